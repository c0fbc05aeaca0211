"""Routed neurons of the tiny Qwen3-Omni, for the grouped and the eager experts implementation.

References are computed by hand from what the model's modules receive: each expert's MLP run on the
tokens routed to it, with padding decided from the stream roots' own inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from esn.hookpoints import Layout
from esn.hooks import installed
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.steering import Condition, folded, steer, steer_rows
from esn.testing import _hooks


def _same(a, b) -> bool:
    return a.text == b.text and a.waveform.shape == b.waveform.shape and np.array_equal(a.waveform, b.waveform)


class _Capture:
    """Plain hooks: every stream root call's (ids, mask), every experts forward's (hidden, routing), and
    every dense gate, in call order."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.roots: dict[str, list] = {"thinker": [], "talker": []}
        self.experts: dict[str, list] = {}
        self.gates: dict[str, list] = {}
        self.order: list[tuple[str, str]] = []  # ("root", name) / ("sub", path) events, in order

    def hooks(self):
        model, pre, fwd = self.adapter.model, [], []
        for root in self.roots:
            def on_root(m, args, kwargs, root=root):
                ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
                x = kwargs.get("inputs_embeds") if ids is None else ids
                self.roots[root].append((None if ids is None else ids.clone(), mask, x.shape[1]))
                self.order.append(("root", root))
            pre.append((model.get_submodule(root), on_root))
        pre.append((model.get_submodule("talker.code_predictor"), lambda m, a, k: self.order.append(("sub", "cp"))))
        for hp in self.adapter.layout():
            if hp.routed:
                def on_experts(m, args, kwargs, hp=hp):
                    self.experts.setdefault(hp.name, []).append((args[0].detach().clone(), args[1].clone()))
                pre.append((model.get_submodule(hp.router), on_experts))
            else:
                fwd.append((model.get_submodule(hp.module),
                            lambda m, a, g, hp=hp: self.gates.setdefault(hp.name, []).append(g.detach().clone())))
        return pre, fwd


def _valid(calls, stop_ids, batch):
    """Per root call, ``[B, pos]`` bool: the prefill's mask columns; in decode, rows not yet finished."""
    out, finished = [], torch.zeros(batch, dtype=torch.bool)
    for n, (ids, mask, pos) in enumerate(calls):
        if n == 0:
            out.append(torch.ones(batch, pos, dtype=torch.bool) if mask is None else mask[:, -pos:].bool())
        else:
            if batch > 1:
                finished |= torch.isin(ids[:, -1], torch.tensor(stop_ids))
            out.append((~finished)[:, None].clone())
    return out


def _by_hand(adapter, requests, config):
    """Expected statistics of every routed hook point: ``{name: (counts [B, E, d], tokens [B, E])}``."""
    cap = _Capture(adapter)
    pre, fwd = cap.hooks()
    with installed(pre, kind="pre", with_kwargs=True), installed(fwd):
        adapter.generate(requests, config)
    b = len(requests)
    specs = adapter.stream_specs()
    valid = {"lm": _valid(cap.roots["thinker"], specs["lm"].stop_token_ids, b),
             "synth": _valid(cap.roots["talker"], specs["synth"].stop_token_ids, b)}
    model, out = adapter.model, {}
    for hp in adapter.layout():
        if not hp.routed:
            continue
        w = model.get_parameter(hp.router + ".gate_up_proj").detach()  # [E, 2d, h]
        d = hp.unit_width
        counts = torch.zeros(b, hp.experts, d, dtype=torch.int64)
        tokens = torch.zeros(b, hp.experts, dtype=torch.int64)
        forwards = cap.experts[hp.name]
        assert len(forwards) == len(valid[hp.stream])
        for (hidden, index), ok in zip(forwards, valid[hp.stream], strict=True):
            pos = ok.shape[1]
            for t in range(hidden.shape[0]):
                row, p = divmod(t, pos)
                if ok[row, p]:
                    for e in index[t].tolist():
                        g = torch.nn.functional.silu(hidden[t] @ w[e, :d].T)  # expert e's gate, by hand
                        counts[row, e] += (g > 0).long()
                        tokens[row, e] += 1
        out[hp.name] = counts, tokens
    return out


