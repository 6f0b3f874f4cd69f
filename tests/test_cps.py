"""CPS and ADL on literal arrays: top sets, the 3-gram model, beam search, the trie, the draft-length controller.
Every expected value is worked out by hand in the comment next to it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from specdec.drafters.diffusion.adl import CPU, PAPER, ADLConfig, AdaptiveLength, generated_length
from specdec.drafters.diffusion.cps import NgramLM, TopSet, merge_beams, path_search, top_sets


def lp(*rows):
    """[k, V] float32 log-probabilities from rows of probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def tokens_of(sets):
    return [s.tokens.tolist() for s in sets]


# ---- top sets --------------------------------------------------------------------------------------------


def test_mass_threshold_edges():
    row = lp([0.5, 0.3, 0.15, 0.05])
    assert tokens_of(top_sets(row, None, [], mass=0.8)) == [[0, 1]]  # 0.5 + 0.3 reaches 0.8 exactly
    assert tokens_of(top_sets(row, None, [], mass=0.81)) == [[0, 1, 2]]  # 0.8 < 0.81 <= 0.95
    assert tokens_of(top_sets(row, None, [], mass=0.5)) == [[0]]  # the top token alone
    assert tokens_of(top_sets(row, None, [], mass=1.0)) == [[0, 1, 2, 3]]
    s = top_sets(row, None, [], mass=0.8)[0]
    assert s.logq.dtype == torch.float32 and s.tokens.dtype == torch.int64
    assert torch.equal(s.logq, row[0, :2]) and s.is_eos.tolist() == [False, False]


def test_cap_and_ties_by_lower_id():
    # uniform over 20: 0.8 needs 16 tokens, the cap stops at 15, ties go to the lower ids
    uniform = torch.full((1, 20), math.log(1 / 20))
    assert tokens_of(top_sets(uniform, None, [], mass=0.8, cap=15)) == [list(range(15))]
    # 0.3 at columns 0 and 2, 0.2 at 1 and 3: by value, then lower id; the cap-3 boundary tie goes to 1, not 3
    row = lp([0.3, 0.2, 0.3, 0.2])
    assert tokens_of(top_sets(row, None, [], mass=0.8)) == [[0, 2, 1]]
    assert tokens_of(top_sets(row, None, [], mass=0.95, cap=3)) == [[0, 2, 1]]
    assert tokens_of(top_sets(row, None, [], mass=0.95, cap=2)) == [[0, 2]]


def test_eos_always_kept_beyond_the_cap():
    # EOS = 3 has 0.05: outside the 0.8 set {0, 1}, added at its rank; cap 1 keeps {0} and still adds EOS
    row = lp([0.5, 0.3, 0.15, 0.05])
    s = top_sets(row, None, [3], mass=0.8)[0]
    assert s.tokens.tolist() == [0, 1, 3] and s.is_eos.tolist() == [False, False, True]
    assert s.logq.tolist() == pytest.approx([math.log(0.5), math.log(0.3), math.log(0.05)], rel=1e-6)
    assert tokens_of(top_sets(row, None, [3], mass=0.8, cap=1)) == [[0, 3]]
    # already in the set: not added twice; an EOS with probability 0 or outside the columns: not added
    assert tokens_of(top_sets(row, None, [1], mass=0.8)) == [[0, 1]]
    zero = lp([0.6, 0.4, 0.0])
    assert tokens_of(top_sets(zero, None, [2, 7], mass=0.5)) == [[0]]


def test_stops_after_the_first_position_where_eos_ranks_first():
    # EOS = 2; position 1's argmax is EOS: positions 2 and 3 are dropped, position 1's set kept
    rows = lp([0.9, 0.05, 0.05], [0.3, 0.1, 0.6], [0.05, 0.05, 0.9], [0.9, 0.05, 0.05])
    sets = top_sets(rows, None, [2], mass=0.8)
    assert tokens_of(sets) == [[0, 2], [2, 0]]
    assert sets[1].is_eos.tolist() == [True, False]
    # EOS in the set but not first: no stop
    assert len(top_sets(rows[[0, 3]], None, [2], mass=0.8)) == 2


