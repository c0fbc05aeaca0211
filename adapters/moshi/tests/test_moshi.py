"""The Moshi adapter on its tiny checkpoint: fused lm gates and per-codebook (indexed) synth gates.

The reference in every test is observed through the model's own modules, not through esn's injected
one: a forward hook on each MLP's ``activation_fn`` (the post-SiLU gate ``[batch, pos, d]``), a pre-hook
on the MLP (the depth decoder's ``codebook_idx``), a hook on ``fc1`` (the up half) and a pre-hook on
``fc2`` (what the MLP feeds its down projection, after any edit)."""

import contextlib
import json

import numpy as np
import pytest
import torch
from esn.errors import EsnError
from esn.hooks import has_hooks
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.steering import Condition, folded, steer, steer_rows


class Observer:
    """Per MLP of every hook point, per forward: (codebook index [pos] or None, gate g, up u, fc2 input h)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.calls = {hp.name: [] for hp in adapter.layout()}

    @contextlib.contextmanager
    def watching(self):
        handles, model = [], self.adapter.model
        for hp in self.adapter.layout():
            mlp = model.get_submodule(hp.module.rpartition(".")[0])
            calls, d = self.calls[hp.name], hp.unit_width

            def index(m, args, calls=calls):
                calls.append({"idx": args[1].clone() if len(args) > 1 else None})

            def gate(m, args, out, calls=calls):
                calls[-1]["g"] = out.clone()

            def up(m, args, out, calls=calls, d=d):
                calls[-1]["u"] = out[..., d:].clone()

            def fed(m, args, calls=calls):
                calls[-1]["h"] = args[0].clone()

            handles += [mlp.register_forward_pre_hook(index), mlp.activation_fn.register_forward_hook(gate),
                        mlp.fc1.register_forward_hook(up), mlp.fc2.register_forward_pre_hook(fed)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def test_hook_points_are_fused_lm_and_indexed_synth(adapter):
    layout = adapter.layout()
    cfg = adapter.model.config
    k, d = cfg.depth_decoder_config.num_codebooks, cfg.depth_decoder_config.ffn_dim // 2
    assert [hp.kind for hp in layout] == ["fused"] * cfg.num_hidden_layers + ["indexed"] * 2
    synth = layout["synth.layers.1.mlp.gate"]
    assert (synth.indices, synth.unit_width, synth.width, synth.fused) == (k, d, k * d, "depth_decoder.layers.1.mlp.fc1")
    assert layout.neuron_name(layout.slice(synth.name).start + 2 * d + 4) == "synth.layers.1.mlp.gate[2, 4]"
    assert not any(type(m).__name__ == "GateHookPoint" for m in adapter.model.modules())  # injected only while used


def test_tiny_checkpoint_codebooks_are_initialised_and_finite(adapter, tiny_dir):
    books = [m for m in adapter.model.modules() if type(m).__name__ == "MimiEuclideanCodebook"]
    assert books and all(float(b.embed_sum.abs().sum()) > 0 for b in books)
    assert all(bool(torch.isfinite(t).all()) for t in [*adapter.model.parameters(), *adapter.model.buffers()]
               if t.dtype.is_floating_point)
    assert json.loads((tiny_dir / "config.json").read_text())["architectures"] == ["MoshiForConditionalGeneration"]


def test_recording_equals_gates_counted_by_hand(adapter, request_, config):
    observer = Observer(adapter)
    with observer.watching(), GateRecorder(adapter) as rec:
        result = adapter.generate([request_], config)[0]
    stats = rec.stats()
    layout = adapter.layout()
    assert result.info["target_emotion"] == "happy" and result.info["instruction_sent"] is False
    for hp in layout:
        calls = observer.calls[hp.name]
        assert calls, hp.name
        counts = np.zeros((hp.groups, hp.unit_width), np.int64)
        tokens = np.zeros(hp.groups, np.int64)
        for call in calls:  # every position of every forward, to its codebook (lm: one group)
            g = call["g"][0].numpy()  # [pos, d], batch of one
            idx = call["idx"].tolist() if hp.indexed else [0] * g.shape[0]
            assert len(idx) == g.shape[0]
            for s, k in enumerate(idx):
                counts[k] += g[s] > 0
                tokens[k] += 1
        assert np.array_equal(stats.counts[0, layout.slice(hp.name)].numpy(), counts.reshape(-1)), hp.name
        assert np.array_equal(stats.tokens[0, layout.group_slice(hp.name)].numpy(), tokens), hp.name
        if hp.indexed:  # every frame runs all codebooks once
            assert len(set(tokens.tolist())) == 1 and tokens[0] == result.info["text_tokens"]  # one depth pass per frame
    assert not has_hooks(adapter.model)


def _mask(adapter, picks):
    """Neurons ``{hook point: [(index, unit), ...]}`` as a mask."""
    layout = adapter.layout()
    flat = [layout.slice(name).start + k * layout[name].unit_width + u for name, units in picks.items() for k, u in units]
    return Mask(np.array(sorted(flat)), layout)


EDITS = {"steer": lambda g, a: g * (1 + a), "add": lambda g, a: g + a,
         "clamp": lambda g, a: torch.maximum(g, torch.tensor(a)), "deactivate": lambda g, a: g * 0}


@pytest.mark.parametrize("method,alpha", [("steer", 3.0), ("add", 0.25), ("clamp", 0.2), ("deactivate", None)])
def test_steering_edits_exactly_the_selected_codebook_units(adapter, request_, config, method, alpha):
    picks = {"lm.layers.1.mlp.gate": [(0, 5)], "synth.layers.0.mlp.gate": [(1, 3), (2, 0)],
             "synth.layers.1.mlp.gate": [(0, 9)]}
    observer = Observer(adapter)
    with steer(adapter, _mask(adapter, picks), method, alpha), observer.watching():
        adapter.generate([request_], config)
    assert not has_hooks(adapter.model)
    for hp in adapter.layout():
        selected = picks.get(hp.name, [])
        for call in observer.calls[hp.name]:
            g, u, h = call["g"], call["u"], call["h"]
            want = g.clone()
            idx = call["idx"] if hp.indexed else torch.zeros(g.shape[1], dtype=torch.long)
            for k, unit in selected:  # only positions of codebook k, only that unit
                at = idx == k
                want[:, at, unit] = EDITS[method](g[:, at, unit], alpha)
            assert torch.equal(h, want * u), hp.name  # the product fed to fc2; every other neuron untouched


def test_steer_rows_edits_only_its_row(adapter, speech):
    waves = [speech(0.5, 1), speech(0.5, 2)]
    mask = _mask(adapter, {"synth.layers.0.mlp.gate": [(0, u) for u in range(10)], "lm.layers.0.mlp.gate": [(0, 1)]})
    plain = adapter.reply(waves, frames=4)
    with steer_rows(adapter, [None, Condition(mask, "steer", 50.0)]):
        rows = adapter.reply(waves, frames=4)
    with steer(adapter, mask, "steer", 50.0):
        both = adapter.reply(waves, frames=4)
    assert rows[0][0] == plain[0][0] and np.array_equal(rows[1][0], plain[1][0])  # row 0: no condition
    assert rows[0][1] == both[0][1] and np.array_equal(rows[1][1], both[1][1])  # row 1: the mask
    assert not np.array_equal(rows[1][1], plain[1][1])


@pytest.mark.parametrize("method,alpha", [("steer", 1.0), ("deactivate", None)])  # gains 2 and 0: exact
def test_folding_equals_hooking(adapter, request_, config, method, alpha):
    rng = np.random.default_rng(0)
    layout = adapter.layout()
    mask = Mask(np.sort(rng.choice(layout.n_neurons, layout.n_neurons // 4, replace=False)), layout)
    weights = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    with steer(adapter, mask, method, alpha):
        hooked = adapter.generate([request_], config)[0]
    with folded(adapter, mask, method, alpha):
        fold = adapter.generate([request_], config)[0]
    plain = adapter.generate([request_], config)[0]
    assert hooked.text == fold.text and np.array_equal(hooked.waveform, fold.waveform)
    assert not np.array_equal(hooked.waveform, plain.waveform)
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in weights.items())  # restored bit for bit


def test_no_instruction_channel(adapter, request_, config):
    assert type(adapter).instruction_channel is False and not adapter.batched
    texts = adapter.prompt_texts(config)
    assert "no instruction channel" in texts["instruction"] and texts["instruction_channel"] is False
    angry = adapter.generate([type(request_)(request_.audio, "angry", id="a")], config)[0]
    happy = adapter.generate([request_], config)[0]
    # nothing about the emotion reaches the model: the same speech gives the same reply
    assert angry.text == happy.text and np.array_equal(angry.waveform, happy.waveform)
    assert (angry.info["target_emotion"], happy.info["target_emotion"]) == ("angry", "happy")


def test_reply_refuses_rows_of_different_lengths(adapter, speech):
    with pytest.raises(EsnError, match="one length"):
        adapter.reply([speech(0.5, 0), speech(0.6, 0)], frames=2)


def test_load_refuses_a_checkpoint_with_missing_weights(tiny_dir, tmp_path):
    from esn_moshi import MoshiAdapter
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    del tensors[next(k for k in tensors if k.startswith("depth_decoder.layers.0.mlp.fc1"))]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EsnError, match="missing"):
        MoshiAdapter.load(bad, dtype="float32")


def test_recording_and_neutral_steering_change_no_bit(adapter, request_, config):
    plain = adapter.generate([request_], config)[0]
    with GateRecorder(adapter):
        recorded = adapter.generate([request_], config)[0]
    layout = adapter.layout()
    with steer(adapter, Mask(np.arange(layout.n_neurons), layout), "steer", 0.0):
        neutral = adapter.generate([request_], config)[0]
    for other in (recorded, neutral):
        assert other.text == plain.text and np.array_equal(other.waveform, plain.waveform)
    assert not has_hooks(adapter.model) and not any(type(m).__name__ == "GateHookPoint" for m in adapter.model.modules())
