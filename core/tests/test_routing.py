"""Routed (mixture-of-experts) hook points on a tiny real Qwen3-MoE, for each experts implementation.

The references are computed by hand from what the experts module receives: each expert's MLP run on
the tokens routed to it (``silu(x @ gate_up_proj[e][:d].T)``), so they do not share esn's row mapping.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from decode_reference import tiny_moe
from esn.adapters import StreamSpec
from esn.errors import EsnError, LayoutMismatchError
from esn.hookpoints import HookPoint, Layout
from esn.hooks import ModelTarget, has_hooks, mlp_hook_points
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.statistics import ActivationStats
from esn.steering import Condition, folded, steer, steer_rows

PAD = 0
NEW = 8
PROMPTS = [[5, 17, 99, 3], [44, 8, 120, 7, 61, 2, 90, 33, 14], [200, 6]]
E, K, D = 6, 2, 8  # experts, top-k, units per expert


@pytest.fixture(scope="module")
def model():
    model = tiny_moe(E, K, D)
    free = [_generate(model, [p], eos=None)[0, len(p):].tolist() for p in PROMPTS]
    # an eos that row 0 generates early and row 1 never: finished rows keep being fed in a batch
    eos = next(t for t in free[0][2:] if t not in free[1] and t not in free[0][:2])
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = PAD
    return model


def _generate(model, prompts, eos="config", new=NEW):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    extra = {} if eos == "config" else {"eos_token_id": eos}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                              min_new_tokens=new if eos is None else 0, pad_token_id=PAD, **extra)


def _target(model):
    return ModelTarget(model, mlp_hook_points(model, "model.layers", "lm"),
                       {"lm": StreamSpec("model", (model.generation_config.eos_token_id,))})


def _by_hand(model, prompts):
    """Generate with plain hooks; per routed layer, counts [B, E, d], tokens [B, E] and sums by hand."""
    eos = model.generation_config.eos_token_id
    calls: list[tuple] = []  # per model forward: (input_ids, attention_mask)
    seen: dict[int, list[tuple]] = {}  # layer -> per forward (hidden [T, h], top_k_index [T, k])

    def root(m, args, kwargs):
        calls.append((kwargs["input_ids"].clone(), kwargs.get("attention_mask")))

    def experts(i):
        def hook(m, args):
            seen.setdefault(i, []).append((args[0].detach().clone(), args[1].clone()))
        return hook

    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    handles = [model.model.register_forward_pre_hook(root, with_kwargs=True)]
    handles += [model.model.layers[i].mlp.experts.register_forward_pre_hook(experts(i)) for i in layers]
    try:
        _generate(model, prompts)
    finally:
        for h in handles:
            h.remove()
    b = len(prompts)
    valid = []  # per forward: [B, pos] bool
    finished = torch.zeros(b, dtype=torch.bool)
    for n, (ids, mask) in enumerate(calls):
        if n == 0:
            pos = ids.shape[1]
            valid.append(torch.ones(b, pos, dtype=torch.bool) if mask is None else mask[:, -pos:].bool())
        else:
            finished |= ids[:, -1] == eos
            valid.append((~finished)[:, None].clone() if b > 1 else torch.ones(1, 1, dtype=torch.bool))
    out = {}
    for i in layers:
        w = model.model.layers[i].mlp.experts.gate_up_proj.detach()  # [E, 2d, h]
        counts = torch.zeros(b, E, D, dtype=torch.int64)
        tokens = torch.zeros(b, E, dtype=torch.int64)
        sums = torch.zeros(b, E, D, dtype=torch.float64)
        for (hidden, index), ok in zip(seen[i], valid, strict=True):
            pos = ok.shape[1]
            for t in range(hidden.shape[0]):
                row, p = divmod(t, pos)
                if not ok[row, p]:
                    continue
                for e in index[t].tolist():
                    g = torch.nn.functional.silu(hidden[t] @ w[e, :D].T)  # the expert's gate, by hand
                    counts[row, e] += (g > 0).long()
                    tokens[row, e] += 1
                    sums[row, e] += g.double()
        out[i] = counts, tokens, sums
    return out


@pytest.mark.parametrize("strategy,chunk", [("chunk", None), ("chunk", 3), ("step", None)])
def test_recording_equals_each_expert_by_hand(model, impl, strategy, chunk):
    target = _target(model)
    with GateRecorder(target, strategy=strategy, chunk_steps=chunk) as rec:
        _generate(model, PROMPTS)
    stats = rec.stats()
    layout = target.layout()
    want = _by_hand(model, PROMPTS)
    for i, (counts, tokens, sums) in want.items():
        name = f"lm.layers.{i}.mlp.gate"
        hp = layout[name]
        assert hp.routed and hp.experts == E and hp.top_k == K and hp.width == E * D
        got = stats.counts[:, layout.slice(name)].reshape(len(PROMPTS), E, D).long()
        assert torch.equal(got, counts), f"{name}: {int((got != counts).sum())} counts differ"
        assert torch.equal(stats.tokens[:, layout.group_slice(name)], tokens)
        assert torch.allclose(stats.sums[:, layout.slice(name)].reshape(len(PROMPTS), E, D), sums, atol=1e-5)
    dense = layout["lm.layers.1.mlp.gate"]
    assert not dense.routed and stats.tokens[:, layout.group_slice(dense.name)].shape[1] == 1
    assert tokens.sum(1).tolist() == [K * int(t) for t in stats.tokens[:, layout.group_slice(dense.name)][:, 0]]
    assert not has_hooks(model)


def test_batched_rows_equal_solo_runs(model, impl):
    target = _target(model)
    with GateRecorder(target) as rec:
        _generate(model, PROMPTS)
    batch = rec.stats()
    for b, prompt in enumerate(PROMPTS):
        with GateRecorder(target) as solo:
            _generate(model, [prompt])
        one = solo.stats()
        assert torch.equal(batch.counts[b], one.counts[0]) and torch.equal(batch.tokens[b], one.tokens[0])


@pytest.mark.parametrize("strategy", ["chunk", "step"])
def test_prompt_split_equals_a_generated_only_recording(model, impl, strategy):
    """positions="all" keeps the prompt's share apart (per expert for T): all minus prompt equals a
    positions="generated" recording of the same generation, exactly."""
    target = _target(model)
    with GateRecorder(target, strategy=strategy) as both:
        _generate(model, PROMPTS)
    with GateRecorder(target, strategy=strategy, positions="generated") as generated:
        _generate(model, PROMPTS)
    a, g = both.stats(), generated.stats()
    assert a.has_prompt_split and a.prompt_tokens.shape == a.tokens.shape == (len(PROMPTS), target.layout().n_groups)
    assert (a.prompt_tokens > 0).any() and (a.prompt_counts > 0).any()
    assert torch.equal(a.generated().counts, g.counts) and torch.equal(a.generated().tokens, g.tokens)


def test_generated_positions_only(model):
    target = _target(model)
    with GateRecorder(target, positions="generated") as rec:
        out = _generate(model, PROMPTS[:1])
    generated = out.shape[1] - len(PROMPTS[0])  # the last token is never fed back
    for name in ("lm.layers.0.mlp.gate", "lm.layers.1.mlp.gate"):
        tokens = rec.stats().tokens[0, target.layout().group_slice(name)]
        per_position = K if target.layout()[name].routed else 1
        assert int(tokens.sum()) == per_position * (generated - 1)


def _experts_io(model, layer, fn):
    """Run ``fn()``; return the experts module's (input, routing, output) of its first forward."""
    seen = {}
    experts = model.model.layers[layer].mlp.experts

    def hook(m, args, out):
        seen.setdefault("io", (args[0].detach().clone(), args[1].clone(), out.detach().clone()))

    handle = experts.register_forward_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return seen["io"]


