"""`specdec bench` end to end on a tiny model: every method runs, the table and files are written, and outputs of
lossless methods match the transformers baseline."""

from __future__ import annotations

import json

from click.testing import CliRunner

from specdec.bench import load_questions
from specdec.cli import main


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
    assert "Gain split" in res.output and next(out.glob("*.png")).stat().st_size > 10_000


def test_load_questions_per_category():
    qs = load_questions(None, 2)
    assert len(qs) == 26 and len({q["category"] for q in qs}) == 13
