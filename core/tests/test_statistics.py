"""Aggregation: K and T by hand, exact and order-independent over any split of shards and stores."""

import random

import numpy as np
import pytest
from esn.errors import EsnError
from esn.hookpoints import HookPoint, Layout
from esn.statistics import aggregate
from esn.store import AttemptRecord, AttemptStore

LAYOUT = Layout([HookPoint("lm", 0, 2, "a"), HookPoint("synth", 0, 3, "b")])  # N = 5, H = 2


def recs(*pairs):
    return [AttemptRecord(i, e, "x", "x") for i, e in pairs]


def test_k_t_and_p_by_hand(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    # attempt: counts [lm0, lm1 | s0, s1, s2], tokens [lm, synth]
    store.append(recs(("a", "happy"), ("b", "sad")),
                 [[1, 2, 0, 3, 4], [4, 0, 1, 1, 1]], [[4, 10], [5, 2]])
    store.append(recs(("c", "happy")), [[3, 0, 6, 0, 0]], [[6, 6]],
                 sums=[[1.5, 0, 2, 0, 0]], sumsq=[[2.25, 0, 4, 0, 0]])
    stats = aggregate(store, {"happy": ["a", "c"], "sad": ["b"]})
    assert stats.emotions == ["happy", "sad"]
    np.testing.assert_array_equal(stats.K, [[4, 2, 6, 3, 4], [4, 0, 1, 1, 1]])
    np.testing.assert_array_equal(stats.T, [[10, 16], [5, 2]])
    np.testing.assert_array_equal(stats.n_attempts, [2, 1])
    assert stats.K.dtype == stats.T.dtype == np.int64
    np.testing.assert_allclose(stats.probs(), [[0.4, 0.2, 6 / 16, 3 / 16, 4 / 16], [0.8, 0, 0.5, 0.5, 0.5]])
    assert stats.S is None  # one shard had no sums
    with pytest.raises(EsnError, match="without sums"):
        stats.mean()
    only_c = aggregate(store, {"happy": ["c"]})
    np.testing.assert_allclose(only_c.mean(), [[1.5 / 6, 0, 2 / 6, 0, 0]])


def test_an_emotion_without_positions_is_named(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    store.append(recs(("a", "happy")), [[1, 2, 0, 0, 0]], [[4, 0]])  # synth never ran
    with pytest.raises(EsnError, match=r"no positions for emotion 'happy' at synth.layers.0.mlp.gate"):
        aggregate(store, {"happy": ["a"]}).probs()
    with pytest.raises(EsnError, match=r"'angry' at lm.layers.0.mlp.gate \(0 successful attempts\)"):
        aggregate(store, {"happy": ["a"], "angry": []}).probs()


def test_bad_id_lists(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    store.append(recs(("a", "happy"), ("b", "sad")), np.zeros((2, 5), int), np.ones((2, 2), int))
    with pytest.raises(EsnError, match="'a' targets 'happy' but is listed under 'sad'"):
        aggregate(store, {"sad": ["a"]})
    with pytest.raises(EsnError, match="listed under 'happy' and 'sad'"):
        aggregate(store, {"happy": ["a"], "sad": ["a"]})
    with pytest.raises(EsnError, match=r"not in .*\['zz'\]"):
        aggregate(store, {"happy": ["zz"]})


def test_any_split_and_merge_gives_identical_k_and_t(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    ids = [f"x{i}" for i in range(n)]
    emotions = ["happy", "angry", "sad", "surprise"]
    target = {i: emotions[k % 4] for k, i in enumerate(ids)}
    tokens = rng.integers(1, 3000, size=(n, 2))
    counts = (rng.random((n, 5)) * (np.repeat(tokens, [2, 3], axis=1) + 1)).astype(np.int64)
    sets = {e: [i for i in ids if target[i] == e and rng.random() < 0.8] for e in emotions}

    one = AttemptStore(tmp_path / "one", LAYOUT)
    one.append(recs(*target.items()), counts, tokens)
    want = aggregate(one, sets)

    order = list(range(n))
    random.Random(3).shuffle(order)
    parts = [AttemptStore(tmp_path / f"p{k}", LAYOUT) for k in range(3)]
    for k, chunk in enumerate(np.array_split(order, 7)):
        parts[k % 3].append(recs(*[(ids[j], target[ids[j]]) for j in chunk]), counts[chunk], tokens[chunk],
                            worker=f"w{k}")
    merged = AttemptStore(tmp_path / "m", LAYOUT)
    merged.merge_from(*parts[::-1])
    for got in (aggregate(merged, sets), aggregate(merged, {e: v[::-1] for e, v in sets.items()})):
        np.testing.assert_array_equal(got.K, want.K)
        np.testing.assert_array_equal(got.T, want.T)
    # statistics of disjoint halves add up exactly
    half_a = {e: v[: len(v) // 2] for e, v in sets.items()}
    half_b = {e: v[len(v) // 2:] for e, v in sets.items()}
    total = aggregate(merged, half_a) + aggregate(merged, half_b)
    np.testing.assert_array_equal(total.K, want.K)
    np.testing.assert_array_equal(total.T, want.T)
    np.testing.assert_array_equal(total.n_attempts, [len(v) for v in sets.values()])


def test_generated_positions_from_the_stored_prompt_split(tmp_path):
    """P over the generated positions alone, from the same stored attempts: counts minus their prompt share."""
    store = AttemptStore(tmp_path / "s", LAYOUT)
    store.append(recs(("a", "happy"), ("b", "sad")), [[1, 2, 0, 3, 4], [4, 0, 1, 1, 1]], [[4, 10], [5, 2]],
                 sums=np.ones((2, 5)), sumsq=np.ones((2, 5)),
                 prompt_counts=[[1, 1, 0, 2, 0], [3, 0, 0, 0, 1]], prompt_tokens=[[2, 4], [3, 1]])
    every = aggregate(store, {"happy": ["a"], "sad": ["b"]})
    gen = aggregate(store, {"happy": ["a"], "sad": ["b"]}, positions="generated")
    np.testing.assert_array_equal(every.K, [[1, 2, 0, 3, 4], [4, 0, 1, 1, 1]])
    np.testing.assert_array_equal(gen.K, [[0, 1, 0, 1, 4], [1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(gen.T, [[2, 6], [2, 1]])
    assert gen.S is None and every.S is not None and gen.meta["positions"] == "generated"
    # the split survives a merge into another store, byte for byte
    other = AttemptStore(tmp_path / "o", LAYOUT)
    assert other.merge_from(store) == 2
    np.testing.assert_array_equal(aggregate(other, {"happy": ["a"], "sad": ["b"]}, positions="generated").K, gen.K)
    with pytest.raises(EsnError, match="positions must be"):
        aggregate(store, {"happy": ["a"]}, positions="prompt")


def test_prompt_split_is_checked_and_required_for_generated(tmp_path):
    store = AttemptStore(tmp_path, LAYOUT)
    with pytest.raises(EsnError, match="both prompt_counts and prompt_tokens"):
        store.append(recs(("a", "happy")), [[1, 2, 0, 0, 0]], [[4, 4]], prompt_counts=[[0, 0, 0, 0, 0]])
    with pytest.raises(EsnError, match="prompt share"):
        store.append(recs(("a", "happy")), [[1, 2, 0, 0, 0]], [[4, 4]], prompt_counts=[[2, 0, 0, 0, 0]],
                     prompt_tokens=[[1, 1]])
    with pytest.raises(EsnError, match="shape"):
        store.append(recs(("a", "happy")), [[1, 2, 0, 0, 0]], [[4, 4]], prompt_counts=[[0, 0]], prompt_tokens=[[1, 1]])
    store.append(recs(("a", "happy")), [[1, 2, 0, 0, 0]], [[4, 4]])  # an older store: no split
    assert aggregate(store, {"happy": ["a"]}).K.sum() == 3
    with pytest.raises(EsnError, match="without the prompt/generated split"):
        aggregate(store, {"happy": ["a"]}, positions="generated")


def test_one_pass_over_several_requests_equals_separate_aggregates_bit_for_bit(tmp_path):
    """aggregate_each (select's one pass for every c and positions) reads each shard once and gives what
    aggregate gives per request: K, T exactly and the float64 sums to the bit; a request the store cannot
    answer (generated positions without the prompt split) gets its error, the others their statistics."""
    from esn.statistics import aggregate_each

    rng = np.random.default_rng(3)
    store = AttemptStore(tmp_path / "split", LAYOUT)
    ids = [(f"x{k}", "happy" if k % 2 else "sad") for k in range(24)]
    for start in range(0, 24, 6):
        tokens = rng.integers(10, 30, size=(6, 2))
        counts = rng.integers(0, 10, size=(6, 5))
        sums = rng.normal(size=(6, 5)) * 1e3
        store.append(recs(*ids[start:start + 6]), counts, tokens, sums, sums**2, prompt_counts=counts // 2,
                     prompt_tokens=tokens // 2, compress=start % 12 == 0)
    happy = [i for i, e in ids if e == "happy"]
    sad = [i for i, e in ids if e == "sad"]
    requests = [({"happy": happy[:3], "sad": sad[:5]}, "all"), ({"happy": happy, "sad": sad[1::2]}, "all"),
                ({"happy": happy[2:9], "sad": sad}, "generated"), ({"sad": sad[4:], "happy": happy[:1]}, "all")]
    for one, (want_ids, positions) in zip(aggregate_each(store, requests), requests, strict=True):
        want = aggregate(store, want_ids, positions=positions)
        assert one.emotions == want.emotions
        for name in ("K", "T", "n_attempts", "S", "SS"):
            a, b = getattr(one, name), getattr(want, name)
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and a.tobytes() == b.tobytes()))
    bare = AttemptStore(tmp_path / "bare", LAYOUT)
    bare.append(recs(("a", "happy"), ("b", "sad")), [[1, 2, 0, 3, 4], [4, 0, 1, 1, 1]], [[4, 10], [5, 2]])
    every, gen = aggregate_each(bare, [({"happy": ["a"], "sad": ["b"]}, "all"), ({"happy": ["a"]}, "generated")])
    assert every.K.sum() == 17 and isinstance(gen, EsnError) and "prompt/generated split" in str(gen)
    with pytest.raises(EsnError, match="listed under 'happy' and 'sad'"):
        aggregate_each(bare, [({"happy": ["a"], "sad": ["a"]}, "all")])
