"""Steering on tiny real Qwen2 models (saved and loaded back), float32, greedy.

Checks: each method against hand-applied values inside a real forward, alpha = 0 is bit-identical,
deactivating a layer equals zeroing its down_proj, hooks always removed, per-row conditions reproduce
solo runs with left padding, positions="generated", layout checks, weight folding and its bf16 caveat.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from esn.adapters import StreamSpec
from esn.errors import EsnError, LayoutMismatchError
from esn.hookpoints import HookPoint, Layout
from esn.hooks import ModelTarget, gate_hook_points, has_hooks, installed
from esn.interventions import Intervention, apply_intervention
from esn.masks import Mask
from esn.plugins import hookimpl, registry_with
from esn.steering import Condition, folded, steer, steer_rows

LAYERS, WIDTH = 3, 64
NEW = 6


def _tiny(path, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # initializer_range 0.3: large enough that editing a few gate neurons changes greedy tokens.
    config = Qwen2Config(
        num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=WIDTH, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny_qwen2"), seed=0)


@pytest.fixture(scope="module")
def target(model):
    return ModelTarget(model, gate_hook_points(model, "model.layers", "lm"), {"lm": StreamSpec(root="model")})


def _mask(target, per_layer: dict[int, list[int]], streams=("lm",)) -> Mask:
    layout = target.layout(list(streams))
    return Mask.from_split(layout, {f"{streams[0]}.layers.{i}.mlp.gate": np.array(v) for i, v in per_layer.items()})


def _prompts(n: int, lengths=(5, 7, 4, 6, 3, 7), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (lengths[i % len(lengths)],), generator=g) for i in range(n)]


def _left_pad(prompts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        att[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": att}


def _gen(model, inputs: dict[str, torch.Tensor], new: int = NEW) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:]


def _solo(prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": prompt[None], "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.stack(_prompts(2, lengths=(6,)))


# -- exact values inside a real forward ------------------------------------------------------------


def _gates(model, layer: int, run):
    """Gates ``[batch, pos, d_mlp]`` of ``layer`` per forward, as seen after any steering hook."""
    seen = []
    with installed([(model.model.layers[layer].mlp.act_fn, lambda m, a, o: seen.append(o.detach().clone()))]):
        run()
    return seen


def _capture(model, layer: int, run):
    """``(run(), gates of layer per forward)``."""
    out = []
    gates = _gates(model, layer, lambda: out.append(run()))
    return out[0], gates


@pytest.mark.parametrize(("method", "alpha"), [("steer", 1.0), ("steer", 0.5), ("add", 0.25), ("clamp", 0.1),
                                               ("deactivate", None)])
def test_each_method_edits_exactly_the_selected_neurons(model, target, ids, method, alpha):
    sel = [0, 5, 17, 63]
    plain = _gates(model, 0, lambda: _logits(model, ids))[0]
    with steer(target, _mask(target, {0: sel}), method, alpha) as names:
        edited = _gates(model, 0, lambda: _logits(model, ids))[0]
    assert names == ("lm.layers.0.mlp.gate",)
    # Layer 0 is the first edit, so its input is unchanged: the edit must equal the pure function.
    assert torch.equal(edited, apply_intervention(plain, torch.tensor(sel), method, alpha))
    others = [n for n in range(WIDTH) if n not in sel]
    assert torch.equal(edited[..., others], plain[..., others])
    hand = {
        "steer": plain[..., sel] * (1 + (alpha or 0)),
        "add": plain[..., sel] + (alpha or 0),
        "clamp": plain[..., sel].clamp_min(alpha or 0),
        "deactivate": torch.zeros_like(plain[..., sel]),
    }[method]
    assert torch.equal(edited[..., sel], hand)
    assert not torch.equal(edited, plain)


def test_alpha_zero_steering_is_bit_identical(model, target, ids):
    mask = _mask(target, {0: [1, 2, 3], 2: list(range(0, 64, 3))})
    plain_logits, plain_tokens = _logits(model, ids), _gen(model, {"input_ids": ids})
    with steer(target, mask, "steer", 0.0):
        assert torch.equal(_logits(model, ids), plain_logits)
        assert torch.equal(_gen(model, {"input_ids": ids}), plain_tokens)
    # Per row: a row at alpha 0 is bit-identical to the unsteered batch while its neighbour is steered.
    with steer_rows(target, [Condition(mask, "steer", 0.0), Condition(mask, "steer", 2.0)]):
        logits = _logits(model, ids)
    assert torch.equal(logits[0], plain_logits[0])
    assert not torch.allclose(logits[1], plain_logits[1])


def test_deactivating_a_layer_equals_zeroing_its_down_proj(model, target, ids):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight.zero_()
    want_logits, want_tokens = _logits(reference, ids), _gen(reference, {"input_ids": ids})
    with steer(target, _mask(target, {1: list(range(WIDTH))}), "deactivate"):
        assert torch.equal(_logits(model, ids), want_logits)
        assert torch.equal(_gen(model, {"input_ids": ids}), want_tokens)
    assert not torch.equal(_logits(model, ids), want_logits)


# -- no trace left ---------------------------------------------------------------------------------


def test_hooks_removed_after_normal_exit_and_errors(model, target, ids):
    mask = _mask(target, {0: [1, 2], 2: [3, 4, 5]})
    before_logits, before_tokens = _logits(model, ids), _gen(model, {"input_ids": ids})
    with steer(target, mask, "steer", 3.0):
        assert has_hooks(model)
        assert not torch.equal(_logits(model, ids), before_logits)
    assert not has_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), steer(target, mask, "add", 1.0, positions="generated"):
        _gen(model, {"input_ids": ids})
        raise RuntimeError("boom")
    assert not has_hooks(model)
    # An error raised by a hook in the middle of generate (3 conditions, 2 rows).
    with pytest.raises(EsnError, match=r"3 conditions but lm\.layers\.0\.mlp\.gate saw a batch of 2 rows"):
        with steer_rows(target, [Condition(mask), None, Condition(mask, "clamp", 0.5)]):
            _gen(model, {"input_ids": ids})
    assert not has_hooks(model)
    assert torch.equal(_logits(model, ids), before_logits)
    assert torch.equal(_gen(model, {"input_ids": ids}), before_tokens)


# -- per-row conditions ----------------------------------------------------------------------------


def test_mixed_conditions_reproduce_solo_runs_with_left_padding(model, target):
    a = _mask(target, {0: [3, 9, 40], 1: list(range(0, 64, 4))})
    b = _mask(target, {2: list(range(10, 40))})
    conditions = [
        Condition(a, "steer", 1.5),
        None,
        Condition(b, "deactivate"),
        Condition(a, "add", 0.5),
        Condition(b, "clamp", 0.3),
        Condition(a, "steer", 1.5),  # shares its condition with row 0
    ]
    prompts = _prompts(len(conditions))
    batch = _left_pad(prompts)
    width = batch["input_ids"].shape[1]
    with steer_rows(target, conditions) as names:
        tokens, gates = _capture(model, 1, lambda: _gen(model, batch))
    assert set(names) == {f"lm.layers.{i}.mlp.gate" for i in range(3)}
    changed = 0
    for row, (cond, prompt) in enumerate(zip(conditions, prompts, strict=True)):
        with steer(target, cond.mask, cond.method, cond.alpha) if cond else installed([]):
            solo_tokens, solo_gates = _capture(model, 1, lambda p=prompt: _gen(model, _solo(p)))
        assert torch.equal(tokens[row], solo_tokens[0]), f"row {row} differs from its solo run"
        # Gate values: the prefill over the real (unpadded) positions, then one position per step.
        n = len(prompt)
        assert torch.allclose(gates[0][row, width - n:], solo_gates[0][0], atol=1e-5)
        for step in range(1, NEW):
            assert torch.allclose(gates[step][row], solo_gates[step][0], atol=1e-5)
        if cond is not None:
            changed += not torch.equal(solo_tokens[0], _gen(model, _solo(prompt))[0])
    assert changed >= 3, "the conditions should change most steered rows' tokens"


def test_rows_must_match_the_batch(model, target, ids):
    mask = _mask(target, {0: [1]})
    with pytest.raises(EsnError, match="one Condition"):
        with steer_rows(target, []):
            pass
    with pytest.raises(EsnError, match=r"conditions\[1\]"):
        with steer_rows(target, [None, (mask, "steer", 1.0)]):
            pass
    with pytest.raises(EsnError, match=r"1 conditions but .* batch of 2 rows"):
        with steer_rows(target, [Condition(mask)]):
            _logits(model, ids)
    with steer_rows(target, [None, None]) as names:  # nothing to do: no hooks
        assert names == () and not has_hooks(model)


# -- positions -------------------------------------------------------------------------------------


def test_generated_positions_skip_the_prefill(model, target):
    mask = _mask(target, {0: list(range(0, 64, 2)), 1: list(range(0, 64, 2))})
    inputs = _solo(_prompts(1)[0])
    plain = _gates(model, 1, lambda: _gen(model, inputs))
    runs = {}
    for name, tgt in (("root", target), ("fallback", ModelTarget(model, target.layout().hook_points))):
        with steer(tgt, mask, "steer", 2.0, positions="generated"):
            runs[name] = _gates(model, 1, lambda: _gen(model, inputs))
            again = _gen(model, inputs)  # a second generate in the same context: its prefill is skipped too
        assert torch.equal(runs[name][0], plain[0]), "the prefill must not be edited"
        assert not torch.allclose(runs[name][1], plain[1]), "decode steps must be edited"
        assert torch.equal(again, _gen_in(tgt, mask, inputs))
    assert all(torch.equal(x, y) for x, y in zip(runs["root"], runs["fallback"], strict=True))
    with steer_rows(target, [Condition(mask, "steer", 2.0)], positions="generated"):
        assert torch.equal(_gen(model, inputs), again)
    with pytest.raises(EsnError, match="positions"), steer(target, mask, positions="prompt"):
        pass


def _gen_in(target, mask, inputs):
    with steer(target, mask, "steer", 2.0, positions="generated"):
        return _gen(target.model, inputs)


# -- layouts and streams ---------------------------------------------------------------------------


def test_masks_from_another_layout_are_refused(target):
    other = Layout(HookPoint("lm", i, 32 if i == 1 else WIDTH, f"x.{i}") for i in range(LAYERS))
    with pytest.raises(LayoutMismatchError, match=r"First difference at hook point 1: mask has lm.layers.1.mlp.gate"
                                                  r" \(width 32\); model has lm.layers.1.mlp.gate \(width 64\)"):
        with steer(target, Mask(np.array([1]), other)):
            pass
    synth = Layout([HookPoint("synth", 0, WIDTH, "y")])
    with pytest.raises(LayoutMismatchError, match=r"stream\(s\) \['synth'\], but this model has only \['lm'\]"):
        with steer_rows(target, [Condition(Mask(np.array([1]), synth))]):
            pass
    with pytest.raises(EsnError, match="selects no neurons"), folded(target, Mask(np.zeros(0), target.layout())):
        pass
    with pytest.raises(EsnError, match="unknown intervention 'boost'"):
        with steer(target, _mask(target, {0: [1]}), "boost"):
            pass
    with pytest.raises(EsnError, match="steer alpha must be >= -1"):
        with steer(target, _mask(target, {0: [1]}), "steer", -2):
            pass


class _Pair(torch.nn.Module):
    """Two decoders in one model: ``lm`` and ``synth``, like a thinker and a talker."""

    def __init__(self, lm, synth):
        super().__init__()
        self.lm, self.synth = lm, synth


def test_masks_for_lm_synth_or_both(tmp_path, model):
    pair = _Pair(model, _tiny(tmp_path / "synth", seed=5))
    points = gate_hook_points(pair, "lm.model.layers", "lm") + gate_hook_points(pair, "synth.model.layers", "synth")
    two = ModelTarget(pair, points)
    ids = torch.stack(_prompts(1))
    plain = (_logits(pair.lm, ids), _logits(pair.synth, ids))
    sel = {1: list(range(0, 64, 2))}
    only_synth = Mask.from_split(two.layout(["synth"]), {"synth.layers.1.mlp.gate": np.array(sel[1])})
    both = Mask.from_split(two.layout(), {"lm.layers.1.mlp.gate": np.array(sel[1]),
                                          "synth.layers.1.mlp.gate": np.array(sel[1])})
    with steer(two, only_synth, "steer", 2.0) as names:
        assert names == ("synth.layers.1.mlp.gate",)
        assert torch.equal(_logits(pair.lm, ids), plain[0])
        synth_only = _logits(pair.synth, ids)
        assert not torch.allclose(synth_only, plain[1])
    with steer(two, both, "steer", 2.0):
        assert not torch.allclose(_logits(pair.lm, ids), plain[0])
        assert torch.equal(_logits(pair.synth, ids), synth_only)
    assert not has_hooks(pair)


# -- third-party interventions ---------------------------------------------------------------------


class Negate(Intervention):
    """A plugin intervention with no affine form: ``g -> -g`` (uses the ``apply`` fallback)."""

    name = "negate"
    needs_alpha = False

    @classmethod
    def apply(cls, gate, indices, alpha):
        out = gate.clone()
        out[..., indices] = -out[..., indices]
        return out


class NegatePlugin:
    @hookimpl
    def register_interventions(self, register):
        register(Negate)


def test_plugin_intervention_in_steer_and_steer_rows(model, target, ids):
    reg = registry_with(NegatePlugin())
    sel = [2, 7]
    mask = _mask(target, {0: sel})
    plain = _gates(model, 0, lambda: _logits(model, ids))[0]
    with steer(target, mask, "negate", registry=reg):
        edited = _gates(model, 0, lambda: _logits(model, ids))[0]
    assert torch.equal(edited[..., sel], -plain[..., sel])
    with steer_rows(target, [Condition(mask, "negate"), Condition(mask, "steer", 1.0)], registry=reg):
        rows = _gates(model, 0, lambda: _logits(model, ids))[0]
    assert torch.equal(rows[0, :, sel], -plain[0, :, sel])
    assert torch.equal(rows[1, :, sel], 2 * plain[1, :, sel])
    assert torch.equal(rows[:, :, 0], plain[:, :, 0])


# -- weight folding --------------------------------------------------------------------------------


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise_same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.mark.parametrize(("method", "alpha"), [("steer", 1.0), ("deactivate", None), ("steer", 3.0)])
def test_folded_equals_hook_steering_exactly(model, target, ids, method, alpha):
    mask = _mask(target, {0: [1, 5, 9], 2: list(range(20, 50))})
    before = _weights(model)
    with steer(target, mask, method, alpha):
        want_logits, want_tokens = _logits(model, ids), _gen(model, {"input_ids": ids})
    with folded(target, mask, method, alpha) as names:
        assert not has_hooks(model)
        assert names == ("lm.layers.0.mlp.gate", "lm.layers.2.mlp.gate")
        assert torch.equal(_logits(model, ids), want_logits)  # gains 2, 0 and 4: powers of two or zero
        assert torch.equal(_gen(model, {"input_ids": ids}), want_tokens)
    assert _bitwise_same(_weights(model), before)


def test_folded_restores_weights_on_error_and_refuses_other_methods(model, target, ids):
    mask = _mask(target, {1: [0, 1, 2, 3]})
    before = _weights(model)
    with pytest.raises(RuntimeError, match="inside"), folded(target, mask, "steer", 0.3):
        assert not _bitwise_same(_weights(model), before)
        raise RuntimeError("inside")
    assert _bitwise_same(_weights(model), before)
    for method in ("add", "clamp"):
        with pytest.raises(EsnError, match=f"{method!r} cannot be folded"), folded(target, mask, method, 0.5):
            pass
    no_down = ModelTarget(model, [HookPoint("lm", i, WIDTH, f"model.layers.{i}.mlp.act_fn") for i in range(LAYERS)])
    with pytest.raises(EsnError, match="no down_proj path"), folded(no_down, mask):
        pass
    assert _bitwise_same(_weights(model), before)


def test_folding_bf16_caveat(model, target, ids):
    """Gain 1.3 rounds differently folded (g * (w * 1.3)) than hooked ((g * 1.3) * w) in bf16;
    gain 2 is exact in any dtype; in float32 greedy tokens agree for gain 1.3 all the same."""
    mask = _mask(target, {0: list(range(0, 64, 2)), 1: list(range(0, 64, 2)), 2: list(range(0, 64, 2))})
    inputs = {"input_ids": ids}
    with steer(target, mask, "steer", 0.3):
        hooked = _gen(model, inputs)
    with folded(target, mask, "steer", 0.3):
        assert torch.equal(_gen(model, inputs), hooked)

    half = copy.deepcopy(model).to(torch.bfloat16)
    half_target = ModelTarget(half, target.layout().hook_points)
    before = _weights(half)
    outs = {}
    for alpha in (0.3, 1.0):
        with steer(half_target, mask, "steer", alpha):
            hooked = _logits(half, ids)
        with folded(half_target, mask, "steer", alpha):
            outs[alpha] = (hooked, _logits(half, ids))
    assert torch.equal(*outs[1.0])
    assert not torch.equal(*outs[0.3]), "bf16 folding with a gain that is not a power of two rounds differently"
    assert _bitwise_same(_weights(half), before)


# -- the fast path needs no nnsight ----------------------------------------------------------------


def test_fast_path_does_not_import_nnsight():
    code = (
        "import sys, numpy as np, torch\n"
        "from torch import nn\n"
        "import esn.steering as s\n"
        "from esn.hooks import ModelTarget\n"
        "from esn.hookpoints import HookPoint\n"
        "from esn.masks import Mask\n"
        "m = nn.Sequential(nn.SiLU())\n"
        "t = ModelTarget(m, [HookPoint('lm', 0, 4, '0')])\n"
        "with s.steer(t, Mask(np.array([1]), t.layout()), 'steer', 1.0):\n"
        "    y = m(torch.ones(1, 1, 4))\n"
        "assert y[0, 0, 1] == 2 * y[0, 0, 0], y\n"
        "assert 'nnsight' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gate_dtype_other_than_weights_is_handled(model, target, ids):
    """Under autocast the gate is bf16 while the weights are float32: the edit follows the gate."""
    sel = [0, 3, 8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _gates(model, 0, lambda: _logits(model, ids))[0]
        with steer(target, _mask(target, {0: sel}), "add", 0.3):
            edited = _gates(model, 0, lambda: _logits(model, ids))[0]
    assert plain.dtype == edited.dtype == torch.bfloat16
    assert torch.equal(edited, apply_intervention(plain, sel, "add", 0.3))


def _alone(edit, kind: str) -> torch.Tensor | None:
    """The dense tensor of one edit built by itself: neutral everywhere, then its spec's values."""
    from esn.steering import _NEUTRAL

    if kind not in edit._spec:
        return None
    flat, values = edit._spec[kind]
    t = torch.full(edit._shape, _NEUTRAL[kind], dtype=edit.dtype, device=edit.device)
    t.view(-1)[flat] = values.to(edit.dtype)
    return t


