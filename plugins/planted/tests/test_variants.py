"""Planted variants (``esn_planted.model.build``'s options): content carried by generic neurons, an inert
synthesis stream, hard emotions, other layouts; each does what it is built to do through esn's real
recording, selection and steering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig
from esn.judges import Audio
from esn.masks import Mask
from esn.pipeline.synthetic import speech_like
from esn.recording import GateRecorder
from esn.selection import select_neurons
from esn.steering import steer
from esn.testing import CHECKS
from esn.wer import corpus_wer
from esn_planted import PlantedAdapter, PlantedJudge

TARGETS = ["angry", "happy", "sad", "surprise"]
GEN = GenerationConfig(max_new_tokens=8)
TEXT = "kids are talking by the door"


def load(tmp_path_factory, **options) -> PlantedAdapter:
    torch.set_num_threads(1)
    return PlantedAdapter.load(PlantedAdapter.write_tiny(tmp_path_factory.mktemp("planted"), **options))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return load(tmp_path_factory, seed=2, synth=True)


def requests(target: str, n: int = 24) -> list[EVCRequest]:
    return [EVCRequest(speech_like(11 + k % 6, "neutral", 1 + k // 6, 0.5), target, id=f"{target}{k}",
                       transcript=TEXT) for k in range(n)]


def convert(adapter, target: str, mask: Mask | None = None, alpha: float = 1.0, method: str = "steer"):
    reqs = requests(target)
    if mask is None:
        results = adapter.generate(reqs, GEN)
    else:
        with steer(adapter, mask, method, alpha):
            results = adapter.generate(reqs, GEN)
    labels = PlantedJudge().judge([Audio(r.waveform, r.sample_rate) for r in results],
                                  sources=[Audio(q.audio, 16_000) for q in reqs])
    return results, float(np.mean([j.label == target for j in labels])), \
        corpus_wer([TEXT] * len(results), [r.text for r in results]).wer


def probs(adapter, stream: str) -> np.ndarray:
    rows = []
    for target in TARGETS:
        with GateRecorder(adapter, streams=[stream]) as rec:
            adapter.generate(requests(target), GEN)
        st = rec.stats()
        rows.append((st.counts.sum(0) / st.tokens_per_neuron().sum(0)).numpy())
    return np.array(rows)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_synth_variant_meets_the_adapter_contract(synth, check):
    check(synth)


def test_synth_neurons_are_found_but_steer_nothing_audible(synth):
    layout = synth.layout(["synth"])
    assert layout.hook_points[0].name == "synth.layers.0.mlp.gate"
    truth = synth.synth_truth
    chosen = select_neurons(probs(synth, "synth"), "cas", 6 / layout.n_neurons, emotions=TARGETS)
    assert np.mean([np.isin(truth[e], chosen[e]).mean() for e in TARGETS]) >= 0.8  # they are emotion-specific
    base, match, _ = convert(synth, "happy")
    steered, moved, _ = convert(synth, "happy", Mask(truth["happy"], layout), alpha=3.0)
    assert moved == match  # ... and inert: the same codes, pitch and text, at most another loudness
    for a, b in zip(base, steered, strict=True):
        assert a.text == b.text and a.info["codes"] == b.info["codes"] and a.info["f0"] == b.info["f0"]
    lm = Mask(synth.ground_truth["happy"], synth.layout(["lm"]))
    assert convert(synth, "happy", lm)[1] > convert(synth, "happy")[1] + 0.3  # the lm side does steer


@pytest.mark.parametrize("seed", [0, 4])
def test_generic_neurons_carry_the_text(tmp_path_factory, seed):
    adapter = load(tmp_path_factory, seed=seed)
    layout = adapter.layout()
    truth, generic = adapter.ground_truth, adapter.meta["generic"]
    assert 24 <= len(generic) <= 32 and not set(generic) & {int(n) for v in truth.values() for n in v}
    for target in ("happy", "sad"):
        _, base, wer0 = convert(adapter, target)
        assert wer0 == 0.0
        _, moved, wer1 = convert(adapter, target, Mask(truth[target], layout), alpha=1.0)
        assert moved >= min(base + 0.3, 1.0) and wer1 == 0.0  # moderate alpha: the emotion moves, the text is kept
        assert convert(adapter, target, Mask(truth[target], layout), alpha=3.0)[2] >= 0.5  # strong: drift
        assert convert(adapter, target, Mask(generic, layout), alpha=1.0)[2] >= 0.5  # generic ones: the text
    # CAS ranks them under the planted ones: in masks larger than the planted set, not in the planted-size one
    p = probs(adapter, "lm")
    small = select_neurons(p, "cas", 6 / layout.n_neurons, emotions=TARGETS)
    large = select_neurons(p, "cas", 0.1, emotions=TARGETS)
    assert all(not set(small[e].tolist()) & set(generic) for e in TARGETS)
    assert all(len(set(large[e].tolist()) & set(generic)) >= 4 for e in TARGETS)


def test_without_content_the_text_never_moves(tmp_path_factory):
    adapter = load(tmp_path_factory, seed=1, content=False)
    assert adapter.meta["generic"] == [] and adapter.model.config.hidden_size == 32
    assert convert(adapter, "happy", Mask(adapter.ground_truth["happy"], adapter.layout()), alpha=4.0)[2] == 0.0


def test_a_hard_emotion_is_never_said_and_other_layouts_place_the_plant(tmp_path_factory):
    adapter = load(tmp_path_factory, seed=3, hard=("sad",), layers=6, planted_layers=(3, 4))
    assert convert(adapter, "sad")[1] == 0.0 and convert(adapter, "happy")[1] > 0.0
    assert adapter.layout().n_neurons == 6 * 64
    assert all({int(n) // 64 for n in v} == {3, 4} for v in adapter.ground_truth.values())
    with pytest.raises(ValueError, match="not among"):
        PlantedAdapter.write_tiny(tmp_path_factory.mktemp("bad"), hard=("bored",))


def test_the_audible_synth_control_steers_what_is_heard(tmp_path_factory):
    adapter = load(tmp_path_factory, seed=2, synth_audible=True)
    for target in ("happy", "sad"):
        mask = Mask(adapter.synth_truth[target], adapter.layout(["synth"]))
        _, base, _ = convert(adapter, target)
        _, moved, _ = convert(adapter, target, mask, alpha=1.0)
        assert base <= 0.6 and moved >= base + 0.3, (target, base, moved)  # neutral at baseline, heard when steered
