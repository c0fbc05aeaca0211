"""AttemptStore: round trips, resume, exact merges, and clear errors for damaged files."""

import json

import numpy as np
import pytest
import torch
from esn.errors import EsnError, LayoutMismatchError
from esn.hookpoints import HookPoint, Layout
from esn.store import AttemptRecord, AttemptStore, StoreWarning

LAYOUT = Layout([HookPoint("lm", 0, 4, "m.0"), HookPoint("lm", 1, 4, "m.1"), HookPoint("synth", 0, 3, "t.0")])


def batch(ids, seed=0, emotion="happy", big=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(70_000, 90_000, size=(len(ids), 3)) if big else rng.integers(1, 50, size=(len(ids), 3))
    per_neuron = np.repeat(tokens, [4, 4, 3], axis=1)
    counts = (rng.random(per_neuron.shape) * (per_neuron + 1)).astype(np.int64)
    if big:
        counts[:, 0] = tokens[:, 0]
    recs = [AttemptRecord(i, emotion, f"say {i}", f"said {i}", {"seed": seed}) for i in ids]
    return recs, counts, tokens


def collect(store, ids=None):
    got = {}
    for part in store.iter_stats(ids):
        for k, i in enumerate(part.ids):
            got[i] = (part.counts[k].astype(np.int64), part.tokens[k])
    return got


def test_round_trip_resume_and_compact_dtypes(tmp_path):
    store = AttemptStore(tmp_path / "run", LAYOUT, architecture="tiny")
    r1, c1, t1 = batch(["a", "b", "c"], seed=1)
    r2, c2, t2 = batch(["d", "e"], seed=2, big=True)
    store.append(r1, c1, t1)
    store.append(r2, torch.from_numpy(c2).to(torch.int32), torch.from_numpy(t2))  # tensors are fine
    again = AttemptStore(tmp_path / "run")  # reopen without a layout
    assert again.layout == LAYOUT and again.architecture == "tiny"
    assert again.done_ids() == {"a", "b", "c", "d", "e"}
    assert [r.id for r in again.records()] == ["a", "b", "c", "d", "e"]
    assert again.records()[0] == AttemptRecord("a", "happy", "say a", "said a", {"seed": 1})
    got = collect(again, ["e", "a", "c"])
    assert sorted(got) == ["a", "c", "e"]
    np.testing.assert_array_equal(got["a"][0], c1[0])
    np.testing.assert_array_equal(got["c"][1], t1[2])
    np.testing.assert_array_equal(got["e"][0], c2[1])
    parts = list(again.iter_stats())
    assert parts[0].counts.dtype == np.uint16  # counts under 65536
    assert parts[1].counts.dtype == np.int32 and parts[1].counts.max() > 65535
    assert parts[0].tokens.dtype == np.int64 and parts[0].sums is None
    files = sorted(p.name for p in (tmp_path / "run" / "shards").iterdir())
    assert files == ["0-000000.json", "0-000000.safetensors", "0-000001.json", "0-000001.safetensors"]


def test_sums_are_kept_as_float32(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    recs, counts, tokens = batch(["a", "b"])
    sums = np.random.default_rng(0).normal(size=counts.shape)
    store.append(recs, counts, tokens, sums, sums**2, worker="gpu3")
    (part,) = store.iter_stats()
    assert part.sums.dtype == np.float32
    np.testing.assert_array_equal(part.sums, sums.astype(np.float32))
    np.testing.assert_array_equal(part.sumsq, (sums**2).astype(np.float32))


def test_layout_is_checked(tmp_path):
    AttemptStore(tmp_path / "run", LAYOUT)
    other = Layout([HookPoint("lm", 0, 4, "m.0"), HookPoint("lm", 1, 5, "m.1")])
    with pytest.raises(LayoutMismatchError, match="different hook-point layout"):
        AttemptStore(tmp_path / "run", other)
    with pytest.raises(EsnError, match="is not an attempt store"):
        AttemptStore(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "layout.json").write_text("{not json")
    with pytest.raises(EsnError, match=r"bad/layout.json: unreadable"):
        AttemptStore(tmp_path / "bad")


def test_duplicate_ids_on_append_are_refused(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    store.append(*batch(["a", "b"]))
    with pytest.raises(EsnError, match=r"already stored or repeated.*\['b'\]"):
        store.append(*batch(["b", "c"]))
    with pytest.raises(EsnError, match=r"\['x'\]"):
        store.append(*batch(["x", "x"]))
    assert store.done_ids() == {"a", "b"}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r, c, t: (r, c.astype(float), t), "counts must be an integer array"),
        (lambda r, c, t: (r, c[:, :5], t), r"counts must be an integer array \[2 attempts, 11 neurons\]"),
        (lambda r, c, t: (r, c, t[:, :2]), "tokens must be"),
        (lambda r, c, t: (r, c + 1000, t), "exceeds the positions seen"),
        (lambda r, c, t: (r, -c - 1, t), "non-negative"),
        (lambda r, c, t: ([{"id": "z", "emotion": "bored", "transcript": "", "text": ""}] * 2, c, t),
         "unknown emotion 'bored'"),
    ],
)
def test_bad_appends(tmp_path, mutate, match):
    store = AttemptStore(tmp_path, LAYOUT)
    with pytest.raises(EsnError, match=match):
        store.append(*mutate(*batch(["a", "b"])))
    assert store.done_ids() == set()


