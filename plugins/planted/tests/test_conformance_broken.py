"""The conformance kit (esn.testing) refuses deliberately broken variants of the planted adapter, each with
a message naming the fault; the unbroken adapter passes (test_planted.py's test_conformance)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from esn.testing import (
    ConformanceError,
    check_checkpoint,
    check_hook_points,
    check_speech_input,
    load_tiny,
    speech_like,
)
from esn_planted import PlantedAdapter
from esn_planted import model as planted
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def fresh(tmp_path):
    return load_tiny(PlantedAdapter, tmp_path / "ok")


def _points(adapter, **change):
    """The adapter's hook points with each field in ``change`` a function of the hook point."""
    return [dataclasses.replace(hp, **{k: f(hp) for k, f in change.items()}) for hp in PlantedAdapter.hook_points(adapter)]


class LastLayerLeftOut(PlantedAdapter):
    def hook_points(self):
        return super().hook_points()[:-1]


class PreActivationGate(PlantedAdapter):  # gate_proj: the tensor before SiLU
    def hook_points(self):
        return _points(self, module=lambda hp: hp.module.replace("act_fn", "gate_proj"))


class UpProjection(PlantedAdapter):  # up_proj: right rank and width, wrong meaning
    def hook_points(self):
        return _points(self, module=lambda hp: hp.module.replace("act_fn", "up_proj"))


class InputNorm(PlantedAdapter):  # the MLP's input norm, declared at its own width
    def hook_points(self):
        return _points(self, module=lambda hp: hp.module.replace("mlp.act_fn", "post_attention_layernorm"),
                       width=lambda hp: self.model.config.hidden_size, down_proj=lambda hp: None)


class HookedUpThroughIdentity(PlantedAdapter):
    """up_proj's output through a parameter-free module (as a hook module a model does not have would be):
    only recomputing the tensor from the MLP's weights tells it from the gate."""

    @classmethod
    def load(cls, source, **kw):
        adapter = super().load(source, **kw)
        for layer in adapter.model.model.layers:
            layer.mlp.up_proj = torch.nn.Sequential(layer.mlp.up_proj, torch.nn.Identity())
        return adapter

    def hook_points(self):
        return _points(self, module=lambda hp: hp.module.replace("act_fn", "up_proj.1"))


class GateThroughIdentity(PlantedAdapter):
    """gate_proj's output (before SiLU) through a parameter-free module, declared as SiLU's output."""

    @classmethod
    def load(cls, source, **kw):
        adapter = super().load(source, **kw)
        for layer in adapter.model.model.layers:
            layer.mlp.gate_proj = torch.nn.Sequential(layer.mlp.gate_proj, torch.nn.Identity())
        return adapter

    def hook_points(self):
        return _points(self, module=lambda hp: hp.module.replace("act_fn", "gate_proj.1"),
                       meta=lambda hp: {"activation": "silu"})


class IgnoresAudio(PlantedAdapter):
    def generate(self, requests, config):
        same = speech_like(1.0, seed=9)
        return super().generate([dataclasses.replace(r, audio=same) for r in requests], config)


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


class ZeroAudioCodebook(PlantedAdapter):
    """The audio tokens' embeddings are zero: the speech never reaches the model (as zero codec codebooks)."""

    @classmethod
    def write_tiny(cls, directory, *, seed=0):
        def zero(t):
            t["model.embed_tokens.weight"][planted.AUDIO0:planted.AUDIO0 + planted.AUDIO_TOKENS] = 0

        return _rewrite(super().write_tiny(directory, seed=seed), zero)


class NaNWeight(PlantedAdapter):
    @classmethod
    def write_tiny(cls, directory, *, seed=0):
        def nan(t):
            t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")

        return _rewrite(super().write_tiny(directory, seed=seed), nan)


class MissingKey(PlantedAdapter):
    """A weight missing from the file: transformers initialises it at random and loads the rest."""

    @classmethod
    def write_tiny(cls, directory, *, seed=0):
        return _rewrite(super().write_tiny(directory, seed=seed), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _refused(cls, check, tmp_path, match):
    adapter = load_tiny(cls, tmp_path / cls.__name__)
    with pytest.raises(ConformanceError, match=match):
        check(adapter)


def test_a_left_out_last_layer_is_refused(tmp_path):
    _refused(LastLayerLeftOut, check_hook_points, tmp_path, r"model\.layers has 4 layers, and layer\(s\) \[3\] have no hook point")


@pytest.mark.parametrize("cls", [PreActivationGate, UpProjection, InputNorm])
def test_a_projection_or_norm_hooked_instead_of_the_gate_is_refused(cls, tmp_path):
    _refused(cls, check_hook_points, tmp_path, r"lm\.layers\.0\.mlp\.gate: the hooked module .* has weights of its own")


def test_a_parameter_free_module_on_the_wrong_tensor_is_refused_by_recomputing_it(tmp_path):
    _refused(HookedUpThroughIdentity, check_hook_points, tmp_path,
             r"lm\.layers\.0\.mlp\.gate: the hooked tensor \(model\.layers\.0\.mlp\.up_proj\.1\) is not act\(W x\)")


def test_the_pre_activation_gate_is_refused_by_the_declared_activations_range(tmp_path):
    _refused(GateThroughIdentity, check_hook_points, tmp_path,
             r"lm\.layers\.0\.mlp\.gate: values down to -[0-9.]+, below silu's minimum -0\.278")


def test_a_layer_with_zero_gate_weights_is_refused(fresh):
    with torch.no_grad():
        fresh.model.model.layers[2].mlp.gate_proj.weight.zero_()
    with pytest.raises(ConformanceError, match=r"lm\.layers\.2\.mlp\.gate: the gate is constant \(0 at every"):
        check_hook_points(fresh)


def test_an_adapter_that_ignores_the_audio_is_refused(tmp_path):
    _refused(IgnoresAudio, check_speech_input, tmp_path, "the input speech never reaches the model")


def test_a_checkpoint_whose_audio_codebook_is_zero_is_refused(tmp_path):
    _refused(ZeroAudioCodebook, check_speech_input, tmp_path, "the input speech never reaches the model")


def test_nan_weights_are_reported_as_nan_not_as_an_unseeded_write(tmp_path):
    with pytest.raises(ConformanceError, match=r"model\.layers\.1\.mlp\.up_proj\.weight of the tiny checkpoint has 1 NaN"):
        check_checkpoint(NaNWeight.load(NaNWeight.write_tiny(tmp_path / "nan")))


def test_a_nan_buffer_is_refused(fresh):
    name, buffer = next((n, b) for n, b in fresh.model.named_buffers() if b.dtype.is_floating_point)
    buffer.view(-1)[0] = float("nan")
    with pytest.raises(ConformanceError, match=rf"buffer {name} of the loaded tiny checkpoint has 1 NaN"):
        check_checkpoint(fresh)


def test_a_weight_missing_from_the_file_is_refused(tmp_path):
    _refused(MissingKey, check_checkpoint, tmp_path,
             r"model\.layers\.1\.mlp\.up_proj\.weight of the loaded model was not read from the checkpoint")
