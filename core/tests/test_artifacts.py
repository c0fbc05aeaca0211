"""Mask and statistics files: round trips with provenance, layout checks, damaged files."""

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from esn import __version__
from esn.artifacts import MaskSet, load_masks, load_stats, read_metadata, save_masks, save_stats
from esn.errors import EsnError, LayoutMismatchError
from esn.hookpoints import HookPoint, Layout
from esn.masks import Mask
from esn.plugins import registry_with
from esn.selection import select_neurons
from esn.statistics import ActivationStats

LAYOUT = Layout([HookPoint("lm", 0, 8, "model.layers.0.mlp.act_fn"), HookPoint("lm", 1, 8, "model.layers.1.mlp.act_fn")])
OTHER = Layout([HookPoint("lm", 0, 8, "x"), HookPoint("lm", 1, 9, "y")])
META = {"architecture": "Qwen2ForCausalLM", "selector": "cas", "r": 0.125, "c": 50, "tau_wer": 0.15,
        "judge": "emotion2vec", "seed": 0, "source_run": "runs/a"}


def maskset():
    return MaskSet({"happy": Mask(np.array([3, 9]), LAYOUT), "sad": Mask(np.array([], np.int64), LAYOUT)},
                   LAYOUT, dict(META))


def test_masks_round_trip_with_provenance(tmp_path):
    path = tmp_path / "masks.safetensors"
    save_masks(path, maskset())
    back = load_masks(path, LAYOUT)
    assert back.emotions == ["happy", "sad"]
    assert back["happy"].indices.tolist() == [3, 9] and len(back["sad"]) == 0
    assert back["happy"].indices.dtype == np.int64
    assert back.layout is LAYOUT  # the caller's layout, with its module paths
    assert {k: back.meta[k] for k in META} == META and back.meta["esn_version"] == __version__
    no_layout = load_masks(path)
    assert no_layout.layout == LAYOUT and no_layout["happy"].split() == {"lm.layers.0.mlp.gate": [3],
                                                                        "lm.layers.1.mlp.gate": [1]}
    meta = read_metadata(path)
    assert meta["format"] == "esn-masks/1" and meta["fingerprint"] == LAYOUT.fingerprint
    assert meta["hook_points"] == [{"name": "lm.layers.0.mlp.gate", "width": 8},
                                   {"name": "lm.layers.1.mlp.gate", "width": 8}]
    # plain safetensors: any reader sees int64 index tensors
    assert safetensors.numpy.load_file(path)["mask.happy"].tolist() == [3, 9]


def test_save_select_neurons_output_directly(tmp_path):
    probs = np.random.default_rng(0).random((2, 16))
    sel = select_neurons(probs, "mad", 0.125, emotions=["angry", "sad"], registry=registry_with())
    save_masks(tmp_path / "m.safetensors", sel, layout=LAYOUT, meta={"selector": "mad", "r": 0.125, "note": "x"})
    back = load_masks(tmp_path / "m.safetensors", LAYOUT)
    assert {e: v.tolist() for e, v in back.indices.items()} == {e: v.tolist() for e, v in sel.items()}
    assert back.meta["note"] == "x" and back.meta["judge"] is None
    with pytest.raises(EsnError, match="needs the layout"):
        save_masks(tmp_path / "n.safetensors", sel)


def test_a_mask_for_another_layout_is_refused(tmp_path):
    path = tmp_path / "masks.safetensors"
    save_masks(path, maskset())
    with pytest.raises(LayoutMismatchError, match=r"masks.safetensors was made for a different hook-point layout"):
        load_masks(path, OTHER)


def test_stats_round_trip(tmp_path):
    k = np.arange(32, dtype=np.int64).reshape(2, 16)
    stats = ActivationStats(["happy", "sad"], LAYOUT, k, np.array([[40, 50], [60, 70]]), np.array([3, 4]),
                            meta={"source_run": "runs/a"})
    path = tmp_path / "stats.safetensors"
    save_stats(path, stats, meta={"c": 50, "tau_wer": 0.15, "judge": "human"})
    back = load_stats(path, LAYOUT)
    np.testing.assert_array_equal(back.K, k)
    np.testing.assert_array_equal(back.probs(), stats.probs())
    assert back.emotions == ["happy", "sad"] and back.S is None
    assert back.meta["c"] == 50 and back.meta["judge"] == "human" and back.meta["source_run"] == "runs/a"
    with pytest.raises(LayoutMismatchError):
        load_stats(path, OTHER)
    with pytest.raises(EsnError, match=r"holds 'esn-stats/1', expected 'esn-masks/1'"):
        load_masks(path)