def test_steering_one_expert_unit_changes_exactly_its_routed_positions(model, impl):
    """+alpha on unit u of expert e: the experts output moves by alpha * up * weight * down[e][:, u] on the
    tokens routed to e, and is bit-identical on every other token."""
    target = _target(model)
    layout = target.layout()
    e, u, alpha = 3, 5, 0.75
    flat = layout.offsets[0] + e * D + u
    mask = Mask(np.array([flat]), layout)
    ids = torch.tensor([PROMPTS[1]])

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    x, index, plain = _experts_io(model, 0, forward)
    with steer(target, mask, "add", alpha) as hooked:
        _, index2, steered = _experts_io(model, 0, forward)
    assert hooked == ("lm.layers.0.mlp.gate",) and torch.equal(index, index2)
    experts = model.model.layers[0].mlp.experts
    routed = (index == e).any(1)
    assert routed.any() and (~routed).any()
    assert torch.equal(steered[~routed], plain[~routed])
    weight = model.model.layers[0].mlp.gate(x)[1]  # [T, k] routing weights
    w_e = (weight * (index == e)).sum(1)  # [T]
    up = x @ experts.gate_up_proj[e, D + u].detach()  # the unit's up projection
    want = plain + (alpha * up * w_e)[:, None] * experts.down_proj[e, :, u].detach()[None, :]
    assert torch.allclose(steered[routed], want[routed], atol=1e-6)
    assert not has_hooks(model)


