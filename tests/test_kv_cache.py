"""The one KV cache (`specdec.verifiers.lean_model.KVCache`): growth keeps what it holds, `keep` moves the accepted nodes."""

from __future__ import annotations

import pytest
import torch

from specdec.verifiers.lean_model import KVCache


def filled(cache: KVCache) -> None:
    for li, (k, v) in enumerate(cache.layers):
        k.copy_(torch.arange(k.numel(), dtype=k.dtype).view_as(k) + 1000 * li)
        v.copy_(-k)


def test_grows_by_doubling_and_keeps_what_it_holds():
    cache = KVCache(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu", max_positions=100)
    cache.reset(3, 10)
    assert cache.capacity == 10 and cache.layers[0][0].shape == (3, 2, 10, 4)
    filled(cache)
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    assert not cache.reserve(10)  # room enough: nothing moves
    assert cache.reserve(11) and cache.capacity == 20  # twice the size
    for (k0, v0), (k1, v1) in zip(before, cache.layers):
        assert torch.equal(k1[:, :, :10], k0) and torch.equal(v1[:, :, :10], v0)
        assert not k1[:, :, 10:].any()  # new room is zeros, never garbage
    assert cache.reserve(90) and cache.capacity == 90
    assert cache.reserve(95) and cache.capacity == 100  # never past the model's positions
    with pytest.raises(ValueError, match="exceed"):
        cache.reserve(101)


def test_keep_moves_accepted_nodes_after_the_committed_tokens():
    cache = KVCache(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu", max_positions=64)
    cache.reset(2, 16)
    filled(cache)
    k_before = cache.layers[0][0].clone()
    cache.keep(1, base=5, nodes=[0, 2, 5])  # the root stays, nodes 2 and 5 follow it
    k = cache.layers[0][0]
    assert torch.equal(k[1, :, 5], k_before[1, :, 5])
    assert torch.equal(k[1, :, 6], k_before[1, :, 7]) and torch.equal(k[1, :, 7], k_before[1, :, 10])
    assert torch.equal(k[0], k_before[0])  # other slots untouched
    assert torch.equal(cache.layers[0][1], -k)  # values moved alike


def test_bytes_round_rows_up_to_blocks():
    plain = KVCache(layers=3, kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu", max_positions=512)
    blocked = KVCache(layers=3, kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu", max_positions=512,
                      round_to=64)
    assert plain.bytes(4, 100) == 2 * 3 * 4 * 2 * 100 * 8 * 4
    assert blocked.bytes(4, 100) == 2 * 3 * 4 * 2 * 128 * 8 * 4
    blocked.reset(1, 100)
    assert blocked.layers[0][0].shape[2] == 128 and blocked.capacity == 100


def test_slots_grow_from_nothing_and_keep_what_they_hold():
    """The diffusion drafter's use: slots appear as the engine names them, positions as context arrives."""
    cache = KVCache(layers=2, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu", max_positions=1000)
    assert cache.reserve_slots(1) and cache.layers[0][0].shape == (1, 1, 0, 2)
    assert cache.reserve(5, at_least=8) and cache.capacity == 8
    filled(cache)
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    assert not cache.reserve_slots(1)
    assert cache.reserve_slots(3) and cache.layers[1][1].shape == (3, 1, 8, 2)
    for (k0, v0), (k1, v1) in zip(before, cache.layers):
        assert torch.equal(k1[:1], k0) and torch.equal(v1[:1], v0)
        assert not k1[1:].any() and not v1[1:].any()
