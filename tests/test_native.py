"""A GGUF loaded in its own memory (`specdec.models.native`): tiny random models written as real GGUFs (llama.cpp
tensor names and conversions, quantised linears, a byte-level vocabulary), decoded natively and compared token
for token with transformers' own GGUF loader, and with the dequantised-cache path for the integer format."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from transformers import AutoModelForCausalLM

from conftest import VOCAB, add_byte_vocab, hf_greedy, make_tiny_model, random_prompts
from specdec.api import SpecDecoder
from specdec.errors import SpecdecError
from specdec.models.native import load_native
from specdec.verifiers.quant import RowTable
from specdec.verifiers.quant import QuantWeight

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """conftest's tiny models, plus Qwen3 (q/k norms; head_dim 128, what its GGUF config implies), Mistral and
    Phi-3 (fused [q; k; v] and [gate; up] linears)."""
    from transformers import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if arch in ("llama", "qwen2", "gemma3"):
        return make_tiny_model(arch, seed=seed)
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=128, tie_word_embeddings=True, **common))
    elif arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common))
    else:
        model = MistralForCausalLM(MistralConfig(head_dim=16, **common))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)  # as conftest: sharper distributions, varied greedy paths
    return model.eval()
PROMPTS = [[5, 17, 99, 3, 250, 7, 64, 301, 12, 45], [8, 8, 200, 31, 7, 64, 301, 12, 45, 5, 17, 99, 4]]


def write_gguf(model, path, kinds=("Q8_0", "Q5_0"), embed_kind="Q8_0", extra=None) -> None:
    """`model` as llama.cpp's converter writes it: its names, llama's q/k rows permuted for interleaved rope,
    Gemma's norms stored as 1 + w; 2-D linears in kinds[i % len(kinds)], the embedding in `embed_kind`."""
    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type.replace("_text", "")]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Mistral tiny" if cfg.model_type == "mistral" else cfg.model_type)
    writer.add_context_length(4096)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters.get("rope_theta", 10000.0)
                                    if "rope_theta" in cfg.rope_parameters else 10000.0))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
    add_byte_vocab(writer, VOCAB)
    if arch == "phi3":
        writer.add_pad_token_id(0)  # as Phi-3's GGUFs do (transformers' Phi-3 config defaults to 32000)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    tied = bool(cfg.tie_word_embeddings)
    i = 0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        stem, suffix = name.rsplit(".", 1)
        target = f"{names.get_name(stem)}.{suffix}"
        w = tensor.float().numpy()
        if arch == "llama" and (".attn_q." in target or ".attn_k." in target):
            heads = cfg.num_attention_heads if ".attn_q." in target else cfg.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if arch == "gemma3" and "norm" in target:
            w = w + 1.0
        if w.ndim == 2:
            kind = embed_kind if target.startswith("token_embd") else kinds[i % len(kinds)]
            i += 1
            if kind != "F32":
                raw = quants.quantize(np.ascontiguousarray(w), getattr(GGMLQuantizationType, kind))
                writer.add_tensor(target, raw, raw_shape=raw.shape, raw_dtype=getattr(GGMLQuantizationType, kind))
                continue
        writer.add_tensor(target, np.ascontiguousarray(w, dtype=np.float32))
    for name, value in (extra or {}).items():  # tensors the converter adds (Llama 3's rope_freqs)
        writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_of(path) -> torch.nn.Module:
    """transformers' own reading of the GGUF (dequantised to fp32): the reference."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_native_gguf_decodes_like_transformers_reading_the_same_file(tmp_path, arch):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(tiny(arch), path)
    reference = transformers_of(path)
    # llama.cpp writes Mistral as llama, and transformers reads it back as llama (its "mistral" mapping, taken
    # only for a file named exactly "mistral", then fails in gguf-py's name tables)
    assert reference.config.model_type == {"mistral": "llama", "gemma3": "gemma3_text"}.get(arch, arch)
    cache = str(tmp_path / "cache")
    plain = SpecDecoder(str(path), drafter="plain", cache_dir=cache)
    assert plain.weights == "gguf" and plain.verifier.weights == "gguf"
    assert all(p.is_meta for n, p in plain.model.named_parameters() if n.endswith("proj.weight"))  # no fp32 copy
    ngram = SpecDecoder(str(path), drafter="ngram", cache_dir=cache, tree_budget=6)
    for prompt in PROMPTS + random_prompts(3, seed=4, length=12):  # 5 prompts x 64 tokens
        want = hf_greedy(reference, prompt, 64)
        assert plain.generate_ids(prompt, max_new_tokens=64, eos_token_id=[]).tokens == want
        assert ngram.generate_ids(prompt, max_new_tokens=64, eos_token_id=[]).tokens == want


@pytest.mark.parametrize("kinds", [("Q8_0", "Q5_0"), ("Q5_0",), ("Q8_0",)])  # one kind: stacked as read
def test_native_integer_format_gives_the_cached_paths_tokens(tmp_path, kinds):
    # q8act quantises activations, so transformers is not its reference: the dequantised-cache path is (the
    # same kernel on the same codes); a drafter that needs the dense target takes that path
    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model("qwen2"), path, kinds=kinds)
    cache = str(tmp_path / "cache")
    native = SpecDecoder(str(path), drafter="plain", weights="q8act", cache_dir=cache)
    assert native.weights == "q8act" and any(p.is_meta for p in native.model.parameters())
    from specdec.api import gguf_weights
    from specdec.models.loading import load_model

    loaded = load_model(str(path), cache_dir=cache)
    assert not any(p.is_meta for p in loaded.model.parameters())
    cached = SpecDecoder(loaded, drafter="plain", weights="q8act", cache_dir=cache,
                         quant=gguf_weights(str(path), loaded.model, cache, fmt="gguf"))
    for prompt in PROMPTS:
        assert native.generate_ids(prompt, max_new_tokens=20, eos_token_id=[]).tokens == \
            cached.generate_ids(prompt, max_new_tokens=20, eos_token_id=[]).tokens


def test_embedding_rows_are_read_from_the_file_and_the_entry_is_reused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model("qwen2"), path, embed_kind="Q5_0")
    lines: list[str] = []
    first = load_native(str(path), cache_dir=tmp_path / "cache", log=lines.append)
    assert any("checking" in line for line in lines)
    table = first.quant["model.embed_tokens"]
    assert isinstance(table, RowTable) and table.kind == "Q5_0"
    reference = transformers_of(path).model.embed_tokens.weight.detach()
    ids = torch.tensor([[3, 500, 3], [0, 77, 511]])
    assert torch.equal(table.rows(ids), reference[ids])  # gguf-py's values, row by row
    assert isinstance(first.quant["lm_head"], QuantWeight)  # untied: output.weight is the head
    lines.clear()
    load_native(str(path), cache_dir=tmp_path / "cache", log=lines.append)
    assert not any("checking" in line or "reading" in line for line in lines)  # the entry is reused


def test_block_type_the_kernels_lack_is_named_in_one_line(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model("qwen2"), path, kinds=("Q8_0", "Q4_1"))
    with pytest.raises(SpecdecError) as err:
        SpecDecoder(str(path), drafter="plain", cache_dir=str(tmp_path / "cache"))
    message = str(err.value)
    assert "\n" not in message and "Q4_1" in message and "--weights fp32" in message


def test_all_float_gguf_runs_natively_in_fp32(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model("gemma3"), path, kinds=("F32",), embed_kind="F32")
    decoder = SpecDecoder(str(path), drafter="plain", cache_dir=str(tmp_path / "cache"))
    assert decoder.weights == "fp32" and not any(p.is_meta for p in decoder.model.parameters())
    reference = transformers_of(path)
    assert decoder.generate_ids(PROMPTS[0], max_new_tokens=16, eos_token_id=[]).tokens == \
        hf_greedy(reference, PROMPTS[0], 16)
    with pytest.raises(SpecdecError, match="no block type the kernels run"):
        SpecDecoder(str(path), drafter="plain", weights="gguf", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3"])
def test_tensor_names_are_transformers_own(arch):
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from specdec.models.conversion import processor
    from specdec.models.native import gguf_names
    from specdec.models.native_model import hf_names

    model = tiny(arch)
    theirs = get_gguf_hf_weights_map(model, processor(model.config, arch))
    params = dict(model.named_parameters(remove_duplicate=False))  # theirs also names buffers
    want = {g: p for g, p in theirs.items() if p in params}
    assert gguf_names(model, arch) == want
    assert hf_names(list(want) + ["rope_freqs.weight"]) == want  # from the file's names alone, no model


def test_draft_model_named_by_a_gguf_loads_natively_and_stays_lossless(tmp_path):
    from specdec.drafters.model import ModelDrafter
    from specdec.drafters.registry import make_drafter
    from specdec.engine import Engine, StopConditions

    target = make_tiny_model("qwen2")
    path = tmp_path / "draft.gguf"
    write_gguf(make_tiny_model("qwen2", seed=1), path)
    drafter = make_drafter("model", vocab_size=VOCAB, draft_model=str(path), cache_dir=str(tmp_path / "cache"), k=3)
    lean = drafter._seqs[0].runner.lean
    assert isinstance(drafter, ModelDrafter) and lean.glued  # weights=auto: q8act, natively
    assert type(lean.lm_head.quant).__name__ == "Q8Weight" and isinstance(lean.embed, RowTable)
    from specdec.verifiers.hf import HFVerifier

    result = Engine(HFVerifier(target), drafter, 6).generate(PROMPTS[0], StopConditions(24))
    assert result.tokens == hf_greedy(target, PROMPTS[0], 24)


def test_benches_load_a_gguf_natively_when_no_method_needs_fp32(tmp_path):
    import json

    from specdec.bench.batch import BatchBenchSpec, run_batch_bench
    from specdec.bench.spec_bench import BenchSpec, native_format, run_bench

    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model("qwen2"), path)
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) for i, (c, t) in
                                 enumerate([("coding", "hello hello hello world"), ("math", "he ll he ll 1 2 3")])))
    methods = ("plain@gguf", "ngram@gguf", "plain@q8act", "ngram@q8act")
    spec = BenchSpec(model=str(path), prompts=str(prompts), max_new_tokens=8, methods=methods,
                     out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert native_format(spec) == "gguf"
    assert native_format(BenchSpec(model=str(path), methods=("hf-plain", "plain@gguf"))) is None  # needs fp32
    assert native_format(BenchSpec(model=str(path), methods=("lexical@gguf",))) is None  # computes with it
    run_bench(spec, log=lambda _: None, echo=lambda _: None)
    rows = json.loads(next((tmp_path / "out").glob("*.json")).read_text())["rows"]
    out = {(r["question_id"], r["method"]): r["tokens"] for r in rows}
    for q in (0, 1):
        assert len(out[q, "plain@gguf"]) == 8
        assert out[q, "ngram@gguf"] == out[q, "plain@gguf"] and out[q, "ngram@q8act"] == out[q, "plain@q8act"]
    report = run_batch_bench(BatchBenchSpec(model=str(path), prompts=str(prompts), weights="q8act", n_prompts=2,
                                            max_new_tokens=6, batch_sizes=(2,), repeats=1,
                                            cache_dir=str(tmp_path / "cache")), log=lambda _: None,
                             echo=lambda _: None)
    assert [t["method"] for t in report["table"]] == ["plain", "spec"]
    assert all(t["exact_match"] == 1.0 for t in report["table"])


def test_the_entry_tokenizer_is_autotokenizers(tmp_path):
    from transformers import AutoTokenizer

    from specdec.models.native import load_tokenizer

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny("qwen2"), path)
    loaded = load_native(str(path), cache_dir=tmp_path / "cache")
    entry = next((tmp_path / "cache" / "models").glob("*.gguf-meta"))
    ours, theirs = load_tokenizer(entry), AutoTokenizer.from_pretrained(entry)
    assert loaded.tokenizer.get_vocab() == theirs.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "all_special_ids", "chat_template"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    for text in ("hello world", "he ll he<|eos|>llo", " \n\t 123 <|bos|>x"):
        ids = theirs(text).input_ids
        assert ours(text).input_ids == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("weights", ["gguf", "q8act"])
def test_self_drafter_runs_on_a_native_targets_own_weights(tmp_path, weights):
    from specdec.verifiers.quant import QuantLinear

    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model("gemma3"), path)
    cache = str(tmp_path / "cache")
    plain = SpecDecoder(str(path), drafter="plain", weights=weights, cache_dir=cache)
    spec = SpecDecoder(str(path), drafter="self", weights=weights, cache_dir=cache, tree_budget=6,
                       drafter_options={"skip": [1, 2], "k": 3})
    assert any(p.is_meta for p in spec.model.parameters())  # native: the self drafter did not need fp32 weights
    lean = spec.drafter._seqs[0].runner.lean
    assert isinstance(lean.lm_head, QuantLinear) and len(lean.layers) == 2  # the target's codes, 2 of 4 layers
    scored = 0
    for prompt in PROMPTS:
        result = spec.generate_ids(prompt, max_new_tokens=32, eos_token_id=[])
        assert result.tokens == plain.generate_ids(prompt, max_new_tokens=32, eos_token_id=[]).tokens
        scored += sum(result.stats.tree_sizes) - result.stats.steps
    assert scored > 0


def test_a_tensor_of_another_shape_than_the_metadata_describes_is_one_line(tmp_path):
    model = make_tiny_model("qwen2")
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"blk.0.ffn_down.weight") + len(b"blk.0.ffn_down.weight")
    n_dims = int.from_bytes(raw[at: at + 4], "little")
    assert n_dims == 2
    raw[at + 4: at + 20] = (64).to_bytes(8, "little") + (128).to_bytes(8, "little")  # [128, 64], not [64, 128]
    path.write_bytes(bytes(raw))
    with pytest.raises(SpecdecError) as err:
        SpecDecoder(str(path), drafter="plain", cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value) and "blk.0.ffn_down.weight" in str(err.value)


def test_llama3_rope_factors_in_the_gguf_are_applied(tmp_path):
    """Llama 3.x GGUFs carry their rope scaling as `rope_freqs` factors (transformers' GGUF reader drops them):
    natively and in fp32 the model decodes as transformers' llama3 rope computes it from the original config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=4096, head_dim=16,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters=rope)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    rotary = model.model.rotary_emb
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    factors = (default / rotary.inv_freq.double()).float().numpy()  # what llama.cpp's converter writes
    assert factors.max() > 7.9  # the scaling changes most frequencies here
    path = tmp_path / "tiny-llama3.gguf"
    write_gguf(model, path, extra={"rope_freqs.weight": factors})
    dropped = transformers_of(path)  # transformers' reading: default rope
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict(dropped.state_dict())  # the file's weights, llama3 rope from the config
    cache = str(tmp_path / "cache")
    native = SpecDecoder(str(path), drafter="plain", cache_dir=cache)
    fp32 = SpecDecoder(str(path), drafter="plain", weights="fp32", cache_dir=cache)
    prompts = PROMPTS + random_prompts(3, seed=5, length=12)
    wants = [hf_greedy(reference, p, 48) for p in prompts]
    assert any(hf_greedy(dropped, p, 48) != w for p, w in zip(prompts, wants))  # the factors matter
    for prompt, want in zip(prompts, wants):
        assert native.generate_ids(prompt, max_new_tokens=48, eos_token_id=[]).tokens == want
        assert fp32.generate_ids(prompt, max_new_tokens=48, eos_token_id=[]).tokens == want


def test_drafters_train_on_the_targets_real_weights_and_its_default_format(tmp_path):
    """`training_decoder`: a GGUF target that would load natively (quantised linears and embedding, a meta shell)
    is loaded with its fp32 weights for training, verified in the gguf format; the diffusion drafter's network
    builds from it (it copies the embedding and the last layer)."""
    from specdec.drafters.corpus import training_decoder
    from specdec.drafters.diffusion import dflash

    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model("qwen2"), path)
    decoder = training_decoder(str(path), str(tmp_path / "cache"))
    assert decoder.weights == "gguf"
    assert not any(p.is_meta for p in decoder.model.parameters())
    m = decoder.model
    cfg = dflash.DFlashConfig(target=m.config.model_type, hidden=m.config.hidden_size, num_layers=1,
                              target_layers=m.config.num_hidden_layers, feature_layers=(1,), block=4, vocab=8)
    net = dflash.BlockDrafter(m, cfg, torch.arange(8))
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])


