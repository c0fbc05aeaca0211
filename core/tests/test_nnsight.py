"""Interventions written inside an nnsight 0.8 trace equal the fast hook path (tiny Qwen2, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from esn.adapters import StreamSpec
from esn.hooks import ModelTarget, gate_hook_points, has_hooks
from esn.masks import Mask
from esn.steering import Condition, steer, steer_rows

nnsight = pytest.importorskip("nnsight")
from esn.nnsight_support import TraceSteering, apply_in_trace, envoy  # noqa: E402

NEW = 5


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2_nnsight")
    config = Qwen2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ModelTarget(model, gate_hook_points(model, "model.layers", "lm"), {"lm": StreamSpec(root="model")})


@pytest.fixture(scope="module")
def mask(target):
    return Mask.from_split(target.layout(), {"lm.layers.0.mlp.gate": np.arange(0, 64, 3),
                                             "lm.layers.1.mlp.gate": np.array([1, 5, 33])})


@pytest.fixture(scope="module")
def inputs():
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)


def _traced_generate(target, inputs, plan, steps=slice(0, NEW)):
    traced = nnsight.NNsight(target.model)
    with traced.trace(**inputs, fn=target.model.generate, do_sample=False, max_new_tokens=NEW,
                      min_new_tokens=NEW, pad_token_id=0) as tracer:
        for _ in tracer.iter[steps]:
            plan.apply(traced)
        tokens = tracer.result.save()
    return tokens


def test_envoy_walks_the_module_path(target):
    traced = nnsight.NNsight(target.model)
    node = envoy(target, traced, "lm.layers.1.mlp.gate")
    assert node is traced.model.layers[1].mlp.act_fn


@pytest.mark.parametrize(("method", "alpha"), [("steer", 1.0), ("add", 0.5), ("clamp", 0.2), ("deactivate", None)])
def test_trace_forward_equals_fast_path(target, mask, inputs, method, alpha):
    model = target.model
    with torch.no_grad(), steer(target, mask, method, alpha):
        want = model(**inputs).logits
    traced = nnsight.NNsight(model)
    with torch.no_grad(), traced.trace(**inputs):
        apply_in_trace(target, traced, mask, method, alpha)
        logits = traced.lm_head.output.save()
    assert torch.equal(logits, want)
    assert not torch.allclose(logits, model(**inputs).logits)
    assert not has_hooks(model)


def test_trace_generation_equals_fast_path(target, mask, inputs):
    with steer(target, mask, "steer", 2.0):
        want = _generate(target.model, inputs)
    plain = _generate(target.model, inputs)
    assert not torch.equal(want, plain), "the mask should change the tokens"
    got = _traced_generate(target, inputs, TraceSteering(target, mask, "steer", 2.0))
    assert torch.equal(got, want)
    # Generated positions only: skip step 0 (the prefill) in the trace, positions="generated" in the hooks.
    with steer(target, mask, "steer", 2.0, positions="generated"):
        want_gen = _generate(target.model, inputs)
    got_gen = _traced_generate(target, inputs, TraceSteering(target, mask, "steer", 2.0), slice(1, NEW))
    assert torch.equal(got_gen, want_gen)


def test_trace_rows_equal_steer_rows(target, mask, inputs):
    conditions = [None, Condition(mask, "deactivate")]
    with steer_rows(target, conditions):
        want = _generate(target.model, inputs)
    got = _traced_generate(target, inputs, TraceSteering.rows(target, conditions))
    assert torch.equal(got, want)
    assert torch.equal(got[0], _generate(target.model, inputs)[0])
