"""Real masked diffusion LMs (`specdec.drafters.diffusion.dlm`): Dream and LLaDA directories in their released
naming conventions load without remote code, and the lattice of the lean bidirectional forward is the model's
distribution at the convention's shift (Dream: read one position earlier; LLaDA: at the mask), checked against
transformers with a full bidirectional mask and against a reference written from the files; the context is
attended both ways; ragged batches and the context window change nothing for a row; wrong directories are
refused in one line.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from dlm_fixtures import reference_logits, write_tiny_dream, write_tiny_llada
from specdec.drafters.base import DraftRow, Needs
from specdec.drafters.diffusion.dlm import DiffusionLM, load_dlm
from specdec.errors import SpecdecError

WRITERS = {"dream": write_tiny_dream, "llada": write_tiny_llada}
KINDS = tuple(WRITERS)
VOCAB = 512
K = 5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dlm")
    return {kind: write(root / kind) for kind, write in WRITERS.items()}


@pytest.fixture(scope="module")
def backends(dirs) -> dict[str, DiffusionLM]:
    return {kind: load_dlm(path, gemm="linear") for kind, path in dirs.items()}


def context(length: int, seed: int) -> torch.Tensor:  # [length] int64, no special ids (0..2, 511 = mask)
    return torch.randint(3, VOCAB - 1, (length,), generator=torch.Generator().manual_seed(seed))


def lattice(backend: DiffusionLM, contexts: list[torch.Tensor], k: int = K, slots=None) -> torch.Tensor:
    slots = range(len(contexts)) if slots is None else slots
    return backend.lattice([DraftRow(s, c) for s, c in zip(slots, contexts)], k).logprobs  # [B, k, V]


def bidirectional_hf(backend: DiffusionLM, tokens: list[int]) -> torch.Tensor:
    """[T, V] float64 log-probs: the transformers model itself (in float64) with an all-True 4D mask."""
    model = copy.deepcopy(backend.model).double()
    n = len(tokens)
    with torch.no_grad():
        out = model(torch.tensor([tokens]), attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool))
    return out.logits[0].log_softmax(-1)


def read_at_shift(logp: torch.Tensor, length: int, shift: int, k: int = K) -> torch.Tensor:  # [k, V]
    return logp[length - shift: length - shift + k]


# ---- (1) the lattice is the model's distribution at the convention's shift ---------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, 6, 17])
def test_lattice_equals_transformers_with_bidirectional_mask(backends, kind, length):
    be = backends[kind]
    ctx = context(length, seed=length)
    got = lattice(be, [ctx])[0]  # [K, V]
    assert got.shape == (K, VOCAB) and got.dtype == torch.float32
    ref = bidirectional_hf(be, ctx.tolist() + [be.convention.mask_token_id] * K)
    shift = be.convention.shift
    assert shift == {"dream": 1, "llada": 0}[kind]
    torch.testing.assert_close(got.double(), read_at_shift(ref, length, shift), atol=1e-5, rtol=0)
    # the other convention's reading is far off: the comparison does tell the shifts apart
    assert (got.double() - read_at_shift(ref, length, 1 - shift)).abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_lattice_equals_reference_written_from_the_files(dirs, backends, kind):
    """Independent of specdec's name mapping (gate = ff_proj, rope theta, biases): the network run straight
    from model.safetensors and config.json."""
    be = backends[kind]
    for length in (2, 9):
        ctx = context(length, seed=100 + length)
        got = lattice(be, [ctx])[0]
        ref = reference_logits(dirs[kind], ctx.tolist() + [be.convention.mask_token_id] * K).log_softmax(-1)
        torch.testing.assert_close(got.double(), read_at_shift(ref, length, be.convention.shift), atol=1e-5, rtol=0)


def test_conventions_read_from_config(backends):
    dream, llada = backends["dream"], backends["llada"]
    assert type(dream.model).__name__ == "Qwen2ForCausalLM"
    assert dream.model.model.layers[0].self_attn.q_proj.bias is not None
    assert type(llada.model).__name__ == "LlamaForCausalLM"
    for be in (dream, llada):
        assert be.convention.mask_token_id == VOCAB - 1 and be.eos_token_ids == frozenset({2})
        assert be.vocab_size == VOCAB and be.needs == Needs()
        be.reset(3)
        be.observe_hidden(3, 0, {0: torch.zeros(2, 64)})  # no-ops: a real DLM reads tokens only
    out = dream.lattice([DraftRow(0, context(4, 0))], 3)
    assert out.ids is None
    torch.testing.assert_close(out.logprobs.exp().sum(-1), torch.ones(1, 3))


# ---- (2) the context is attended bidirectionally ------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_context_is_attended_bidirectionally(backends, kind):
    be = backends[kind]
    ctx = context(8, seed=7)
    masks = [be.convention.mask_token_id] * K
    changed = ctx.clone()
    changed[-1] = (changed[-1] + 1) % (VOCAB - 1)
    # the reference is bidirectional: the last context token moves the logits at every earlier position
    before, after = bidirectional_hf(be, ctx.tolist() + masks), bidirectional_hf(be, changed.tolist() + masks)
    assert ((before - after).abs().amax(-1)[: len(ctx) - 1] > 1e-3).all()
    # the lattice depends on every context token
    base = lattice(be, [ctx])[0]
    for i in range(len(ctx)):
        other = ctx.clone()
        other[i] = (other[i] + 1) % (VOCAB - 1)
        assert (lattice(be, [other])[0] - base).abs().max() > 1e-3, f"context token {i} is ignored"
    # and the lean forward is not causal: position 0 of the lattice (Dream: the last context token; LLaDA: the
    # first mask) sees the masks after it, so it changes with their number
    assert (lattice(be, [ctx], k=1)[0, 0] - lattice(be, [ctx], k=4)[0, 0]).abs().max() > 1e-3


# ---- (3) ragged batches and the context window --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_ragged_batch_gives_each_row_its_lattice_alone(backends, kind):
    be = backends[kind]
    contexts = [context(n, seed=n) for n in (3, 11, 1, 7)]
    batch = lattice(be, contexts, slots=[5, 2, 9, 0])  # the slots are irrelevant to a stateless DLM
    for b, ctx in enumerate(contexts):
        torch.testing.assert_close(batch[b], lattice(be, [ctx])[0], atol=1e-5, rtol=0)
    # a smaller call after a larger one (the cache is reused, never re-committed) is unchanged
    torch.testing.assert_close(lattice(be, contexts[:2])[1], batch[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_context_window_keeps_the_last_tokens_renumbered_from_zero(dirs, backends, kind):
    windowed = load_dlm(dirs[kind], gemm="linear", context_window=6)
    long = context(15, seed=3)
    got = lattice(windowed, [long, long[:4]])
    torch.testing.assert_close(got[0], lattice(backends[kind], [long[-6:]])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], lattice(backends[kind], [long[:4]])[0], atol=1e-5, rtol=0)
    assert (got[0] - lattice(backends[kind], [long])[0]).abs().max() > 1e-3


def test_triton_tree_kernel_takes_the_all_true_mask_interpreted():
    """On CUDA the lean forward attends through the triton tree kernel: under the interpreter (one subprocess,
    as in test_tree_attention) its lattices equal SDPA's for ragged rows whose nodes all see each other."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (optional dependency: pip install triton)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == set(KINDS) and max(errors.values()) <= 1e-5, errors


