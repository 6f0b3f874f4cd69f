"""Hardware-aware tree sizing: latency curves, rank statistics, and the host time the allocator prices in."""

from __future__ import annotations

import pytest

from conftest import make_tiny_model
from specdec.trees.sizer import NodeAllocator
from specdec.drafters.recycling import RankRates
from specdec.trees.calibration import cached_curve
from specdec.trees.sizer import LatencyCurve
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier


def test_curve_interpolates_and_extrapolates():
    curve = LatencyCurve((1, 4, 16), (0.10, 0.13, 0.25))
    assert curve(1) == pytest.approx(0.10) and curve(4) == pytest.approx(0.13)
    assert curve(10) == pytest.approx(0.19)  # halfway from 4 to 16
    assert curve(28) == pytest.approx(0.37)  # slope of the last segment continues
    assert curve.ratios()[16] == pytest.approx(2.5)


def test_rank_rates_count_tries_and_hits():
    # root -> ranks 0, 1; node 1 (rank 0) -> rank 0 child (node 3). Accepted path: root, node 2 (rank 1).
    tree = Tree.from_parents([-1, 0, 0, 1])
    rates = RankRates(prior=[0.5, 0.5], strength=2.0)  # 1 hit / 2 tries each to start
    rates.update(tree, [0, 2])
    assert rates.tries == [3.0, 3.0] and rates.hits == [1.0, 2.0]
    assert rates.rates() == (pytest.approx(1 / 3), pytest.approx(1 / 3))  # kept non-increasing


def test_cached_curve_round_trip(tmp_path):
    verifier = HFVerifier(make_tiny_model("llama"))
    first = cached_curve(verifier, "tiny-key", tmp_path)
    assert (tmp_path / "latency" / "tiny-key.json").is_file()
    assert cached_curve(verifier, "tiny-key", tmp_path) == first  # read back, not measured again
    assert all(s > 0 for s in first.seconds)


def test_a_curve_is_provisional_only_when_the_machine_was_busy_before_measuring(tmp_path, monkeypatch):
    # the measurement's own threads raise the load average: judged after it, a calm 2-core machine read as busy
    # and every start measured the curve again (~10 s of a warm start)
    import json

    load = iter([False, True])  # calm when it starts, busy (its own threads) when it ends
    monkeypatch.setattr("specdec.trees.calibration.overloaded", lambda: next(load, True))
    verifier = HFVerifier(make_tiny_model("llama"))
    first = cached_curve(verifier, "tiny-key", tmp_path)
    assert not json.loads((tmp_path / "latency" / "tiny-key.json").read_text())["provisional"]
    monkeypatch.setattr("specdec.trees.calibration.overloaded", lambda: False)
    monkeypatch.setattr("specdec.trees.calibration.calibrate", lambda v: pytest.fail("measured again"))
    assert cached_curve(verifier, "tiny-key", tmp_path) == first
    monkeypatch.setattr("specdec.trees.calibration.overloaded", lambda: True)  # busy before: provisional, used
    (tmp_path / "latency" / "tiny-key.json").unlink()
    monkeypatch.setattr("specdec.trees.calibration.calibrate", lambda v: first)
    cached_curve(verifier, "tiny-key", tmp_path)
    assert json.loads((tmp_path / "latency" / "tiny-key.json").read_text())["provisional"]


def test_allocator_folds_the_measured_host_time_into_the_cut():
    # verify cost 10 ms + 10 ms a node; each node is accepted with 0.3. No host time: 1 token / 10 ms beats any
    # draft (7 nodes: 3.1 tokens / 80 ms). 100 ms of host work a step (drafting, say): 7 nodes win, 3.1 / 180 >
    # 1 / 110.
    alloc = NodeAllocator(LatencyCurve((1, 8), (0.010, 0.080)))
    assert alloc.allocate([[0.3] * 7]) == [0]
    alloc.record(nodes=1, verify_s=0.010, host_s=0.100)
    assert alloc.allocate([[0.3] * 7]) == [7]