def test_routed_recording_equals_each_expert_by_hand(adapter, experts, requests_, config):
    with GateRecorder(adapter) as rec:
        adapter.generate(requests_, config)
    stats, layout = rec.stats(), adapter.layout()
    want = _by_hand(adapter, requests_, config)
    assert set(want) == {"lm.layers.0.mlp.gate", "lm.layers.2.mlp.gate", "synth.layers.0.mlp.gate",
                         "synth.layers.1.mlp.gate"}
    for name, (counts, tokens) in want.items():
        hp = layout[name]
        got = stats.counts[:, layout.slice(name)].reshape(len(requests_), hp.experts, hp.unit_width).long()
        assert torch.equal(got, counts), f"{name}: {int((got != counts).sum())} of {counts.numel()} counts differ"
        assert torch.equal(stats.tokens[:, layout.group_slice(name)], tokens), name
    assert _hooks(adapter) == set()


def test_batched_rows_equal_solo_runs_in_every_hook_point(adapter, experts, requests_, config):
    """Routed, dense, shared-expert and code-predictor (substep) statistics of a padded batch equal each
    row's solo run: padding, finished rows and the code predictor's steps are attributed correctly."""
    with GateRecorder(adapter) as rec:
        batch = adapter.generate(requests_, config)
    stats = rec.stats()
    for b, request in enumerate(requests_):
        with GateRecorder(adapter) as solo:
            one = adapter.generate([request], config)[0]
        assert one.text == batch[b].text
        assert torch.equal(stats.tokens[b], solo.stats().tokens[0])
        assert torch.equal(stats.counts[b], solo.stats().counts[0])
        assert torch.allclose(stats.sums[b], solo.stats().sums[0], rtol=1e-4, atol=1e-4)
    layout = adapter.layout()
    cp = layout["synth.layers.2.mlp.gate"]  # code predictor layer 0: 4 positions per talker decode step
    assert cp.module.startswith("talker.code_predictor.")
    cp_tokens = stats.tokens[:, layout.group_slice(cp.name)][:, 0]
    assert (cp_tokens > 0).all() and (cp_tokens % 4 == 0).all()


def _first_experts_io(adapter, router: str, fn):
    """Run ``fn()``; the experts module's (hidden, routing, output) of its first forward (the prefill)."""
    seen = {}

    def hook(m, args, out):
        seen.setdefault("io", (args[0].detach().clone(), args[1].clone(), out.detach().clone()))

    with installed([(adapter.model.get_submodule(router), hook)]):
        fn()
    return seen["io"]


@pytest.mark.parametrize("name", ["lm.layers.0.mlp.gate", "synth.layers.1.mlp.gate"])
def test_steering_one_expert_unit_changes_exactly_its_routed_positions(adapter, experts, requests_, config, name):
    """+alpha on unit u of expert e: the experts output moves by alpha * up_u * weight_e * down[e][:, u] on
    exactly the positions routed to e, and stays bit-identical everywhere else."""
    layout = adapter.layout()
    hp = layout[name]
    d = hp.unit_width
    x, index, _ = _first_experts_io(adapter, hp.router, lambda: adapter.generate(requests_[:1], config))
    counts = torch.bincount(index.reshape(-1), minlength=hp.experts)
    e = int(((counts > 0) & (counts < index.shape[0])).nonzero()[0])  # routed to some positions, not all
    u, alpha = d - 1, 0.5
    mask = Mask(np.array([layout.offsets[layout.index(name)] + e * d + u]), layout)

    def run():
        return adapter.generate(requests_[:1], config)

    _, _, plain = _first_experts_io(adapter, hp.router, run)
    with steer(adapter, mask, "add", alpha):
        x2, index2, steered = _first_experts_io(adapter, hp.router, run)
    assert torch.equal(x, x2) and torch.equal(index, index2)  # same inputs: only this layer's edit differs
    routed = (index == e).any(1)
    assert routed.any() and (~routed).any()
    assert torch.equal(steered[~routed], plain[~routed])
    experts_module = adapter.model.get_submodule(hp.router)
    router = adapter.model.get_submodule(hp.router.rpartition(".")[0] + ".gate")
    weight = router(x)[1]  # routing weights [T, k]
    w_e = (weight * (index == e)).sum(1)
    up = x @ experts_module.gate_up_proj[e, d + u].detach()
    want = plain + (alpha * up * w_e)[:, None] * experts_module.down_proj[e, :, u].detach()[None, :]
    assert torch.allclose(steered[routed], want[routed], atol=1e-6)
    assert _hooks(adapter) == set()