def test_ids_map_columns_to_tokens():
    row = lp([0.5, 0.3, 0.15, 0.05])
    ids = torch.tensor([10, 20, 30, 40])
    s = top_sets(row, ids, [40], mass=0.8)[0]
    assert s.tokens.tolist() == [10, 20, 40] and s.is_eos.tolist() == [False, False, True]
    # unsorted ids: ties still go to the lower token id (columns 1 and 3 tie at 0.3: ids 10 < 20)
    tied = lp([0.2, 0.3, 0.2, 0.3])
    assert top_sets(tied, torch.tensor([40, 20, 30, 10]), [], mass=0.8)[0].tokens.tolist() == [10, 20, 30]
    # an EOS id no column holds is ignored
    assert top_sets(row, ids, [2], mass=0.8)[0].tokens.tolist() == [10, 20]


def test_top_sets_edge_shapes():
    assert top_sets(torch.zeros(0, 5), None, [1]) == []
    with pytest.raises(ValueError):
        top_sets(torch.zeros(5), None, [])


# ---- the 3-gram model ------------------------------------------------------------------------------------

W3, W2, W1, EPS, V = 0.6, 0.3, 0.1, 0.01, 10


def smooth(mix):
    return np.log((1 - EPS) * np.asarray(mix, dtype=np.float64) + EPS / V)


def corpus_lm():
    # trigrams (1 2 3) x2, (1 2 4); bigrams (1 2) x3, (2 3) x2, (2 4); unigrams 1:3 2:3 3:2 4:1, N = 9
    return NgramLM.fit([[1, 2, 3], [1, 2, 3], [1, 2, 4]], vocab_size=V)


def test_corpus_probabilities_by_hand():
    lm = corpus_lm()
    got = lm.logp(0, (1, 2), [3, 4, 5])
    assert got.dtype == np.float32
    want = smooth([W3 * 2 / 3 + W2 * 2 / 3 + W1 * 2 / 9, W3 / 3 + W2 / 3 + W1 / 9, 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] > got[1] > got[2] and np.isfinite(got).all()  # seen continuations first, never -inf
    # trigram context (5, 2) unseen: weights renormalised over the bigram and unigram orders
    np.testing.assert_allclose(lm.logp(0, (5, 2), [3]), smooth([(W2 * 2 / 3 + W1 * 2 / 9) / (W2 + W1)]), rtol=1e-6)
    # a one-token prefix leaves w1 unknown: the same
    np.testing.assert_allclose(lm.logp(0, (2,), [3]), lm.logp(0, (5, 2), [3]), rtol=1e-6)
    # only the unigram order seen (context 9 never seen): p1 alone
    np.testing.assert_allclose(lm.logp(0, (8, 9), [1]), smooth([3 / 9]), rtol=1e-6)


def test_empty_model_is_uniform():
    lm = NgramLM(vocab_size=V)
    np.testing.assert_allclose(lm.logp(0, (1, 2), [3, 0, 9]), np.log([0.1, 0.1, 0.1]), rtol=1e-6)
    np.testing.assert_allclose(lm.logp(0, (), [3]), np.log([0.1]), rtol=1e-6)


def test_live_context_counts_per_slot():
    lm = NgramLM(vocab_size=V)
    lm.extend(0, [5, 6, 7])
    lm.extend(0, [5, 6])  # n-grams spanning the two calls count: (6 7 5), (7 5 6)
    # tokens 5 6 7 5 6: tri (5 6 7), (6 7 5), (7 5 6); bi (5 6) x2, (6 7), (7 5); uni 5:2 6:2 7:1, N = 5
    np.testing.assert_allclose(lm.logp(0, (5, 6), [7, 5]),
                               smooth([W3 * 1 + W2 * 1 + W1 / 5, W1 * 2 / 5]), rtol=1e-6)
    np.testing.assert_allclose(lm.logp(0, (7, 5), [6]), smooth([W3 + W2 + W1 * 2 / 5]), rtol=1e-6)
    np.testing.assert_allclose(lm.logp(1, (5, 6), [7]), np.log([0.1]), rtol=1e-6)  # another slot: nothing seen
    lm.reset(0)
    np.testing.assert_allclose(lm.logp(0, (5, 6), [7]), np.log([0.1]), rtol=1e-6)


def test_live_counts_add_to_the_corpus_counts():
    lm = NgramLM.fit([[1, 2, 3]], vocab_size=V)
    lm.extend(0, [1, 2, 4])
    # tri (1 2 3), (1 2 4); bi ctx 2: (2 3), (2 4); uni 1:2 2:2 3:1 4:1, N = 6
    each = W3 / 2 + W2 / 2 + W1 / 6
    np.testing.assert_allclose(lm.logp(0, (1, 2), [3, 4]), smooth([each, each]), rtol=1e-6)


def test_batch_lookup_mixes_contexts():
    lm = corpus_lm()
    got = lm.logp_batch(0, np.array([1, 5, -1]), np.array([2, 2, -1]), np.array([3, 3, 1]))
    want = np.concatenate([lm.logp(0, (1, 2), [3]), lm.logp(0, (5, 2), [3]), lm.logp(0, (), [1])])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got[2], smooth(3 / 9), rtol=1e-6)