def _interpreter_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, write in WRITERS.items():
            path = write(Path(tmp) / kind)
            kernel, sdpa = (load_dlm(path, gemm="linear", attention=a) for a in ("triton", "sdpa"))
            assert kernel.verifier.tree_kernel and not sdpa.verifier.tree_kernel
            contexts = [context(n, seed=n) for n in (3, 9, 1)]
            errors[kind] = (lattice(kernel, contexts) - lattice(sdpa, contexts)).abs().max().item()
    print(json.dumps(errors))


# ---- variants of the conventions ----------------------------------------------------------------------------

def edit(directory: Path, *, tensors=None, config=None) -> Path:
    """Rewrite a fixture directory: tensors(dict) and config(dict) mutate in place."""
    if tensors is not None:
        t = load_file(str(directory / "model.safetensors"))
        tensors(t)
        save_file(t, str(directory / "model.safetensors"))
    if config is not None:
        c = json.loads((directory / "config.json").read_text())
        config(c)
        (directory / "config.json").write_text(json.dumps(c))
    return directory


def test_llada_with_tied_head_and_dream_without_biases(tmp_path):
    tied = edit(write_tiny_llada(tmp_path / "tied"), tensors=lambda t: t.pop("model.transformer.ff_out.weight"),
                config=lambda c: c.update(weight_tying=True))
    be = load_dlm(tied, gemm="linear")
    assert be.model.lm_head.weight.data_ptr() == be.model.model.embed_tokens.weight.data_ptr()

    def unbias(t):
        for name in [n for n in t if n.endswith("_proj.bias")]:
            del t[name]

    plain = edit(write_tiny_dream(tmp_path / "nobias"), tensors=unbias)
    be = load_dlm(plain, gemm="linear")
    assert type(be.model).__name__ == "LlamaForCausalLM"
    ctx = context(5, seed=1)
    ref = reference_logits(plain, ctx.tolist() + [be.convention.mask_token_id] * K).log_softmax(-1)
    torch.testing.assert_close(lattice(be, [ctx])[0].double(), read_at_shift(ref, 5, 1), atol=1e-5, rtol=0)


