"""How store_v1/ was made: run with an esn from before compressed shards (commit 62424b0) on PYTHONPATH,
``python make_store_v1.py store_v1``. A record store as its record stage left it (raw shards, moments)."""
import sys

import esn.store
import numpy as np
from esn.hookpoints import HookPoint, Layout
from esn.store import AttemptRecord, AttemptStore

assert not hasattr(esn.store, "SHARD_FORMAT_COMPRESSED"), "run this with the older esn"
LAYOUT = Layout([HookPoint("lm", 0, 8, "m.0"), HookPoint("lm", 1, 8, "m.1"), HookPoint("synth", 0, 6, "t.0")])
store = AttemptStore(sys.argv[1], LAYOUT, architecture="tiny")
rng = np.random.default_rng(0)
ids = [f"s{s}|{t}" for s in range(6) for t in ("happy", "sad")]
for k in range(3):
    part = ids[4 * k:4 * k + 4]
    recs = [AttemptRecord(i, i.split("|")[1], "a b c", "a b c", {"label": i.split("|")[1] if j % 3 else "neutral"})
            for j, i in enumerate(part)]
    tokens = rng.integers(20, 40, size=(4, 3))
    per = np.repeat(tokens, [8, 8, 6], axis=1)
    counts = rng.binomial(per, rng.random((4, 22)))
    sums = counts * rng.random(counts.shape)
    store.append(recs, counts, tokens, sums, sums**2 + counts, prompt_counts=counts // 3,
                 prompt_tokens=tokens // 3, worker=f"b{k:06d}")
