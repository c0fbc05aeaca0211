"""Routed (mixture-of-experts) recording and steering, and substep recording, inside ``esn.decode``.

A tiny real Qwen3-MoE (transformers' fused ``@use_experts_implementation`` experts) decodes through
``CausalLMDecoding`` with ``capture=False``: on CPU the decoder runs exactly the step a GPU captures, so
the hooks take their device-side decode path. Checked bit for bit against the eager recorder around
``model.generate`` (and, for substeps, against the eager ``SubstepRoot`` path on a toy step).
"""

from __future__ import annotations

import pytest
import torch
from esn.adapters import StreamSpec
from esn.decode import CausalLMDecoding, DecodeState, Greedy
from esn.hooks import ModelTarget, has_hooks, mlp_hook_points
from esn.recording import GateRecorder
from esn.routing import IMPLEMENTATIONS

PAD = 0
NEW = 10
PROMPTS = [[5, 17, 99, 3], [44, 8, 120, 7, 61, 2, 90, 33, 14], [200, 6]]
E, K, D = 6, 2, 8  # experts, top-k, units per expert
STATS = ("counts", "tokens", "sums", "sumsq", "prompt_counts", "prompt_tokens")


def _batch(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate(model, prompts, eos):
    ids, mask = _batch(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                             pad_token_id=PAD, eos_token_id=list(eos))
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        num_hidden_layers=3, hidden_size=32, intermediate_size=40, moe_intermediate_size=D, num_experts=E,
        num_experts_per_tok=K, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False, norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    return model


@pytest.fixture(scope="module")
def eos(model):
    """Stop ids that end the rows at different steps, before NEW tokens."""
    ids, mask = _batch(PROMPTS)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                              min_new_tokens=NEW, pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    stop = (free[0][3], free[1][4], free[2][6])
    ends = [next((i for i, t in enumerate(row) if t in stop), NEW) for row in free]
    assert len(set(ends)) == 3 and max(ends) < NEW - 2, f"premise: rows stop at different steps, early: {ends}"
    return stop


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request, model):
    before = model.config._experts_implementation
    model.set_experts_implementation(request.param)
    yield request.param
    model.set_experts_implementation(before)


def _target(model, eos):
    return ModelTarget(model, mlp_hook_points(model, "model.layers", "lm"), {"lm": StreamSpec("model", tuple(eos))})


def _decoding(model, eos, batch):
    return CausalLMDecoding(model, batch=batch, max_len=16 + NEW, greedy=Greedy(NEW, tuple(eos), PAD), capture=False)


def _decode(dec, prompts):
    return dec.generate(*_batch(prompts))


def _loop_by_hand(dec, prompts, eos) -> torch.Tensor:
    """generate's loop written out over the decoder's own static step: every hook runs its eager path
    (the reference for bit-identity: the static cache rounds attention differently from generate's)."""
    ids, mask = _batch(prompts)
    logits = dec.prefill(ids, mask)
    state = DecodeState(dec.model, len(prompts), logits.shape[-1], dec.greedy, logits.device)
    stop = torch.tensor(eos)
    nxt = logits.argmax(-1)
    finished = torch.isin(nxt, stop)
    out = [nxt]
    with torch.inference_mode():
        for k in range(NEW - 1):
            if bool(finished.all()):
                break
            state.ids.copy_(nxt[:, None])
            state.step.fill_(k)
            nxt = torch.where(finished, PAD, dec.step(state).argmax(-1))
            finished |= torch.isin(nxt, stop)
            out.append(nxt)
    return torch.stack(out, 1)


def _equal(a, b):
    for name in STATS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), f"{name}: {int((x != y).sum())} values differ"


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[1:2]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("strategy,chunk,positions,overlap", [
    ("chunk", None, "all", None), ("chunk", 3, "all", True), ("chunk", 2, "generated", None),
    ("step", None, "all", None),
])
def test_routed_recording_in_the_decoder_equals_the_eager_recorder(model, eos, impl, prompts, strategy, chunk,
                                                                   positions, overlap):
    target = _target(model, eos)
    assert target.layout()["lm.layers.0.mlp.gate"].routed and not target.layout()["lm.layers.1.mlp.gate"].routed
    options = {"strategy": strategy, "chunk_steps": chunk, "positions": positions, "overlap": overlap}
    dec = _decoding(model, eos, len(prompts))
    dec.decoder.check_every = 2  # some steps run past the end: padding, counted nowhere
    with GateRecorder(target, **options) as eager:
        by_hand = _loop_by_hand(dec, prompts, eos)
    with GateRecorder(target, **options) as ours:
        out = _decode(dec, prompts)
    assert torch.equal(out.tokens, by_hand) and out.steps > out.length - 1
    _equal(eager.stats(), ours.stats())
    # and generate under the eager recorder: the same positions, experts and signs; sums agree closely
    with GateRecorder(target, **options) as hf:
        ref = _generate(model, prompts, eos)
    assert torch.equal(out.tokens, ref)
    if len(prompts) > 1:
        assert (ref == PAD).any(), "premise: some rows finish early"
    a, b = hf.stats(), ours.stats()
    assert torch.equal(a.counts, b.counts) and torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-6, atol=1e-6)
    assert not has_hooks(model)
