"""esn.testing on a toy adapter (a tiny real Qwen2ForCausalLM): it passes, and each kind of defect is caught."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from esn.adapters import EVCResult, ModelAdapter
from esn.hooks import gate_hook_points
from esn.testing import (
    ConformanceError,
    check_generation,
    check_hook_points,
    check_interventions,
    run_conformance,
)


class ToyAdapter(ModelAdapter):
    """Text by greedy decoding; 'speech' is one tone per generated token (a stand-in for a vocoder)."""

    name = "toy"
    architectures = ("Qwen2ForCausalLM",)
    streams = ("lm",)
    batched = False

    @classmethod
    def write_tiny(cls, directory, *, seed=0):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
        Qwen2ForCausalLM(config).save_pretrained(directory)
        return directory

    @classmethod
    def load(cls, source, *, dtype="auto", device="cpu", attn_implementation=None, trust_remote_code=False):
        from transformers import Qwen2ForCausalLM

        return cls(Qwen2ForCausalLM.from_pretrained(source).eval(), source)

    def hook_points(self):
        return gate_hook_points(self.model, "model.layers", "lm")

    def generate(self, requests, config):
        out = []
        for r in requests:
            prompt = torch.tensor([[1 + int(abs(x) * 50) % 60 for x in r.audio[::800]]])
            ids = self.model.generate(prompt, max_new_tokens=config.max_new_tokens, do_sample=False,
                                      min_new_tokens=config.max_new_tokens, pad_token_id=0)[0, prompt.shape[1]:]
            t = np.arange(2400) / self.sample_rate
            wave = np.concatenate([np.sin(2 * np.pi * (100 + 10 * int(i)) * t) for i in ids]).astype(np.float32)
            out.append(EVCResult(r.id, " ".join(map(str, ids.tolist())), wave, self.sample_rate))
        return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ToyAdapter.write_tiny(tmp_path_factory.mktemp("toy"))


@pytest.fixture()
def toy(tiny_dir):
    return ToyAdapter.load(tiny_dir)  # a fresh instance: the tests below break it on purpose


def test_a_conforming_adapter_passes(tmp_path):
    adapter = run_conformance(ToyAdapter, tmp_path / "toy")
    assert adapter.layout().n_neurons == 48


def test_wrong_width_is_caught(toy):
    wrong = [dataclasses.replace(hp, width=hp.width + 1) for hp in toy.hook_points()]
    toy._layout = None
    toy.hook_points = lambda: wrong
    with pytest.raises(ConformanceError, match=r"not \[batch, pos, 25\]|input columns"):
        check_hook_points(toy)


def test_float64_audio_is_caught(toy):
    generate = toy.generate
    toy.generate = lambda reqs, cfg: [dataclasses.replace(r, waveform=r.waveform.astype(np.float64))
                                      for r in generate(reqs, cfg)]
    with pytest.raises(ConformanceError, match="float32"):
        check_generation(toy)


def test_a_leaked_hook_is_caught(toy):
    generate = toy.generate

    def leaky(reqs, cfg):
        toy.module(toy.layout().hook_points[0]).register_forward_hook(lambda m, a, o: None)
        return generate(reqs, cfg)

    toy.generate = leaky
    with pytest.raises(ConformanceError, match="left hooks"):
        check_interventions(toy)
