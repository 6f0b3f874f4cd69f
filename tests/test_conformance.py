"""One verifier contract, every backend: the properties the loop relies on, checked the same way for the
transformers verifier, the lean torch forward, strict scoring, the gguf and q8act formats (the glued numba
forward over the GGUF's own codes) and CUDA where present.

- a tree's node scores are those of decoding its path one token at a time (exact where the backend is
  batch-invariant: strict, gguf, q8act; within fp32 rounding elsewhere);
- after `commit`, the cache holds exactly the accepted path: the next scores equal a fresh prefill's;
- rows of different lengths and tree sizes scored in one packed call score as each row alone;
- the greedy tokens are the argmax of the full logits, top-k hints are its k best;
- auxiliary nodes (input vectors) change no real node's scores;
- hidden states are the model's own (`output_hidden_states`) where the weights are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from conftest import make_tiny_model, quantise_linears, score
from specdec.trees.tree import Tree
from specdec.verifiers.base import NodeInputs
from specdec.verifiers.hf import HFVerifier
from specdec.verifiers.lean import LeanVerifier
from specdec.verifiers.q8act import as_q8
from specdec.verifiers.quant import unpack

ATOL = 3e-5  # fp32 logits of O(1-10): the torch forward differs from a sequential one by reassociation only


@dataclass(frozen=True)
class Backend:
    name: str
    build: Callable[[torch.nn.Module], object]  # the (possibly quantised in place) model -> verifier
    quantised: bool = False  # its weights are the GGUF's codes: the model is given their dequantised values
    exact: bool = False  # batch-invariant: every node's scores bitwise a lone row's
    batched: bool = True
    device: str = "cpu"


def _quant(model) -> dict:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {name: unpack(kind, raw, *model.get_submodule(name).weight.shape)
            for name, (kind, raw) in quantise_linears(model, names, ["Q8_0", "Q5_0"]).items()}


BACKENDS = [
    Backend("hf", HFVerifier, batched=False),
    Backend("lean", lambda m: LeanVerifier(m, gemm="linear")),
    Backend("strict", lambda m: LeanVerifier(m, gemm="linear", strict=True), exact=True),
    Backend("gguf", lambda m: LeanVerifier(m, gemm="linear", quant=_quant(m)), quantised=True, exact=True),
    Backend("q8act", lambda m: LeanVerifier(m, gemm="linear", quant=as_q8(_quant(m))), quantised=True, exact=True),
    Backend("cuda", lambda m: LeanVerifier(m.cuda(), gemm="linear"), device="cuda"),
]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request) -> Backend:
    if request.param.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    return request.param


@pytest.fixture(params=["llama", "gemma3"])
def arch(request) -> str:
    return request.param


def built(backend: Backend, arch: str):
    """(model, verifier): the model as the verifier computes it (for quantised formats its linears hold the
    dequantised codes, so transformers' forward of it is the fp32 reference)."""
    model = make_tiny_model(arch)
    verifier = backend.build(model)  # _quant replaces the linears' weights before the verifier reads them
    return model, verifier


def close(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(got.cpu(), want.cpu())
    else:
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=ATOL, rtol=0)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


TREE = Tree.from_parents([-1, 0, 0, 1, 1, 2, 3])  # root, two children, grandchildren, a depth-3 node


def started(backend: Backend, arch: str, length: int, seed: int):
    """(model, verifier, context, tree tokens): a `length`-token context prefilled in slot 0 (all but its last
    token, the next tree's root), and TREE's tokens rooted at it."""
    model, v = built(backend, arch)
    context = prompt(length, seed=seed)
    v.reset(1, 128)
    v.prefill(0, torch.tensor(context[:-1]))
    return model, v, context, [context[-1]] + prompt(TREE.size - 1, seed=seed + 100)


def step(v, token: int) -> torch.Tensor:
    """[V] logits of one plain decoding step feeding `token` (its KV committed)."""
    out = score(v, [0], torch.tensor([[token]]), torch.zeros(1, 1, dtype=torch.long),
                torch.ones(1, 1, 1, dtype=torch.bool))[0, 0]
    v.commit(0, [0])
    return out


def test_tree_nodes_score_as_their_paths_decoded_token_by_token(backend, arch):
    _, v, context, tokens = started(backend, arch, 11, seed=1)  # node i's token; node 0 is the root
    tree_out = score(v, [0], torch.tensor([tokens]), TREE.depth[None], TREE.mask[None])[0]  # [n, V]
    v.commit(0, [0])
    for node in range(TREE.size):
        path = []
        at = node
        while at > 0:
            path.append(tokens[at])
            at = TREE.parents[at]
        path.reverse()  # the node's ancestors' tokens then its own, root excluded
        # plain decoding of that path: the context prefilled, then one token a step; the scores at `node` are
        # those of the step that fed the node's own token
        v.reset(1, 128)
        v.prefill(0, torch.tensor(context[:-1]))
        for tok in [context[-1]] + path:
            alone = step(v, tok)
        close(tree_out[node], alone, backend.exact)


def test_commit_keeps_exactly_the_accepted_path(backend, arch):
    _, v, context, tokens = started(backend, arch, 9, seed=3)
    score(v, [0], torch.tensor([tokens]), TREE.depth[None], TREE.mask[None])
    path = [0, 2, 5]  # root, its second child, that child's child
    v.commit(0, path)
    assert v.length(0) == len(context) - 1 + len(path)
    nxt = prompt(1, seed=5)
    after = step(v, nxt[0])
    v.reset(1, 128)  # plain decoding of the same tokens: the context prefilled, then one token a step
    v.prefill(0, torch.tensor(context[:-1]))
    for tok in [context[-1]] + [tokens[i] for i in path[1:]] + nxt:
        want = step(v, tok)
    close(after, want, backend.exact)


def test_packed_rows_score_as_each_row_alone(backend, arch):
    if not backend.batched:
        pytest.skip("scores one row at a time")
    _, v = built(backend, arch)
    contexts = [prompt(n, seed=10 + n) for n in (5, 17, 9)]
    trees = [TREE, Tree.chain(2), Tree.chain(0)]
    drafts = [[c[-1]] + prompt(t.size - 1, seed=20 + i) for i, (c, t) in enumerate(zip(contexts, trees))]
    n = max(t.size for t in trees)
    tokens = torch.zeros(3, n, dtype=torch.long)
    depth = torch.zeros(3, n, dtype=torch.long)
    mask = torch.eye(n, dtype=torch.bool).repeat(3, 1, 1)
    for b, (t, d) in enumerate(zip(trees, drafts)):
        tokens[b, : t.size], depth[b, : t.size], mask[b, : t.size, : t.size] = torch.tensor(d), t.depth, t.mask
    v.reset(3, 128)
    for slot, c in enumerate(contexts):
        v.prefill(slot, torch.tensor(c[:-1]))
    sizes = [t.size for t in trees]
    packed = v.score_nodes([0, 1, 2], tokens, depth, mask, sizes).logits()  # [sum(sizes), V]
    lo = 0
    for b, (c, t, d) in enumerate(zip(contexts, trees, drafts)):
        v.reset(1, 128)
        v.prefill(0, torch.tensor(c[:-1]))
        alone = score(v, [0], torch.tensor([d]), t.depth[None], t.mask[None])[0]
        close(packed[lo: lo + t.size], alone, backend.exact)
        lo += t.size


def test_greedy_tokens_and_hints_are_the_logits_own(backend, arch):
    _, v, _, tokens = started(backend, arch, 13, seed=6)
    scores = v.score_nodes([0], torch.tensor([tokens]), TREE.depth[None].to(v.device), TREE.mask[None])
    argmax, hints = scores.greedy(4)
    logits = scores.logits()
    assert torch.equal(argmax.cpu(), logits.argmax(-1).cpu())
    assert torch.equal(hints.cpu(), logits.topk(4, dim=-1).indices.cpu())


def test_aux_nodes_change_no_real_node(backend, arch):
    model, v, context, tokens = started(backend, arch, 10, seed=8)
    plain = score(v, [0], torch.tensor([tokens]), TREE.depth[None], TREE.mask[None])[0]
    v.commit(0, [0])
    v.reset(1, 128)
    v.prefill(0, torch.tensor(context[:-1]))
    n, m = TREE.size, 2
    parents = list(TREE.parents) + [1, n]  # an aux node under node 1, a second under the first aux node
    tree = Tree.from_parents(parents)
    hidden = model.config.hidden_size
    vectors = torch.randn(m, hidden, generator=torch.Generator().manual_seed(0)).to(v.device)
    embeds = NodeInputs(torch.tensor([n, n + 1], device=v.device), vectors)
    out = v.score_nodes([0], torch.tensor([tokens + [0, 0]]), tree.depth[None], tree.mask[None], [n + m],
                        embeds=embeds).logits()
    close(out[:n], plain, backend.exact)


def test_hidden_states_are_the_models(backend, arch):
    if backend.quantised:
        pytest.skip("the glued forward's states are checked through its logits against transformers")
    model, v = built(backend, arch)
    ids = prompt(12, seed=11)
    v.reset(1, 128)
    v.prefill(0, torch.tensor(ids[:-1]))
    layers = (0, 1, -1)
    scores = v.score_nodes([0], torch.tensor([[ids[-1]]]), torch.zeros(1, 1, dtype=torch.long),
                           torch.ones(1, 1, 1, dtype=torch.bool), hidden_layers=layers)
    with torch.no_grad():
        ref = model.cpu()(torch.tensor([ids]), output_hidden_states=True).hidden_states  # [L + 1] x [1, T, H]
    for layer in layers:
        want = ref[len(ref) - 1 if layer == -1 else layer][0, -1]
        close(scores.hidden(layer)[0], want, exact=False)


def test_scores_are_transformers_own(backend, arch):
    """The forward itself: the last node's logits equal transformers' forward of the same (dequantised) model."""
    model, v = built(backend, arch)
    ids = prompt(15, seed=12)
    v.reset(1, 128)
    v.prefill(0, torch.tensor(ids[:-1]))
    got = score(v, [0], torch.tensor([[ids[-1]]]), torch.zeros(1, 1, dtype=torch.long),
                torch.ones(1, 1, 1, dtype=torch.bool))[0, 0]
    with torch.no_grad():
        want = model.cpu()(torch.tensor([ids])).logits[0, -1].float()
    if backend.name == "q8act":  # int8 activations: close to fp32, not equal (its own format)
        assert (got.cpu() - want).abs().max() < 0.05 * want.abs().max()
    else:
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