def test_edits_placed_together_equal_edits_placed_one_by_one(target):
    """Entering a block places every hook point's dense tensors with one buffer per kind (one upload,
    one indexed write); each edit's tensors equal those built alone from its sparse spec, -0.0 shifts
    included."""
    from esn.steering import _build, _row_items

    first, second = _mask(target, {0: [1, 3], 2: [0, 63]}), _mask(target, {1: [2, 5], 2: [7]})
    conditions = [Condition(first, "steer", 2.0), Condition(second, "clamp", 0.5), None,
                  Condition(first, "add", -1.0), Condition(second, "deactivate")]
    edits = _build(target, target.layout(), _row_items(target, conditions, None), len(conditions))
    assert sorted(edits) == [f"lm.layers.{i}.mlp.gate" for i in range(LAYERS)]
    storages = set()
    for edit in edits.values():
        for kind in ("scale", "shift", "floor"):
            together, alone = getattr(edit, kind), _alone(edit, kind)
            assert (together is None) == (alone is None), (edit.name, kind)
            if alone is None:
                continue
            assert together.shape == alone.shape == (len(conditions), 1, WIDTH)
            assert torch.equal(together, alone) and torch.equal(together.signbit(), alone.signbit())
            storages.add((kind, together.untyped_storage().data_ptr()))
    assert len(storages) == 3  # one buffer per kind, shared by all hook points
