"""The conformance kit (esn.testing) refuses broken variants of the Qwen2.5-Omni adapter that only a model
with both streams can have, each with a message naming the fault (test_conformance.py: the real one passes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from esn.testing import ConformanceError, check_hook_points, check_speech_input
from esn_qwen_omni import QwenOmniAdapter


class SwappedStreams(QwenOmniAdapter):
    """The talker's gates labelled lm (listed first) and the thinker's synth, stream specs to match."""

    def hook_points(self):
        points = super().hook_points()
        swap = {"lm": "synth", "synth": "lm"}
        return sorted((dataclasses.replace(hp, stream=swap[hp.stream]) for hp in points),
                      key=lambda hp: (hp.stream != "lm", hp.layer))

    def stream_specs(self):
        specs = super().stream_specs()
        return {"lm": specs["synth"], "synth": specs["lm"]}


class SwappedRoots(QwenOmniAdapter):
    def stream_specs(self):
        specs = super().stream_specs()
        return {"lm": specs["synth"], "synth": specs["lm"]}


def test_swapped_streams_are_refused(tiny_dir):
    with pytest.raises(ConformanceError, match="the synth gates ran before the lm gates: lm and synth look swapped"):
        check_hook_points(SwappedStreams.load(tiny_dir))


def test_stream_roots_that_do_not_hold_their_hook_points_are_refused(tiny_dir):
    with pytest.raises(ConformanceError, match=r"stream spec 'lm': hook points \['lm\.layers\.0\.mlp\.gate'.* are "
                                               r"not under its root 'talker'"):
        check_hook_points(SwappedRoots.load(tiny_dir))


def test_a_synth_layer_with_zero_gate_weights_is_refused(tiny_dir):
    adapter = QwenOmniAdapter.load(tiny_dir)
    with torch.no_grad():
        adapter.model.talker.model.layers[1].mlp.gate_proj.weight.zero_()
    with pytest.raises(ConformanceError, match=r"synth\.layers\.1\.mlp\.gate: the gate is constant"):
        check_hook_points(adapter)


def test_a_checkpoint_whose_audio_encoder_outputs_zeros_is_refused(tiny_dir):
    adapter = QwenOmniAdapter.load(tiny_dir)
    proj = adapter.model.thinker.model.audio_tower.proj
    with torch.no_grad():
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    with pytest.raises(ConformanceError, match="the input speech never reaches the model"):
        check_speech_input(adapter)
