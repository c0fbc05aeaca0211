"""Recording and steering through the adapter on the tiny checkpoint (esn.recording, esn.steering)."""

import numpy as np
import pytest
import torch
from esn.errors import LayoutMismatchError
from esn.hookpoints import HookPoint, Layout
from esn.hooks import installed
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.steering import Condition, steer, steer_rows


def _clean(adapter) -> bool:
    """No hook left on a gate, a stream root or token2wav (transformers keeps its own output-capturing
    hooks on decoder layers, so a whole-model check would not do)."""
    modules = [adapter.module(p) for p in adapter.layout()] + [adapter.model.token2wav]
    modules += [adapter.model.get_submodule(s.root) for s in adapter.stream_specs().values()]
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _same(a, b) -> bool:
    return (a.text == b.text and a.info["audio_codes"] == b.info["audio_codes"]
            and torch.equal(torch.from_numpy(a.waveform), torch.from_numpy(b.waveform)))


def _all(adapter, stream: str) -> Mask:
    layout = adapter.layout([stream])
    return Mask(np.arange(layout.n_neurons), layout)


def _plain_counts(adapter, request, config) -> tuple[np.ndarray, np.ndarray]:
    """Reference: a solo run (no padding) with plain forward hooks counting g > 0 and positions."""
    layout = adapter.layout()
    counts = {p.name: torch.zeros(p.width, dtype=torch.int64) for p in layout}
    tokens = dict.fromkeys(counts, 0)

    def hook(name):
        def fn(module, args, g):  # g: [1, pos, d_mlp]
            counts[name] += (g[0] > 0).sum(0)
            tokens[name] += g.shape[1]
        return fn

    with installed([(adapter.module(p), hook(p.name)) for p in layout]):
        adapter.generate([request], config)
    return torch.cat([counts[p.name] for p in layout]).numpy(), np.array([tokens[p.name] for p in layout])


def test_recording_equals_plain_hooks(adapter, requests_, config):
    """Solo and batched (left padding, rows of different lengths): exactly the solo plain-hook counts
    and positions per row. (Batched gates differ from solo ones by ~1e-8 float noise only.)"""
    with GateRecorder(adapter) as rec:
        adapter.generate(requests_, config)
    batched = rec.stats()
    assert batched.batch_size == 2 and _clean(adapter)
    for row, request in enumerate(requests_):
        ref_counts, ref_tokens = _plain_counts(adapter, request, config)
        with GateRecorder(adapter) as rec:
            adapter.generate([request], config)
        solo = rec.stats()
        np.testing.assert_array_equal(solo.counts[0].cpu().numpy(), ref_counts)
        np.testing.assert_array_equal(solo.tokens[0].cpu().numpy(), ref_tokens)
        np.testing.assert_array_equal(batched.tokens[row].cpu().numpy(), ref_tokens)
        np.testing.assert_array_equal(batched.counts[row].cpu().numpy(), ref_counts)


def test_alpha_zero_steering_is_bit_identical(adapter, requests_, config):
    base = adapter.generate(requests_, config)
    mask = Mask(np.arange(0, adapter.layout().n_neurons, 3), adapter.layout())
    with steer(adapter, mask, "steer", 0.0):
        steered = adapter.generate(requests_, config)
    assert all(_same(a, b) for a, b in zip(base, steered, strict=True))
    assert _clean(adapter)


def test_synth_mask_changes_speech_not_text(adapter, requests_, config):
    (base,) = adapter.generate(requests_[:1], config)
    # Random init leaves MLP outputs tiny next to the residual stream: a large shift is needed to matter.
    with steer(adapter, _all(adapter, "synth"), "add", 20.0):
        (out,) = adapter.generate(requests_[:1], config)
    assert out.text == base.text and out.info["text_tokens"] == base.info["text_tokens"]
    assert out.info["audio_codes"] != base.info["audio_codes"]
    assert not torch.equal(torch.from_numpy(out.waveform), torch.from_numpy(base.waveform))


def test_lm_mask_changes_text(adapter, requests_, config):
    (base,) = adapter.generate(requests_[:1], config)
    with steer(adapter, _all(adapter, "lm"), "add", 20.0):
        (out,) = adapter.generate(requests_[:1], config)
    assert out.text != base.text


def test_per_row_conditions_in_one_batch(adapter, requests_, config):
    """Row 0 steered on synth, row 1 untouched: each equals its solo run under the same condition."""
    cond = Condition(_all(adapter, "synth"), "deactivate")
    with steer_rows(adapter, [cond, None]):
        rows = adapter.generate(requests_, config)
    with steer(adapter, cond.mask, "deactivate"):
        (solo0,) = adapter.generate(requests_[:1], config)
    (solo1,) = adapter.generate(requests_[1:], config)
    assert _same(rows[0], solo0) and _same(rows[1], solo1)


def test_mask_for_another_layout_is_refused(adapter, requests_, config):
    other = Layout([HookPoint("lm", i, 4096, module="") for i in range(2)])
    with pytest.raises(LayoutMismatchError, match="another hook-point layout"):
        with steer(adapter, Mask(np.arange(5), other), "steer", 1.0):
            adapter.generate(requests_[:1], config)
    assert _clean(adapter)
