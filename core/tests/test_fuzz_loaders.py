"""Property-based fuzzing of what esn reads from users: any input gives a result or an EsnError, never
another exception (issue #13). Derandomized and bounded, so CI runs the same examples every time, fast.

* configs: JSON-like values built from the real section and key names (so inputs reach deep validators),
  and raw bytes as .toml / .json / .yaml files;
* datasets: CSV corpora (any text, bytes, ids, paths) and ESD trees (any transcript, any wav names);
* masks and statistics files: random bytes, and valid files with flipped, cut or rewritten bytes.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy
import soundfile as sf
from esn.artifacts import MaskSet, load_masks, load_stats, save_masks, save_stats
from esn.errors import EsnError
from esn.hookpoints import HookPoint, Layout
from esn.masks import Mask
from esn.pipeline.config import RunConfig, load_config, parse_config
from esn.pipeline.data import CSVDataset, ESDDataset
from esn.statistics import ActivationStats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
LAYOUT = Layout([HookPoint("lm", 0, 8, "a"), HookPoint("lm", 1, 8, "b")])


def result_or_esn_error(fn, *args, **kwargs):
    """Call ``fn``; an EsnError is an answer, any other exception fails the test (hypothesis shrinks it)."""
    try:
        return fn(*args, **kwargs)
    except EsnError as exc:
        assert str(exc), "an EsnError must say what is wrong"
        return exc


# -- configs ------------------------------------------------------------------------------------------
SECTIONS = {name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
            for name, field in RunConfig.model_fields.items()}
KEYS = sorted({k for keys in SECTIONS.values() for k in keys} | set(SECTIONS) | {"options", "speakers", "first"})
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["cas", "lap", "steer", "cpu", "cuda:x", "yes", "happy", "../x",
                                                     "a\x00b", "x" * 5000, "[/]", "emotion2vec", "identification"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5), max_leaves=25)
VALID = {"model": {"source": "ckpt"}, "data": {"root": "esd"}, "judges": {"emotion": [{"name": "emotion2vec"}]}}


@FUZZ
@given(st.dictionaries(st.sampled_from(list(SECTIONS)), values, max_size=8))
def test_any_config_value_parses_or_is_an_esn_error(data):
    result_or_esn_error(parse_config, data, base=Path("/tmp"))


@FUZZ
@given(st.sampled_from(list(SECTIONS)), st.sampled_from(KEYS), values)
def test_one_bad_field_in_a_valid_config_is_an_esn_error_or_fine(section, key, value):
    data = json.loads(json.dumps(VALID))
    if isinstance(data.get(section), dict):
        data[section][key] = value
    else:
        data[section] = {key: value}
    out = result_or_esn_error(parse_config, data, base=Path("/tmp"))
    if isinstance(out, RunConfig):
        assert isinstance(out.run_dir, Path)


@FUZZ
@given(st.sampled_from([".toml", ".json", ".yaml"]),
       st.binary(max_size=300) | st.text(max_size=300).map(str.encode)
       | st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(KEYS), values, max_size=4)))
def test_any_config_file_loads_or_is_an_esn_error(suffix, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"study{suffix}"
        path.write_bytes(raw)
        result_or_esn_error(load_config, path)


# -- datasets -----------------------------------------------------------------------------------------
def _wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(160, np.float32), 16000)


cells = st.text(max_size=10) | st.sampled_from(["a.wav", "sub/b.wav", "../a.wav", "a\x00.wav", "x" * 300, "",
                                                 "s/1", "s_1", ".hidden", "line\nbreak", '"', ",", "test"])


@FUZZ
@given(st.lists(st.sampled_from(["path", "transcript", "speaker", "split", "id", "extra", ""]), max_size=6),
       st.lists(st.lists(cells, max_size=7), max_size=6), st.sampled_from(["utf-8", "utf-16", "latin-1"]),
       st.binary(max_size=40))
def test_any_csv_corpus_loads_or_is_an_esn_error(header, rows, encoding, noise):
    import csv
    import io

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _wav(root / "a.wav")
        _wav(root / "sub" / "b.wav")
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        try:
            raw = buf.getvalue().encode(encoding)
        except UnicodeEncodeError:
            raw = buf.getvalue().encode("utf-8", "replace")
        (root / "metadata.csv").write_bytes(raw + noise if noise[:1] == b"\xff" else raw)
        ds = result_or_esn_error(CSVDataset, root)
        if isinstance(ds, CSVDataset):
            for split in ds.splits:
                for src in ds.sources(split):
                    assert src.path.is_file() and src.id and "\n" not in src.id
            result_or_esn_error(ds.sources, "no such split")


transcript_lines = st.lists(
    st.builds(lambda i, text, emo, sep: f"0011_{i:06d}{sep}{text}{sep}{emo}", st.integers(0, 2000),
              st.text(max_size=8), st.sampled_from(["Neutral", "Angry", "happy", "中立", "x", ""]),
              st.sampled_from(["\t", " ", "\t\t"]))
    | st.text(max_size=20), max_size=8)


@FUZZ
@given(transcript_lines, st.lists(st.sampled_from(["0011_000001.wav", "0011_000002.wav", "0011_000400.wav",
                                                   "0012_000001.wav", "junk.wav", "0011_1.wav"]), max_size=4),
       st.sampled_from(["Neutral", "neutral", "Angry", None]), st.sampled_from(["utf-8", "utf-16", "gb18030"]),
       st.integers(1, 400), st.integers(1, 400))
def test_any_esd_tree_loads_or_is_an_esn_error(lines, wavs, folder, encoding, first, last):
    from esn.pipeline.data import SplitRule

    with tempfile.TemporaryDirectory() as tmp:
        spk = Path(tmp) / "0011"
        spk.mkdir()
        (spk / "0011.txt").write_bytes("\n".join(lines).encode(encoding, "replace"))
        for name in wavs if folder else []:
            _wav(spk / folder / name)
        splits = {"s": [SplitRule(speakers=["0011"], first=min(first, last), last=max(first, last))]}
        ds = result_or_esn_error(ESDDataset, tmp, splits)
        if isinstance(ds, ESDDataset):
            result_or_esn_error(ds.sources, "s")


# -- masks and statistics -----------------------------------------------------------------------------
def _valid_files(tmp: Path) -> dict[str, bytes]:
    masks = MaskSet({"happy": Mask(np.array([1, 9]), LAYOUT), "sad": Mask(np.array([3]), LAYOUT)}, LAYOUT, {"c": 5})
    stats = ActivationStats(["happy", "sad"], LAYOUT, np.ones((2, 16), np.int64), np.full((2, 2), 3, np.int64),
                            np.array([1, 1], np.int64))
    save_masks(tmp / "m.safetensors", masks)
    save_stats(tmp / "s.safetensors", stats)
    return {"masks": (tmp / "m.safetensors").read_bytes(), "stats": (tmp / "s.safetensors").read_bytes()}


with tempfile.TemporaryDirectory() as _tmp:
    VALID_FILES = _valid_files(Path(_tmp))


def _load_both(path: Path) -> None:
    for load in (load_masks, load_stats):
        result_or_esn_error(load, path)
        result_or_esn_error(load, path, LAYOUT)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_as_a_mask_or_stats_file_are_an_esn_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        _load_both(path)


@FUZZ
@given(st.sampled_from(["masks", "stats"]), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       st.integers(0, 10**6) | st.none())
def test_damaged_mask_and_stats_files_are_an_esn_error(kind, flips, cut):
    blob = bytearray(VALID_FILES[kind])
    for where, value in flips:
        blob[where % len(blob)] = value
    if cut is not None:
        blob = blob[: cut % len(blob)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(bytes(blob))
        _load_both(path)


@FUZZ
@given(st.sampled_from(["masks", "stats"]), st.dictionaries(
    st.sampled_from(["format", "emotions", "hook_points", "fingerprint", "sha256", "c", "esn_version"]), values,
    max_size=3))
def test_rewritten_metadata_is_an_esn_error_or_a_valid_file(kind, change):
    blob = VALID_FILES[kind]
    (n,) = struct.unpack("<Q", blob[:8])
    tensors = safetensors.numpy.load(blob)
    meta = json.loads(json.loads(blob[8:8 + n])["__metadata__"]["esn"]) | change
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        safetensors.numpy.save_file(tensors, path, metadata={"esn": json.dumps(meta)})
        _load_both(path)
