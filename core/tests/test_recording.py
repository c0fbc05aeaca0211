"""GateRecorder on a tiny real Qwen2 model: per-row statistics equal a plain forward-hook reference."""

from __future__ import annotations

import copy

import pytest
import torch
from esn.adapters import StreamSpec
from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hooks import ModelTarget, gate_hook_points, has_hooks
from esn.recording import BatchStats, GateRecorder, record

PAD = 0
NEW = 10
PROMPTS = [[5, 17, 99, 3], [44, 8, 120, 7, 61, 2, 90, 33, 14], [200, 6], [71, 19, 150, 12, 88, 41, 9]]
# (strategy, chunk_steps): default chunk, a chunk that wraps around and ends part-filled, per-step
STRATEGIES = [("chunk", None), ("chunk", 3), ("ref", None), ("ref", 3), ("step", None)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # An eos that ends some prompts early and not others: the first token prompt 0 generates freely
    # at step >= 2 that prompt 1 never generates.
    free = [_generate(model, [p], eos=None)[0, len(p) :].tolist() for p in PROMPTS]
    eos = next(t for t in free[0][2:] if t not in free[1] and t not in free[0][:2])
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = PAD
    return model


def _generate(model, prompts, eos="config", grad_mode=torch.no_grad, **kw):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    extra = {} if eos == "config" else {"eos_token_id": eos}
    with grad_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=PAD,
            **extra,
            **kw,
        )


def _target(model, lm_layers=4, spec=True):
    points = gate_hook_points(model, "model.layers", "lm")
    synth = [HookPoint("synth", p.layer, p.width, p.module, p.down_proj) for p in points[lm_layers:]]
    specs = {"lm": StreamSpec("model", (model.generation_config.eos_token_id,))}
    if spec:
        specs["synth"] = specs["lm"]
    return ModelTarget(model, points[:lm_layers] + synth, specs)


