"""`specdec bench` end to end on a tiny model: every method runs, the table and files are written, and outputs of
lossless methods match the transformers baseline. Also the pieces every bench shares: the Spec-Bench reader and
the report files, which never overwrite a result and refuse a bad --out before any measuring starts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from specdec.bench.report import output_dir, save_report, write_new
from specdec.cli import main
from specdec.data.spec_bench import read_questions
from specdec.errors import SpecdecError


def test_bench_runs_side_by_side(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(main, [
        "bench", "--model", str(tiny_model_dir), "--per-category", "1", "--max-new-tokens", "12",
        "--methods", "hf-plain,hf-pld,plain,ngram,recycling", "--out", str(out), "--plot",
    ])
    assert res.exit_code == 0, res.output
    report = json.loads(next(out.glob("*.json")).read_text())
    overall = report["table"]["overall"]
    assert set(overall) == {"hf-plain", "hf-pld", "plain", "ngram", "recycling"}
    assert report["info"]["prompts"] == 13 and report["info"]["threads"] >= 1
    for m in ("plain", "ngram", "recycling"):  # lossless on a tiny fp32 model: equal to transformers greedy
        assert overall[m]["exact_match"] == 1.0, report["mismatches"]
    assert overall["plain"]["tau"] == 1.0
    for m in ("plain", "ngram", "recycling"):  # each step's time beside the sizing curve's prediction for it
        t = overall[m]["step_time"]
        assert t["steps"] >= 13 and t["predicted_ms"] == pytest.approx(t["curve_ms"] + t["host_ms"])
    assert not overall["hf-plain"]["step_time"]
    assert set(report["info"]["latency_curves"]) == {"plain", "ngram", "recycling"}
    assert "plain meas/pred" in res.output and "Step time vs the latency curve" in res.output
    assert "Gain split" in res.output and next(out.glob("*.png")).stat().st_size > 10_000


def test_read_questions_per_category_and_limit():
    qs = read_questions(per_category=2)
    assert len(qs) == 26 and len({q["category"] for q in qs}) == 13
    assert [q["category"] for q in qs[:2]] == [qs[0]["category"]] * 2  # grouped by category
    assert len(read_questions()) == 480 and len(read_questions(per_category=1, limit=5)) == 5


def test_read_questions_errors_are_one_line(tmp_path):
    with pytest.raises(SpecdecError, match="not found: give a Spec-Bench style JSONL to --prompts"):
        read_questions(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x", "turns": ["q"]}\n{"category": "x"}\n')
    with pytest.raises(SpecdecError, match="line 2 is not a Spec-Bench row"):
        read_questions(bad)
    bad.write_text("\n\n")
    with pytest.raises(SpecdecError, match="no prompts found"):
        read_questions(bad)


def test_reports_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr("specdec.bench.report.time.strftime", lambda *_: "20250101-000000")  # one clock second
    out = tmp_path / "new" / "folder"  # created
    report = {"info": {"cpu": "x"}, "table": [1, 2], "markdown": "| a |"}
    first = save_report(report, out, "bench")
    second = save_report(report | {"table": [3]}, out, "bench")
    assert [p.name for p in first] == ["bench-20250101-000000.json", "bench-20250101-000000.md"]
    assert [p.name for p in second] == ["bench-20250101-000000-2.json", "bench-20250101-000000-2.md"]
    assert json.loads(first[0].read_text()) == {"info": {"cpu": "x"}, "table": [1, 2]}  # untouched
    assert json.loads(second[0].read_text())["table"] == [3] and first[1].read_text() == "| a |\n"
    assert write_new(out / "plot.png", b"\x89PNG") == out / "plot.png"
    assert write_new(out / "plot.png", b"again") == out / "plot-2.png"
    assert (out / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_out_that_is_a_file_fails_before_the_bench_runs(tmp_path):
    taken = tmp_path / "results.json"
    taken.write_text("an earlier result")
    with pytest.raises(SpecdecError, match="is a file, not a folder"):
        output_dir(taken)
    with pytest.raises(SpecdecError, match="cannot create the results folder"):
        output_dir(taken / "sub")
    nowhere = str(tmp_path / "no-such-model")  # fails before loading it: the --out check comes first
    for extra in ([], ["--batch", "1,2"]):
        res = CliRunner().invoke(main, ["bench", "--model", nowhere, "--out", str(taken), *extra])
        assert res.exit_code == 2, res.output
        assert "is a file, not a folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert taken.read_text() == "an earlier result"


def test_pairs_bench_checks_its_out_first(tmp_path):
    from specdec.bench.pairs import PairsSpec, run_pairs

    taken = tmp_path / "pairs"
    taken.write_text("x")
    with pytest.raises(SpecdecError, match="is a file, not a folder"):
        run_pairs(PairsSpec(target="no-such-model", out_dir=str(taken)), log=lambda _: None)


def test_method_names_carry_drafter_options_and_formats():
    from specdec.bench.spec_bench import own_plain, split_method

    assert split_method("ngram") == ("ngram", "fp32", {})
    assert split_method("ngram@bf16") == ("ngram", "bf16", {})
    assert split_method("diffusion[cps=false;k_max=8]") == ("diffusion", "fp32", {"cps": False, "k_max": 8})
    assert split_method("diffusion[adl=false]@bf16") == ("diffusion", "bf16", {"adl": False})
    assert own_plain("diffusion[cps=false]") == "plain" and own_plain("diffusion[cps=false]@bf16") == "plain@bf16"
    for bad in ("diffusion[cps]", "diffusion[cps=false", "[cps=false]", "ngram@int3"):
        with pytest.raises(SpecdecError, match="method '"):
            split_method(bad)


def test_bench_runs_a_drafter_with_options_beside_itself(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(main, [
        "bench", "--model", str(tiny_model_dir), "--per-category", "1", "--max-new-tokens", "8",
        "--methods", "plain,ngram,ngram[max_ngram=1]", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    overall = json.loads(next(out.glob("*.json")).read_text())["table"]["overall"]
    assert set(overall) == {"plain", "ngram", "ngram[max_ngram=1]"}
    assert overall["ngram[max_ngram=1]"]["own_exact"] == 1.0
    res = CliRunner().invoke(main, ["bench", "--model", str(tiny_model_dir), "--methods", "plain,ngram[nope=1]",
                                    "--out", str(tmp_path / "b2"), "--max-new-tokens", "4"])
    assert res.exit_code != 0 and "nope" in res.output
