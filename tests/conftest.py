"""Shared test fixtures: tiny random Llama / Qwen2 / Gemma 3 models built in memory (no hub, no files)."""

from __future__ import annotations

import os
from typing import Sequence

import numba
import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from specdec.verifiers.base import DenseScores, NodeInputs

ARCHS = ("llama", "qwen2", "gemma3")

# Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads spin and stall.
# numba's kernels get the same count: its OpenMP threading layer shares libgomp with torch, and its first parallel
# call set the process's OpenMP thread count to numba's own (2 here), so torch's fp32 GEMMs then ran on 2 threads
# and their last bits depended on whether a numba kernel had run before (test_lean's screened-head test failed
# alone and passed in the full run). hardware.setup sets both alike for the CLI.
torch.set_num_threads(1)
numba.set_num_threads(1)
VOCAB = 512
SLIDING_WINDOW = 16  # small, so short test prompts cross it


def make_tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """A 2-4 layer random model; weights scaled up so greedy continuations are not all one token."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, tie_word_embeddings=False, **common))
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(
            num_hidden_layers=4, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            **common,
        )
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)  # sharper distributions: fewer near-ties, more varied greedy paths
    cfg = model.config
    cfg._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The whole test session's specdec cache is a temporary folder: the tiny models' latency curves, GEMM plans
    and screen calibrations never land in the user's cache. Only the real models' files (models/, gguf/: large,
    the same for every run) are the user's, linked in."""
    from specdec.models.loading import default_cache_dir

    real, before = default_cache_dir(), os.environ.get("SPECDEC_CACHE")
    cache = tmp_path_factory.mktemp("specdec-cache")
    for shared in ("models", "gguf"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(real / shared, target_is_directory=True)
    os.environ["SPECDEC_CACHE"] = str(cache)
    yield cache
    if before is None:
        del os.environ["SPECDEC_CACHE"]
    else:
        os.environ["SPECDEC_CACHE"] = before


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request):
    return make_tiny_model(request.param)


def quantise_linears(model, names: Sequence[str], kinds: Sequence[str]) -> dict[str, tuple[str, "np.ndarray"]]:
    """Each named linear of `model` quantised to GGUF blocks (kinds[i % len(kinds)] for the i-th name) with gguf-py,
    its weight replaced by the dequantised values (what loading a GGUF of the model gives): name -> (kind, raw)."""
    from gguf import GGMLQuantizationType, quants

    out = {}
    with torch.no_grad():
        for i, name in enumerate(names):
            weight = model.get_submodule(name).weight
            kind = kinds[i % len(kinds)]
            raw = quants.quantize(weight.numpy(), getattr(GGMLQuantizationType, kind))
            values = quants.dequantize(raw, getattr(GGMLQuantizationType, kind)).reshape(weight.shape)
            weight.copy_(torch.from_numpy(values))
            out[name] = (kind, raw)
    return out


def add_byte_vocab(writer, vocab: int) -> None:
    """A byte-level BPE vocabulary of `vocab` tokens in a GGUF being written (gguf-py's writer): byte tokens (all
    256 when there is room), two merges ("he", "ll"), unused fillers, then <|bos|> and <|eos|> as the last ids."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())[: vocab - 4] + ["he", "ll"]
    tokens += [f"<|unused{i}|>" for i in range(vocab - 2 - len(tokens))] + ["<|bos|>", "<|eos|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 2) + [3, 3])
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """transformers' own greedy generate(): the reference every path is compared with."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=0, top_k=None, top_p=None, temperature=None,
    )
    return out[0, len(prompt):].tolist()


def random_prompts(count: int, seed: int = 0, length: int = 10) -> list[list[int]]:
    """`count` prompts of random ids (3..VOCAB-1), lengths length, length + 2, ..."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length + 2 * i,), generator=gen).tolist() for i in range(count)]


def score(v, slots, tokens, depth, mask):
    """[B, n, V] float32 logits of every node of `v.score_nodes` (each row's n nodes all real): what tests compare."""
    b, n = tokens.shape
    return v.score_nodes(slots, tokens, depth, mask).logits().view(b, n, -1)


def score_packed(v, slots, tokens, depth, mask, sizes):
    """[sum(sizes), V] float32 logits of the real nodes of padded rows, packed row by row."""
    return v.score_nodes(slots, tokens, depth, mask, sizes).logits()


def run_engine(model, drafter, rows: list[list[int]], width: int, budget: int, params=None, new: int = 20):
    """Decode `rows` through the one loop (lean verifier, fixed node budget, `width` rows in flight) ->
    (tokens per row, the BatchResult)."""
    from specdec.engine import Engine, Request, StopConditions
    from specdec.sampling import SamplingParams
    from specdec.verifiers.lean import LeanVerifier

    eng = Engine(LeanVerifier(model, gemm="linear"), drafter, budget, width)
    params = params or [SamplingParams()] * len(rows)
    res = eng.generate_batch([Request(p, StopConditions(new), s) for p, s in zip(rows, params)])
    return [r.tokens for r in res.results], res


def make_tiny_tokenizer(vocab: int = VOCAB):
    """A byte-level BPE tokenizer trained on a few sentences, with <pad>=0, <bos>=1, <eos>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "Speculative decoding drafts and verifies tokens."]
    tok.train_from_iterator(text * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Gemma 3 model + tokenizer saved as a transformers directory (what --model DIR loads)."""
    path = tmp_path_factory.mktemp("tiny-gemma3")
    make_tiny_model("gemma3").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


class LogitsVerifier:
    """Protocol members a test double verifier gets from its own ``score``: `score_nodes` over
    full logits, one CPU row at a time, no hidden states or input vectors."""

    device = torch.device("cpu")
    num_layers = 0
    batched = False

    def reserve(self, max_len: int) -> None:  # test doubles keep their whole history
        pass

    def cache_bytes(self, num_slots: int, max_len: int) -> int:
        return 0

    def score_nodes(self, slots: Sequence[int], tokens: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor,
                    sizes: Sequence[int] | None = None, *, embeds: NodeInputs | None = None,
                    hidden_layers: Sequence[int] = ()) -> DenseScores:
        if embeds is not None or hidden_layers:
            raise ValueError(f"{type(self).__name__} scores token ids only (no input vectors, no hidden states)")
        padded = self.score(slots, tokens, depth, mask)  # type: ignore[attr-defined]  # [B, n, V]
        sizes = [tokens.shape[1]] * tokens.shape[0] if sizes is None else sizes
        return DenseScores(torch.cat([padded[b, :s] for b, s in enumerate(sizes)]))  # [R, V]