def test_bad_worker_name_and_half_sums(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    with pytest.raises(EsnError, match="worker name"):
        store.append(*batch(["a"]), worker="a/b")
    recs, c, t = batch(["a"])
    with pytest.raises(EsnError, match="both sums and sumsq"):
        store.append(recs, c, t, sums=c.astype(float))


def test_interrupted_write_is_ignored_and_reported(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    store.append(*batch(["a"]))
    store.append(*batch(["b"]))
    (tmp_path / "shards" / "0-000001.json").unlink()  # as if the process died before the sidecar
    with pytest.warns(StoreWarning, match="0-000001.safetensors"):
        assert store.done_ids() == {"a"}
    with pytest.warns(StoreWarning):  # the next shard of this worker does not overwrite the orphan
        path = store.append(*batch(["b"]))
    assert path.name == "0-000002.json"


def test_truncated_or_damaged_files_name_the_file(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    store.append(*batch(["a", "b"]))
    shard = tmp_path / "shards" / "0-000000.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-7])
    with pytest.raises(EsnError, match=r"0-000000.safetensors: shard is truncated or damaged"):
        list(store.iter_stats())
    shard.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(EsnError, match=r"0-000000.safetensors: shard is truncated or damaged.*checksum differs"):
        list(store.iter_stats())
    shard.write_bytes(blob)
    sidecar = tmp_path / "shards" / "0-000000.json"
    sidecar.write_text(sidecar.read_text()[:40])
    with pytest.raises(EsnError, match=r"0-000000.json: unreadable shard sidecar"):
        store.records()


def test_merge_is_exact_and_skips_identical_duplicates(tmp_path):
    a = AttemptStore(tmp_path / "a", LAYOUT)
    b = AttemptStore(tmp_path / "b", LAYOUT)
    ra, ca, ta = batch(["x1", "x2", "x3"], seed=1)
    a.append(ra, ca, ta, worker="w1")
    b.append(ra[2:], ca[2:], ta[2:], worker="w2")  # x3 done twice, identically
    b.append(*batch(["y1", "y2"], seed=2, emotion="sad"), worker="w2")
    merged = AttemptStore(tmp_path / "m", LAYOUT)
    assert merged.merge_from(a, b) == 5
    assert merged.merge_from(a, b) == 0  # idempotent
    want = collect(a) | collect(b)
    got = collect(merged)
    assert sorted(got) == sorted(want) == ["x1", "x2", "x3", "y1", "y2"]
    for i in want:
        np.testing.assert_array_equal(got[i][0], want[i][0])
        np.testing.assert_array_equal(got[i][1], want[i][1])
    assert {r.id: r.emotion for r in merged.records()}["y1"] == "sad"


def test_merge_conflict_is_an_error_and_writes_nothing(tmp_path):
    a = AttemptStore(tmp_path / "a", LAYOUT)
    b = AttemptStore(tmp_path / "b", LAYOUT)
    a.append(*batch(["x1", "x2"], seed=1))
    b.append(*batch(["y1"], seed=3))
    b.append(*batch(["x2"], seed=2))  # same id, other statistics
    with pytest.raises(EsnError, match=r"attempt 'x2' is stored twice with different content"):
        a.merge_from(b)
    assert a.done_ids() == {"x1", "x2"}
    with pytest.raises(LayoutMismatchError):
        a.merge_from(AttemptStore(tmp_path / "c", Layout([HookPoint("lm", 0, 11, "m")])))


def test_two_writers_in_one_directory(tmp_path):
    w1 = AttemptStore(tmp_path, LAYOUT)
    w2 = AttemptStore(tmp_path, LAYOUT)
    w1.append(*batch(["a"]), worker="host1.0")
    w2.append(*batch(["b"]), worker="host1.1")
    w1.append(*batch(["c"]), worker="host1.0")
    assert [r.id for r in AttemptStore(tmp_path).records()] == ["a", "c", "b"]


def _copy_shard(shards, src, dst, change=None):
    (shards / f"{dst}.safetensors").write_bytes((shards / f"{src}.safetensors").read_bytes())
    side = json.loads((shards / f"{src}.json").read_text())
    side["tensors"] = f"{dst}.safetensors"
    if change:
        change(side)
    (shards / f"{dst}.json").write_text(json.dumps(side))


def test_a_redone_attempt_in_one_store(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    store.append(*batch(["a"], seed=1), worker="w1")
    store.append(*batch(["b"], seed=2), worker="w2")
    shards = tmp_path / "shards"
    _copy_shard(shards, "w1-000000", "w3-000000")  # another worker redid "a", identically: read once
    assert [r.id for r in store.records()] == ["a", "b"]
    assert len(collect(store)) == 2

    def other_text(side):
        side["records"][0]["text"] = "something else"

    _copy_shard(shards, "w1-000000", "w4-000000", other_text)  # ... and once differently: an error
    with pytest.raises(EsnError, match=r"'a' is stored twice with different content.*w1-000000.*w4-000000"):
        store.records()


def test_each_sidecar_is_parsed_once_and_changes_are_seen(tmp_path, monkeypatch):
    import esn.store

    parsed = []
    real = esn.store.read_json
    monkeypatch.setattr(esn.store, "read_json", lambda path, what: parsed.append(path.name) or real(path, what))
    store = AttemptStore(tmp_path, LAYOUT)
    for i in range(20):  # a resumable run: every append checks its ids against everything stored
        store.append(*batch([f"a{i}"], seed=i), worker=f"b{i:06d}")
    assert len(store.done_ids()) == 20 and len(store.records()) == 20
    assert sorted(parsed) == sorted(set(parsed)) and len(parsed) == 20  # each sidecar read once, not 20*21/2
    shards = tmp_path / "shards"
    _copy_shard(shards, "b000003-000000", "b000003-000000", lambda side: side["records"][0].update(text="redone"))
    assert store.records()[3].text == "redone"  # a sidecar rewritten on disk is read again
    (shards / "b000004-000000.json").unlink()
    with pytest.warns(StoreWarning, match="without a sidecar"):
        assert "a4" not in store.done_ids()  # ... and a removed one is forgotten
        with pytest.raises(EsnError, match="already stored"):
            store.append(*batch(["a7"]), worker="again")


def test_compressed_shards_read_back_bit_for_bit_and_mix_with_raw_ones(tmp_path):
    """compress=True stores the same integers (uint16 and int32 counts, prompt split), a reader picks rows
    without the others, raw and compressed shards mix in one store and merge exactly either way."""
    raw, packed = AttemptStore(tmp_path / "raw", LAYOUT), AttemptStore(tmp_path / "packed", LAYOUT)
    batches = [batch(["a", "b", "c"], seed=1), batch(["d", "e"], seed=2, big=True)]
    for k, (recs, counts, tokens) in enumerate(batches):
        sums = np.random.default_rng(k).normal(size=counts.shape)
        extra = {"prompt_counts": counts // 2, "prompt_tokens": tokens // 2, "sums": sums, "sumsq": sums**2}
        raw.append(recs, counts, tokens, **extra)
        packed.append(recs, counts, tokens, **extra, compress=True)
    for a, b in zip(raw.iter_stats(), packed.iter_stats(), strict=True):
        assert a.ids == b.ids and all(a.same_row(i, b, i) for i in range(len(a.ids)))
        assert a.counts.dtype == b.counts.dtype and a.prompt_counts.dtype == b.prompt_counts.dtype
    side = json.loads((tmp_path / "packed" / "shards" / "0-000001.json").read_text())
    assert side["format"] == "esn-shard/2"
    (part,) = packed.iter_stats(["e"])
    np.testing.assert_array_equal(part.counts[0], batches[1][1][1])
    mixed = AttemptStore(tmp_path / "mixed", LAYOUT)
    mixed.merge_from(raw, compress=True)
    mixed.merge_from(packed)  # identical content: nothing copied, no conflict
    assert collect(mixed).keys() == collect(raw).keys()
    for i, (c, _t) in collect(raw).items():
        np.testing.assert_array_equal(collect(mixed, [i])[i][0], c)
    back = AttemptStore(tmp_path / "back", LAYOUT)
    assert back.merge_from(packed) == 5  # compressed into raw: the same values
    assert all(a.same_row(0, b, 0) for a, b in zip(back.iter_stats(["d"]), raw.iter_stats(["d"]), strict=True))


def test_a_damaged_compressed_shard_is_a_clear_error(tmp_path):
    import safetensors.numpy

    store = AttemptStore(tmp_path, LAYOUT)
    recs, counts, tokens = batch(["a", "b"])
    side_path = store.append(recs, counts, tokens, compress=True)
    tensor_path = side_path.with_suffix(".safetensors")
    t = safetensors.numpy.load(tensor_path.read_bytes())
    header = json.loads(safetensors.safe_open(str(tensor_path), "np").metadata()["esn"])
    t["counts.zrows"] = t["counts.zrows"][::-1].copy()  # same size, garbage bytes
    blob = safetensors.numpy.save(t, metadata={"esn": json.dumps(header)})
    tensor_path.write_bytes(blob)
    side = json.loads(side_path.read_text())
    import hashlib

    side |= {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}  # a checksum that matches the damage
    side_path.write_text(json.dumps(side))
    with pytest.raises(EsnError, match="not a readable safetensors file"):
        list(AttemptStore(tmp_path).iter_stats())


def test_attempt_bytes_is_what_a_raw_shard_holds(tmp_path):
    from esn.store import attempt_bytes

    store = AttemptStore(tmp_path, LAYOUT)
    recs, counts, tokens = batch([f"x{i}" for i in range(10)])
    sums = counts.astype(float)
    store.append(recs, counts, tokens, sums, sums, prompt_counts=counts // 2, prompt_tokens=tokens // 2)
    (tensors,) = (tmp_path / "shards").glob("*.safetensors")
    per = attempt_bytes(LAYOUT, moments=True)
    assert per == 11 * 12 + 3 * 16
    assert 10 * per <= tensors.stat().st_size <= 10 * per + 1024  # plus the safetensors header
    assert attempt_bytes(LAYOUT, moments=False) == 11 * 4 + 3 * 16