def _mixed_mask(adapter, n=80, seed=0) -> Mask:
    """Random neurons in every kind of hook point: routed, dense, shared expert, code predictor."""
    layout = adapter.layout()
    rng = np.random.default_rng(seed)
    picks = [layout.offsets[i] + rng.choice(hp.width, min(hp.width, n // len(layout)), replace=False)
             for i, hp in enumerate(layout)]
    return Mask(np.sort(np.concatenate(picks)), layout)


def test_alpha_zero_is_bit_identical(adapter, experts, requests_, config):
    base = adapter.generate(requests_, config)
    layout = adapter.layout()
    everything = Mask(np.arange(layout.n_neurons), layout)
    with steer(adapter, everything, "steer", 0.0):
        assert all(_same(a, b) for a, b in zip(base, adapter.generate(requests_, config), strict=True))
    with steer_rows(adapter, [Condition(everything, "steer", 0.0), Condition(everything, "add", 0.0)]):
        assert all(_same(a, b) for a, b in zip(base, adapter.generate(requests_, config), strict=True))


def test_folding_equals_hooking(adapter, experts, requests_, config):
    mask = _mixed_mask(adapter)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if "down_proj" in n}
    base = adapter.generate(requests_, config)
    for method, alpha in (("steer", 127.0), ("deactivate", None)):  # gains 128 and 0: exact in any dtype
        with steer(adapter, mask, method, alpha):
            hooked = adapter.generate(requests_, config)
        with folded(adapter, mask, method, alpha):
            assert all(_same(a, b) for a, b in zip(hooked, adapter.generate(requests_, config), strict=True))
        if method == "steer":  # a tiny random model: only a large gain visibly moves its output
            assert not all(_same(a, b) for a, b in zip(base, hooked, strict=True))
    assert all(torch.equal(p, before[n]) for n, p in adapter.model.named_parameters() if "down_proj" in n)


def test_per_row_conditions_reproduce_solo_runs(adapter, experts, requests_, config):
    layout = adapter.layout()
    lm = Mask(np.arange(*layout.offsets[0:2]), layout)  # thinker layer 0: every expert unit
    synth = _mixed_mask(adapter, seed=2)
    conditions = [Condition(lm, "steer", 3.0), Condition(synth, "clamp", 0.3)]
    with steer_rows(adapter, conditions):
        batch = adapter.generate(requests_, config)
    for request, cond, row in zip(requests_, conditions, batch, strict=True):
        with steer(adapter, cond.mask, cond.method, cond.alpha):
            solo = adapter.generate([request], config)[0]
        assert row.text == solo.text and row.waveform.shape == solo.waveform.shape
        assert np.allclose(row.waveform, solo.waveform, atol=1e-4)
    plain = adapter.generate(requests_, config)
    assert batch[0].text != plain[0].text or not np.array_equal(batch[0].waveform, plain[0].waveform)


def test_mask_for_another_expert_count_is_refused(adapter, requests_, config):
    from esn.errors import LayoutMismatchError
    from esn.hookpoints import HookPoint

    mine = adapter.layout(["lm"])
    # same names and widths, half the experts with twice the units: another model
    other = Layout([HookPoint(hp.stream, hp.layer, hp.width, hp.module, experts=hp.experts // 2, top_k=hp.top_k,
                              router=hp.router) if hp.routed else hp for hp in mine])
    assert [h.width for h in other] == [h.width for h in mine]
    with pytest.raises(LayoutMismatchError, match=r"4 experts top-2\); model has .* 8 experts top-2"):
        with steer(adapter, Mask(np.array([0]), other), "steer", 1.0):
            pass
    assert _hooks(adapter) == set()