def test_a_warm_native_load_imports_no_transformers_model_code(tmp_path):
    # transformers' modeling code costs a start ~2 s of imports: the entry is written once with it (the check
    # against transformers' own model), a later load builds `NativeModel` from the file alone
    import subprocess
    import sys

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny("gemma3"), path)
    cache = str(tmp_path / "cache")
    want = SpecDecoder(str(path), drafter="plain", cache_dir=cache).generate_ids(PROMPTS[0], max_new_tokens=8,
                                                                                 eos_token_id=[]).tokens
    code = ("import sys; from specdec.api import SpecDecoder; "
            f"d = SpecDecoder({str(path)!r}, drafter='ngram', cache_dir={cache!r}); "
            f"print(d.generate_ids({PROMPTS[0]!r}, max_new_tokens=8, eos_token_id=[]).tokens); "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers.modeling_utils', 'torch._dynamo', "
            "'transformers.models.gemma3.modeling'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [str(want), "[]"]


def test_the_native_model_is_refused_unless_it_is_transformers_own(tmp_path):
    from specdec.models.gguf_weights import tensor_index
    from specdec.models.native import _shell
    from specdec.models.native_model import check_same, native_model

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny("gemma3"), path)
    reference = transformers_of(path)
    shell = _shell(reference.config)
    ours = native_model(reference.config, reference.generation_config, tensor_index(path))
    check_same(ours, shell, path.name)  # the same names, shapes, rotary tables and embedding scale
    rotary = ours.model.rotary_emb
    rotary.register_buffer("sliding_attention_inv_freq", rotary.sliding_attention_inv_freq * 1.0001,
                           persistent=False)
    with pytest.raises(SpecdecError, match="computes model.rotary_emb.sliding_attention_inv_freq unlike"):
        check_same(ours, shell, path.name)
    ours = native_model(reference.config, reference.generation_config, tensor_index(path))
    ours.model.layers[0].add_module("extra", torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(SpecdecError, match="another model than transformers'"):
        check_same(ours, shell, path.name)
    ours = native_model(reference.config, reference.generation_config, tensor_index(path))
    ours.model.rotary_emb.sliding_attention_attention_scaling = 2.0
    with pytest.raises(SpecdecError, match="rope settings differ"):
        check_same(ours, shell, path.name)


def test_an_entry_checked_by_an_older_version_is_checked_again(tmp_path):
    import json

    from specdec.models import native

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny("qwen2"), path)
    lines: list[str] = []
    load_native(str(path), cache_dir=tmp_path / "cache", log=lines.append)
    entry = next((tmp_path / "cache" / "models").glob("*.gguf-meta"))
    record = json.loads((entry / "checked.json").read_text())
    assert record["version"] == native._CHECK_VERSION and any("checking" in line for line in lines)
    lines.clear()
    load_native(str(path), cache_dir=tmp_path / "cache", log=lines.append)
    assert not any("checking" in line for line in lines)  # a current entry is trusted
    (entry / "checked.json").write_text(json.dumps(record | {"version": native._CHECK_VERSION - 1}))
    loaded = load_native(str(path), cache_dir=tmp_path / "cache", log=lines.append)
    assert any("checking" in line for line in lines)
    assert json.loads((entry / "checked.json").read_text())["version"] == native._CHECK_VERSION
    assert sorted(p.name for p in entry.parent.iterdir() if not p.name.endswith(".lock")) == [entry.name]
    assert loaded.tokenizer.get_vocab()  # the rewritten entry loads