def _write_header(path, header: dict, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_damaged_files_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_masks(good, maskset())
    blob = good.read_bytes()
    cases = {
        "truncated.safetensors": blob[:-5],
        "half.safetensors": blob[: len(blob) // 2],
        "empty.safetensors": b"",
        "text.safetensors": b"this is not a tensor file at all",
        "pickle.safetensors": b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00}\x94.",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EsnError, match=rf"{name}: not a valid safetensors file"):
            load_masks(tmp_path / name, LAYOUT)
    with pytest.raises(EsnError, match=r"missing.safetensors: file not found"):
        load_masks(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(3)}, plain)
    with pytest.raises(EsnError, match=r"plain.safetensors: a safetensors file without esn metadata"):
        load_masks(plain)


def test_edited_metadata_is_caught(tmp_path):
    good = tmp_path / "good.safetensors"
    save_masks(good, maskset())
    tensors = safetensors.numpy.load_file(good)
    meta = read_metadata(good)

    def rewrite(name, **change):
        path = tmp_path / name
        safetensors.numpy.save_file(tensors, path, metadata={"esn": json.dumps({**meta, **change})})
        return path

    hp = [{"name": "lm.layers.0.mlp.gate", "width": 8}, {"name": "lm.layers.1.mlp.gate", "width": 9}]
    with pytest.raises(EsnError, match=r"fp.safetensors: layout fingerprint .* does not match its hook points"):
        load_masks(rewrite("fp.safetensors", hook_points=hp))
    with pytest.raises(EsnError, match=r"emo.safetensors: tensors .* do not match the emotions"):
        load_masks(rewrite("emo.safetensors", emotions=["happy"]))
    bad = dict(tensors, **{"mask.happy": np.array([3, 99], np.int64)})
    safetensors.numpy.save_file(bad, tmp_path / "edited.safetensors", metadata={"esn": json.dumps(meta)})
    with pytest.raises(EsnError, match=r"edited.safetensors: the tensors do not match the checksum"):
        load_masks(tmp_path / "edited.safetensors")
    # a file without a checksum (written by esn < 0.2) still gets every other check
    old = {k: v for k, v in meta.items() if k != "sha256"}
    safetensors.numpy.save_file(bad, tmp_path / "range.safetensors", metadata={"esn": json.dumps(old)})
    with pytest.raises(EsnError, match=r"range.safetensors: mask.happy: mask index out of range 0..15"):
        load_masks(tmp_path / "range.safetensors")


def test_a_flipped_byte_in_the_tensor_data_is_caught(tmp_path):
    """A bit flip in the data section leaves a parseable safetensors file: only the checksum sees it."""

    stats = ActivationStats(["happy", "sad"], LAYOUT, np.array([[1, 2] * 8, [0, 1] * 8], np.int64),
                            np.array([[4, 4], [2, 2]], np.int64), np.array([1, 1], np.int64))
    for name, save, load, obj in (("m.safetensors", save_masks, load_masks, maskset()),
                                  ("s.safetensors", save_stats, load_stats, stats)):
        path = tmp_path / name
        save(path, obj)
        load(path)
        blob = bytearray(path.read_bytes())
        blob[-3] ^= 0x01  # inside the last tensor's bytes
        path.write_bytes(bytes(blob))
        with pytest.raises(EsnError, match=rf"{name}: the tensors do not match the checksum"):
            load(path)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(EsnError, match="plain JSON values"):
        save_masks(tmp_path / "m.safetensors", maskset(), meta={"r": float("nan")})
    with pytest.raises(EsnError, match="plain JSON values"):
        save_masks(tmp_path / "m.safetensors", maskset(), meta={"obj": object()})