def test_max_entries_keeps_the_most_frequent():
    lm = NgramLM.fit([[1, 2, 1, 2, 1, 3]], max_entries=2)
    a = lm.to_arrays()
    # uni 1:3 2:2 3:1 -> {1, 2}; bi (1 2):2 (2 1):2 (1 3):1 -> both 2s; tri (1 2 1):2, then the tie
    # (2 1 2):1 / (2 1 3):1 goes to the lower key (2 1 2)
    assert a["uni_ids"].tolist() == [1, 2] and a["uni_counts"].tolist() == [3, 2]
    assert a["bi_keys"].tolist() == [(1 << 21) | 2, (2 << 21) | 1] and a["bi_counts"].tolist() == [2, 2]
    assert a["tri_keys"].tolist() == [(1 << 42) | (2 << 21) | 1, (2 << 42) | (1 << 21) | 2]
    assert a["tri_counts"].tolist() == [2, 1]


def test_arrays_round_trip_through_safetensors(tmp_path):
    gen = np.random.default_rng(0)
    lm = NgramLM.fit([gen.integers(0, 50, 200).tolist() for _ in range(5)], vocab_size=1000, eps=0.02)
    arrays = lm.to_arrays()
    assert {k: v.dtype for k, v in arrays.items()} == {
        "tri_keys": np.int64, "tri_counts": np.int32, "bi_keys": np.int64, "bi_counts": np.int32,
        "uni_ids": np.int64, "uni_counts": np.int32, "vocab_size": np.int64, "smoothing": np.float64}
    path = tmp_path / "ngram.safetensors"
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(path))
    back = NgramLM.from_arrays({k: v.numpy() for k, v in load_file(str(path)).items()})
    for k, v in back.to_arrays().items():
        np.testing.assert_array_equal(v, arrays[k])
    w = np.arange(60)
    for prefix in [(3, 7), (7,), (49, 49)]:
        np.testing.assert_array_equal(back.logp(0, prefix, w), lm.logp(0, prefix, w))
    with pytest.raises(ValueError, match="missing"):
        NgramLM.from_arrays({"tri_keys": arrays["tri_keys"]})


def test_bad_ids_are_refused():
    with pytest.raises(ValueError):
        NgramLM.fit([[1, -2, 3]])
    with pytest.raises(ValueError):
        NgramLM().extend(0, [1 << 21])


def topset(pairs, eos=()):
    """TopSet from (token, probability) pairs."""
    t = torch.tensor([p[0] for p in pairs])
    logq = torch.tensor([math.log(p[1]) for p in pairs], dtype=torch.float32)
    return TopSet(t, logq, torch.isin(t, torch.tensor(eos, dtype=torch.long)))


def test_beam_ordering_dlm_only():
    # lam = 1: scores are log q sums. Paths 5-7 .42, 6-7 .28, 5-8 .18, 6-8 .12: beam 3 keeps the first three
    sets = [topset([(5, 0.6), (6, 0.4)]), topset([(7, 0.7), (8, 0.3)])]
    got = path_search(sets, NgramLM(vocab_size=V), 0, (1, 2), lam=1.0, beam=3)
    assert [p for p, _ in got] == [[5, 7], [6, 7], [5, 8]]
    assert [s for _, s in got] == pytest.approx([math.log(0.42), math.log(0.28), math.log(0.18)], rel=1e-6)
    assert [p for p, _ in path_search(sets, NgramLM(vocab_size=V), 0, (1, 2), lam=1.0, beam=1)] == [[5, 7]]


def test_paths_end_at_eos_and_compete_with_their_score():
    # EOS = 2. depth 0: [5] .6 and [2] .4 both kept (beam 2), [2] set aside; depth 1: [5 7] .54 and [5 2] .06,
    # [5 2] set aside; depth 2: [5 7 9] .54. Complete: .54, .4, .06 -> the best two
    sets = [topset([(5, 0.6), (2, 0.4)], eos=[2]), topset([(7, 0.9), (2, 0.1)], eos=[2]), topset([(9, 1.0)])]
    got = path_search(sets, NgramLM(vocab_size=V), 0, (1,), lam=1.0, beam=2)
    assert [p for p, _ in got] == [[5, 7, 9], [2]]
    assert [s for _, s in got] == pytest.approx([math.log(0.54), math.log(0.4)], rel=1e-6)
    # beam 1 prunes [2] at depth 0 (.4 < .6) and [5 2] at depth 1
    assert [p for p, _ in path_search(sets, NgramLM(vocab_size=V), 0, (1,), lam=1.0, beam=1)] == [[5, 7, 9]]
    # an EOS-ending path is never extended: with only EOS at depth 0 the search stops there
    assert [p for p, _ in path_search([topset([(2, 1.0)], eos=[2]), topset([(9, 1.0)])],
                                      NgramLM(vocab_size=V), 0, (1,), lam=1.0)] == [[2]]


