"""`specdec batch`: JSONL in, JSONL out, every row exactly once, errors recorded, resumable after a real kill -9.

The job runs the tiny Gemma 3 directory from conftest (tiny_model_dir) through the `batch` click command, in
process (CliRunner) or in a subprocess that SIGKILLs itself right after a fixed number of records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.errors import SpecdecError
from specdec.config import RunConfig
from specdec.jobs import OutputFile, derived_seed, read_input, row_options
from specdec.jobs.cli import batch

WORDS = "the quick brown fox jumps over the lazy dog speculative decoding drafts and verifies tokens".split()


def prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7) % 11: (i * 7) % 11 + 2 + i % 4])


def write_rows(path: Path, count: int, sampled_every: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(count):
            row = {"id": f"r{i}", "prompt": prompt(i), "max_new_tokens": 8 + i % 17}
            if sampled_every and i % sampled_every == 0:
                row["temperature"] = 0.9
            f.write(json.dumps(row) + "\n")
    return path


def run(*args: str):
    return CliRunner().invoke(batch, [*args, "--no-progress"])


def results(path: Path) -> dict:
    """id -> record without its timings; asserts every id appears once."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: {k: v for k, v in r.items() if k != "stats"} for r in rows}


def test_rows_errors_and_outputs(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "the quick brown fox", "max_new_tokens": 12, "meta": {"k": 1}}),
        json.dumps({"prompt": "the lazy dog", "max_new_tokens": 5}),  # id defaults to the line number: 2
        "",  # blank lines are skipped
        "{not json",
        json.dumps({"id": "empty", "prompt": "   "}),
        json.dumps({"id": "long", "prompt": "the fox", "max_new_tokens": 10_000}),
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}]}),  # no chat template
        json.dumps({"id": "typo", "promt": "the fox"}),
        json.dumps({"id": "badval", "prompt": "the fox", "top_p": "high"}),
        json.dumps({"id": 7, "prompt": "drafts and verifies", "max_new_tokens": 9, "stop": ["zzz"]}),
    ]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    res = run(str(src), "--out", str(out), "--model", str(tiny_model_dir), "--drafter", "ngram",
              "--tree-budget", "4", "--width", "3", "--raw")
    assert res.exit_code == 0, res.output
    assert "3 ok, 6 failed" in res.stdout
    got = results(out)
    assert set(got) == {"a", 2, None, "empty", "long", "chat", "typo", "badval", 7}  # None: line 4, no id
    errors = {k: v["error"] for k, v in got.items() if "error" in v}
    assert got[None]["line"] == 4 and "not valid JSON" in errors[None] and "empty prompt" in errors["empty"]
    assert "exceeds the model's context" in errors["long"] and "chat template" in errors["chat"]
    assert "unknown field" in errors["typo"] and "'top_p' must be a finite number" in errors["badval"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for rid, text, n in (("a", "the quick brown fox", 12), (2, "the lazy dog", 5), (7, "drafts and verifies", 9)):
        ids = tok(text, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0)[0, ids.shape[1]:].tolist()
        ref = ref[: ref.index(2) + 1] if 2 in ref else ref  # the tiny model's EOS id is 2
        assert got[rid]["token_ids"] == ref and got[rid]["text"] == tok.decode(ref, skip_special_tokens=True)
    assert got["a"]["meta"] == {"k": 1} and got["a"]["prompt_tokens"] == tok("the quick brown fox",
                                                                               return_tensors="pt")["input_ids"].numel()
    again = run(str(src), "--out", str(out), "--model", str(tiny_model_dir))  # all done: nothing to decode
    assert again.exit_code == 0 and "0 ok, 0 failed, 9 already done" in again.stdout


def test_null_nan_and_infinite_values_are_error_rows_not_a_crash(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        json.dumps({"id": "ok1", "prompt": "the quick brown fox", "max_new_tokens": 4}),
        json.dumps({"id": "null-max", "prompt": "the fox", "max_new_tokens": None}),
        json.dumps({"id": "null-temp", "prompt": "the fox", "temperature": None}),
        '{"id": "nan-temp", "prompt": "the fox", "temperature": NaN}',  # Python's json reads these literals
        '{"id": "inf-temp", "prompt": "the fox", "temperature": Infinity}',
        '{"id": "inf-top-p", "prompt": "the fox", "top_p": -Infinity}',
        json.dumps({"id": "huge-seed", "prompt": "the fox", "temperature": 0.8, "seed": 2 ** 70}),
        json.dumps({"id": "ok2", "prompt": "the lazy dog", "max_new_tokens": 3}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    args = [str(src), "--out", str(out), "--model", str(tiny_model_dir), "--drafter", "ngram", "--tree-budget", "4",
            "--width", "2"]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "2 ok, 6 failed" in res.stdout
    got = results(out)
    assert len(got["ok1"]["token_ids"]) >= 1 and len(got["ok2"]["token_ids"]) >= 1
    errors = {k: v["error"] for k, v in got.items() if "error" in v}
    assert set(errors) == {"null-max", "null-temp", "nan-temp", "inf-temp", "inf-top-p", "huge-seed"}
    assert "'max_new_tokens' must be an integer, got null" in errors["null-max"]
    assert "'temperature' must be a finite number, got null" in errors["null-temp"]
    assert "got NaN" in errors["nan-temp"] and "got Infinity" in errors["inf-temp"]
    assert "got -Infinity" in errors["inf-top-p"] and "'seed' must be in 0.." in errors["huge-seed"]
    assert all(len(e.splitlines()) == 1 for e in errors.values())
    again = run(*args)  # the error rows are recorded: a rerun has nothing left to do
    assert again.exit_code == 0 and "0 ok, 0 failed, 8 already done" in again.stdout, again.output


def test_row_options_defaults_and_checks():
    cfg = RunConfig(max_new_tokens=9, temperature=0.0, seed=5)
    assert row_options({"prompt": "x"}, cfg, "a")["max_new_tokens"] == 9  # absent: the job's setting
    sampled = row_options({"prompt": "x", "temperature": 1}, cfg, "a")
    assert sampled["temperature"] == 1.0 and sampled["seed"] == derived_seed(5, "a")  # not the job seed itself
    assert row_options({"prompt": "x", "temperature": 1, "seed": 3}, cfg, "a")["seed"] == 3
    for fields, message in [
        ({"max_new_tokens": None}, "must be an integer, got null"),
        ({"max_new_tokens": 2.5}, "must be an integer, got 2.5"),
        ({"top_k": True}, "must be an integer, got true"),
        ({"temperature": float("nan")}, "must be a finite number, got NaN"),
        ({"top_p": 10 ** 400}, "must be a finite number"),
        ({"seed": -1}, "'seed' must be in 0.."),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ]:
        with pytest.raises(SpecdecError, match=message):
            row_options({"prompt": "x", **fields}, cfg, "a")


KILL_AFTER_10 = """
import os, signal, sys
from specdec.jobs import cli, output
write = output.OutputFile.write
written = []
def write_then_die(self, record):
    write(self, record)
    written.append(record["id"])
    if len(written) == 10:
        os.kill(os.getpid(), signal.SIGKILL)
output.OutputFile.write = write_then_die
sys.argv[0] = "specdec-batch"
cli.batch()
"""


def test_resume_after_kill_9_gives_every_row_once(tiny_model_dir, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 80, sampled_every=5)
    args = [str(src), "--model", str(tiny_model_dir), "--drafter", "recycling", "--tree-budget", "4",
            "--width", "4", "--max-new-tokens", "24"]
    killed = tmp_path / "killed.jsonl"
    # the job SIGKILLs itself right after its 10th record is written and fsynced: a kill at a fixed point, not a
    # race against the job's speed
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_10, *args, "--out", str(killed), "--no-progress",
                           "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = killed.read_bytes().count(b"\n")
    assert partial == 10
    with killed.open("ab") as f:  # as if the kill had cut a write short too
        f.write(b'{"id": "r9999", "text": "tor')
    resumed = run(*args, "--out", str(killed))
    assert resumed.exit_code == 0, resumed.output
    assert f"{partial} already done" in resumed.stdout
    whole = tmp_path / "whole.jsonl"
    assert run(*args, "--out", str(whole)).exit_code == 0
    assert results(killed) == results(whole)  # every id once, the same tokens as an uninterrupted run
    assert len(results(whole)) == 80 and all("error" not in r for r in results(whole).values())
    sampled = results(whole)["r5"]
    assert sampled["seed"] == derived_seed(0, "r5")  # reproducible without a seed in the row


def test_torn_and_garbled_output_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputFile(out) as f:  # a new output: the state file beside it makes it this job's
        assert f.done() == set()
        f.write({"id": "a"})
    assert (tmp_path / "out.jsonl.specdec-job.json").is_file()
    with out.open("ab") as f:
        f.write(b'{"id": 2}\n{"id": "c", "te')  # a torn last write
    with OutputFile(out) as f:
        assert f.done() == {'"a"', "2"}
        with pytest.raises(SpecdecError, match="another run"):
            OutputFile(out)  # locked while this run writes it
    assert out.read_bytes() == b'{"id": "a"}\n{"id": 2}\n'
    with out.open("ab") as f:
        f.write(b'{"id": 3, "te\n')  # a complete line of garbage at the end: torn too
    with OutputFile(out) as f:
        assert f.done() == {'"a"', "2"}
    assert out.read_bytes() == b'{"id": "a"}\n{"id": 2}\n'
    with out.open("ab") as f:
        f.write(b'not a row\n{"id": 3}\n')
    with OutputFile(out) as f, pytest.raises(SpecdecError, match="line 3 is not a result row"):
        f.done()


def test_an_output_not_made_by_the_job_is_never_read_or_cut(tmp_path):
    mine = tmp_path / "mine.jsonl"
    content = b'{"id": 1, "x": 1}\n{"id": 2, "x": 2}\n{"id": 3, "x": 3}'  # looks like ours, no final newline
    mine.write_bytes(content)
    with pytest.raises(SpecdecError, match="did not write"):
        OutputFile(mine)
    assert mine.read_bytes() == content
    ours = tmp_path / "ours.jsonl"
    with OutputFile(ours) as f:
        f.write({"id": 1})
    ours.unlink()
    ours.write_bytes(content)  # another file in the output's place: its inode is not the one the state names
    with pytest.raises(SpecdecError, match="did not write"):
        OutputFile(ours)
    assert ours.read_bytes() == content


def test_out_hard_linked_to_the_input_is_refused(tiny_model_dir, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 4)
    before = src.read_bytes()
    os.link(src, tmp_path / "link.jsonl")
    res = run(str(src), "--out", str(tmp_path / "link.jsonl"), "--model", str(tiny_model_dir))
    assert res.exit_code == 2 and "is the input file" in res.stderr, res.output
    assert src.read_bytes() == before


def test_bad_lines_and_poison_rows_are_error_rows_and_the_job_goes_on(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [json.dumps({"id": i, "prompt": prompt(i), "max_new_tokens": 4}) for i in range(6)]
    rows[2] = '{"id": 2, "prompt": "cut'  # a malformed line: its line number (3) is another row's id
    rows[3] = json.dumps({"id": 3, "prompt": "x y", "temperature": 1e-45})  # sampling would overflow
    rows[4] = json.dumps({"id": 4, "messages": "hello"})  # not a chat
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    res = run(str(src), "--out", str(out), "--model", str(tiny_model_dir))
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    errors = {(r["id"], r.get("line")): r["error"] for r in records if "error" in r}
    assert set(errors) == {(None, 3), (3, None), (4, None)}, errors
    assert "not valid JSON" in errors[None, 3] and "temperature must be 0 (greedy) or in" in errors[3, None]
    assert "'messages' must be a list" in errors[4, None]
    assert sorted(r["id"] for r in records if "error" not in r) == [0, 1, 5]
    again = run(str(src), "--out", str(out), "--model", str(tiny_model_dir))  # every line, the bad one too, done
    assert again.exit_code == 0 and "6 already done" in again.stdout, again.output
    assert len(out.read_text().splitlines()) == 6


def test_batch_reads_standard_input(tiny_model_dir, tmp_path):
    rows = "".join(json.dumps({"id": i, "prompt": prompt(i), "max_new_tokens": 3}) + "\n" for i in range(3))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(batch, ["-", "--out", str(out), "--model", str(tiny_model_dir), "--no-progress"],
                             input=rows)
    assert res.exit_code == 0, res.output
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == [0, 1, 2]


def test_a_failed_write_leaves_whole_lines_and_the_rerun_resumes(tiny_model_dir, tmp_path):
    """A real write fault: the job runs under a file-size limit (RLIMIT_FSIZE) that its output outgrows."""
    import resource

    src = write_rows(tmp_path / "in.jsonl", 12)
    out, whole = tmp_path / "out.jsonl", tmp_path / "whole.jsonl"
    args = [str(src), "--out", str(out), "--model", str(tiny_model_dir), "--width", "2", "--no-progress"]
    # the same job unlimited first: every cache the limited run would otherwise write (numba's compiled kernels,
    # the latency curve) is then on disk, so the size limit can only hit the output
    assert run(str(src), "--out", str(whole), "--model", str(tiny_model_dir), "--width", "2").exit_code == 0

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (700, 700))

    proc = subprocess.run([sys.executable, "-m", "specdec.jobs.cli", *args, "--threads", "1"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("[specdec] ")]
    assert proc.returncode == 2 and len(lines) == 1 and "cannot write to" in lines[0], proc.stderr
    assert "rerun the same command to resume" in lines[0]
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < data.count(b"\n") < 12  # whole lines only, some written
    partial = data.count(b"\n")
    resumed = run(*args)
    assert resumed.exit_code == 0 and f"{partial} already done" in resumed.stdout, resumed.output
    assert results(out) == results(whole)  # every row once, as the uninterrupted job wrote them


def test_one_line_errors(tiny_model_dir, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 2)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "prompt": "a b"}\n{"prompt": "c d"}\n{"id": 1, "prompt": "e"}\n')
    cases = [
        ([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")], "not found"),
        ([str(src), "--out", str(tmp_path / "no" / "such" / "dir.jsonl")], "cannot write output file"),
        ([str(src), "--out", str(tmp_path)], "cannot write output file"),
        ([str(dup), "--out", str(tmp_path / "o.jsonl")], "line 3 repeats id 1"),
        ([str(src), "--out", str(src)], "is the input file"),
        ([str(src), "--out", str(tmp_path / "o.jsonl"), "--width", "0"], "--width must be >= 1"),
    ]
    for args, message in cases:
        res = run(*args, "--model", str(tiny_model_dir))
        assert res.exit_code == 2, res.output
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_ids_must_be_strings_or_integers(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n{"id": [1], "prompt": "y"}\n')
    with pytest.raises(SpecdecError, match="line 2: id must be a string or an integer"):
        read_input(src)


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _ray_available(), reason="ray is not installed (pip install 'specdec[ray]')")
def test_ray_two_workers_match_single_process(tiny_model_dir, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", 40, sampled_every=4)
    args = [str(src), "--model", str(tiny_model_dir), "--drafter", "recycling", "--tree-budget", "4",
            "--width", "4", "--max-new-tokens", "16"]
    single, on_ray = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    assert run(*args, "--out", str(single)).exit_code == 0
    res = run(*args, "--out", str(on_ray), "--ray", "2")
    assert res.exit_code == 0, res.output
    assert "40 ok" in res.stdout
    assert results(on_ray) == results(single)
