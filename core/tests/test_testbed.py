"""The planted-neuron test bed through the real path: store -> filter -> aggregate -> select."""

import csv

import numpy as np
import pytest
from esn.filtering import filter_attempts, load_label_csv
from esn.plugins import registry_with
from esn.selection import select_neurons
from esn.statistics import aggregate
from esn.store import AttemptStore
from esn.testbed import make_testbed, recall, selector_recall

REG = registry_with()


@pytest.fixture(scope="module")
def bed_and_store(tmp_path_factory):
    bed = make_testbed(seed=0)
    store = AttemptStore(tmp_path_factory.mktemp("bed"), bed.layout, architecture="synthetic")
    bed.write(store)
    return bed, store


def test_the_bed_is_what_it_claims(bed_and_store):
    bed, store = bed_and_store
    sizes = {e: sum(1 for r in bed.records if r.emotion == e and r.meta["kind"] == "ok") for e in bed.emotions}
    assert sizes == {"happy": 40, "angry": 12, "sad": 25, "surprise": 8}  # unequal success sets
    groups = [*bed.planted.values(), bed.always_on, *bed.suppressed.values()]
    assert len(np.unique(np.concatenate(groups))) == sum(g.size for g in groups)  # disjoint
    assert len(store.done_ids()) == len(bed.records) == 85 + 40
    assert int(bed.rate * bed.layout.n_neurons + 1e-9) == 16
    again = make_testbed(seed=0)
    np.testing.assert_array_equal(again.counts, bed.counts)  # deterministic


def test_cas_and_mad_recover_the_planted_set_lap_is_captured_by_always_on(bed_and_store):
    bed, store = bed_and_store
    rec = selector_recall(bed, store, registry=REG)
    for method in ("cas", "mad"):
        assert min(rec[method].values()) >= 0.9, (method, rec[method])
    assert max(rec["lap"].values()) <= 0.1, rec["lap"]
    assert max(rec["random"].values()) <= 0.2, rec["random"]
    # LAP's choice is the generic always-on neurons
    res = filter_attempts(store.records(), bed.labels, emotions=bed.emotions)
    lap = select_neurons(aggregate(store, res.success).probs(), "lap", bed.rate, emotions=bed.emotions,
                         registry=REG)
    for e in bed.emotions:
        assert np.isin(lap[e], bed.always_on).mean() >= 0.9


def test_recall_holds_across_seeds(tmp_path):
    for seed in (1, 2):
        bed = make_testbed(seed=seed, successes=(6, 30, 10, 18))
        store = AttemptStore(tmp_path / str(seed), bed.layout)
        bed.write(store)
        rec = selector_recall(bed, store, methods=("cas", "mad", "lap"), registry=REG, seed=seed)
        assert min(rec["cas"].values()) >= 0.9 and min(rec["mad"].values()) >= 0.9, rec
        assert max(rec["lap"].values()) <= 0.1, rec


def test_recall_by_hand():
    planted = {"a": np.array([1, 2, 3, 4]), "b": np.array([7])}
    assert recall({"a": np.array([2, 4, 9]), "b": np.array([8])}, planted) == {"a": 0.5, "b": 0.0}


def _masks(store, bed, labels, tau_wer):
    res = filter_attempts(store.records(), labels, tau_wer=tau_wer, emotions=bed.emotions)
    probs = aggregate(store, res.success).probs()
    return res, {m: select_neurons(probs, m, bed.rate, emotions=bed.emotions, registry=REG) for m in ("lap", "cas")}


def test_refiltering_stored_attempts_changes_the_masks_without_generating(bed_and_store, tmp_path):
    bed, store = bed_and_store
    files_before = sorted(p.name for p in store.shard_dir.iterdir())
    base_res, base = _masks(store, bed, bed.labels, 0.15)

    loose_res, loose = _masks(store, bed, bed.labels, 0.6)  # admits the attempts with bad decoded text
    assert loose_res.success != base_res.success
    assert any(not np.array_equal(base["lap"][e], loose["lap"][e]) for e in bed.emotions)

    # human listeners reject every other success the judge accepted (CAS-H): a CSV of labels
    path = tmp_path / "human.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        for r in store.records():
            ok = r.meta["kind"] == "ok" and int(r.id[-3:]) % 2 == 1
            w.writerow([r.id, r.emotion if ok else "neutral"])
    human_res, human = _masks(store, bed, load_label_csv(path), 0.15)
    assert all(len(human_res.success[e]) == len(base_res.success[e]) // 2 for e in bed.emotions)
    assert any(not np.array_equal(base["lap"][e], human["lap"][e]) for e in bed.emotions)
    assert min(recall(human["cas"], bed.planted).values()) >= 0.9  # CAS-H still finds the ESNs
    assert sorted(p.name for p in store.shard_dir.iterdir()) == files_before  # nothing regenerated
