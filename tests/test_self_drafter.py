"""The self-speculative drafter: the layer-skipping view against transformers with those layers removed,
equivalence with generate(), the tau replay, and the cached calibration."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import VOCAB, hf_greedy, make_tiny_model, make_tiny_tokenizer
from specdec.drafters.model import DraftRunner, ModelDrafter, lean_forward
from specdec.drafters.registry import make_drafter
from specdec.drafters.self_spec import replayed_tau, spec_bench_prompts
from specdec.engine import Engine, StopConditions
from specdec.errors import SpecdecError
from specdec.models.loading import LoadedModel
from specdec.verifiers.hf import HFVerifier

PROMPT = [5, 17, 99, 3, 250, 7, 64, 301, 12, 45, 46, 47, 9, 130, 220, 18, 77, 19, 400, 6]


def self_drafter(target, **options) -> ModelDrafter:
    return make_drafter("self", vocab_size=VOCAB, target=target, gemm="linear", **options)


def without_layers_hf(model, skip: set[int]):
    """transformers' own model with layers removed (layer types follow their layers): the oracle."""
    cut = copy.deepcopy(model)
    cut.model.layers = torch.nn.ModuleList([m for i, m in enumerate(cut.model.layers) if i not in skip])
    if getattr(cut.config, "layer_types", None):
        cut.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in skip]
    cut.config.num_hidden_layers = len(cut.model.layers)
    return cut


@pytest.mark.parametrize("skip", [{0}, {1}])
def test_skipping_view_matches_transformers_without_those_layers(tiny_model, skip):
    ids = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(0))  # crosses gemma's window
    with torch.no_grad():
        ref = without_layers_hf(tiny_model, skip)(ids[None], use_cache=False).logits[0]
    runner = DraftRunner(lean_forward(tiny_model, "linear").without_layers(skip), 4096)
    torch.testing.assert_close(runner.extend(ids, None, list(range(30))), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", [dict(mode="chain", k=4), dict(mode="tree", k=3, branch=2),
                                  dict(mode="chain", k=2, adaptive=True)])
@pytest.mark.parametrize("skip", [[], [1]])
def test_matches_transformers_generate(tiny_model, mode, skip):
    ref = hf_greedy(tiny_model, PROMPT, 40)
    res = Engine(HFVerifier(tiny_model), self_drafter(tiny_model, skip=skip, **mode), 8).generate(
        PROMPT, StopConditions(40))
    assert res.tokens == ref
    if not skip:  # no layer skipped: the draft is the target, everything is accepted
        assert res.stats.tau >= (3.0 if mode["mode"] == "tree" else 4.5)


def test_replayed_tau_on_literal_bits():
    # k = 2: [1 1 | 0] -> 3 tokens; [1 | end] -> 2 tokens (the draft of the 5th token is never needed)
    assert replayed_tau([[True, True, False, True]], 2) == pytest.approx(5 / 2)
    assert replayed_tau([[True] * 10], 4) == 5.0  # two steps of 4 drafts + bonus
    assert replayed_tau([[False] * 6], 3) == 1.0
    assert replayed_tau([[True, False], [False]], 1) == pytest.approx(3 / 2)


def test_calibration_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr("specdec.drafters.self_spec.overloaded", lambda: False)  # a calm machine throughout
    model = make_tiny_model("gemma3")  # 4 layers
    prompts = [torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    options = dict(calibration_prompts=prompts, calibration=dict(new_tokens=12, timing_reps=1), cache_dir=str(tmp_path))
    first = self_drafter(model, **options)
    files = list((tmp_path / "self_spec").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["skip"] == first.info["skip"] and 1 <= len(record["skip"]) <= 3
    assert record["history"][0]["skip"] == [] and record["history"][0]["agreement"] == 1.0  # the full model
    assert first.k == record["k"] and 1 <= first.k <= 8

    def no_recalibration(*args, **kwargs):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr("specdec.drafters.self_spec.calibrate", no_recalibration)
    again = self_drafter(model, **options)
    assert again.info["skip"] == first.info["skip"]
    res = Engine(HFVerifier(model), again, 8).generate(PROMPT, StopConditions(30))
    assert res.tokens == hf_greedy(model, PROMPT, 30)


def test_calibration_timed_under_load_is_measured_again_when_calm(tmp_path, monkeypatch):
    busy = [True]
    monkeypatch.setattr("specdec.drafters.self_spec.overloaded", lambda: busy[0])
    model = make_tiny_model("llama")
    prompts = [torch.randint(3, VOCAB, (16,), generator=torch.Generator().manual_seed(0)).tolist()]
    options = dict(calibration_prompts=prompts, calibration=dict(new_tokens=8, timing_reps=1), cache_dir=str(tmp_path))
    self_drafter(model, **options)
    path = next((tmp_path / "self_spec").glob("*.json"))
    assert json.loads(path.read_text())["provisional"]
    self_drafter(model, **options)  # still busy: the provisional record is used as it is
    assert json.loads(path.read_text())["provisional"]
    busy[0] = False
    self_drafter(model, **options)  # calm now: measured again
    assert not json.loads(path.read_text())["provisional"]


def test_spec_bench_calibration_prompts_are_encoded_text():
    prompts = spec_bench_prompts(make_tiny_tokenizer(), 3)
    assert len(prompts) == 3 and all(len(p) > 5 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 3


def test_errors():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="skip"):
        self_drafter(model, skip=[0, 1])  # nothing left
    with pytest.raises(ValueError, match="skip"):
        self_drafter(model, skip=[5])
    with pytest.raises(SpecdecError, match="tokenizer"):
        self_drafter(model)  # calibration needs text or prompts
    with pytest.raises(SpecdecError, match="output rows"):
        make_drafter("self", vocab_size=VOCAB, target=make_tiny_model("llama", vocab=256), skip=[0], gemm="linear")
    loaded = LoadedModel(model, make_tiny_tokenizer(), "tiny", "")
    assert self_drafter(loaded, skip=[0]).info["skip"] == [0]
