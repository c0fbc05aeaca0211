"""The planted model does what it is built to do, through esn's real recording, selection and steering:
its planted neurons are the ones CAS finds, steering them moves the judge, and the adapter meets the
adapter contract (``esn.testing``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig
from esn.errors import EsnError
from esn.hooks import installed
from esn.judges import Audio
from esn.masks import Mask
from esn.pipeline.synthetic import speech_like
from esn.recording import GateRecorder
from esn.selection import select_neurons
from esn.steering import steer
from esn.testing import CHECKS, load_tiny
from esn_planted import PlantedAdapter, PlantedJudge, sound

TARGETS = ["angry", "happy", "sad", "surprise"]
GEN = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    torch.set_num_threads(1)
    return load_tiny(PlantedAdapter, tmp_path_factory.mktemp("planted"))


def requests(target: str, n: int = 24) -> list[EVCRequest]:
    return [EVCRequest(speech_like(11 + k % 6, "neutral", 1 + k // 6, 0.5), target, id=f"{target}{k}",
                       transcript="kids are talking") for k in range(n)]


def match(adapter, target: str, mask: Mask | None = None, alpha: float = 1.0) -> float:
    reqs = requests(target)
    if mask is None:
        results = adapter.generate(reqs, GEN)
    else:
        with steer(adapter, mask, "steer", alpha):
            results = adapter.generate(reqs, GEN)
    labels = PlantedJudge().judge([Audio(r.waveform, r.sample_rate) for r in results],
                                  sources=[Audio(q.audio, 16_000) for q in reqs])
    return float(np.mean([j.label == target for j in labels]))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(adapter, check):
    check(adapter)


def test_cas_finds_the_planted_neurons_lap_does_not(adapter):
    probs = []
    for target in TARGETS:
        with GateRecorder(adapter) as rec:
            adapter.generate(requests(target), GEN)
        st = rec.stats()
        probs.append((st.counts.sum(0) / st.tokens_per_neuron().sum(0)).numpy())
    truth = adapter.ground_truth
    rate = 6 / adapter.layout().n_neurons
    for method, lo, hi in (("cas", 1.0, 1.0), ("mad", 0.5, 1.0), ("lap", 0.0, 0.0)):
        chosen = select_neurons(np.array(probs), method, rate, emotions=TARGETS)
        recall = [np.isin(truth[e], chosen[e]).mean() for e in TARGETS]
        assert all(lo <= r <= hi for r in recall), (method, recall)


def test_steering_the_planted_neurons_moves_the_judge(adapter):
    layout = adapter.layout()
    truth = {e: Mask(v, layout) for e, v in adapter.ground_truth.items()}
    for target in ("happy", "sad"):
        base = match(adapter, target)
        assert 0.0 < base < 0.8, (target, base)  # a modest baseline: room to move
        assert match(adapter, target, truth[target]) - base >= 0.3  # self-effect
        other = "angry" if target == "happy" else "surprise"
        assert abs(match(adapter, target, truth[other]) - base) <= 0.1  # cross-effect: small
        assert match(adapter, target, truth[target], alpha=-1.0) <= base  # zeroing them removes the emotion


def test_generated_only_steering_leaves_the_prompt_forward_bit_identical(adapter):
    """evaluate.positions = "generated": the pipeline's steered generate leaves the prompt's forward alone."""
    from esn.pipeline.config import Setting
    from esn.pipeline.evaluate import steered_generate

    layout = adapter.layout()
    reqs = requests("happy", 6)
    st = Setting("cas", 0.02, 8, "ser", "steer", 1.0)
    conds = [None, *[(Mask(adapter.ground_truth["happy"], layout), st)] * 5]

    def logits(**kw):
        seen = []
        with installed([(adapter.model.lm_head, lambda m, a, out: seen.append(out.detach().clone()))]):
            if kw:
                out = steered_generate(adapter, reqs, conds, GEN, **kw)
            else:
                out = adapter.generate(reqs, GEN)
        return seen, out

    plain, plain_out = logits()
    gen, gen_out = logits(positions="generated")
    every, _ = logits(positions="all")
    assert torch.equal(gen[0], plain[0]), "the prompt's forward must be bit-identical"
    assert not torch.equal(every[0], plain[0]), "positions='all' steers the prompt too"
    assert any(not torch.equal(g[1:], p[1:]) for g, p in zip(gen[1:], plain[1:], strict=True)), \
        "generated steps must be steered"
    assert all(torch.equal(g[0], p[0]) for g, p in zip(gen, plain, strict=True)), "row 0 has no condition"
    assert gen_out[0].info["codes"] == plain_out[0].info["codes"]


def test_judge_hears_the_synthetic_corpus_and_says_nothing_for_silence():
    judge = PlantedJudge.load()
    clips, sources, truth = [], [], []
    for spk in (17, 18, 19):
        for index in (1, 2):
            for emotion in sound.FACTOR:
                clips.append(Audio(speech_like(spk, emotion, index, 0.5), 16_000))
                sources.append(Audio(speech_like(spk, "neutral", index, 0.5), 16_000))
                truth.append(emotion)
    labels = [j.label for j in judge.judge(clips, sources=sources)]
    assert np.mean([a == b for a, b in zip(labels, truth, strict=True)]) >= 0.8
    silent = judge.judge([Audio(np.zeros(8000, np.float32), 16_000)])[0]
    assert silent.label is None and silent.raw == "no voiced frame"
    with pytest.raises(EsnError, match="takes no options"):
        PlantedJudge.load(mapping="five")
    with pytest.raises(EsnError, match="2 clips but 1 sources"):
        judge.judge(clips[:2], sources=sources[:1])


def test_render_and_pitch_round_trip():
    wave = sound.render(["neutral", "sad", "surprise"], 150.0)
    assert wave.dtype == np.float32 and wave.size == 3 * int(sound.SEGMENT * sound.RATE)
    f0s = sound.frame_pitches(wave[: int(sound.SEGMENT * sound.RATE)])
    assert abs(np.median(f0s) - 150.0) < 3.0
    assert sound.nearest_emotion(1.3) == "happy" and sound.nearest_emotion(0.8) == "sad"


def test_load_refuses_other_checkpoints(tmp_path):
    with pytest.raises(EsnError, match="not a planted checkpoint"):
        PlantedAdapter.load(tmp_path)
    with pytest.raises(EsnError, match="dtype"):
        PlantedAdapter.load(tmp_path, dtype="int8")