def test_ngram_overrules_the_lattice_at_lam_half():
    # corpus 4 5 8: after (4, 5) the 3-gram says 8. The lattice prefers 7 (.6 vs .4) at position 1.
    lm = NgramLM.fit([[4, 5, 8]], vocab_size=V)
    sets = [topset([(5, 0.9)]), topset([(7, 0.6), (8, 0.4)])]
    got = path_search(sets, lm, 0, (1, 4), lam=0.5, beam=2)
    # 5 after (1, 4): trigram unseen, p2 = 1, p1 = 1/3 -> mix (0.3 + 0.1/3) / 0.4
    # 8 after (4, 5): p3 = p2 = 1, p1 = 1/3 -> mix 0.6 + 0.3 + 0.1/3; 7 after (4, 5): mix 0 (the floor)
    n5 = smooth((W2 + W1 / 3) / (W2 + W1))
    s8 = 0.5 * (math.log(0.9) + math.log(0.4)) + 0.5 * (n5 + smooth(W3 + W2 + W1 / 3))
    s7 = 0.5 * (math.log(0.9) + math.log(0.6)) + 0.5 * (n5 + smooth(0.0))
    assert [p for p, _ in got] == [[5, 8], [5, 7]]
    assert [s for _, s in got] == pytest.approx([s8, s7], rel=1e-6)


def test_path_search_edges():
    assert path_search([], NgramLM(), 0, (1, 2)) == []
    with pytest.raises(ValueError):
        path_search([topset([(5, 1.0)])], NgramLM(), 0, (1, 2), lam=1.5)


