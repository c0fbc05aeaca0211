"""Success filtering: judge label AND WER threshold, seeded caps independent of order, label CSVs."""

import random

import pytest
from esn.errors import EsnError
from esn.filtering import cap_sample, filter_attempts, load_label_csv
from esn.store import AttemptRecord

REF = "the cat sat on the mat"  # 6 words


def rec(i, emotion, text=REF):
    return AttemptRecord(i, emotion, REF, text)


RECORDS = [
    rec("h1", "happy"),  # exact
    rec("h2", "happy", "The cat sat on the mat!"),  # exact after normalisation
    rec("h3", "happy", "the cat sat on mat"),  # WER 1/6 = 0.167 > 0.15
    rec("h4", "happy"),  # judged sad
    rec("h5", "happy"),  # no label
    rec("s1", "sad", "the cat sat on the hat"),  # WER 1/6
    rec("s2", "sad"),
]
LABELS = {"h1": "happy", "h2": "Happy", "h3": "happy", "h4": "sad", "s1": "sad", "s2": "sadness"}


def test_success_needs_label_match_and_low_wer():
    res = filter_attempts(RECORDS, LABELS)
    assert res.success == {"happy": ["h1", "h2"], "sad": ["s2"]}
    why = {v.id: v.reason for v in res.verdicts}
    assert why == {"h1": "kept", "h2": "kept", "h3": "wer too high", "h4": "wrong emotion", "h5": "no label",
                   "s1": "wer too high", "s2": "kept"}
    v = {v.id: v for v in res.verdicts}
    assert v["h3"].wer == pytest.approx(1 / 6) and v["h3"].label == "happy" and not v["h3"].success
    assert v["h4"].label == "sad" and v["h5"].label is None
    assert res.counts()["happy"] == {"kept": 2, "over cap": 0, "no label": 1, "wrong emotion": 1,
                                     "wer too high": 1, "wrong emotion, wer too high": 0}


def test_threshold_is_inclusive_and_changes_the_sets():
    res = filter_attempts(RECORDS, LABELS, tau_wer=1 / 6)
    assert res.success == {"happy": ["h1", "h2", "h3"], "sad": ["s1", "s2"]}
    assert res.params["tau_wer"] == 1 / 6


def test_require_match_off_keeps_the_wer_condition_only():
    res = filter_attempts(RECORDS, LABELS, require_match=False)
    assert res.success == {"happy": ["h1", "h2", "h4", "h5"], "sad": ["s2"]}


def test_judge_labels_outside_the_vocabulary_never_match():
    res = filter_attempts([rec("a", "happy")], {"a": "Fearful"})
    assert res.verdicts[0].label == "fearful" and res.verdicts[0].reason == "wrong emotion"
    res = filter_attempts([rec("a", "happy")], {"a": None})  # an undecided judge
    assert res.verdicts[0].reason == "no label"


def test_cap_is_seeded_uniform_and_independent_of_order():
    records = [rec(f"a{i:03d}", "angry") for i in range(100)] + [rec(f"u{i}", "surprise") for i in range(3)]
    labels = {r.id: r.emotion for r in records}
    first = filter_attempts(records, labels, cap=10, seed=5)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    again = filter_attempts(shuffled, labels, cap=10, seed=5)
    other = filter_attempts(records, labels, cap=10, seed=6)
    assert first.success == again.success
    assert len(first.success["angry"]) == 10 and first.success["surprise"] == ["u0", "u1", "u2"]
    assert first.success["angry"] != other.success["angry"]
    assert first.success["angry"] == sorted(first.success["angry"])
    over = [v for v in first.verdicts if v.reason == "over cap"]
    assert len(over) == 90 and all(v.success and not v.kept for v in over)
    # uniform: over many seeds every attempt is drawn about 10% of the time
    hits = dict.fromkeys(range(100), 0)
    for s in range(300):
        for i in cap_sample([f"{i:03d}" for i in range(100)], 10, seed=s, emotion="angry"):
            hits[int(i)] += 1
    assert min(hits.values()) > 10 and max(hits.values()) < 60  # expected 30 each


def test_emotions_order_and_unknown_targets():
    res = filter_attempts(RECORDS, LABELS, emotions=["sad", "happy", "angry"])
    assert list(res.success) == ["sad", "happy", "angry"] and res.success["angry"] == []
    with pytest.raises(EsnError, match="targets 'happy', which is not among"):
        filter_attempts(RECORDS, LABELS, emotions=["sad"])


@pytest.mark.parametrize(("kw", "match"), [({"tau_wer": -0.1}, "tau_wer"), ({"tau_wer": float("inf")}, "tau_wer"),
                                           ({"cap": 0}, "cap c"), ({"cap": 2.5}, "cap c")])
def test_bad_parameters(kw, match):
    with pytest.raises(EsnError, match=match):
        filter_attempts(RECORDS, LABELS, **kw)


def test_duplicate_attempt_is_an_error():
    with pytest.raises(EsnError, match="'h1' appears twice"):
        filter_attempts([rec("h1", "happy"), rec("h1", "happy")], LABELS)


def test_label_csv(tmp_path):
    path = tmp_path / "human.csv"
    path.write_text("id,label,rater\nh1,Happy,r1\nh3, happy ,r2\nh4,surprised,r1\nh4,surprise,r3\n")
    assert load_label_csv(path) == {"h1": "happy", "h3": "happy", "h4": "surprise"}
    res = filter_attempts(RECORDS, load_label_csv(path), tau_wer=0.2)
    assert res.success == {"happy": ["h1", "h3"], "sad": []}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,emotion\na,happy\n", r"header must name the columns 'id' and 'label'"),
        ("id,label\na,happy\nb,bored\n", r"human.csv, line 3: unknown emotion 'bored'"),
        ("id,label\na,happy\n,sad\n", r"human.csv, line 3: empty id or label"),
        ("id,label\na,happy\nb,sad\na,sad\n", r"human.csv, line 4: attempt 'a' was already labelled 'happy'"),
        ("", r"header must name"),
    ],
)
def test_bad_label_csv(tmp_path, text, match):
    path = tmp_path / "human.csv"
    path.write_text(text)
    with pytest.raises(EsnError, match=match):
        load_label_csv(path)


def test_missing_or_binary_label_csv(tmp_path):
    with pytest.raises(EsnError, match="label file not found"):
        load_label_csv(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81id,label")
    with pytest.raises(EsnError, match=r"bin\.csv: not a readable CSV"):
        load_label_csv(tmp_path / "bin.csv")


def test_verdict_table_csv(tmp_path):
    res = filter_attempts(RECORDS, LABELS)
    res.write_csv(tmp_path / "verdicts.csv")
    lines = (tmp_path / "verdicts.csv").read_text().splitlines()
    assert lines[0] == "id,emotion,label,wer,success,kept,reason" and len(lines) == 1 + len(RECORDS)