def test_eos_ids_from_generation_config_and_defaults(tmp_path):
    d = write_tiny_dream(tmp_path / "gen", eos_token_id=2)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert load_dlm(d, gemm="linear").eos_token_ids == frozenset({2, 7})
    assert load_dlm(write_tiny_dream(tmp_path / "d", eos_token_id=None), gemm="linear").eos_token_ids == {151643}
    assert load_dlm(write_tiny_llada(tmp_path / "l", eos_token_id=None), gemm="linear").eos_token_ids == {126081}


# ---- (4) wrong directories are refused in one line ----------------------------------------------------------

def _plain_llama(d: Path) -> Path:
    make_tiny_model("llama").save_pretrained(d)
    return d


def _pickle_only(d: Path) -> Path:
    write_tiny_llada(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not to be unpickled")  # never opened: a torch.load would fail here
    return d


REFUSED = {
    "no config.json": (lambda d: d.mkdir() or d, "has no config.json"),
    "a causal LM": (_plain_llama, "is not a diffusion LM (config.json model_type 'llama')"),
    "pickle weights only": (_pickle_only, "holds only pickle weights (pytorch_model.bin)"),
    "dream tensor missing": (lambda d: edit(write_tiny_dream(d), tensors=lambda t: t.pop(
        "model.layers.1.mlp.up_proj.weight")), "missing tensor model.layers.1.mlp.up_proj.weight"),
    "llada tensor missing": (lambda d: edit(write_tiny_llada(d), tensors=lambda t: t.pop(
        "model.transformer.blocks.1.up_proj.weight")), "missing tensor model.transformer.blocks.1.up_proj.weight"),
    "llada shape mismatch": (lambda d: edit(write_tiny_llada(d), config=lambda c: c.update(n_kv_heads=4)),
                             "k_proj.weight is [32, 64], the config implies [64, 64]"),
    "llada fused qkv (sequential block)": (lambda d: edit(write_tiny_llada(d), tensors=lambda t: t.update(
        {"model.transformer.blocks.0.att_proj.weight": torch.zeros(3, 3)})),
        "unexpected tensor model.transformer.blocks.0.att_proj.weight"),
    "llada unsupported block": (lambda d: edit(write_tiny_llada(d), config=lambda c: c.update(
        block_type="sequential")), "block_type 'sequential' is not supported"),
    "dream config key missing": (lambda d: edit(write_tiny_dream(d), config=lambda c: c.pop("hidden_size")),
                                 "lacks 'hidden_size'"),
    "mask id outside the vocabulary": (lambda d: write_tiny_dream(d, mask_token_id=151666),
                                       "mask_token_id 151666 is outside the 512-row embedding"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_wrong_directory_is_refused_with_one_clear_line(tmp_path, case):
    make, expected = REFUSED[case]
    directory = make(tmp_path / "m")
    with pytest.raises(SpecdecError) as err:
        load_dlm(directory, gemm="linear")
    message = str(err.value)
    assert expected in message and "\n" not in message
    fix = message.rsplit(": ", 1)[-1]  # the problem, then the fix after the last colon
    assert any(verb in fix for verb in ("give", "convert", "download", "fix", "remove")), message


if __name__ == "__main__":
    _interpreter_worker()
