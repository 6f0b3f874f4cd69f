"""The command line through click's CliRunner: JSON output equals transformers' greedy output; bad input gives
one error line and exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("drafter", ["plain", "ngram", "recycling"])
def test_generate_json_matches_transformers(tiny_model_dir, drafter):
    res = run("generate", "the quick brown fox", "--model", str(tiny_model_dir), "--drafter", drafter,
              "--max-new-tokens", "20", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok("the quick brown fox", return_tensors="pt")["input_ids"]
    ref = model.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=0)[0, ids.shape[1]:].tolist()
    ref = ref[: ref.index(2) + 1] if 2 in ref else ref  # the model's EOS id is 2
    assert out["token_ids"] == ref
    assert out["text"] == tok.decode(ref, skip_special_tokens=True)
    assert out["stats"]["new_tokens"] == len(ref) and out["stats"]["tau"] >= 1.0


def test_stream_and_stats(tiny_model_dir):
    res = run("generate", "the lazy dog", "--model", str(tiny_model_dir), "--drafter", "ngram",
              "--max-new-tokens", "12", "--stream", "--stats")
    assert res.exit_code == 0, res.output
    assert "tau=" in res.stderr and "histogram" in res.stderr


def test_config_file_and_override(tiny_model_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndrafter: ngram\nmax_new_tokens: 7\n")
    res = run("generate", "the quick", "--config", str(cfg), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["stats"]["drafter"] == "ngram"
    assert json.loads(res.stdout)["stats"]["new_tokens"] <= 7
    res = run("generate", "the quick", "--config", str(cfg), "--max-new-tokens", "3", "--json")
    assert json.loads(res.stdout)["stats"]["new_tokens"] <= 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drafter", "nope"], "unknown drafter 'nope'"),
        (["--tree", "no-such-tree"], "unknown tree 'no-such-tree'"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_bad_options_give_one_line(tiny_model_dir, args, message):
    res = run("generate", "the quick", "--model", str(tiny_model_dir), *args)
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_missing_model_and_empty_prompt(tiny_model_dir, tmp_path):
    res = run("generate", "hi", "--model", str(tmp_path / "nowhere"))
    assert res.exit_code == 2 and "not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run("generate", "   ", "--model", str(tiny_model_dir))
    assert res.exit_code == 2 and "empty prompt" in res.stderr


def test_over_long_prompt(tiny_model_dir):
    res = run("generate", "fox " * 5000, "--model", str(tiny_model_dir), "--drafter", "plain")
    assert res.exit_code == 2 and "exceeds the model's context" in res.stderr


def test_broken_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    res = run("generate", "hi", "--config", str(bad))
    assert res.exit_code == 2 and "not valid YAML" in res.stderr
    bad.write_text("modle: x\n")
    res = run("generate", "hi", "--config", str(bad))
    assert res.exit_code == 2 and "unknown setting" in res.stderr
