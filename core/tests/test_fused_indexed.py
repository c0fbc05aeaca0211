"""Fused and indexed hook points on plain gated MLPs (no model family): a functional activation, a fused
gate/up projection, and one weight set per index. Recording equals ``(gate > 0)`` counted by hand,
steering edits exactly the selected neurons, folding equals hooking, and the injected module goes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from esn.errors import EsnError
from esn.fused import GateHookPoint, injected
from esn.hookpoints import HookPoint
from esn.hooks import ModelTarget, has_hooks
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.steering import Condition, folded, steer, steer_rows
from torch import nn

H, D, K = 6, 5, 3


class FunctionalMLP(nn.Module):
    """``down(F.silu(gate(x)) * up(x))``: no activation module to hook."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, D, bias=False)
        self.up = nn.Linear(H, D, bias=False)
        self.down = nn.Linear(D, H, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FusedMLP(nn.Module):
    """One projection for gate and up halves, a GELU written inline."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(H, 2 * D, bias=False)
        self.fc2 = nn.Linear(D, H, bias=False)

    def forward(self, x):
        z = self.fc1(x)
        return self.fc2(F.gelu(z[..., :D]) * z[..., D:])


class PerIndex(nn.Module):
    """``weight [K, out, in]``; position s uses weight set ``idx[s]`` (as Moshi's MoshiFlexibleLinear)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(K, n_out, n_in))

    def forward(self, x, idx):
        return torch.einsum("bsi,soi->bso", x, self.weight[idx])


class IndexedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = PerIndex(H, 2 * D)
        self.fc2 = PerIndex(D, H)

    def forward(self, x, idx):
        z = self.fc1(x, idx)
        return self.fc2(F.silu(z[..., :D]) * z[..., D:], idx)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = FunctionalMLP()
        self.b = FusedMLP()
        self.c = IndexedMLP()

    def forward(self, x, idx):
        return self.c(self.b(self.a(x)), idx)


def points():
    return [HookPoint("lm", 0, D, "a.esn_gate", "a.down", fused="a.gate", up="a.up"),
            HookPoint("lm", 1, D, "b.esn_gate", "b.fc2", fused="b.fc1", activation="gelu"),
            HookPoint("synth", 0, K * D, "c.esn_gate", "c.fc2", fused="c.fc1", indices=K, index_from="c")]


def gates(model, x, idx):
    """The three post-activation gates, by hand."""
    ga = F.silu(model.a.gate(x))
    hb = model.a(x)
    gb = F.gelu(model.b.fc1(hb)[..., :D])
    hc = model.b(hb)
    gc = F.silu(model.c.fc1(hc, idx)[..., :D])
    return ga, gb, gc


@pytest.fixture
def toy():
    model = Toy().eval()
    return model, ModelTarget(model, points())


def inputs(b=2, s=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, H, generator=g), torch.tensor([0, 1, 2, 1][:s])


def test_recording_counts_each_gate_and_index_by_hand(toy):
    model, target = toy
    x, idx = inputs()
    with torch.no_grad():
        before = model(x, idx)
        with GateRecorder(target) as rec:
            out = model(x, idx)
        ga, gb, gc = gates(model, x, idx)
    assert torch.equal(out, before)  # hooking changes no bit
    assert not has_hooks(model) and not any(isinstance(m, GateHookPoint) for m in model.modules())
    stats = rec.stats()
    layout = target.layout()
    assert torch.equal(stats.counts[:, layout.slice("lm.layers.0.mlp.gate")], (ga > 0).sum(1).int())
    assert torch.equal(stats.counts[:, layout.slice("lm.layers.1.mlp.gate")], (gb > 0).sum(1).int())
    want = torch.zeros(2, K, D, dtype=torch.int32)
    for s, k in enumerate(idx.tolist()):
        want[:, k] += (gc[:, s] > 0).int()
    assert torch.equal(stats.counts[:, layout.slice("synth.layers.0.mlp.gate")], want.reshape(2, K * D))
    assert stats.tokens[:, layout.group_slice("synth.layers.0.mlp.gate")].tolist() == [[1, 2, 1]] * 2
    assert stats.tokens[:, layout.group_slice("lm.layers.0.mlp.gate")].tolist() == [[4]] * 2
    assert torch.allclose(stats.sums[:, layout.slice("lm.layers.1.mlp.gate")], gb.double().sum(1))
    assert layout.neuron_name(layout.slice("synth.layers.0.mlp.gate").start + D + 2) == "synth.layers.0.mlp.gate[1, 2]"


@pytest.mark.parametrize("method,alpha", [("steer", 2.0), ("add", 0.5), ("clamp", 0.3), ("deactivate", None)])
@pytest.mark.parametrize("where", ["a", "c"])
def test_steering_edits_exactly_the_selected_neurons(toy, method, alpha, where):
    model, target = toy
    x, idx = inputs()
    layout = target.layout()
    name = {"a": "lm.layers.0.mlp.gate", "c": "synth.layers.0.mlp.gate"}[where]
    unit = {"a": 1, "c": 2 * D + 3}[where]  # unit 1 of lm 0; (index 2, unit 3) of synth 0
    mask = Mask(np.array([layout.slice(name).start + unit]), layout)
    seen = {}
    with torch.no_grad(), steer(target, mask, method, alpha):
        # the gate after the edit, seen by a later hook on the injected module
        getattr(model, where).esn_gate.register_forward_hook(lambda mod, a, out: seen.__setitem__("g", out.clone()))
        model(x, idx)
    assert not has_hooks(model) and not hasattr(model.a, "esn_gate") and not hasattr(model.c, "esn_gate")
    with torch.no_grad():
        ga, _, gc = gates(model, x, idx)  # nothing upstream of the edited point changed
    edit = {"steer": lambda g: g * (1 + alpha), "add": lambda g: g + alpha,
            "clamp": lambda g: torch.maximum(g, torch.tensor(alpha)), "deactivate": lambda g: g * 0}[method]
    want = (ga if where == "a" else gc).clone()
    at = slice(None) if where == "a" else idx == 2  # synth: only the positions of index 2
    want[:, at, unit % D] = edit(want[:, at, unit % D])
    assert torch.equal(seen["g"], want)
    assert not torch.equal(want, ga if where == "a" else gc) or method == "clamp"


def test_steer_rows_per_row_and_index(toy):
    model, target = toy
    x, idx = inputs()
    layout = target.layout()
    off_c = layout.slice("synth.layers.0.mlp.gate").start
    mask = Mask(np.array([off_c + 0 * D + 4, off_c + 1 * D + 0]), layout)
    with torch.no_grad():
        plain = model(x, idx)
        with steer_rows(target, [None, Condition(mask, "deactivate")]):
            rows = model(x, idx)
        with steer(target, mask, "deactivate"):
            both = model(x, idx)
    assert torch.equal(rows[0], plain[0]) and torch.equal(rows[1], both[1]) and not torch.equal(rows[1], plain[1])


@pytest.mark.parametrize("method,alpha", [("steer", 1.0), ("deactivate", None)])  # gains 2 and 0: exact
def test_folding_equals_hooking(toy, method, alpha):
    model, target = toy
    x, idx = inputs()
    layout = target.layout()
    rng = np.random.default_rng(0)
    mask = Mask(np.sort(rng.choice(layout.n_neurons, 9, replace=False)), layout)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with steer(target, mask, method, alpha):
            hooked = model(x, idx)
        with folded(target, mask, method, alpha):
            fold = model(x, idx)
    assert torch.equal(hooked, fold)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_injection_is_removed_on_error_and_shared_when_nested(toy):
    model, target = toy
    x, idx = inputs()
    with pytest.raises(RuntimeError, match="boom"), GateRecorder(target):
        assert isinstance(model.b.esn_gate, GateHookPoint)
        raise RuntimeError("boom")
    assert not has_hooks(model) and not hasattr(model.b, "esn_gate")
    mask = Mask(np.array([0]), target.layout())
    with GateRecorder(target) as rec, steer(target, mask, "deactivate"), torch.no_grad():
        model(x, idx)
        assert model.a.esn_gate.users == 2  # one injection, two users
    assert not has_hooks(model) and not hasattr(model.b, "esn_gate")
    with GateRecorder(target) as plain, torch.no_grad():
        model(x, idx)
    # the recorder's hook came first, so it saw lm 0's gate before the edit (as on a dense act_fn); later
    # points see the edit's effect
    first, steered, unsteered = target.layout().slice("lm.layers.0.mlp.gate"), rec.stats(), plain.stats()
    assert torch.equal(steered.counts[:, first], unsteered.counts[:, first])
    assert not torch.equal(steered.counts, unsteered.counts)


def test_bad_declarations_are_refused(toy):
    model, _ = toy
    with pytest.raises(EsnError, match="already exists"), injected(model, [HookPoint("lm", 0, D, "a.gate", "a.down", fused="a.gate")]):
        pass
    with pytest.raises(EsnError, match="activation"), injected(model, [HookPoint("lm", 0, D, "a.g2", "a.down", fused="a.gate", activation="tanhh")]):
        pass
    with pytest.raises(EsnError, match="down_proj"):
        HookPoint("lm", 0, D, "a.g2", fused="a.gate")
    with pytest.raises(EsnError, match="indices"):
        HookPoint("synth", 0, 7, "c.act", indices=K, index_from="c")
    assert not has_hooks(model)


def test_indexed_probabilities_selection_files_and_index_view(toy, tmp_path):
    """P of neuron (k, u) is over the positions of index k; a selector ranks the flat neurons; the layout
    (with its indices) survives a file; the index x layer view counts a mask per (index, layer)."""
    from esn import analysis, artifacts
    from esn.selection import select_neurons
    from esn.statistics import ActivationStats
    from esn.store import layout_from_dict, layout_to_dict

    model, target = toy
    layout = target.layout(["synth"])
    x, idx = inputs()
    with GateRecorder(target, streams=["synth"]) as rec, torch.no_grad():
        model(x, idx)
    stats = rec.stats()
    act = ActivationStats(["happy", "sad"], layout, stats.counts.numpy().astype(np.int64),
                          stats.tokens.numpy(), np.ones(2, np.int64))
    p = act.probs()
    assert np.allclose(p[:, D:2 * D], stats.counts[:, D:2 * D].numpy() / 2)  # index 1 ran at two positions
    assert np.array_equal(act.hook_point_positions(), [[4], [4]])
    masks = select_neurons(p, "lap", 0.2, emotions=act.emotions)
    assert all(len(m) == 3 for m in masks.values())  # floor(0.2 * 15) over the flat K x d neurons
    again = layout_from_dict(layout_to_dict(layout), "test")
    assert again.describe() == layout.describe() and again.indexed and again.fingerprint == layout.fingerprint
    with pytest.raises(EsnError, match="fingerprint"):  # the indices are part of the layout: dropping them shows
        layout_from_dict({**layout_to_dict(layout), "hook_points": [{"name": "synth.layers.0.mlp.gate", "width": 15}]}, "t")
    path = tmp_path / "m.safetensors"
    artifacts.save_masks(path, masks, layout=layout)
    loaded = artifacts.load_masks(path)
    names, counts = analysis.index_counts(loaded.masks, loaded.layout)
    assert names == ["synth 0"] and counts.shape == (2, K, 1)
    for e, mask in enumerate(masks.values()):
        assert counts[e, :, 0].tolist() == np.bincount(mask // D, minlength=K).tolist()
    with pytest.raises(EsnError, match="no indexed hook point"):
        analysis.index_counts(loaded.masks, target.layout(["lm"]))


def test_indexed_misdeclarations_are_named(toy):
    model, _ = toy
    x, idx = inputs()
    d_points = points()[:2]
    wrong_module = HookPoint("synth", 0, K * D, "c.esn_gate", "c.fc2", fused="c.fc1", indices=K, index_from="c.fc2")  # runs after the gate
    with pytest.raises(EsnError, match="without a call of its index_from"), GateRecorder(ModelTarget(model, [*d_points, wrong_module])), torch.no_grad():
        model(x, idx)
    too_few = HookPoint("synth", 0, 2 * D, "c.esn_gate", "c.fc2", fused="c.fc1", indices=2, index_from="c")
    with pytest.raises(EsnError, match=r"outside 0\.\.1"), GateRecorder(ModelTarget(model, [too_few])), torch.no_grad():
        model(x, idx)
    assert not has_hooks(model) and not hasattr(model.c, "esn_gate")
