"""The command line through click's CliRunner: JSON output equals transformers' greedy output, streamed text
equals the printed text; bench options reach the bench's spec; bad input gives one error line and exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def reference(model_dir, text: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `text` (no chat template: the tiny tokenizer has none), cut at EOS."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(text, return_tensors="pt")["input_ids"]
    ref = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)[0, ids.shape[1]:]
    ref = ref.tolist()
    return ref[: ref.index(2) + 1] if 2 in ref else ref  # the model's EOS id is 2


@pytest.mark.parametrize("drafter", ["plain", "ngram", "recycling"])
def test_generate_json_matches_transformers(tiny_model_dir, drafter):
    res = run("generate", "the quick brown fox", "--model", str(tiny_model_dir), "--drafter", drafter,
              "--max-new-tokens", "20", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    ref = reference(tiny_model_dir, "the quick brown fox", 20)
    assert out["token_ids"] == ref and len(ref) >= 1
    assert out["text"] == AutoTokenizer.from_pretrained(tiny_model_dir).decode(ref, skip_special_tokens=True)
    assert out["stats"]["new_tokens"] == len(ref) and out["stats"]["tau"] >= 1.0


def test_stream_prints_the_same_text_and_stats(tiny_model_dir):
    args = ["generate", "the lazy dog", "--model", str(tiny_model_dir), "--drafter", "ngram", "--max-new-tokens", "12"]
    whole = run(*args, "--json")
    assert whole.exit_code == 0, whole.output
    out = json.loads(whole.stdout)
    assert out["token_ids"] == reference(tiny_model_dir, "the lazy dog", 12) and out["stats"]["new_tokens"] >= 1
    printed = run(*args)
    streamed = run(*args, "--stream", "--stats")
    assert printed.exit_code == 0 and streamed.exit_code == 0, streamed.output
    assert printed.stdout == out["text"] + "\n"
    assert streamed.stdout == printed.stdout  # pieces as steps are accepted, the same text in the end
    assert "tau=" in streamed.stderr and "histogram" in streamed.stderr


def test_config_file_and_override(tiny_model_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndrafter: ngram\nmax_new_tokens: 7\n")
    res = run("generate", "the quick", "--config", str(cfg), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    ref = reference(tiny_model_dir, "the quick", 7)
    assert out["stats"]["drafter"] == "ngram" and out["token_ids"] == ref
    assert out["stats"]["new_tokens"] == len(ref) >= 1 and (len(ref) == 7 or ref[-1] == 2)  # 7 unless EOS
    res = run("generate", "the quick", "--config", str(cfg), "--max-new-tokens", "3", "--json")
    out = json.loads(res.stdout)
    assert out["token_ids"] == ref[:3] and 1 <= out["stats"]["new_tokens"] <= 3  # the flag wins over the file


def test_bench_options_reach_the_spec(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr("specdec.bench.spec_bench.run_bench", lambda spec, **_: got.append(spec))
    monkeypatch.setattr("specdec.bench.batch.run_batch_bench", lambda spec, **_: got.append(spec))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("drafter: model\ndrafter_options: {draft_model: tiny, k: 3}\nbackend: lean\n")
    assert run("bench", "--drafter", "ngram", "--methods", "hf-plain,plain").exit_code == 0
    assert run("bench", "--config", str(cfg), "--methods", "hf-plain,plain", "--backend", "hf").exit_code == 0
    assert run("bench", "--methods", "hf-plain,plain").exit_code == 0  # nothing chosen: the methods as given
    assert run("bench", "--batch", "1,2", "--drafter", "ngram", "--backend", "lean").exit_code == 0
    assert run("bench", "--batch", "1", "--config", str(cfg)).exit_code == 0
    flag, config, plain, batch_flag, batch_config = got
    # the default model is a GGUF: weights="auto" runs specdec's methods in gguf; the hf backend stays fp32
    assert flag.methods == ("hf-plain", "plain@gguf", "ngram@gguf") and flag.drafter == "ngram"
    assert flag.drafter_options == {}
    assert config.methods == ("hf-plain", "plain", "model") and config.drafter == "model"
    assert config.drafter_options == {"draft_model": "tiny", "k": 3} and config.backend == "hf"
    assert plain.methods == ("hf-plain", "plain@gguf")
    assert (batch_flag.drafter, batch_flag.backend, batch_flag.batch_sizes) == ("ngram", "lean", (1, 2))
    assert batch_flag.weights == "gguf"
    assert batch_config.drafter_options == {"draft_model": "tiny", "k": 3} and batch_config.backend == "lean"


def test_batch_bench_refuses_the_hf_backend_before_loading(tmp_path):
    res = run("bench", "--batch", "1,2", "--backend", "hf", "--model", str(tmp_path / "nowhere"))
    assert res.exit_code == 2 and "use --backend lean or auto" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


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


def test_models_lists_built_ins_architectures_and_block_types():
    result = run("models")
    assert result.exit_code == 0
    assert "gemma3-270m" in result.output and "(the default)" in result.output
    assert "qwen3" in result.output and "mistral" in result.output  # architectures that load
    assert "Q4_K" in result.output and "--weights fp32" in result.output  # block types, and the way out


def _executable(*args: str, stdin: str | None = None):
    """`specdec ARGS` as the installed executable runs it (`specdec.cli.run`, in a fresh interpreter)."""
    import subprocess
    import sys

    code = "import sys; from specdec.cli import run; sys.argv = ['specdec'] + sys.argv[1:]; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_the_executable_ends_generate_quickly_with_its_output_and_status(tiny_model_dir):
    """`run` ends `generate` with os._exit after the atexit handlers: the same stdout as the command in-process,
    exit status 0, and 2 with one error line for bad input; other commands exit as Python does."""
    args = ["generate", "the quick brown fox", "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--json"]
    proc = _executable(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["token_ids"] == json.loads(run(*args).stdout)["token_ids"]
    bad = _executable("generate", "", "--model", str(tiny_model_dir))
    lines = [x for x in bad.stderr.strip().splitlines() if not x.startswith("[specdec] ")]
    assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    version = _executable("--version")
    assert version.returncode == 0 and "version" in version.stdout
