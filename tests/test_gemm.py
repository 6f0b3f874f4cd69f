"""GEMM plan calibration times the forward's real working set: every weight whole, in the forward's order.

No test here reads a real clock: calibration gets a recording `multiply` and a fake `clock` that the fake
products advance by a cost of our choosing, so what it multiplies, in what order, and what it concludes from
the times are checked exactly.
"""

from __future__ import annotations

import pytest
import torch

from specdec.verifiers import gemm


class FakeGemm:
    """A `multiply` that records each product and advances a fake clock by cost(shape, orientation, rows)."""

    def __init__(self, cost=lambda shape, o, rows: 1e-3):
        self.now, self.cost, self.calls = 0.0, cost, []  # calls: (data_ptr, shape, rows, orientation)

    def clock(self) -> float:
        return self.now

    def __call__(self, x: torch.Tensor, w: torch.Tensor, o: str) -> None:
        assert x.shape == (x.shape[0], w.shape[1])  # x [rows, in]
        self.calls.append((w.data_ptr(), tuple(w.shape), x.shape[0], o))
        self.now += self.cost(gemm.shape_key(w), o, x.shape[0])

    def at(self, rows: int) -> list[tuple]:
        return [c for c in self.calls if c[2] == rows]


def model_weights() -> list[torch.Tensor]:
    """An LM head over 128 MB (the size v3 sliced; torch.empty: pages never touched) and two layers' weights."""
    head = torch.empty(52_500, 640)  # 134 MB
    return [head] + [torch.empty(96, 640), torch.empty(640, 96), torch.empty(96, 640), torch.empty(640, 96)]


def warm_ups(weights: list[torch.Tensor]) -> int:
    """Untimed first products per bucket: one per (shape, orientation), for shapes up to WARM_UP_MAX_BYTES."""
    small = {tuple(w.shape) for w in weights if w.numel() * w.element_size() <= gemm.WARM_UP_MAX_BYTES}
    return len(small) * len(gemm.available())


def test_every_product_is_a_whole_weight_in_forward_order():
    weights, fake = model_weights(), FakeGemm()
    gemm.calibrate(weights, budget_s=0.0, multiply=fake, clock=fake.clock)
    handed = [(w.data_ptr(), tuple(w.shape)) for w in weights]
    assert {c[:2] for c in fake.calls} == set(handed)  # no slice, no copy: the handed tensors, whole
    assert (weights[0].data_ptr(), (52_500, 640)) in {c[:2] for c in fake.calls}  # the 134 MB head in full
    for rows in gemm.BUCKETS:
        calls = fake.at(rows)
        warm, timed = calls[: warm_ups(weights)], calls[warm_ups(weights):]
        assert weights[0].data_ptr() not in {c[0] for c in warm}  # over WARM_UP_MAX_BYTES: no untimed call
        assert len(timed) % len(weights) == 0 and timed
        for p in range(0, len(timed), len(weights)):  # each pass: every weight once, in the order given
            assert [c[:2] for c in timed[p: p + len(weights)]] == handed
        # between two products with one weight, every other weight was multiplied: nothing stays hot that a
        # forward would have streamed out
        ptrs = [c[0] for c in timed]
        for i in range(len(ptrs) - len(weights)):
            assert ptrs[i + len(weights)] == ptrs[i] and len(set(ptrs[i: i + len(weights)])) == len(weights)


def test_each_pass_gives_each_shape_one_orientation_and_rounds_cover_all():
    weights, fake = model_weights(), FakeGemm()
    gemm.calibrate(weights, budget_s=0.0, multiply=fake, clock=fake.clock)  # equal costs: nothing dropped
    n, orientations = len(weights), gemm.available()
    timed = fake.at(1)[warm_ups(weights):]
    passes = [timed[p: p + n] for p in range(0, len(timed), n)]
    assert len(passes) == len(orientations)  # budget 0: the floor, one round of every candidate
    for ps in passes:
        by_shape = {}
        for _, shape, _, o in ps:
            by_shape.setdefault(shape, set()).add(o)
        assert all(len(os) == 1 for os in by_shape.values())  # one orientation per shape within a pass
    for shape in {tuple(w.shape) for w in weights}:
        assert {o for ps in passes for _, s, _, o in ps if s == shape} == set(orientations)  # a round: each once


def test_plan_and_timings_follow_the_measured_costs():
    orientations = gemm.available()
    fast = orientations[-1]

    def cost(shape, o, rows):  # the head: `fast` wins; the layers: "linear" wins up to 4 rows, then "wxt"
        if shape == "52500x640":
            return 0.030 if o == fast else 0.050
        if o == "linear":
            return 0.001 * rows
        return 0.004 if o == "wxt" else 0.100

    weights, fake = model_weights(), FakeGemm(cost)
    plan, ms = gemm.calibrate(weights, budget_s=0.0, multiply=fake, clock=fake.clock)
    assert {b: plan.choices["52500x640"][b] for b in gemm.BUCKETS} == dict.fromkeys(gemm.BUCKETS, fast)
    assert ms["52500x640"][1][fast] == 30.0  # ms per product of the WHOLE weight
    if "wxt" in orientations:
        assert [plan.choices["96x640"][b] for b in gemm.BUCKETS] == ["linear"] * 3 + ["wxt"] * 4
        assert ms["640x96"][16] == pytest.approx({o: 1e3 * cost("640x96", o, 16) for o in orientations})


def test_a_candidate_twice_as_slow_is_dropped_after_two_rounds():
    orientations = gemm.available()
    if len(orientations) < 2:
        pytest.skip("one orientation in this torch build")
    slow = orientations[0]
    fake = FakeGemm(lambda shape, o, rows: 0.010 if o == slow else 0.001)
    gemm.calibrate([torch.empty(64, 32)], budget_s=1e9, rounds=6, multiply=fake, clock=fake.clock)
    timed = [c[3] for c in fake.at(1)[len(orientations):]]
    assert timed.count(slow) == 2  # rounds 1 and 2 only
    assert all(timed.count(o) == 6 for o in orientations if o != slow)


def test_contention_abandons_calibration_after_a_pass():
    fake = FakeGemm()
    looks = []
    assert gemm.calibrate(model_weights(), multiply=fake, clock=fake.clock,
                          contended=lambda: looks.append(1) or True) is None
    assert len(looks) == 1 and len(fake.at(2)) == 0  # stopped in the first bucket, after its first pass


def test_real_products_agree_with_matmul():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    for o in gemm.available():
        out = gemm.product(x, w, o)
        assert out.is_contiguous()
        torch.testing.assert_close(out, x @ w.T, atol=1e-5, rtol=1e-5)


def test_budget_left_by_cheap_buckets_goes_to_the_expensive_ones():
    """Products cost `rows` ms, budget 0.5 s: cheap buckets run all their rounds, a bucket stops before a round
    that would overrun its share of what is left, and the floor is one round (the 64-row bucket overruns)."""
    fake = FakeGemm(lambda shape, o, rows: 1e-3 * rows)
    gemm.calibrate([torch.empty(64, 32)], budget_s=0.5, rounds=5, multiply=fake, clock=fake.clock)
    n = len(gemm.available())
    rounds = [(len(fake.at(b)) - n) // n for b in gemm.BUCKETS]  # products after the warm-up, per candidate
    if n == 3:
        assert rounds == [5, 5, 5, 3, 1, 1, 1]
    assert rounds == sorted(rounds, reverse=True) and rounds[0] == 5 and rounds[-1] == 1
