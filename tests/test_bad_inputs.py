"""Bad input never crashes, never loses a file, never runs foreign code: one table, every row a case.

CLI cases run through click's CliRunner on a tiny Gemma 3 directory: each must exit 2 with ONE line on stderr
(no traceback), say what it says, and leave the files it names untouched. API cases raise SpecdecError.

Run as a script, the CLI table runs each case through a real `specdec` process instead and prints its exit
code and stderr, to compare builds side by side:
    python tests/test_bad_inputs.py [--cmd "python other_build.py"]
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]  # "{model}" is the tiny model directory, "{dir}" the case's own folder
    says: str  # a substring of the one stderr line
    files: dict[str, str] = field(default_factory=dict)  # created first; must be unchanged afterwards
    env: dict[str, str] = field(default_factory=dict)
    stdin: str = ""


GOOD_ROW = '{"id": 1, "prompt": "hello"}\n'
REMOTE_CONFIG = json.dumps({"model_type": "evil_net", "auto_map": {
    "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}})
REMOTE_CODE = "open('{dir}/evil/RAN', 'w').write('ran')\n"  # transformers would run a copy elsewhere
GEN = ["generate", "hello", "--model", "{model}", "--max-new-tokens", "2"]

CASES = [
    # data loss
    Case("batch --out over a text file", ["batch", "{dir}/in.jsonl", "--out", "{dir}/important.txt", "--model",
         "{model}"], "did not write", {"in.jsonl": GOOD_ROW, "important.txt": "my notes, no newline"}),
    Case("batch --out over a text file with lines", ["batch", "{dir}/in.jsonl", "--out", "{dir}/notes.txt",
         "--model", "{model}"], "did not write", {"in.jsonl": GOOD_ROW, "notes.txt": "a\nb\n"}),
    Case("batch --out over the user's JSONL of id rows, no final newline", ["batch", "{dir}/in.jsonl", "--out",
         "{dir}/mine.jsonl", "--model", "{model}"], "did not write",
         {"in.jsonl": GOOD_ROW, "mine.jsonl": '{"id": 1, "x": 1}\n{"id": 2, "x": 2}\n{"id": 3, "x": 3}'}),
    Case("batch --out over the user's JSONL of id rows, garbled last line", ["batch", "{dir}/in.jsonl", "--out",
         "{dir}/mine.jsonl", "--model", "{model}"], "did not write",
         {"in.jsonl": GOOD_ROW, "mine.jsonl": '{"id": 1, "x": 1}\n{"id": 2, "x": 2}\n{"id": 3, "x\n'}),
    Case("batch --out /dev/full", ["batch", "{dir}/in.jsonl", "--out", "/dev/full", "--model", "{model}"],
         "is a character device", {"in.jsonl": GOOD_ROW}),
    Case("batch input is a folder", ["batch", "{dir}/sub", "--out", "{dir}/o.jsonl", "--model", "{model}"],
         "is a folder", {"sub/x": "x"}),
    Case("batch input /dev/zero", ["batch", "/dev/zero", "--out", "{dir}/o.jsonl", "--model", "{model}"],
         "is a character device"),
    Case("bench --out is a file", ["bench", "--model", "{model}", "--methods", "plain", "--max-new-tokens", "2",
         "--out", "{dir}/results"], "is a file", {"results": "keep me"}),
    # foreign code
    Case("auto_map model answered y", ["generate", "hi", "--model", "{dir}/evil"], "does not support",
         {"evil/config.json": REMOTE_CONFIG, "evil/evil.py": REMOTE_CODE}, stdin="y\ny\n"),
    # poison values and hangs
    Case("--temperature nan", GEN + ["--temperature", "nan"], "finite"),
    Case("--temperature inf", GEN + ["--temperature", "inf"], "finite"),
    Case("--temperature 1e-45", GEN + ["--temperature", "1e-45"], "temperature must be 0 (greedy) or in"),
    Case("--temperature 1e-300", GEN + ["--temperature", "1e-300"], "temperature must be 0 (greedy) or in"),
    Case("--temperature 1e30", GEN + ["--temperature", "1e30"], "temperature must be 0 (greedy) or in"),
    Case("--tree chain-100000", GEN + ["--tree", "chain-100000"], "at most"),
    Case("--tree-budget 100000", GEN + ["--tree-budget", "100000"], "tree_budget must be"),
    Case("--tree-budget 0", GEN + ["--tree-budget", "0"], "tree_budget must be"),
    # drafter options: typos, absurd sizes, malformed specs
    Case("auto[...] typo", GEN + ["--drafter", "auto[propose_node=8]"], "propose_node"),
    Case("auto[propose_nodes=10**12]", GEN + ["--drafter", "auto[propose_nodes=1000000000000]"],
         "propose_nodes must be a whole number in 2..1024"),
    Case("recycling[k=10**12]", GEN + ["--drafter", "recycling[k=1000000000000]"], "k must be a whole number in 1..64"),
    Case("ngram[max_ngram=10**9]", GEN + ["--drafter", "ngram[max_ngram=1000000000]"],
         "max_ngram must be a whole number in 1..32"),
    Case("ngram[branches=2.5]", GEN + ["--drafter", "ngram[branches=2.5]"], "branches must be a whole number"),
    Case("diffusion[beam=10**6]", GEN + ["--drafter", "diffusion[beam=1000000]"], "beam must be a whole number in 1..16"),
    Case("diffusion[mass=nan]", GEN + ["--drafter", "diffusion[mass=.nan]"], "mass must be a number in"),
    Case("lexical[alternatives=10**6]", GEN + ["--drafter", "lexical[alternatives=1000000]"],
         "alternatives must be a whole number in 0..16"),
    Case("auto[drafters=ngram (unbalanced)", GEN + ["--drafter", "auto[drafters=ngram"], "write options as"),
    # wrong types in a config file
    Case("config temperature: hot", GEN + ["--config", "{dir}/c.yaml"], "temperature", {"c.yaml": "temperature: hot\n"}),
    Case("config max_new_tokens: ten", ["generate", "hello", "--model", "{model}", "--config", "{dir}/c.yaml"],
         "max_new_tokens", {"c.yaml": "max_new_tokens: ten\n"}),
    Case("config threads: two", GEN + ["--config", "{dir}/c.yaml"], "threads", {"c.yaml": "threads: two\n"}),
    Case("config drafter_options: [1, 2]", GEN + ["--config", "{dir}/c.yaml"], "drafter_options must be a mapping",
         {"c.yaml": "drafter_options: [1, 2]\n"}),
    Case("config stop_strings: END", GEN + ["--config", "{dir}/c.yaml"], "stop_strings must be a list",
         {"c.yaml": "stop_strings: END\n"}),
    Case("config strict: maybe", GEN + ["--config", "{dir}/c.yaml"], "strict", {"c.yaml": "strict: maybe\n"}),
    # flags
    Case("--threads -1", GEN + ["--threads", "-1"], "threads must be"),
    Case("--threads 0", GEN + ["--threads", "0"], "threads must be"),
    Case("--stop ''", GEN + ["--stop", ""], "non-empty"),
    Case("non-UTF-8 prompt", ["generate", "caf\udce9", "--model", "{model}"], "UTF-8"),
    Case("tree YAML malformed", GEN + ["--tree", "{dir}/t.yaml"], "line 2", {"t.yaml": "name: t\n  bad: [\n"}),
    Case("tree rank_paths: []", GEN + ["--tree", "{dir}/t.yaml"], "no nodes",
         {"t.yaml": "name: t\ndescription: d\nrank_paths: []\n"}),
    Case("bench --per-category 0", ["bench", "--model", "{model}", "--per-category", "0"], "per-category must be"),
    Case("SPECDEC_CACHE is a file", GEN, "not a folder", {"cachefile": "x"}, env={"SPECDEC_CACHE": "{dir}/cachefile"}),
    Case("--cache-dir is a file", GEN + ["--cache-dir", "{dir}/cachefile"], "not a folder", {"cachefile": "x"}),
]


def _fill(text: str, model: Path, folder: Path) -> str:
    return text.replace("{model}", str(model)).replace("{dir}", str(folder))


def _prepare(case: Case, model: Path, folder: Path) -> dict[Path, bytes]:
    made = {}
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(content, model, folder))
        made[path] = path.read_bytes()
    return made


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input(case: Case, tiny_model_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from specdec.cli import main

    made = _prepare(case, tiny_model_dir, tmp_path)
    for k, v in case.env.items():
        monkeypatch.setenv(k, _fill(v, tiny_model_dir, tmp_path))
    args = [_fill(a, tiny_model_dir, tmp_path) for a in case.args]
    result = CliRunner().invoke(main, args, input=case.stdin or None)
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("[specdec] ")]  # progress logs
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert case.says in lines[0], lines[0]
    for path, content in made.items():  # nothing the user had was lost or changed
        assert path.read_bytes() == content, path
    assert not (tmp_path / "evil" / "RAN").exists()  # no foreign code ran


# ---------------------------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def decoder():
    from conftest import make_tiny_model, make_tiny_tokenizer

    import specdec

    return specdec.SpecDecoder(make_tiny_model("llama"), make_tiny_tokenizer(), drafter="ngram", backend="lean")


API_CASES = [
    ("max_new_tokens=None", dict(max_new_tokens=None), "max_new_tokens must be a whole number"),
    ("max_new_tokens=8.5", dict(max_new_tokens=8.5), "max_new_tokens must be a whole number"),
    ("temperature='0.5'", dict(temperature="0.5"), "temperature must be a finite number"),
    ("temperature=nan", dict(temperature=float("nan")), "temperature must be a finite number"),
    ("top_k=2.5", dict(top_k=2.5), "top_k must be a whole number"),
    ("eos_token_id=-5", dict(eos_token_id=-5), "eos_token_id must be in"),
    ("stop_strings=['']", dict(stop_strings=[""]), "stop strings must be non-empty"),
]


@pytest.mark.parametrize("name, kwargs, says", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_arguments(decoder, name, kwargs, says):
    from specdec.errors import SpecdecError

    with pytest.raises(SpecdecError, match=says):
        decoder.generate_ids([5, 6, 7], **kwargs)


def test_api_bad_prompts_and_drafters(decoder):
    import torch

    import specdec
    from specdec.errors import SpecdecError

    with pytest.raises(SpecdecError, match="token ids must be integers"):
        decoder.generate_ids([5.0, 6.7], max_new_tokens=2)  # floats were silently truncated
    with pytest.raises(SpecdecError, match="token ids must be integers"):
        decoder.generate_ids(torch.tensor([5.0, 6.0]), max_new_tokens=2)
    with pytest.raises(SpecdecError, match="contradictory"):
        specdec.generate(decoder, torch.tensor([[5, 6]]), do_sample=True, temperature=0.0)
    with pytest.raises(SpecdecError, match="lacks name, needs"):
        specdec.SpecDecoder(decoder.model, drafter=123)


def test_latency_cache_holding_null_is_measured_again(tmp_path):
    from conftest import make_tiny_model

    from specdec.trees.calibration import cached_curve
    from specdec.verifiers.lean import LeanVerifier

    v = LeanVerifier(make_tiny_model("llama"), gemm="linear")
    (tmp_path / "latency").mkdir()
    (tmp_path / "latency" / "k.json").write_text("null")
    curve = cached_curve(v, "k", tmp_path)
    assert curve.sizes[0] == 1 and json.loads((tmp_path / "latency" / "k.json").read_text())["sizes"]


def test_stale_staging_directories_are_removed_and_published_files_are_readable(tmp_path):
    from specdec.models.loading import _publish, remove_stale_staging

    target = tmp_path / "models" / "m"
    target.parent.mkdir()
    stale = target.parent / ".m.staging-abc123.partial"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 10)
    other = target.parent / ".other.staging-abc.partial"  # another model's staging: not ours to remove
    other.mkdir()
    remove_stale_staging(target)
    assert not stale.exists() and other.exists()
    staging = target.parent / ".m.staging-new.partial"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"w")
    os.chmod(staging / "model.safetensors", 0o600)
    _publish(staging, target)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------- script


def _run_table(cmd: list[str]) -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny_model, make_tiny_tokenizer

    root = Path(tempfile.mkdtemp())
    model = root / "tiny"
    make_tiny_model("gemma3").save_pretrained(model)
    make_tiny_tokenizer().save_pretrained(model)
    print("| input | exit | stderr lines (logs aside) | files kept, no code ran | last stderr line |\n|---|---|---|---|---|")
    for i, case in enumerate(CASES):
        folder = root / f"case{i}"
        folder.mkdir()
        made = _prepare(case, model, folder)
        env = os.environ | {k: _fill(v, model, folder) for k, v in case.env.items()}
        args = [_fill(a, model, folder) for a in case.args]
        try:
            proc = subprocess.run(cmd + args, input=case.stdin, capture_output=True, text=True, env=env, timeout=90)
            code, stderr = str(proc.returncode), proc.stderr
        except subprocess.TimeoutExpired as err:
            code, stderr = "hung (killed at 90 s)", (err.stderr or b"").decode(errors="replace")
        kept = all(p.read_bytes() == c for p, c in made.items()) and not (folder / "evil" / "RAN").exists()
        lines = [x for x in stderr.strip().splitlines() if not x.startswith("[specdec] ")]  # progress logs
        first = (lines[-1] if lines else "").replace("|", "/")[:90]
        print(f"| {case.id} | {code} | {len(lines)} | {'yes' if kept else 'NO'} | {first} |", flush=True)


if __name__ == "__main__":
    command = sys.argv[sys.argv.index("--cmd") + 1] if "--cmd" in sys.argv else "specdec"
    _run_table(shlex.split(command))


def test_quant_weights_need_the_gguf_format():
    import specdec
    from conftest import make_tiny_model, make_tiny_tokenizer
    from specdec.errors import SpecdecError

    with pytest.raises(SpecdecError, match="weights='gguf'"):
        specdec.SpecDecoder(make_tiny_model("llama"), make_tiny_tokenizer(), drafter="plain", weights="fp32",
                            quant={})