@pytest.mark.parametrize("method,alpha", [("steer", 0.5), ("add", 0.75), ("clamp", 0.3), ("deactivate", None)])
def test_one_token_forward_gets_each_experts_edit(model, impl, method, alpha):
    """A one-token forward (the shape of a batch-1 decode step, where eager calls act_fn once per routed
    expert with one row): every routed expert's gate row gets that expert's edit, by hand."""
    target = _target(model)
    layout = target.layout()
    ids = torch.tensor([[PROMPTS[1][0]]])
    act = model.model.layers[0].mlp.experts.act_fn
    gates: list[torch.Tensor] = []

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    def observed() -> torch.Tensor:  # the gate rows after every hook installed before this one
        gates.clear()
        handle = act.register_forward_hook(lambda m, a, out: gates.append(out.detach().clone()))
        try:
            forward()
        finally:
            handle.remove()
        return torch.cat(gates)

    _, index, _ = _experts_io(model, 0, forward)
    plain = observed()  # [k, d], rows by increasing expert (one token, k distinct experts)
    rng = np.random.default_rng(1)
    units = rng.choice(E * D, 20, replace=False)  # neurons (e, u) of layer 0, routed or not
    mask = Mask(np.sort(layout.offsets[0] + units), layout)
    with steer(target, mask, method, alpha):
        steered = observed()
    assert len(gates) == (K if impl == "eager" else 1)
    want = plain.clone()
    for row, e in enumerate(sorted(index[0].tolist())):
        for u in [int(x) % D for x in units if int(x) // D == e]:
            g = plain[row, u]
            want[row, u] = {"steer": g * (1 + 0.5), "add": g + 0.75, "clamp": torch.clamp(g, min=0.3),
                            "deactivate": g * 0.0}[method]
    assert not torch.equal(want, plain)  # some selected neuron is routed to
    assert torch.allclose(steered, want, atol=1e-6, rtol=0)
    assert not has_hooks(model)


def test_alpha_zero_and_deactivate_rows(model, impl):
    target = _target(model)
    layout = target.layout()
    everything = Mask(np.arange(layout.n_neurons), layout)
    base = _generate(model, PROMPTS)
    with steer(target, everything, "steer", 0.0):
        assert torch.equal(_generate(model, PROMPTS), base)
    with steer_rows(target, [Condition(everything, "steer", 0.0), None, Condition(everything, "add", 0.0)]):
        assert torch.equal(_generate(model, PROMPTS), base)
    largest = []
    hp = layout["lm.layers.2.mlp.gate"]
    observe = model.get_submodule(hp.module).register_forward_hook
    with steer(target, Mask(np.arange(*layout.offsets[2:4]), layout), "deactivate"):
        handle = observe(lambda m, a, out: largest.append(float(out.abs().max())))
        try:
            _generate(model, PROMPTS[:1])
        finally:
            handle.remove()
    assert largest and max(largest) == 0.0


def test_per_row_conditions_reproduce_solo_runs(model, impl):
    target = _target(model)
    layout = target.layout()
    rng = np.random.default_rng(0)
    masks = [Mask(np.sort(rng.choice(layout.n_neurons, 40, replace=False)), layout) for _ in range(2)]
    conditions = [Condition(masks[0], "steer", 3.0), None, Condition(masks[1], "clamp", 0.2)]
    with steer_rows(target, conditions):
        batch = _generate(model, PROMPTS)
    width = batch.shape[1] - NEW
    for b, (prompt, cond) in enumerate(zip(PROMPTS, conditions, strict=True)):
        if cond is None:
            solo = _generate(model, [prompt])
        else:
            with steer(target, cond.mask, cond.method, cond.alpha):
                solo = _generate(model, [prompt])
        n = solo.shape[1] - len(prompt)
        assert batch[b, width:width + n].tolist() == solo[0, len(prompt):].tolist()


def test_folding_equals_hooking(model, impl):
    target = _target(model)
    layout = target.layout()
    rng = np.random.default_rng(1)
    mask = Mask(np.sort(rng.choice(layout.n_neurons, 60, replace=False)), layout)
    assert {layout.neuron_name(i).split("[")[0] for i in mask.indices} >= {"lm.layers.0.mlp.gate", "lm.layers.1.mlp.gate"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for method, alpha in (("steer", 1.0), ("deactivate", None)):  # gains 2 and 0: exact in any dtype
        with steer(target, mask, method, alpha):
            hooked = _generate(model, PROMPTS)
        with folded(target, mask, method, alpha):
            assert torch.equal(_generate(model, PROMPTS), hooked)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_routed_layout_names_artifacts_and_mismatch(model, tmp_path):
    from esn import artifacts

    layout = _target(model).layout()
    assert layout.describe()[0] == {"name": "lm.layers.0.mlp.gate", "width": E * D, "experts": E, "top_k": K}
    assert layout.describe()[1] == {"name": "lm.layers.1.mlp.gate", "width": 40}
    assert layout.n_groups == 2 * E + 1 and layout.neuron_name(3 * D + 5) == "lm.layers.0.mlp.gate[3, 5]"
    masks = artifacts.MaskSet.from_indices({"happy": np.array([1, 60])}, layout, selector="lap")
    artifacts.save_masks(tmp_path / "m.safetensors", masks)
    back = artifacts.load_masks(tmp_path / "m.safetensors", layout)
    assert back.layout == layout and back["happy"].indices.tolist() == [1, 60]
    # the same widths with another expert count: refused, naming the expert counts
    other = Layout([HookPoint("lm", 0, E * D, "x", experts=E // 2, top_k=K, router="r"),
                    HookPoint("lm", 1, 40, "y"), HookPoint("lm", 2, E * D, "z", experts=E, top_k=K, router="r")])
    with pytest.raises(LayoutMismatchError, match=f"has lm.layers.0.mlp.gate .width 48, {E} experts top-{K}.; "
                                                  f"model has lm.layers.0.mlp.gate .width 48, {E // 2} experts"):
        artifacts.load_masks(tmp_path / "m.safetensors", other)
    with pytest.raises(LayoutMismatchError, match="experts"):
        with steer(_target(model), Mask(np.array([0]), other), "steer", 1.0):
            pass


def test_routed_probabilities_and_routing_frequency():
    layout = Layout([HookPoint("lm", 0, 4, "a", experts=2, top_k=1, router="r"), HookPoint("lm", 1, 3, "b")])
    assert layout.n_groups == 3 and layout.group_widths.tolist() == [2, 2, 3]
    K_ = np.array([[3, 1, 0, 0, 2, 2, 2]], np.int64)
    T_ = np.array([[4, 0, 4]], np.int64)  # expert 1 never routed to: P = 0 there
    stats = ActivationStats(["happy"], layout, K_, T_, np.array([1]))
    assert stats.probs().tolist() == [[0.75, 0.25, 0.0, 0.0, 0.5, 0.5, 0.5]]
    assert stats.routing()["lm.layers.0.mlp.gate"].tolist() == [[1.0, 0.0]]
    with pytest.raises(EsnError, match="no positions"):
        ActivationStats(["happy"], layout, K_ * 0, np.array([[0, 0, 4]]), np.array([1])).probs()


def test_unsupported_implementation_and_missing_spec_are_refused(model):
    target = _target(model)
    experts = model.model.layers[0].mlp.experts
    before = experts.config._experts_implementation
    experts.config._experts_implementation = "sonicmoe"
    try:
        with pytest.raises(EsnError, match="experts implementation 'sonicmoe' is not supported"):
            with GateRecorder(target):
                _generate(model, PROMPTS[:1])
    finally:
        experts.config._experts_implementation = before
    assert not has_hooks(model)
    no_spec = ModelTarget(model, target.layout().hook_points)
    with pytest.raises(EsnError, match="needs a StreamSpec"):
        with GateRecorder(no_spec):
            pass
    assert not has_hooks(model)


def test_nnsight_steering_refuses_routed_gates(model):
    from esn.nnsight_support import TraceSteering

    target = _target(model)
    layout = target.layout()
    with pytest.raises(EsnError, match="mixture-of-experts gate"):
        TraceSteering(target, Mask(np.array([0]), layout), "steer", 1.0)
    dense = layout.offsets[1]  # lm.layers.1 is dense: allowed
    assert TraceSteering(target, Mask(np.array([dense]), layout), "steer", 1.0).hook_points == ("lm.layers.1.mlp.gate",)
