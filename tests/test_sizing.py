"""Hardware-aware tree sizing: latency curves, acceptance statistics, and the budget they choose."""

from __future__ import annotations

import pytest

from conftest import make_tiny_model
from specdec.drafters.base import Needs
from specdec.trees.sizing import AutoBudget, DepthRates, LatencyCurve, RankRates, cached_curve, choose_budget
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier


def test_curve_interpolates_and_extrapolates():
    curve = LatencyCurve((1, 4, 16), (0.10, 0.13, 0.25))
    assert curve(1) == pytest.approx(0.10) and curve(4) == pytest.approx(0.13)
    assert curve(10) == pytest.approx(0.19)  # halfway from 4 to 16
    assert curve(28) == pytest.approx(0.37)  # slope of the last segment continues
    assert curve.ratios()[16] == pytest.approx(2.5)


def test_flat_curve_prefers_big_trees_steep_curve_small_ones():
    gain = lambda n: 1 + 0.9 * (1 - 0.6 ** (n - 1)) / 0.4  # noqa: E731 - diminishing returns, like real trees
    flat = LatencyCurve((1, 64), (0.100, 0.110))
    steep = LatencyCurve((1, 2, 64), (0.100, 0.200, 6.4))
    assert choose_budget(flat, gain, 32) >= 8
    assert choose_budget(steep, gain, 32) == 1


def test_rank_rates_count_tries_and_hits():
    # root -> ranks 0, 1; node 1 (rank 0) -> rank 0 child (node 3). Accepted path: root, node 2 (rank 1).
    tree = Tree.from_parents([-1, 0, 0, 1])
    rates = RankRates(prior=[0.5, 0.5], strength=2.0)  # 1 hit / 2 tries each to start
    rates.update(tree, [0, 2])
    assert rates.tries == [3.0, 3.0] and rates.hits == [1.0, 2.0]
    assert rates.rates() == (pytest.approx(1 / 3), pytest.approx(1 / 3))  # kept non-increasing


def test_depth_rates_expected_tokens():
    d = DepthRates(prior=0.5, strength=2.0)
    for _ in range(8):
        d.update(proposed=3, accepted=3)  # always fully accepted: rates climb toward 1
    e = d.expected_tokens(4)
    assert e[0] == 1.0 and e[1] > 1.7 and e[3] > e[2] > e[1]


class _Estimator:
    name, topk = "fake", 0
    needs = Needs()

    def __init__(self, table):
        self.table = table

    def expected_tokens(self, slot, max_nodes):
        return self.table[:max_nodes]


def test_auto_budget_follows_the_estimate():
    curve = LatencyCurve((1, 8), (0.1, 0.1))  # free extra nodes: the most tokens wins
    auto = AutoBudget(curve, max_nodes=8, every=1)
    assert auto.budget(_Estimator([1, 1.5, 2, 2.2, 2.3, 2.3, 2.3, 2.3])) == 5
    assert auto.budget(_Estimator([1.0] * 8)) == 1  # nothing gets accepted: plain decoding


def test_cached_curve_round_trip(tmp_path):
    verifier = HFVerifier(make_tiny_model("llama"))
    first = cached_curve(verifier, "tiny-key", tmp_path)
    assert (tmp_path / "latency" / "tiny-key.json").is_file()
    assert cached_curve(verifier, "tiny-key", tmp_path) == first  # read back, not measured again
    assert all(s > 0 for s in first.seconds)


def test_curve_sizer_folds_the_measured_host_time_into_the_budget():
    # verify cost 10 ms + 10 ms a node; each node adds 0.3 tokens. No host time: 1 node, 1 token / 10 ms beats
    # 8 nodes, 3.1 tokens / 80 ms. 100 ms of host work a step (drafting, say): 8 nodes win, 3.1 / 180 > 1 / 110.
    from specdec.trees.budget import CurveSizer

    curve = LatencyCurve((1, 8), (0.010, 0.080))
    sizer = CurveSizer(AutoBudget(curve, max_nodes=8, every=1))
    drafter = _Estimator([1 + 0.3 * i for i in range(8)])
    assert sizer.host_s is None and sizer.plan(drafter, [0], cap=8).budgets == [1]
    sizer.record(sizer.plan(drafter, [0], 8), rows=1, nodes=1, verify_s=0.010, host_s=0.100, committed=1)
    assert sizer.host_s == pytest.approx(0.100)  # the first step is taken as is
    assert sizer.plan(drafter, [0], cap=8).budgets == [8]
    sizer.record(sizer.plan(drafter, [0], 8), rows=1, nodes=8, verify_s=0.080, host_s=0.0, committed=3)
    assert sizer.host_s == pytest.approx(0.090)  # then a running mean, weight 0.1 on the newest step