def test_top_sets_feed_path_search():
    # EOS = 2 ranks first at position 1: the paths stop there ([5 2]) or end short of it
    rows = lp([0.7, 0.1, 0.1, 0.0, 0.0, 0.1], [0.1, 0.0, 0.8, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    sets = top_sets(rows, torch.tensor([5, 6, 2, 7, 8, 9]), [2], mass=0.6)
    assert tokens_of(sets) == [[5, 2], [2]]  # set 0: 5, plus EOS 2; set 1: 2 (EOS first: stop)
    got = path_search(sets, NgramLM(vocab_size=V), 0, (1, 3), lam=1.0, beam=3)
    assert [p for p, _ in got] == [[5, 2], [2]]  # .7 * .8 = .56, then .1


# ---- the trie --------------------------------------------------------------------------------------------


def test_merge_beams_shares_prefixes_best_path_first():
    # root 1; [5 7 9] -> nodes 1 2 3; [5 8] reuses node 1 -> node 4; [6 7] -> nodes 5 6
    tree, tokens = merge_beams([[5, 7, 9], [5, 8], [6, 7]], root=1, budget=10)
    assert tree.parents == (-1, 0, 1, 2, 1, 0, 5)
    assert tree.ranks == (0, 0, 0, 0, 1, 1, 0)
    assert tokens.tolist() == [1, 5, 7, 9, 8, 6, 7] and tokens.dtype == torch.int64
    assert tree.retrieve.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [0, 5, 6, -1]]


def test_merge_beams_budget_truncation():
    paths = [[5, 7, 9], [5, 8], [6, 7]]
    tree, tokens = merge_beams(paths, 1, budget=5)  # the first path whole, then [5 8]'s new node
    assert tree.parents == (-1, 0, 1, 2, 1) and tokens.tolist() == [1, 5, 7, 9, 8]
    tree, tokens = merge_beams(paths, 1, budget=3)  # the best path cut after two tokens
    assert tree.parents == (-1, 0, 1) and tokens.tolist() == [1, 5, 7]
    tree, tokens = merge_beams(paths, 1, budget=6)  # [6 7] cut after 6
    assert tree.parents == (-1, 0, 1, 2, 1, 0) and tokens.tolist() == [1, 5, 7, 9, 8, 6]
    tree, tokens = merge_beams(paths, 1, budget=1)
    assert tree.parents == (-1,) and tokens.tolist() == [1]
    tree, tokens = merge_beams([], 4, budget=8)
    assert tree.parents == (-1,) and tokens.tolist() == [4]
    tree, _ = merge_beams([[5, 7], [5, 7, 9]], 1, budget=8)  # a prefix path adds nothing of its own
    assert tree.parents == (-1, 0, 1, 2)
    with pytest.raises(ValueError):
        merge_beams(paths, 1, budget=0)


# ---- adaptive draft length -------------------------------------------------------------------------------

EOS = [2]


def raw(k, eos_at=None):
    """A raw argmax draft of length k (token 7) with EOS at index eos_at."""
    r = [7] * k
    if eos_at is not None:
        r[eos_at] = 2
    return r


def test_generated_length():
    assert generated_length([3, 2, 5], EOS) == 1  # one token before the EOS
    assert generated_length([2, 3], EOS) == 0
    assert generated_length([3, 4, 5], EOS) == 3  # no EOS: the whole draft
    assert generated_length([3, 9, 5], [9, 2]) == 1


def test_adl_sequence_with_delta_and_clip():
    adl = AdaptiveLength(CPU)  # k_min 4, k_max 12, delta 4
    adl.reset(0)
    assert adl.k(0) == 12
    steps = [  # (raw draft, accepted) -> EMA_gen, EMA_acc -> k
        (raw(12), 12, 12),  # gen 12, acc 12: 12 + 4 = 16 clipped to 12
        (raw(12, 2), 2, 11),  # gen 2: EMAs 7, 7 (equal: delta applies) -> 7 + 4
        (raw(11, 0), 0, 7),  # EMAs 3.5, 3.5 -> 3 + 4
        (raw(7, 0), 0, 5),  # 1.75, 1.75 -> 1 + 4
        (raw(5, 0), 0, 4),  # .875, .875 -> 0 + 4
        (raw(4, 0), 0, 4),  # .4375, .4375 -> 0 + 4
        (raw(4), 0, 4),  # gen 4: EMA_gen 2.21875 > EMA_acc .21875 -> 2, clipped up to k_min 4
    ]
    for r, acc, k in steps:
        assert adl.update(0, r, EOS, acc) == k and adl.k(0) == k


def test_adl_delta_only_when_acceptance_keeps_up():
    adl = AdaptiveLength(CPU)
    adl.update(0, raw(12, 8), EOS, 5)  # gen 8 > acc 5: k = 8
    adl.update(1, raw(12, 8), EOS, 8)  # gen 8 = acc 8: k = 8 + 4
    assert (adl.k(0), adl.k(1)) == (8, 12)
    adl.update(0, raw(8), EOS, 8)  # EMAs gen (8 + 8) / 2 = 8, acc (5 + 8) / 2 = 6.5: k = 8
    assert adl.k(0) == 8
    adl.update(0, raw(8), EOS, 8)  # acc 7.25 < 8: still 8
    assert adl.k(0) == 8


def test_adl_paper_preset():
    assert PAPER == ADLConfig(k_min=20, k_max=30, delta=10, rho=0.5)
    assert CPU == ADLConfig(k_min=4, k_max=12, delta=4, rho=0.5)
    adl = AdaptiveLength(PAPER)
    assert adl.k(3) == 30  # a slot never reset starts at k_max too
    assert adl.update(3, raw(30, 12), EOS, 12) == 22  # EMAs 12, 12 -> 12 + 10
    assert adl.update(3, raw(22), EOS, 5) == 20  # EMAs 17, 8.5 -> 17, clipped up to 20
    assert adl.update(3, raw(20), EOS, 20) == 20  # EMAs 18.5, 14.25 -> 18 -> 20


def test_adl_reset_fixed_and_slots():
    adl = AdaptiveLength(CPU)
    adl.update(0, raw(12, 5), EOS, 1)
    assert adl.k(0) == 5 and adl.k(1) == 12  # slots are independent
    adl.reset(0)
    assert adl.k(0) == 12
    assert adl.update(0, raw(12, 9), EOS, 0) == 9  # the first observation after a reset initialises the EMAs
    fixed = AdaptiveLength(CPU, fixed=True)
    for r, acc in [(raw(12, 0), 0), (raw(12, 1), 0), (raw(12), 12)]:
        assert fixed.update(0, r, EOS, acc) == 12 and fixed.k(0) == 12
    with pytest.raises(ValueError):
        ADLConfig(k_min=5, k_max=4, delta=1)
