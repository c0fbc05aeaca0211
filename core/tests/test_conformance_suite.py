"""esn.testing on a toy adapter (a tiny real Qwen2ForCausalLM): it passes, and each kind of defect is caught."""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch
from esn.adapters import EVCResult, ModelAdapter
from esn.hooks import gate_hook_points
from esn.testing import (
    ConformanceError,
    check_checkpoint,
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


class UninitialisedToy(ToyAdapter):
    """Writes one weight straight from torch.empty-like memory: subnormal and huge values, new ones each write."""

    @classmethod
    def write_tiny(cls, directory, *, seed=0):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
        model = Qwen2ForCausalLM(config)
        garbage = torch.randn(model.model.norm.weight.shape, generator=torch.Generator().manual_seed(os.getpid()
                                                                                                  + next(_writes)))
        garbage[0], garbage[1] = 1e-41, 1.7e38  # what uninitialised float32 memory holds
        with torch.no_grad():
            model.model.norm.weight.copy_(garbage)
        model.save_pretrained(directory)
        return directory


_writes = itertools.count()


def test_an_uninitialised_checkpoint_is_caught_and_named(tmp_path):
    adapter = UninitialisedToy.load(UninitialisedToy.write_tiny(tmp_path / "t"))
    with pytest.raises(ConformanceError) as info:
        check_checkpoint(adapter)
    message = str(info.value)
    assert "write_tiny wrote different checkpoints twice with seed 0" in message
    assert "model.safetensors: tensor model.norm.weight differs" in message


def test_subnormal_and_huge_weights_are_caught_even_when_written_the_same_twice(toy):
    with torch.no_grad():
        toy.model.model.norm.weight[0] = 1e-41
    with pytest.raises(ConformanceError, match=r"parameter model.norm.weight .* 1 subnormal value"):
        check_checkpoint(toy)
    with torch.no_grad():
        toy.model.model.norm.weight[0] = 1.7e38
    with pytest.raises(ConformanceError, match=r"model.norm.weight .* values up to 1.7e\+38"):
        check_checkpoint(toy)
    with torch.no_grad():
        toy.model.model.norm.weight[0] = float("nan")
    with pytest.raises(ConformanceError, match="1 NaN or infinite value"):
        check_checkpoint(toy)


def test_check_generation_compares_a_two_request_batch_with_solo_runs_and_says_so(toy):
    generate = toy.generate

    def mates_matter(reqs, cfg):  # a second request shifts the first's audio: rows depend on batch mates
        out = generate(reqs, cfg)
        if len(reqs) > 1:
            out[0] = dataclasses.replace(out[0], waveform=out[0].waveform * np.float32(0.5))
        return out

    toy.generate = mates_matter
    with pytest.raises(ConformanceError, match=r"request 0 of a 2-request generate differs from the same request "
                                               r"generated alone with the same seed .*waveforms differ"):
        check_generation(toy)
