"""The plan (`specdec.plan`): what a SpecDecoder builds, decided from the settings and the model's files alone."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from specdec.errors import SpecdecError
from specdec.plan import ModelFacts, Plan, check_device, model_facts, resolve

BUILTIN = ModelFacts("gguf", "gemma3-270m", lean=True, kernel_kinds=("Q4_K", "Q8_0"), named_gguf=True)
ALL_FLOAT = ModelFacts("gguf", "tiny", lean=True, kernel_kinds=(), named_gguf=True)
NO_LEAN = ModelFacts("gguf", "odd", lean=False, why_not_lean="architecture 'falcon'", kernel_kinds=("Q8_0",),
                     named_gguf=True)
DIRECTORY = ModelFacts("directory", "tiny-dir", lean=True)
LOADED = ModelFacts("loaded", "tiny", lean=True)


def plan_of(facts: ModelFacts, **settings) -> tuple:
    p = resolve(facts, **settings)
    return p.load, p.weights, p.backend


@pytest.mark.parametrize("facts, settings, expected", [
    (BUILTIN, {}, ("native", "gguf", "lean")),  # the default
    (BUILTIN, {"weights": "q8act"}, ("native", "q8act", "lean")),
    (BUILTIN, {"backend": "hf"}, ("dequantised", "fp32", "hf")),
    (BUILTIN, {"strict": True}, ("dequantised", "fp32", "lean")),
    (BUILTIN, {"fp32_drafter": True}, ("dequantised", "gguf", "lean")),  # lexical / diffusion need fp32 weights
    (BUILTIN, {"quant_given": True}, ("dequantised", "gguf", "lean")),
    (BUILTIN, {"weights": "bf16"}, ("dequantised", "bf16", "lean")),
    (ALL_FLOAT, {}, ("native", "fp32", "lean")),  # its values as they are
    (ALL_FLOAT, {"backend": "hf"}, ("dequantised", "fp32", "hf")),
    (NO_LEAN, {}, ("dequantised", "fp32", "hf")),
    (DIRECTORY, {}, ("directory", "fp32", "lean")),
    (LOADED, {}, ("given", "fp32", "lean")),
    (ModelFacts("loaded", "gemma3-270m", lean=True, named_gguf=True), {}, ("given", "gguf", "lean")),
])
def test_the_rules(facts, settings, expected):
    assert plan_of(facts, **settings) == expected


def test_automatic_choices_say_why():
    assert resolve(BUILTIN).notes == ()
    assert resolve(BUILTIN, backend="hf").notes == ("weights fp32: the hf backend",)
    assert resolve(NO_LEAN).notes == ("weights fp32: architecture 'falcon'", "backend hf: architecture 'falcon'")
    assert resolve(ALL_FLOAT).notes == ("weights fp32: the GGUF holds no block type the kernels run",)
    assert resolve(BUILTIN, device="cuda").weights == "fp32"  # the kernels are CPU code (no GPU needed to decide)


@pytest.mark.parametrize("facts, settings, message", [
    (BUILTIN, {"weights": "gguf", "backend": "hf"}, "need the lean backend"),
    (BUILTIN, {"strict": True, "backend": "hf"}, "strict mode needs the lean backend"),
    (BUILTIN, {"weights": "gguf", "device": "cuda"}, "runs on the CPU only"),
    (ALL_FLOAT, {"weights": "q8act"}, "no block type the kernels run"),
    (NO_LEAN, {"backend": "lean"}, "cannot run this model \\(architecture 'falcon'\\)"),
    (NO_LEAN, {"weights": "gguf"}, "cannot run this model"),
    (DIRECTORY, {"weights": "gguf"}, "needs the model by name"),
    (LOADED, {"weights": "q8act"}, "needs the model by name"),
    (LOADED, {"weights": "bf16"}, "loaded in bfloat16"),
    (BUILTIN, {"weights": "fp32", "quant_given": True}, "quant weights are the gguf format's"),
    (BUILTIN, {"weights": "int4"}, "unknown weight format 'int4'"),
    (BUILTIN, {"backend": "vllm"}, "unknown backend 'vllm'"),
])
def test_impossible_settings_are_one_line_errors(facts, settings, message):
    with pytest.raises(SpecdecError, match=message) as err:
        resolve(facts, **settings)
    assert "\n" not in str(err.value)


def test_plan_is_frozen_and_printable():
    p = resolve(NO_LEAN)
    with pytest.raises(AttributeError):
        p.weights = "gguf"  # type: ignore[misc]
    assert json.loads(json.dumps(p.as_dict())) == {
        "model": "odd", "load": "dequantised", "weights": "fp32", "backend": "hf", "strict": False, "device": "cpu",
        "notes": ["weights fp32: architecture 'falcon'", "backend hf: architecture 'falcon'"]}
    assert p.line().startswith("model=odd load=dequantised weights=fp32 backend=hf strict=False device=cpu (")
    assert isinstance(p, Plan)


def test_devices():
    assert check_device("cpu") == "cpu"
    with pytest.raises(SpecdecError, match="give cpu, cuda or cuda:N"):
        check_device("gpu0")
    with pytest.raises(SpecdecError, match="runs on cpu or cuda"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(SpecdecError, match="no CUDA GPU"):
            check_device("cuda")


def test_facts_of_files_and_models(tmp_path, tiny_model_dir):
    from test_native import write_gguf

    quantised, floats = tmp_path / "q.gguf", tmp_path / "f.gguf"
    write_gguf(make_tiny_model("llama"), quantised, kinds=("Q8_0", "Q5_0"))
    write_gguf(make_tiny_model("llama"), floats, kinds=("F32",), embed_kind="F32")
    q = model_facts(str(quantised))
    assert (q.source, q.lean, q.kernel_kinds, q.named_gguf) == ("gguf", True, ("Q5_0", "Q8_0"), True)
    assert model_facts(str(floats)).kernel_kinds == ()
    d = model_facts(str(tiny_model_dir))
    assert (d.source, d.lean, d.kernel_kinds, d.named_gguf) == ("directory", True, None, False)
    model = make_tiny_model("qwen2")
    assert model_facts(model).source == "loaded" and model_facts(model).dtype == "float32"
    model.config.hidden_act = "relu"  # an activation the lean forward lacks
    facts = model_facts(model)
    assert not facts.lean and "activation" in facts.why_not_lean
    assert plan_of(facts) == ("given", "fp32", "hf")


def test_partial_rotary_gguf_is_not_planned_on_the_lean_forward(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_key_length(16)
    writer.add_rope_dimension_count(8)  # half the head rotated (Phi-4-mini style)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    facts = model_facts(str(path))
    assert not facts.lean and "partial rotary embeddings (8 of 16 dimensions)" in facts.why_not_lean
    assert plan_of(facts) == ("dequantised", "fp32", "hf")


def test_decoder_keeps_its_plan_and_refuses_a_missing_gpu_before_loading(tiny_model_dir):
    from specdec.api import SpecDecoder

    decoder = SpecDecoder(str(tiny_model_dir), drafter="plain")
    assert (decoder.plan.load, decoder.plan.weights, decoder.plan.backend) == ("directory", "fp32", "lean")
    assert decoder.weights == decoder.plan.weights
    if not torch.cuda.is_available():
        with pytest.raises(SpecdecError, match="no CUDA GPU"):
            SpecDecoder("no/such/model", drafter="plain", device="cuda")  # the device is checked first


def test_cli_prints_the_plan(tiny_model_dir):
    from test_cli import run

    res = run("generate", "the quick", "--model", str(tiny_model_dir), "--drafter", "plain", "--max-new-tokens", "3",
              "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["plan"] == {"model": tiny_model_dir.resolve().name, "load": "directory",
                                              "weights": "fp32", "backend": "lean", "strict": False,
                                              "device": "cpu", "notes": []}
    res = run("generate", "the quick", "--model", str(tiny_model_dir), "--drafter", "plain", "--max-new-tokens", "3",
              "--stats")
    assert res.exit_code == 0 and "[stats] plan: model=" in res.stderr
    res = run("generate", "the quick", "--model", str(tiny_model_dir), "--device", "tpu")
    assert res.exit_code != 0 and "unknown device 'tpu'" in res.output
