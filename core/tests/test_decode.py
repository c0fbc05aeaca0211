"""esn.decode on CPU: the decoder's step (the code a GPU captures as a CUDA graph) run eagerly.

A tiny real Qwen2 decodes a left-padded batch whose rows stop at different steps. Checked against
transformers' ``generate`` (tokens), against the recorder driven step by step by a plain Python loop over
the same static step (statistics, bit for bit), with steering, per-row conditions and recording.
"""

from __future__ import annotations

import pytest
import torch
from decode_reference import greedy_by_hand
from esn.adapters import StreamSpec
from esn.decode import CausalLMDecoding, Greedy, graphs
from esn.errors import EsnError
from esn.hooks import ModelTarget, gate_hook_points, has_hooks, installed
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.steering import Condition, steer, steer_rows

PAD = 0
NEW = 12
PROMPTS = [[5, 17, 99, 3], [44, 8, 120, 7, 61, 2, 90, 33, 14], [200, 6], [71, 19, 150, 12, 88, 41, 9]]
WIDTH = max(len(p) for p in PROMPTS)
IDS = torch.tensor([[PAD] * (WIDTH - len(p)) + p for p in PROMPTS])
MASK = torch.tensor([[0] * (WIDTH - len(p)) + [1] * len(p) for p in PROMPTS])


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def eos(model):
    """Stop ids that end the rows at different steps, all before NEW tokens (the row that stops last sets
    where generate stops; the decoder runs a few steps further)."""
    with torch.no_grad():
        free = model.generate(input_ids=IDS, attention_mask=MASK, do_sample=False, max_new_tokens=NEW, pad_token_id=PAD)
    new = free[:, WIDTH:].tolist()
    ids = (new[1][2], new[2][1], new[0][5])
    ends = [next(i for i, t in enumerate(row) if t in ids) for row in new]
    assert len(set(ends)) >= 3 and max(ends) < NEW - 4, f"premise: rows stop at different steps, early: {ends}"
    return ids


def _generate(model, eos, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=IDS, attention_mask=MASK, do_sample=False, max_new_tokens=NEW,
                             pad_token_id=PAD, eos_token_id=list(eos), **kw)
    return out[:, WIDTH:]


def _decoding(model, eos, **kw) -> CausalLMDecoding:
    return CausalLMDecoding(model, batch=len(PROMPTS), max_len=WIDTH + NEW,
                            greedy=Greedy(NEW, tuple(eos), PAD, **kw))


def _target(model, eos, spec=True):
    specs = {"lm": StreamSpec("model", tuple(eos))} if spec else {}
    return ModelTarget(model, gate_hook_points(model, "model.layers", "lm"), specs)


def _loop_by_hand(dec: CausalLMDecoding, eos) -> torch.Tensor:
    """generate's loop written out over the decoder's own static step: every hook runs its eager path."""
    return greedy_by_hand(dec.model, dec.step, dec.prefill(IDS, MASK), dec.greedy, eos)


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 1.3}, {"min_new_tokens": 5}, {"suppress_tokens": [27]}])
def test_tokens_equal_generate(model, eos, kw):
    ref = _generate(model, eos, **kw)
    ours = {"suppress_token_ids": tuple(kw.pop("suppress_tokens"))} if "suppress_tokens" in kw else kw
    out = _decoding(model, eos, **ours).generate(IDS, MASK)
    assert torch.equal(out.tokens, ref), (out.tokens, ref)
    assert out.length == ref.shape[1] and out.steps >= out.length - 1
    assert out.info["decode"] == "eager"  # CPU: the same step, not captured


def test_repetition_penalty_skips_each_rows_left_padding_as_generate(model, eos):
    """generate's penalty ignores the padded columns (``prompt_ignore_length``): make the pad id win by 10%
    at every step, so penalising it from the padding (or not) changes the first token of padded rows."""

    def prefer_pad(module, args, out):  # out: [B, pos, V]
        out = out.clone()
        top = out[..., 1:].max(-1).values
        out[..., PAD] = top + 0.1 * top.abs()
        return out

    with installed([(model.lm_head, prefer_pad)]):
        ref = _generate(model, eos, repetition_penalty=1.3)
        out = _decoding(model, eos, repetition_penalty=1.3).generate(IDS, MASK)
    assert (ref[:, 0] == PAD).all(), "premise: unpenalised, the pad id wins"
    assert torch.equal(out.tokens, ref), (out.tokens, ref)