def _reference(model, prompt, generated_only=False):
    """Solo run; a plain forward hook on every act_fn keeps every gate [1, pos, d_mlp]."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}
    handles = [
        layer.mlp.act_fn.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out.detach().clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        out = _generate(model, [prompt])
    finally:
        for h in handles:
            h.remove()
    gates = [torch.cat(seen[i][1 if generated_only else 0 :], dim=1)[0] for i in sorted(seen)]  # [T, D] each
    return {
        "counts": torch.cat([(g > 0).sum(0) for g in gates]).to(torch.int32),
        "tokens": torch.tensor([g.shape[0] for g in gates]),
        "sums": torch.cat([g.double().sum(0) for g in gates]),
        "sumsq": torch.cat([g.double().square().sum(0) for g in gates]),
        "new_tokens": out.shape[1] - len(prompt),
    }


@pytest.mark.parametrize("strategy,chunk", STRATEGIES)
def test_solo_run_equals_plain_hook_reference(model, strategy, chunk):
    ref = _reference(model, PROMPTS[1])
    with GateRecorder(_target(model), strategy=strategy, chunk_steps=chunk) as rec:
        _generate(model, [PROMPTS[1]])
    stats = rec.stats()
    assert stats.counts.dtype == torch.int32 and stats.tokens.dtype == torch.int64
    assert stats.counts.shape == (1, 4 * 48) and stats.tokens.shape == (1, 4)
    assert torch.equal(stats.counts[0], ref["counts"])
    assert torch.equal(stats.tokens[0], ref["tokens"])
    assert stats.tokens[0, 0] == len(PROMPTS[1]) + NEW - 1  # the last token is never fed back
    torch.testing.assert_close(stats.sums[0], ref["sums"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.sumsq[0], ref["sumsq"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("overlap", [False, True])
def test_bf16_gates_give_the_float64_reference(model, overlap):
    """Low-precision gates, as on accelerators: padding zeroed in bf16, moments summed in float64."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    ref = _reference(half, PROMPTS[1])
    with GateRecorder(_target(half), chunk_steps=3, overlap=overlap) as rec:
        _generate(half, [PROMPTS[1]])
    stats = rec.stats()
    assert torch.equal(stats.counts[0], ref["counts"]) and torch.equal(stats.tokens[0], ref["tokens"])
    torch.testing.assert_close(stats.sums[0], ref["sums"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.sumsq[0], ref["sumsq"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["chunk", "ref"])
def test_overlap_gives_the_same_statistics_bit_for_bit(model, strategy):
    """overlap=True (on CPU: the two-half chunk buffers, no side stream) changes no bit of a padded batch."""
    runs = []
    for overlap in (False, True):
        with GateRecorder(_target(model), strategy=strategy, chunk_steps=3, overlap=overlap) as rec:
            _generate(model, PROMPTS)
        runs.append(rec.stats())
    for name in ("counts", "tokens", "sums", "sumsq"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name


@pytest.mark.parametrize("strategy,chunk", STRATEGIES)
def test_left_padded_batch_gives_each_row_its_solo_statistics(model, strategy, chunk):
    refs = [_reference(model, p) for p in PROMPTS]
    lengths = [r["new_tokens"] for r in refs]
    assert min(lengths) < NEW == max(lengths), f"premise: some rows stop early at eos, others not: {lengths}"
    with GateRecorder(_target(model), strategy=strategy, chunk_steps=chunk) as rec:
        _generate(model, PROMPTS)
    stats = rec.stats()
    assert stats.batch_size == len(PROMPTS)
    for row, ref in enumerate(refs):
        assert torch.equal(stats.tokens[row], ref["tokens"]), row
        assert torch.equal(stats.counts[row], ref["counts"]), row
        torch.testing.assert_close(stats.sums[row], ref["sums"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.sumsq[row], ref["sumsq"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy,chunk", STRATEGIES)
def test_generated_positions_exclude_prefill(model, strategy, chunk):
    refs = [_reference(model, p, generated_only=True) for p in PROMPTS]
    with GateRecorder(_target(model), positions="generated", strategy=strategy, chunk_steps=chunk) as rec:
        _generate(model, PROMPTS)
    stats = rec.stats()
    assert stats.positions == "generated"
    for row, ref in enumerate(refs):
        assert torch.equal(stats.tokens[row], ref["tokens"])
        assert int(stats.tokens[row, 0]) == ref["new_tokens"] - 1
        assert torch.equal(stats.counts[row], ref["counts"])


@pytest.mark.parametrize("strategy,chunk", STRATEGIES)
def test_prompt_split_gives_the_generated_only_statistics_exactly(model, strategy, chunk):
    """One recording over all positions keeps the prompt's share apart: P over the generated positions,
    recomputed from it, equals a recording made with positions="generated" (left-padded batch, early eos)."""
    with GateRecorder(_target(model), strategy=strategy, chunk_steps=chunk) as rec:
        _generate(model, PROMPTS)
    full = rec.stats()
    with GateRecorder(_target(model), positions="generated", strategy=strategy, chunk_steps=chunk) as rec:
        _generate(model, PROMPTS)
    gen = rec.stats()
    assert full.has_prompt_split and not gen.has_prompt_split
    for row, prompt in enumerate(PROMPTS):
        assert torch.all(full.prompt_tokens[row] == len(prompt))  # padding is not prompt
        solo = _reference(model, prompt)
        assert torch.equal(full.prompt_counts[row] + gen.counts[row], solo["counts"])
    derived = full.generated()
    assert derived.positions == "generated" and derived.sums is None
    assert torch.equal(derived.counts, gen.counts) and torch.equal(derived.tokens, gen.tokens)
    p_derived = derived.counts / derived.tokens_per_neuron()
    assert torch.equal(p_derived, gen.counts / gen.tokens_per_neuron())
    both = BatchStats.concat([full, full.select_rows([1, 0])])
    assert torch.equal(both.prompt_counts[len(PROMPTS)], full.prompt_counts[1])
    with pytest.raises(EsnError, match="prompt split"):
        BatchStats.concat([full, gen])


def test_strategies_agree_exactly_on_counts_without_moments(model):
    results = []
    for strategy, chunk in STRATEGIES:
        with GateRecorder(_target(model), moments=False, strategy=strategy, chunk_steps=chunk) as rec:
            _generate(model, PROMPTS)
        results.append(rec.stats())
    assert results[0].sums is None and results[0].sumsq is None
    for other in results[1:]:
        assert torch.equal(other.counts, results[0].counts) and torch.equal(other.tokens, results[0].tokens)


class _Boom(RuntimeError):
    pass


def test_hooks_removed_after_exit_and_after_error_mid_generate(model):
    from transformers import LogitsProcessor, LogitsProcessorList

    class FailAtStep(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 4:
                raise _Boom("judge crashed mid-generation")
            return scores

    assert not has_hooks(model)
    with GateRecorder(_target(model)) as rec:
        assert has_hooks(model)
        _generate(model, PROMPTS[:2])
    assert not has_hooks(model)
    assert rec.stats().batch_size == 2
    with pytest.raises(_Boom):
        with GateRecorder(_target(model)):
            _generate(model, PROMPTS[:2], logits_processor=LogitsProcessorList([FailAtStep()]))
    assert not has_hooks(model)


def test_stream_selection(model):
    target = _target(model, lm_layers=2)
    with GateRecorder(target) as rec:
        _generate(model, PROMPTS)
    full = rec.stats()
    assert full.layout.names[:2] == ["lm.layers.0.mlp.gate", "lm.layers.1.mlp.gate"]
    for streams, cols in ((["synth"], slice(96, 192)), (["lm"], slice(0, 96))):
        with GateRecorder(target, streams=streams) as rec:
            _generate(model, PROMPTS)
        part = rec.stats()
        assert part.layout.streams == streams and part.counts.shape == (4, 96)
        assert torch.equal(part.counts, full.counts[:, cols])
        assert torch.equal(part.tokens, full.tokens[:, :2] if streams == ["lm"] else full.tokens[:, 2:])


def test_stream_without_spec_counts_every_position(model):
    """Documented: with no StreamSpec, every position of every row is counted (padding included)."""
    target = _target(model, lm_layers=2, spec=False)
    ref = _reference(model, PROMPTS[0])
    with GateRecorder(target) as rec:
        _generate(model, [PROMPTS[0]])
    solo = rec.stats()
    assert torch.equal(solo.counts[0], ref["counts"]) and torch.equal(solo.tokens[0], ref["tokens"])
    with GateRecorder(target) as rec:
        out = _generate(model, PROMPTS)
    stats = rec.stats()
    every = out.shape[1] - 1  # padded prompt + every fed step, the same for all rows
    assert stats.tokens[:, 2:].eq(every).all()
    assert stats.tokens[:, 0].tolist() == [_reference(model, p)["tokens"][0].item() for p in PROMPTS]


def test_batch_stats_concat_and_select_rows(model):
    with GateRecorder(_target(model)) as rec:
        _generate(model, PROMPTS[:2])
    a = rec.stats()
    _, b = record(_target(model), lambda: _generate(model, PROMPTS[2:]))
    both = BatchStats.concat([a, b])
    assert both.batch_size == 4
    picked = both.select_rows([3, 0])
    assert torch.equal(picked.counts[0], b.counts[1]) and torch.equal(picked.counts[1], a.counts[0])
    arrays = picked.numpy()
    assert arrays["counts"].dtype.name == "int32" and arrays["sums"].dtype.name == "float64"
    per_neuron = both.tokens_per_neuron()
    assert per_neuron.shape == both.counts.shape and (both.counts <= per_neuron).all()
    assert BatchStats.concat([a]) is a  # one batch: no copy of its statistics


def test_user_mistakes_give_clear_errors(model):
    target = _target(model)
    with pytest.raises(EsnError, match="positions"):
        GateRecorder(target, positions="prompt")
    with pytest.raises(EsnError, match="strategy"):
        GateRecorder(target, strategy="fast")
    with pytest.raises(EsnError, match="overlap"):
        GateRecorder(target, overlap="yes")
    rec = GateRecorder(target)
    with pytest.raises(EsnError, match="after the with-block"):
        with rec:
            rec.stats()
    assert not has_hooks(model)
    with pytest.raises(EsnError, match="one generation"):
        with rec:
            pass
    with pytest.raises(EsnError, match="second prefill"):
        with GateRecorder(target):
            _generate(model, PROMPTS[:2])
            _generate(model, PROMPTS[:2])
    assert not has_hooks(model)


def test_generate_under_inference_mode(model):
    """Buffers born in inference mode are reduced at exit (a part-filled chunk) without error."""
    ref = _reference(model, PROMPTS[1])
    with GateRecorder(_target(model), chunk_steps=4) as rec:
        _generate(model, [PROMPTS[1]], grad_mode=torch.inference_mode)
    stats = rec.stats()
    assert torch.equal(stats.counts[0], ref["counts"]) and torch.equal(stats.tokens[0], ref["tokens"])


def test_ref_strategy_detects_a_gate_modified_in_place_after_the_hook(model):
    def edit(module, args, g):  # a later hook that edits the gate in place
        g.mul_(1.0)

    with pytest.raises(EsnError, match="modified in place"):
        with GateRecorder(_target(model), strategy="ref", chunk_steps=2):
            handles = [layer.mlp.act_fn.register_forward_hook(edit) for layer in model.model.layers]
            try:
                _generate(model, PROMPTS[:2])
            finally:
                for h in handles:
                    h.remove()
    assert not has_hooks(model)
