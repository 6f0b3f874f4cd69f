"""The lexical-unit drafter: its training forward equals what the verifier computes for the same placeholder aux
nodes; greedy output equals transformers' generate() and sampled output plain sampling, alone and in batches;
the unit's tree; the weights file; training lowers the loss; the training prompts avoid every benchmark prompt.
"""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

from conftest import ARCHS, hf_greedy, make_tiny_model, random_prompts, run_engine
from specdec.drafters.base import PlainDrafter
from specdec.drafters.lexical import placeholders
from specdec.drafters.lexical.drafter import LexicalDrafter, lexical_drafter
from specdec.drafters.lexical.train import LexicalTrainConfig, fit, loss_of
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams
from specdec.verifiers.base import NodeInputs
from specdec.verifiers.lean import LeanVerifier
from specdec.verifiers.lean_model import LeanModel

VOCAB = 512


@lru_cache(maxsize=None)
def target(arch: str):
    return make_tiny_model(arch)


prompts = random_prompts


def random_embeds(arch: str, k: int = 3, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, target(arch).config.hidden_size, generator=gen)


def make_drafter(arch: str, **options) -> LexicalDrafter:
    m = target(arch)
    vocab_ids = torch.arange(0, VOCAB, 2)
    head = m.get_output_embeddings().weight.detach()[vocab_ids].float()
    return LexicalDrafter(random_embeds(arch), head, vocab_ids, **options)