def test_rows_finish_early_and_steps_past_the_end_are_padding(model, eos):
    ref = _generate(model, eos)
    assert ref.shape[1] < NEW and (ref == PAD).any()  # premise: every row stops, some earlier than others
    dec = _decoding(model, eos)
    dec.decoder.check_every = 1  # checked every step, read one step late: one step past the end
    out = dec.generate(IDS, MASK)
    assert torch.equal(out.tokens, ref) and out.steps == out.length  # ran one step more than generate


@pytest.mark.parametrize("strategy,chunk,positions,overlap", [
    ("chunk", None, "all", None), ("chunk", 3, "all", None), ("step", None, "all", None), ("chunk", 2, "generated", None),
    # overlap: chunk buffers of two halves that the steps fill in turn (on CUDA one is reduced on a side
    # stream while the other fills); wrapping several times, ending part-filled in either half
    ("chunk", 2, "all", True), ("chunk", 3, "generated", True),
])
def test_recording_in_the_decoder_is_bit_identical_to_the_eager_recorder(model, eos, strategy, chunk, positions,
                                                                         overlap):
    target = _target(model, eos)
    options = {"strategy": strategy, "chunk_steps": chunk, "positions": positions, "overlap": overlap}
    dec = _decoding(model, eos)
    with GateRecorder(target, **options) as eager:
        by_hand = _loop_by_hand(dec, eos)
    with GateRecorder(target, **options) as graph_aware:
        out = dec.generate(IDS, MASK)
    assert torch.equal(out.tokens, by_hand)
    a, b = eager.stats(), graph_aware.stats()
    for name in ("counts", "tokens", "sums", "sumsq"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # and transformers' generate under the classic recorder: the same positions and signs (the static
    # cache's attention rounds differently in the last bits, so the float sums only agree closely)
    with GateRecorder(target, **options) as hf:
        _generate(model, eos)
    c = hf.stats()
    assert torch.equal(c.tokens, b.tokens) and torch.equal(c.counts, b.counts)
    torch.testing.assert_close(c.sums, b.sums, rtol=1e-6, atol=1e-6)


def test_stream_without_spec_counts_what_generate_runs(model, eos):
    target = _target(model, eos, spec=False)
    with GateRecorder(target) as hf:
        _generate(model, eos)
    dec = _decoding(model, eos)
    dec.decoder.check_every = 2
    with GateRecorder(target) as ours:
        out = dec.generate(IDS, MASK)
    assert out.steps > out.length - 1  # steps past the end ran ...
    assert torch.equal(hf.stats().tokens, ours.stats().tokens)  # ... and counted nowhere
    assert torch.equal(hf.stats().counts, ours.stats().counts)


def _row_conditions(layout):
    masks = [Mask(torch.arange(r, layout.n_neurons, 5 + r).numpy(), layout) for r in range(4)]
    return [Condition(masks[0], "steer", 2.0), None, Condition(masks[2], "add", 0.5),
            Condition(masks[3], "clamp", 0.3)], masks


def test_steering_and_recording_in_the_decoder_match_generate(model, eos):
    target = _target(model, eos)
    layout = target.layout()
    conditions, masks = _row_conditions(layout)
    contexts = {
        "steer": lambda: steer(target, masks[1], "steer", 3.0),
        "deactivate": lambda: steer(target, masks[1], "deactivate"),
        "rows": lambda: steer_rows(target, conditions),
        "generated": lambda: steer_rows(target, conditions, positions="generated"),
    }
    plain = _generate(model, eos)
    dec = _decoding(model, eos)
    for name, make in contexts.items():
        with make():
            ref = _generate(model, eos)
        with make():
            out = dec.generate(IDS, MASK)
        assert torch.equal(out.tokens[:, : ref.shape[1]], ref), name
        assert not torch.equal(ref[:, :3], plain[:, :3]) or name == "generated", f"premise: {name} changes tokens"
    with steer_rows(target, conditions), GateRecorder(target) as hf:
        _generate(model, eos)
    with steer_rows(target, conditions), GateRecorder(target) as ours:
        dec.generate(IDS, MASK)
    assert torch.equal(hf.stats().counts, ours.stats().counts) and torch.equal(hf.stats().tokens, ours.stats().tokens)
    assert not has_hooks(model)


class _Boom(RuntimeError):
    pass


def test_hooks_removed_on_exit_and_on_error_mid_decode(model, eos):
    target = _target(model, eos)
    conditions, _ = _row_conditions(target.layout())
    dec = _decoding(model, eos)
    first = dec.generate(IDS, MASK).tokens
    calls = []

    def fail_at_step_4(module, args, out):
        calls.append(1)
        if len(calls) == 5:  # prefill, then decode steps
            raise _Boom("a hook failed mid-decode")

    with pytest.raises(_Boom):
        with steer_rows(target, conditions), GateRecorder(target), installed([(model.lm_head, fail_at_step_4)]):
            dec.generate(IDS, MASK)
    assert not has_hooks(model)
    assert torch.equal(dec.generate(IDS, MASK).tokens, first)  # the decoder is reusable after the error


def test_graph_aware_hooks_have_structural_keys_and_adopt_values(model, eos):
    """What lets a new steering block or recorder reuse a graph captured with an earlier one."""
    target = _target(model, eos)
    conditions, masks = _row_conditions(target.layout())
    other = [Condition(masks[1], "steer", 0.5), Condition(masks[0], "add", -1.0), None, Condition(masks[2], "clamp", 0.0)]
    with steer_rows(target, conditions):
        first = graphs.scoped_hooks(model)
        captured = graphs.states(first)
        key = graphs.fingerprint(first)
    with steer_rows(target, other):
        second = graphs.scoped_hooks(model)
        assert graphs.fingerprint(second) == key  # same structure: one graph serves both blocks
        values = [h.hook.edit.scale.clone() for h in second]
        graphs.adopt(second, captured)
        for h, state, value in zip(second, captured, values, strict=True):
            assert h.hook.edit.scale is state[0] and torch.equal(state[0], value)
    with steer(target, masks[1], "steer", 1.0):  # another structure: another graph
        assert graphs.fingerprint(graphs.scoped_hooks(model)) != key
    foreign = lambda m, a, o: None  # noqa: E731
    with installed([(model.lm_head, foreign)]):
        hooks = graphs.scoped_hooks(model)
        assert [h.key for h in hooks] == [("foreign", id(foreign))] and not hooks[0].aware


def test_bad_settings_are_refused(model, eos):
    with pytest.raises(EsnError, match="max_new_tokens"):
        Greedy(0)
    with pytest.raises(EsnError, match="repetition_penalty"):
        Greedy(4, repetition_penalty=0.0)
    with pytest.raises(EsnError, match="CUDA graphs need a CUDA device"):
        CausalLMDecoding(model, batch=1, max_len=8, greedy=Greedy(4), capture=True)
    dec = _decoding(model, eos)
    with pytest.raises(EsnError, match="batch 4, got 1"):
        dec.generate(IDS[:1], MASK[:1])
    with pytest.raises(EsnError, match="exceed max_len"):
        dec.generate(torch.cat([IDS, IDS], 1), torch.cat([MASK, MASK], 1))
    with GateRecorder(_target(model, eos), strategy="ref"), pytest.raises(EsnError, match="strategy 'ref'"):
        dec.generate(IDS, MASK)
    assert not has_hooks(model)


def test_decode_policy_is_decided_in_one_place():
    """The adapter option ``decode`` and ``Decoder(capture=None)`` both follow ``esn.decode.policy``."""
    import warnings

    from esn.decode.policy import capture_default, decode_mode

    assert capture_default("cpu") is False and capture_default(torch.device("cuda", 0)) is True
    assert decode_mode("x", None, "cpu") == "generate"
    assert decode_mode("x", None, "cuda") == "graph"
    assert decode_mode("x", None, "cuda", capturable=False) == "generate"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_mode("x", "graph", "cpu") == "graph" and decode_mode("x", "generate", "cuda") == "generate"
    with pytest.warns(FutureWarning, match="x option decode='eager' is now called decode='generate'"):
        assert decode_mode("x", "eager", "cuda") == "generate"
    with pytest.raises(EsnError, match="x option decode must be one of graph, generate, got 'fast'"):
        decode_mode("x", "fast", "cpu")


def test_graph_decoding_mixin_declares_sessions_info_and_release(model):
    from esn.adapters import ModelAdapter
    from esn.decode.policy import GraphDecoding, Sessions

    class Plain(ModelAdapter):
        name = "plain-test"

        @classmethod
        def load(cls, source, **kwargs):
            raise NotImplementedError

        @classmethod
        def write_tiny(cls, directory, *, seed=0):
            raise NotImplementedError

        def hook_points(self):
            return []

        def generate(self, requests, config):
            return []

    class Graphed(GraphDecoding, Plain):
        pass

    adapter = Graphed(model, "memory")
    assert adapter.last_decode_info == {} and isinstance(adapter._sessions, Sessions)
    assert adapter.capture is False  # CPU: the steps run uncaptured
    adapter.capture_graphs = True
    assert adapter.capture is True
    adapter._sessions.get("lm", ("k",), lambda: "session")
    adapter.release_decode_buffers()
    assert adapter._sessions._kept == {"lm": {}}