def test_the_entry_records_transformers_conversion_as_orders_and_values(tmp_path):
    # llama's q/k rows are permuted (as orders, even for an all-float file: no second copy of the values), Gemma's
    # norms are stored as 1 + w (their converted values); a load then decodes as transformers without its processor
    from specdec.models.conversion import FILE, Conversion

    for arch, kinds in (("llama", ("F32",)), ("gemma3", ("Q8_0",))):
        path = tmp_path / f"{arch}.gguf"
        write_gguf(tiny(arch), path, kinds=kinds, embed_kind=kinds[0])
        cache = str(tmp_path / f"cache-{arch}")
        decoder = SpecDecoder(str(path), drafter="plain", cache_dir=cache)
        conversion = Conversion.read(next((tmp_path / f"cache-{arch}" / "models").glob("*.gguf-meta")))
        layers = tiny(arch).config.num_hidden_layers
        if arch == "llama":
            assert sorted(conversion.orders) == sorted(f"blk.{i}.attn_{x}.weight" for i in range(layers) for x in "qk")
            assert conversion.values == {}
        else:
            assert conversion.orders == {} and all("norm" in name for name in conversion.values)
            assert len(conversion.values) == 6 * layers + 1  # four norms and q/k norms a layer, the final norm
        want = hf_greedy(transformers_of(path), PROMPTS[0], 16)
        assert decoder.generate_ids(PROMPTS[0], max_new_tokens=16, eos_token_id=[]).tokens == want
        assert (next((tmp_path / f"cache-{arch}" / "models").glob("*.gguf-meta")) / FILE).stat().st_size < 2**20
