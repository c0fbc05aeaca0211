"""Recording an adapter that generates one request at a time (``batched = False``), and gates of the wrong rank.

One multi-request ``generate`` inside one ``GateRecorder`` gives one row per request, each equal to that
request recorded alone, also with ``positions="generated"`` (the second prompt is a prompt, not output).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, EVCResult, GenerationConfig, ModelAdapter
from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hooks import ModelTarget, gate_hook_points, has_hooks
from esn.recording import GateRecorder

CONFIG = GenerationConfig(max_new_tokens=5)


class OneAtATime(ModelAdapter):
    """A tiny real Qwen2 decoder; generate() runs its requests one after another, as chat-style APIs do."""

    name = "one_at_a_time"
    architectures = ("Qwen2ForCausalLM",)
    streams = ("lm",)
    batched = False

    @classmethod
    def load(cls, source, **kwargs):
        raise NotImplementedError

    @classmethod
    def write_tiny(cls, directory, *, seed=0):
        raise NotImplementedError

    def hook_points(self):
        return gate_hook_points(self.model, "model.layers", "lm")

    def generate(self, requests, config):
        out = []
        for r in requests:  # prompt length differs per request: 1 token per 1000 samples
            prompt = torch.tensor([[1 + int(abs(x) * 50) % 60 for x in r.audio[::1000]]])
            with torch.no_grad():
                ids = self.model.generate(prompt, max_new_tokens=config.max_new_tokens, do_sample=False,
                                          min_new_tokens=config.max_new_tokens, pad_token_id=0)
            out.append(EVCResult(r.id, str(ids.tolist()), np.zeros(10, np.float32), self.sample_rate))
        return out


@pytest.fixture(scope="module")
def adapter():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
    return OneAtATime(Qwen2ForCausalLM(config).eval(), "memory")


def _requests():
    rng = np.random.default_rng(0)
    return [EVCRequest(rng.standard_normal(n).astype(np.float32), e, id=f"r{i}")
            for i, (n, e) in enumerate([(6_000, "happy"), (9_000, "sad"), (4_000, "angry")])]


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_one_generate_of_several_requests_gives_one_row_per_request(adapter, positions):
    requests = _requests()
    with GateRecorder(adapter, positions=positions) as rec:
        results = adapter.generate(requests, CONFIG)
    stats = rec.stats()
    assert [r.id for r in results] == ["r0", "r1", "r2"] and stats.batch_size == 3
    assert "generate" not in vars(adapter) and not has_hooks(adapter.model)  # the adapter is itself again
    for i, request in enumerate(requests):
        with GateRecorder(adapter, positions=positions) as alone:
            adapter.generate([request], CONFIG)
        solo = alone.stats()
        assert torch.equal(stats.counts[i], solo.counts[0]) and torch.equal(stats.tokens[i], solo.tokens[0])
        assert torch.equal(stats.sums[i], solo.sums[0])
    prompt_lengths = [len(r.audio[::1000]) for r in requests]
    per_layer = stats.tokens[:, 0].tolist()
    if positions == "generated":  # prefill skipped: the decode steps after the first token only
        assert per_layer == [CONFIG.max_new_tokens - 1] * 3
    else:
        assert per_layer == [n + CONFIG.max_new_tokens - 1 for n in prompt_lengths]


def test_nothing_generated_through_the_adapter_is_a_clear_error(adapter):
    with GateRecorder(adapter) as rec:
        pass
    with pytest.raises(EsnError, match=r"generates one request at a time \(batched = False\)"):
        rec.stats()


def test_a_2d_gate_gets_an_error_naming_the_hook_point_and_the_shape():
    class Flat(torch.nn.Module):
        """An MLP that flattens batch and positions before its activation: the gate is [tokens, d_mlp]."""

        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(4, 6)
            self.act = torch.nn.SiLU()

        def forward(self, x):  # x [batch, pos, 4]
            return self.act(self.up(x).reshape(-1, 6))

    model = Flat()
    target = ModelTarget(model, [HookPoint("lm", 0, 6, module="act")])
    with pytest.raises(EsnError, match=r"hook point lm.layers.0.mlp.gate: module 'act' outputs \(6, 6\); recording "
                                       r"needs the gate as \[batch, pos, 6\]"), GateRecorder(target):
        model(torch.randn(2, 3, 4))
    assert not has_hooks(model)
