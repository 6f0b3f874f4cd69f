"""Step times, predicted and measured: the engine records every step; the bench's columns come from them.

No assertion here depends on how fast anything ran: the engine test checks what is recorded (one entry per
step, shapes and sums that must hold), the report tests feed synthetic rows with chosen numbers.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from specdec.bench import step_time
from specdec.bench.spec_bench import Row, summarise
from specdec.drafters.base import BaseDrafter, Draft
from specdec.engine import DecodeStats, Engine, Request, StopConditions
from specdec.trees.sizer import LatencyCurve
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier
from specdec.verifiers.lean import LeanVerifier

PROMPT = [5, 17, 99, 3, 250, 7, 64, 301]


class WrongChain(BaseDrafter):
    """Proposes `depth` tokens nobody accepts, so every step scores exactly depth + 1 nodes."""

    name = "wrong-chain"

    def __init__(self, depth: int = 3):
        self.depth = depth

    def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
        d = min(self.depth, budget - 1)
        return Draft(Tree.chain(d), torch.tensor([int(context[-1])] + [0] * d))


def test_engine_records_each_step_nodes_and_times():
    res = Engine(HFVerifier(make_tiny_model("llama")), WrongChain(3), sizer=8).generate(PROMPT, StopConditions(6))
    s = res.stats
    assert len(s.step_nodes) == len(s.step_s) == len(s.step_verify_s) == s.steps == len(s.tree_sizes)
    assert s.step_nodes == s.tree_sizes == [4] * s.steps  # width 1, no aux nodes: the row's own tree
    assert all(0 < v <= t for v, t in zip(s.step_verify_s, s.step_s))  # the verify is part of the step
    assert sum(s.step_verify_s) == pytest.approx(s.verify_s)


def test_batched_steps_record_the_whole_call():
    eng = Engine(LeanVerifier(make_tiny_model("llama"), gemm="linear"), WrongChain(2), sizer=8, width=2)
    res = eng.generate_batch([Request(PROMPT, StopConditions(5)), Request(PROMPT[:5], StopConditions(5))])
    for r in res.results:  # both rows in every step: each step scored 3 + 3 nodes
        assert r.stats.tree_sizes == [3] * r.stats.steps and r.stats.step_nodes == [6] * r.stats.steps


def test_step_times_predict_from_the_curve():
    curve = LatencyCurve((1, 4), (0.010, 0.040))
    stats = DecodeStats(step_nodes=[1, 4, 2], step_s=[0.02, 0.05, 0.03], step_verify_s=[0.01, 0.04, 0.02])
    t = step_time.StepTimes.of(stats, curve)
    assert t.nodes == [1, 4, 2] and t.curve_s == pytest.approx([0.010, 0.040, 0.020])


def row(qid: int, cat: str, method: str, steps: step_time.StepTimes | None) -> Row:
    return Row(qid, cat, method, 3, 8, 1.0, 2.0, [1, 2], [7], steps=steps)


def test_report_columns_come_from_the_rows_numbers():
    # ngram: 2 prompts, 3 steps in all; pooled means: step (30 + 50 + 40) / 3 = 40 ms, verify (20 + 40 + 30) / 3
    # = 30 ms, so host 10 ms; curve (15 + 35 + 25) / 3 = 25 ms; predicted 25 + 10 = 35 ms; ratio 40 / 35
    a = step_time.StepTimes([1, 4], [0.030, 0.050], [0.020, 0.040], [0.015, 0.035], [0.002, 0.004])
    b = step_time.StepTimes([2], [0.040], [0.030], [0.025], [0.003])
    rows = [row(1, "x", "hf-plain", None), row(1, "x", "ngram", a),
            row(2, "y", "hf-plain", None), row(2, "y", "ngram", b)]
    info = {"prompts": 2, "max_new_tokens": 8, "model": "tiny", "dtype": "float32", "cpu": "Test CPU",
            "threads": 2, "torch": "t", "transformers": "tf", "loadavg": 3.5}
    report = summarise(rows, ("hf-plain", "ngram"), info)
    t = report["table"]["overall"]["ngram"]["step_time"]
    assert t["steps"] == 3 and t["nodes"] == pytest.approx(7 / 3)
    assert (t["step_ms"], t["verify_ms"], t["host_ms"]) == pytest.approx((40.0, 30.0, 10.0))
    assert t["drafter_ms"] == pytest.approx(3.0)  # (2 + 4 + 3) / 3: the drafter's share of the host time
    assert (t["curve_ms"], t["predicted_ms"], t["ratio"]) == pytest.approx((25.0, 35.0, 40 / 35))
    assert report["table"]["x"]["ngram"]["step_time"]["ratio"] == pytest.approx(0.040 / 0.035)  # (30+50)/2 / (25+10)
    assert report["table"]["overall"]["hf-plain"]["step_time"] == {}  # transformers: no steps, no columns
    md = report["markdown"]
    header = next(line for line in md.splitlines() if line.startswith("| category"))
    assert header.endswith("| ngram step ms | ngram pred ms | ngram meas/pred |") and "hf-plain step" not in header
    overall = next(line for line in md.splitlines() if line.startswith("| **overall**"))
    assert overall.endswith("| 40.0 | 35.0 | 1.14 |")
    assert "| ngram | 3 | 2.33 | 25.0 | 30.0 | 10.00 | 3.00 | 35.0 | 40.0 | 1.14 |" in md
    assert "Test CPU, 2 threads, load average 3.50" in md  # the machine beside the numbers
    separator = next(line for line in md.splitlines() if line.startswith("|---|"))
    assert separator.count("---|") == header.count("|") - 1  # one separator per column


def test_rows_without_steps_leave_the_table_as_it_was():
    rows = [row(1, "x", "hf-plain", None), row(1, "x", "model", None)]  # e.g. the pairs bench
    info = {"prompts": 1, "max_new_tokens": 8, "model": "tiny", "dtype": "float32", "cpu": "c", "threads": 1,
            "torch": "t", "transformers": "tf"}
    md = summarise(rows, ("hf-plain", "model"), info)["markdown"]
    assert "step ms" not in md and "latency curve" not in md