def run(arch: str, drafter, rows, width: int, budget: int = 6, params=None, new: int = 20):
    return run_engine(target(arch), drafter, rows, width, budget, params, new)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_equals_the_verifiers_aux_nodes(arch):
    """group_states' placeholder states are what the verify forward computes for a group of aux nodes under a
    real node (positions past the tiny gemma's 16-token sliding window included)."""
    m = target(arch)
    seq = torch.tensor(prompts(1, seed=2, length=30)[0])
    embeds = random_embeds(arch)
    lean = LeanModel(m)
    anchors = torch.tensor([5, 21, 28])
    real, ph = placeholders.group_states(lean, seq, anchors, embeds, lean.rope_tables(64))
    L = m.config.num_hidden_layers
    v = LeanVerifier(m, gemm="linear")
    v.reset(1, 64)
    full = v.prefill(0, seq, hidden_layers=(L,))[L]
    torch.testing.assert_close(real, full.float(), atol=1e-4, rtol=1e-4)
    k = embeds.shape[0]
    for a, t in enumerate(anchors.tolist()):
        v.prefill(0, seq[:t])  # committed: seq[:t]; the root (node 0) is seq[t] at position t
        n = 1 + k
        tokens = torch.tensor([[int(seq[t])] + [0] * k])
        depth = torch.arange(n)[None]
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None]  # root <- P_1 <- P_2 <- P_3
        scores = v.score_nodes([0], tokens, depth, mask, embeds=NodeInputs(torch.arange(1, n), embeds),
                               hidden_layers=(-1,))
        torch.testing.assert_close(ph[a], scores.hidden(-1, 1, n).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate(arch):
    rows = prompts(4, seed=3)
    refs = [hf_greedy(target(arch), p, 20) for p in rows]
    for width in (1, 3):
        got, res = run(arch, make_drafter(arch, threshold=0.0), rows, width)
        assert got == refs, width
    drafted = sum(sum(r.stats.tree_sizes) - len(r.stats.tree_sizes) for r in res.results)
    assert drafted > 0  # drafts from the placeholders' predictions were really scored


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_equals_plain_sampling(arch):
    rows = prompts(4, seed=5)
    params = [SamplingParams(0.8, seed=10 + i) for i in range(len(rows))]
    plain, _ = run(arch, PlainDrafter(), rows, 1, budget=1, params=params)
    for width in (1, 4):
        got, _ = run(arch, make_drafter(arch), rows, width, params=params)
        assert got == plain, width


def test_the_unit_is_the_confident_span_and_branches_fill_the_budget():
    d = make_drafter("llama", threshold=0.5, alternatives=1)
    toks = torch.tensor([[10, 11], [20, 21], [30, 31]])
    probs = torch.tensor([[0.9, 0.05], [0.6, 0.3], [0.4, 0.3]])  # position 3 is below the threshold
    tree, tokens = d._tree((toks, probs), torch.tensor([7]), budget=8)
    # span 2: chain 10 -> 20, branches 11 (under the root) and 21 (under 10); nothing at depth 3
    assert tokens.tolist() == [7, 10, 11, 20, 21]
    assert list(tree.parents) == [-1, 0, 0, 1, 1]
    tree, tokens = d._tree((toks, probs), torch.tensor([7]), budget=3)  # best two: 10 (0.9), 20 (0.54)
    assert tokens.tolist() == [7, 10, 20] and list(tree.parents) == [-1, 0, 1]
    tree, tokens = d._tree((toks, torch.tensor([[0.1, 0.05], [0.9, 0.1], [0.9, 0.1]])), torch.tensor([7]), 8)
    assert tokens.tolist()[:2] == [7, 10] and tree.max_depth == 1  # a weak first token: the unit is one token


def test_groups_ride_under_the_root_and_the_chain():
    d = make_drafter("qwen2", groups=2)
    from specdec.drafters.base import DraftRow
    from specdec.sampling import SamplingParams as SP

    d.reset(0, SP())
    draft = d.propose([DraftRow(0, torch.tensor([5, 6, 7]))], [6])[0]
    assert draft.size == 1 and draft.aux.parents.tolist() == [0, 1, 2]  # no prediction yet: root + one group
    d._pred[0] = (torch.tensor([[10, 11, 12]] * 3), torch.tensor([[0.9, 0.05, 0.01]] * 3))
    draft = d.propose([DraftRow(0, torch.tensor([5, 6, 7]))], [6])[0]
    n = draft.size
    assert draft.aux.parents.tolist() == [0, n, n + 1, 1, n + 3, n + 4]  # under the root and chain node 1
    assert torch.equal(draft.aux.embeds, d.embeds.repeat(2, 1))


def test_weights_round_trip_and_refuse_another_target(tmp_path):
    path = tmp_path / "lex.safetensors"
    embeds, ids = random_embeds("gemma3"), torch.arange(0, VOCAB, 4)
    placeholders.save(path, embeds, ids, placeholders.target_shape(target("gemma3")), {"data": "test"})
    back, back_ids = placeholders.load(path, target("gemma3"))
    assert torch.equal(back, embeds) and torch.equal(back_ids, ids)
    drafter = lexical_drafter(VOCAB, target=target("gemma3"), weights=str(path))
    assert drafter.k == 3 and drafter.needs.max_aux == 6
    with pytest.raises(SpecdecError, match="trained for a gemma3_text"):
        placeholders.load(path, target("llama"))
    with pytest.raises(SpecdecError, match="not found"):
        placeholders.load(tmp_path / "none.safetensors", target("llama"))


def test_training_lowers_the_loss_and_resumes(tmp_path):
    arch = "llama"
    m = target(arch)
    seqs = [hf_greedy(m, p, 16) for p in prompts(3, seed=11)]
    seqs = [p + o for p, o in zip(prompts(3, seed=11), seqs)]
    starts = [len(p) - 1 for p in prompts(3, seed=11)]
    lean = LeanModel(m)
    head = lean.lm_head.weight[torch.arange(VOCAB)].float()
    rope = lean.rope_tables(64)
    embeds = torch.nn.Parameter(random_embeds(arch).clone())
    probe = torch.tensor(seqs[0]), torch.arange(starts[0], len(seqs[0]) - 1)

    def loss():
        with torch.no_grad():
            return loss_of(lean, embeds, head, *probe, rope, 0.8)[0].item()

    before = loss()
    cfg = LexicalTrainConfig(steps=60, anchors=8, lr=1e-1, warmup=2, checkpoint_every=20)
    ckpt = tmp_path / "ckpt.safetensors"
    fit(lean, embeds, head, seqs, starts, rope, cfg, ckpt, log=lambda s: None)
    after = loss()
    assert after < 0.9 * before, (before, after)
    again = torch.nn.Parameter(random_embeds(arch).clone())
    fit(lean, again, head, seqs, starts, rope, cfg, ckpt, log=lambda s: None)  # finished: resumes at step 60
    assert torch.equal(again.detach(), embeds.detach())


def test_training_prompts_share_no_eight_words_with_the_benchmark():
    from specdec.drafters.training_prompts import benchmark_grams, benchmark_texts, overlaps, training_prompts

    got = training_prompts(400)
    assert len(got) >= 300 and len(set(got)) == len(got) and got == training_prompts(400)
    grams = benchmark_grams(benchmark_texts())
    assert not any(overlaps(p, grams) for p in got)
    assert overlaps(benchmark_texts()[0], grams)  # the check itself catches a benchmark prompt


@pytest.mark.parametrize("kind", ["lexical", "diffusion"])
def test_train_command_makes_weights_the_drafter_loads(kind, tiny_model_dir, tmp_path):
    """`specdec train lexical|diffusion` end to end on the tiny model (a few prompts and steps): the file it
    writes loads as that drafter, whose output equals plain decoding's; a rerun resumes instead of redoing."""
    from click.testing import CliRunner

    from specdec.api import SpecDecoder
    from specdec.cli import main

    work, out = tmp_path / "work", tmp_path / f"{kind}.safetensors"
    args = ["train", kind, "--model", str(tiny_model_dir), "--work-dir", str(work), "--out", str(out),
            "--prompts", "8", "--max-new-tokens", "8", "--steps", "3", "--vocab", "64", "--threads", "1"]
    if kind == "diffusion":
        args += ["--block", "4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert out.is_file() and len((work / "corpus.jsonl").read_text().splitlines()) == 8
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "resumed from" in again.output, again.output
    plain = SpecDecoder(str(tiny_model_dir), drafter="plain")
    spec = SpecDecoder(str(tiny_model_dir), drafter=kind, drafter_options={"weights": str(out)})
    for p in ("The sea", "Once upon a time"):
        assert spec.generate_text(p, max_new_tokens=16)[0] == plain.generate_text(p, max_new_tokens=16)[0]


def test_training_prompts_reach_thousands_and_stay_off_the_benchmark():
    from specdec.drafters.training_prompts import benchmark_grams, benchmark_texts, overlaps, training_prompts

    got = training_prompts(6000)
    assert len(got) == 6000 and len(set(got)) == 6000
    assert got[:381] == training_prompts(381)  # the first set, which the shipped drafters were trained on, first
    grams = benchmark_grams(benchmark_texts())
    assert not any(overlaps(p, grams) for p in got)


def test_corpus_is_packed_into_files_and_extended_without_duplicates(tiny_model_dir, tmp_path):
    """`extend_corpus` (`specdec train corpus`): rows are the target's plain greedy outputs, full chunks are packed
    into gzip files, the tail stays live; a kill between packing and rewriting the live file (rows in both) and a
    rerun neither lose nor duplicate a row."""
    from specdec.api import SpecDecoder
    from specdec.bench.spec_bench import PROMPT_TEMPLATE
    from specdec.drafters.corpus import extend_corpus, packed_rows, read_corpus
    from specdec.drafters.training_prompts import training_prompts
    from specdec.text import encode_prompt

    decoder = SpecDecoder(str(tiny_model_dir), drafter="ngram")
    folder, live = tmp_path / "corpus", tmp_path / "live.jsonl"
    rows = extend_corpus(decoder, folder, live, 10, 8, width=2, log=lambda s: None, chunk_rows=4)
    assert sorted(p.name for p in folder.iterdir()) == ["corpus-00000.jsonl.gz", "corpus-00001.jsonl.gz"]
    assert len(read_corpus(live)) == 2 and {r["prompt"] for r in rows} == set(training_prompts(10))
    plain = SpecDecoder(str(tiny_model_dir), drafter="plain")
    for row in rows[:3]:
        assert row["prompt_ids"] == encode_prompt(decoder.tokenizer, row["prompt"], template=PROMPT_TEMPLATE)
        assert row["output_ids"] == plain.generate_ids(row["prompt_ids"], max_new_tokens=8).tokens
    with live.open("a") as f:  # a kill after a file was packed, before the live file lost its rows
        f.writelines(json.dumps(r) + "\n" for r in packed_rows(folder)[4:8])
    rows = extend_corpus(decoder, folder, live, 13, 8, width=2, log=lambda s: None, chunk_rows=4)
    assert len(rows) == 13 and sorted(r["prompt"] for r in rows) == sorted(training_prompts(13))
    assert len(packed_rows(folder)) == 12 and len(read_corpus(live)) == 1
    again = extend_corpus(decoder, folder, live, 13, 8, width=2, log=lambda s: None, chunk_rows=4)
    assert again == rows  # nothing left to decode


@pytest.mark.parametrize("kind", ["diffusion", "lexical"])
def test_trains_on_a_packed_corpus_and_reports_its_held_out_slice(kind, tiny_model_dir, tmp_path):
    """`specdec train diffusion|lexical --corpus DIR`: the packed corpus of `specdec train corpus` is trained on,
    its held-out prompts (1 in 50 by hash) never are, and their top-1 and tau are printed at each checkpoint."""
    from click.testing import CliRunner

    from specdec.api import SpecDecoder
    from specdec.cli import main
    from specdec.drafters.corpus import extend_corpus, held_out, split_rows
    from specdec.drafters.training_prompts import training_prompts

    prompts = training_prompts(400)
    count = next(i for i, p in enumerate(prompts) if held_out(p)) + 2  # the first held-out prompt, and one more
    decoder = SpecDecoder(str(tiny_model_dir), drafter="ngram")
    folder = tmp_path / "corpus"
    rows = extend_corpus(decoder, folder, tmp_path / "live.jsonl", count, 6, width=4, log=lambda s: None,
                         chunk_rows=4)
    packed = len(rows) - len(rows) % 4
    train, held = split_rows(rows[:packed])
    assert held and len(train) + len(held) == packed and not any(held_out(r["prompt"]) for r in train)
    work, out = tmp_path / "work", tmp_path / "d.safetensors"
    args = ["train", kind, "--model", str(tiny_model_dir), "--corpus", str(folder), "--work-dir", str(work),
            "--out", str(out), "--steps", "2", "--vocab", "64", "--threads", "1"]
    res = CliRunner().invoke(main, args + (["--block", "4"] if kind == "diffusion" else []))
    assert res.exit_code == 0, res.output
    assert f"{len(train)} sequences" in res.output and f"{len(held)} held out" in res.output
    assert "held-out" in res.output and "top-1" in res.output and "never trained on" in res.output
    assert not (work / "corpus.jsonl").exists()  # nothing generated: the packed corpus was used
    plain = SpecDecoder(str(tiny_model_dir), drafter="plain")
    spec = SpecDecoder(str(tiny_model_dir), drafter=kind, drafter_options={"weights": str(out)})
    assert spec.generate_text("The sea", max_new_tokens=12)[0] == plain.generate_text("The sea", max_new_tokens=12)[0]
