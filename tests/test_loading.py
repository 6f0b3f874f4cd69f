"""Model resolution and loading: tiny random models saved to tmp dirs, a tiny hand-written GGUF, and the
one-line SpecdecError for each way a spec can be wrong. Only the `slow` test touches a real model."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from conftest import add_byte_vocab
from specdec.errors import SpecdecError
from specdec.models import check_same_tokenizer, default_cache_dir, list_builtin, load_model
from specdec.models.builtin import BUILTINS, Builtin, Chunk, assemble, chunk_paths, concatenate, file_sha256

VOCAB = 256
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)


def word_tokenizer(words: list[str], eos: str = "<eos>") -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<bos>", "<eos>", "<end>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token=eos)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer([f"w{i}" for i in range(VOCAB - 4)])


def save_tiny(model, path):
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # [1, seq, vocab]


def assert_one_line_error(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


IDS = torch.tensor([[1, 17, 42, 200, 5, 99, 3, 250]])  # [1, 8]

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "gemma3_text": lambda: Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=4),
}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_tiny_directory_loads_with_identical_logits(tmp_path, model_type):
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]()).eval()
    save_tiny(original, tmp_path / "tiny")

    loaded = load_model(str(tmp_path / "tiny"), cache_dir=tmp_path / "cache")

    assert loaded.model.config.model_type == model_type
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert (loaded.name, loaded.source) == ("tiny", str(tmp_path / "tiny"))
    assert torch.equal(logits(loaded.model, IDS), logits(original, IDS))
    assert loaded.tokenizer.convert_tokens_to_ids("w0") == 4


def test_multimodal_gemma3_loads_as_its_text_model(tmp_path):
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(SMALL, vocab_size=300, head_dim=16, sliding_window=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    original = Gemma3ForConditionalGeneration(config).eval()
    save_tiny(original, tmp_path / "mm")

    loaded = load_model(str(tmp_path / "mm"))

    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert torch.equal(logits(loaded.model, IDS), logits(original, IDS))


# A qwen2 GGUF written by hand: HF parameter name -> GGUF tensor name (per layer for "layers.N.").
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.o_proj.weight": "attn_output", "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
    **{f"self_attn.{p}_proj.{kind}": f"attn_{p}" for p in "qkv" for kind in ("weight", "bias")},
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}.{rest.rsplit('.', 1)[1]}"


def write_tiny_gguf(model, path) -> None:
    """An F32 qwen2 GGUF of `model` (tied embeddings) with a byte-level BPE vocabulary of VOCAB tokens."""
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(model.config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(model.config.rms_norm_eps)
    add_byte_vocab(writer, VOCAB)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            writer.add_tensor(gguf_name(name), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_path_decodes_in_the_format_auto_picks(tmp_path):
    # weights="auto" on a .gguf path reads that file's blocks (not a file named after the model); this one holds
    # only F32 tensors, nothing the gguf kernel runs, so auto settles on fp32 and decodes like transformers
    from specdec.api import SpecDecoder, default_weights

    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(Qwen2Config(**SMALL, tie_word_embeddings=True)).eval()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(original, path)
    assert default_weights(str(path), cache_dir=str(tmp_path / "cache")) == "fp32"  # what the decoder then runs
    decoder = SpecDecoder(str(path), drafter="plain", cache_dir=str(tmp_path / "cache"))
    assert decoder.weights == "fp32" and decoder.verifier.weights == "fp32"
    ids = [3, 7, 11, 5]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():  # transformers reading the same file
        ref = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                 pad_token_id=0, top_k=None, top_p=None, temperature=None)[0, 4:].tolist()
    assert decoder.generate_ids(ids, max_new_tokens=6, stop_strings=()).tokens[:len(ref)] == ref


def test_gguf_file_is_dequantized_once_into_a_verified_cache(tmp_path):
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(Qwen2Config(**SMALL, tie_word_embeddings=True)).eval()
    write_tiny_gguf(original, tmp_path / "tiny.gguf")
    lines: list[str] = []

    first = load_model(str(tmp_path / "tiny.gguf"), cache_dir=tmp_path / "cache", log=lines.append)
    logged_first = len(lines)
    second = load_model(str(tmp_path / "tiny.gguf"), cache_dir=tmp_path / "cache", log=lines.append)

    assert any("dequantizing" in line for line in lines[:logged_first])
    assert any("cached at" in line for line in lines[:logged_first])
    assert len(lines) == logged_first  # the second load came from the cache, silently
    assert first.source == second.source and first.name == "tiny"
    leftovers = [n for n in os.listdir(tmp_path / "cache" / "models") if n.endswith(".partial")]
    assert leftovers == [] and os.path.isdir(first.source)
    assert "quantization_config" not in (tmp_path / "cache" / "models" / first.source).joinpath(
        "config.json").read_text()
    for loaded in (first, second):
        assert torch.equal(logits(loaded.model, IDS), logits(original, IDS))
        assert loaded.model.generation_config.eos_token_id == VOCAB - 1
        assert loaded.tokenizer.eos_token_id == VOCAB - 1
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_unknown_spec_names_the_accepted_forms(tmp_path):
    with pytest.raises(SpecdecError) as err:
        load_model("foo", cache_dir=tmp_path)
    assert_one_line_error(err, "model 'foo' not found", "gemma3-270m", "qwen2.5-coder-0.5b", ".gguf file")


def test_missing_directory_is_not_found(tmp_path):
    with pytest.raises(SpecdecError) as err:
        load_model(str(tmp_path / "no" / "such" / "dir"), cache_dir=tmp_path)
    assert_one_line_error(err, "not found", "a transformers model directory")


def test_directory_without_config_says_what_is_missing(tmp_path):
    with pytest.raises(SpecdecError) as err:
        load_model(str(tmp_path), cache_dir=tmp_path)
    assert_one_line_error(err, "without config.json", "save_pretrained")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    save_tiny(gpt2, tmp_path / "gpt2")
    with pytest.raises(SpecdecError) as err:
        load_model(str(tmp_path / "gpt2"), cache_dir=tmp_path)
    assert_one_line_error(err, "'gpt2'", "gemma3_text, gemma3, qwen2, qwen3, llama, mistral")


def test_same_tokenizer_passes():
    check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer(), "target", "draft")


@pytest.mark.parametrize("draft, difference", [
    (word_tokenizer(["a", "b"]), f"vocab 6 vs {VOCAB}"),
    (word_tokenizer([f"v{i}" for i in range(VOCAB - 4)]), "different token ids"),
    (word_tokenizer([f"w{i}" for i in range(VOCAB - 4)], eos="<end>"), "eos_token_id 3 vs 2"),
])
def test_different_tokenizers_are_refused(draft, difference):
    with pytest.raises(SpecdecError) as err:
        check_same_tokenizer(tiny_tokenizer(), draft, "big", "small")
    assert_one_line_error(err, "draft model 'small'", "target 'big'", difference, "pick a draft model")


def test_builtin_with_missing_packages_names_the_pip_install(tmp_path):
    absent = Builtin("ghost", "not installed", "ghost.gguf", (
        Chunk("specdec-test-absent-part1", "1.0", "specdec_test_absent_part1", "data/part01.bin"),
        Chunk("specdec-test-absent-part2", "1.0", "specdec_test_absent_part2", "data/part02.bin"),
    ), sha256=None)
    for attempt in (lambda: chunk_paths(absent), lambda: assemble(absent, tmp_path, print)):
        with pytest.raises(SpecdecError) as err:
            attempt()
        assert_one_line_error(err, "'ghost'",
                              "pip install specdec-test-absent-part1==1.0 specdec-test-absent-part2==1.0")
    assert list(tmp_path.iterdir()) == []


def test_concatenate_checks_sha_and_leaves_nothing_on_mismatch(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"GGUF")
    parts[1].write_bytes(b"rest")
    (tmp_path / "whole").write_bytes(b"GGUFrest")
    good = file_sha256(tmp_path / "whole")

    assert not concatenate(parts, tmp_path / "out" / "x.gguf", "0" * 64)
    assert list((tmp_path / "out").iterdir()) == []
    assert concatenate(parts, tmp_path / "out" / "x.gguf", good)
    assert (tmp_path / "out" / "x.gguf").read_bytes() == b"GGUFrest"


def test_builtins_are_listed_default_first():
    names = list(list_builtin())
    assert names == ["gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"] == list(BUILTINS)
    assert all(list_builtin().values())


def test_default_cache_dir_honours_specdec_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SPECDEC_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "specdec")


@pytest.mark.slow
def test_default_builtin_loads_and_reloads_from_cache():
    first = load_model()
    assert os.path.isdir(os.path.join(default_cache_dir(), "models", "gemma3-270m"))
    second = load_model()
    ids = first.tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids  # [1, seq]
    assert first.name == "gemma3-270m" and first.model.config.model_type == "gemma3_text"
    assert torch.equal(logits(first.model, ids), logits(second.model, ids))


def test_a_checked_gguf_is_stamped_and_not_hashed_again_until_it_changes(tmp_path):
    from specdec.models.builtin import _stamp, _stamped

    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUFrest")
    sha = file_sha256(path)
    assert not _stamped(path, sha)
    _stamp(path, sha)
    assert _stamped(path, sha) and not _stamped(path, "0" * 64)  # the stamp names the sha it was checked for
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # rewritten: a new time
    assert not _stamped(path, sha)
