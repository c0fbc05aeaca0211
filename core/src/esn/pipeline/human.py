"""The human listening kit (the paper's section 5.4): blind A/B pairs and blind emotion labelling.

Loudness: every clip is RMS-normalised to -23 dBFS (the level EBU R128 programmes target, applied here as
plain RMS over the whole clip, no K-weighting or gating) and then scaled down if needed so that its peak
stays at or below -1 dBFS. Clips are resampled to 16 kHz, as the judges hear them.

* ``ab`` kit: for the anchor setting, pairs of (baseline, intervened) conversions of the same source and
  target emotion (self-effect cells), ``per_emotion`` per target, order of trials and of A/B shuffled with
  the run seed. Raters answer which clip better matches the target emotion (A, B, or tie). Imported
  answers become win / tie / loss rates of the intervened system per emotion (Figure 8).
* ``labels`` kit: recorded identification attempts whose decoded text passes the WER filter (the judge's
  successes must pass it too, so only the kind of supervision differs), shuffled, named only by number;
  by default ``2 c`` per target emotion, so that the human success set can still reach the cap c when
  raters accept half of them. Raters write the emotion they hear. Imported answers (majority vote per
  clip; ties dropped) become the ``id,label`` CSV that ``filter.human_labels`` reads, which adds the
  human-filtered CAS-H masks.

Both kits get ``index.html``, the browser listening page (``esn.pipeline.listening``).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from esn.emotions import EMOTIONS, normalize_emotion
from esn.errors import EsnError
from esn.files import check_sha256, read_bytes
from esn.pipeline import evaluate, record, select
from esn.pipeline.batches import derive_seed
from esn.pipeline.config import settings
from esn.pipeline.files import (
    atomic_write_json,
    atomic_write_text,
    atomic_write_wav,
    read_sealed,
    seal,
)
from esn.pipeline.grid import BASELINE
from esn.pipeline.listening import CODES, KEY, issue_codes, key_path, private_dir, read_codes, write_page
from esn.pipeline.run import Run

KIT_RATE = 16_000
# "Which clip sounds more surprised?": the question wants an adjective, the emotion names are nouns or adjectives.
ADJECTIVES = {"surprise": "surprised", "happiness": "happy", "sadness": "sad", "anger": "angry", "fear": "afraid",
              "disgust": "disgusted"}
CHOICES = {"a": "A", "b": "B", "tie": "tie", "indecisive": "tie", "=": "tie", "same": "tie"}


def _csv(rows: list[dict], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _read_csv(path: Path, need: Sequence[str]) -> list[dict]:
    try:
        text = read_bytes(path).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EsnError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    cols = set(rows[0]) if rows else set()
    missing = [c for c in need if c not in cols]
    if missing:
        raise EsnError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(need)})")
    return rows


def _clip(src: Path, dst: Path, sha: str | None, fix: str) -> None:
    """A kit clip from a wav the run wrote, after checking it against its recorded ``sha`` (``fix``: what
    the error tells users to do)."""
    from esn.audio import read_audio, resample, rms_normalize, to_mono

    if sha is not None:  # runs of older esn versions recorded no checksum
        check_sha256(src, sha, fix)
    data, rate = read_audio(src)
    atomic_write_wav(dst, rms_normalize(resample(to_mono(data), rate, KIT_RATE)), KIT_RATE)


def export_ab(run: Run, out: Path, *, per_emotion: int = 25, raters: int | None = None) -> int:
    """Write ``clips/``, ``trials.csv`` (for raters) and a response template into ``out``, and the blind key
    (``key.csv``) and, for ``raters``, their login codes (``codes.csv``) into the private folder beside it."""
    anchor = settings(run.cfg)[0].key
    skip = set(select.no_success(run).get(settings(run.cfg)[0].mask_key, []))  # no mask: no intervened clip
    records = evaluate.records(run)
    base = {(r["split"], r["source"], r["target"]): r for r in records if r["setting"] == BASELINE}
    rng = np.random.default_rng(derive_seed(run.cfg.seed, "human-ab"))
    pairs = []
    for target in [t for t in run.cfg.record.targets if t not in skip]:
        cands = [(base[(r["split"], r["source"], r["target"])], r) for r in records
                 if r["setting"] == anchor and r["mask"] == r["target"] == target
                 and (r["split"], r["source"], r["target"]) in base]
        cands = [(b, i) for b, i in cands if b.get("audio") and i.get("audio")]
        if not cands:
            raise EsnError(f"no evaluated {target} pairs with audio in {run.rundir.evaluate}: set evaluate.save_audio = true "
                           "and run `esn evaluate`")
        pick = rng.choice(len(cands), size=min(per_emotion, len(cands)), replace=False)
        pairs += [(target, *cands[k]) for k in sorted(pick)]
    order = rng.permutation(len(pairs))
    trials, key = [], []
    for n, k in enumerate(order, start=1):
        target, b, i = pairs[k]
        flip = bool(rng.integers(2))
        a_rec, b_rec = (i, b) if flip else (b, i)
        names = (f"clips/t{n:03d}_A.wav", f"clips/t{n:03d}_B.wav")
        for rec, name in ((a_rec, names[0]), (b_rec, names[1])):
            _clip(run.rundir.evaluate / rec["audio"], out / name, rec.get("audio_sha256"),
                  f"delete the file in {run.rundir.evaluate / 'batches'} that holds {rec['id']!r} and run "
                  "`esn evaluate` to convert that batch again")
        trials.append({"trial": n, "emotion": target, "clip_a": names[0], "clip_b": names[1],
                       "question": f"Which clip sounds more {ADJECTIVES.get(target, target)}? Answer A, B or tie."})
        key.append({"trial": n, "emotion": target, "a": "intervened" if flip else "baseline",
                    "b": "baseline" if flip else "intervened", "a_id": a_rec["id"], "b_id": b_rec["id"]})
    atomic_write_text(out / "trials.csv", _csv(trials, ["trial", "emotion", "clip_a", "clip_b", "question"]))
    _write_private(out, _csv(key, ["trial", "emotion", "a", "b", "a_id", "b_id"]), raters)
    atomic_write_text(out / "responses_template.csv", "rater,trial,choice\n")
    write_page(out)
    return len(trials)


def _write_private(out: Path, key: str, raters: int | None) -> None:
    """The key (and the codes) into the private folder; a key.csv of an older export leaves the kit folder."""
    atomic_write_text(private_dir(out) / KEY, key)
    (out / KEY).unlink(missing_ok=True)
    codes = private_dir(out) / CODES
    if raters:
        issue_codes(out, raters)
    else:
        codes.unlink(missing_ok=True)  # a new kit: codes of an earlier export must not admit anyone


def read_answers(kit: Path, responses: Sequence[Path], item: str, answer: str) -> tuple[list[dict], dict[str, int]]:
    """The rows of the responses files (``rater``, ``item`` (trial or clip), ``answer``, ``where``) and the
    number of answers per rater. Refused: a file given twice (or two files with the same content), a row
    without a rater, a rater that answers one item twice, and, when the kit issued codes, raters without one."""
    codes_file = private_dir(kit) / CODES
    known = set(read_codes(codes_file).values()) if codes_file.is_file() else None
    seen_files: dict[str, Path] = {}
    seen: dict[tuple[str, str], str] = {}
    rows, per_rater = [], Counter()
    for path in map(Path, responses):
        data = read_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_files:
            same = seen_files[digest]
            if same.resolve() == path.resolve():
                raise EsnError(f"{path} is given twice: give each responses file once")
            raise EsnError(f"{path} and {same} hold the same responses (identical content): give each once")
        seen_files[digest] = path
        for n, row in enumerate(_read_csv(path, ["rater", item, answer]), start=2):
            rater, key = (row["rater"] or "").strip(), (row[item] or "").strip()
            where = f"{path} line {n}"
            if not rater:
                raise EsnError(f"{where}: no rater id (every answer must say whose it is)")
            if known is not None and rater not in known:
                raise EsnError(f"{where}: rater {rater!r} has no code in {codes_file} (this kit issued codes: "
                               "only their raters count)")
            if (rater, key) in seen:
                raise EsnError(f"{where}: rater {rater!r} answers {item} {key!r} again (first at {seen[(rater, key)]}); "
                               f"each rater answers each {item} once: remove the duplicate or the extra file")
            seen[(rater, key)] = where
            rows.append({"rater": rater, item: key, answer: row[answer], "where": where})
            per_rater[rater] += 1
    return rows, dict(sorted(per_rater.items()))


def import_ab(run: Run, kit: Path, responses: Sequence[Path]) -> dict:
    """Win / tie / loss of the intervened system per emotion (and pooled), written to human/results.json."""
    key_file = key_path(kit)
    key = {row["trial"]: row for row in _read_csv(key_file, ["trial", "emotion", "a", "b"])}
    counts: dict[str, Counter] = {}
    rows, raters = read_answers(kit, responses, "trial", "choice")
    for row in rows:
        trial = row["trial"]
        if trial not in key:
            raise EsnError(f"{row['where']}: unknown trial {trial!r} (not in {key_file})")
        choice = CHOICES.get((row["choice"] or "").strip().lower())
        if choice is None:
            raise EsnError(f"{row['where']}: choice {row['choice']!r} must be A, B or tie")
        k = key[trial]
        outcome = "tie" if choice == "tie" else ("win" if k[choice.lower()] == "intervened" else "loss")
        counts.setdefault(k["emotion"], Counter())[outcome] += 1
    if not counts:
        raise EsnError(f"no responses in {', '.join(map(str, responses))}")
    pooled = sum(counts.values(), Counter())
    table = {**{e: counts[e] for e in run.cfg.record.targets if e in counts}, "average": pooled}
    result = {
        "rates": {e: {k: round(c[k] / sum(c.values()), 6) for k in ("win", "tie", "loss")} for e, c in table.items()},
        "counts": {e: {**{k: c[k] for k in ("win", "tie", "loss")}, "n": sum(c.values())} for e, c in table.items()},
        "raters": raters,  # answers per rater
    }
    atomic_write_json(run.dir / "human" / "results.json", seal(result))  # a damaged or edited file is refused
    return result


def labels_per_emotion(run: Run) -> int:
    """The default size of the labelling kit per target emotion: twice the anchor's cap c."""
    return 2 * run.cfg.anchor.c


def export_labels(run: Run, out: Path, *, per_emotion: int | None = None, raters: int | None = None) -> int:
    """Blind clips of recorded WER-passing attempts for raters to label with the emotion they hear."""
    from esn.wer import wer

    per_emotion = labels_per_emotion(run) if per_emotion is None else per_emotion
    tau = run.cfg.filter.tau_wer
    stored = [r for r in record.store(run).records() if r.meta.get("audio")]
    if not stored:
        raise EsnError(f"no recorded audio in {run.rundir.record}: set record.save_audio = true and record again")
    records = [r for r in stored if wer(r.transcript, r.text) <= tau]
    if not records:
        raise EsnError(f"none of the {len(stored)} recorded attempts with audio passes the WER filter "
                       f"(tau_wer = {tau:g}): there is nothing a human label could add to a success set")
    rng = np.random.default_rng(derive_seed(run.cfg.seed, "human-labels"))
    chosen = []
    for target in run.cfg.record.targets:
        cands = sorted((r for r in records if r.emotion == target), key=lambda r: r.id)
        pick = rng.choice(len(cands), size=min(per_emotion, len(cands)), replace=False) if cands else []
        chosen += [cands[k] for k in sorted(pick)]
    clips, key = [], []
    for n, k in enumerate(rng.permutation(len(chosen)), start=1):
        rec = chosen[k]
        name = f"clips/c{n:04d}.wav"
        _clip(run.rundir.record / rec.meta["audio"], out / name, rec.meta.get("audio_sha256"),
              f"attempt {rec.id!r} cannot go into the kit")
        clips.append({"clip": n, "file": name, "question": f"Which emotion do you hear? One of: {', '.join(EMOTIONS)}"})
        key.append({"clip": n, "id": rec.id, "target": rec.emotion})
    atomic_write_text(out / "clips.csv", _csv(clips, ["clip", "file", "question"]))
    _write_private(out, _csv(key, ["clip", "id", "target"]), raters)
    atomic_write_text(out / "responses_template.csv", "rater,clip,label\n")
    write_page(out)
    return len(clips)


def import_labels(run: Run, kit: Path, responses: Sequence[Path]) -> tuple[Path, dict[str, int]]:
    """Majority label per clip -> ``human/labels.csv`` (``id,label``) for ``filter.human_labels``; returns
    that file and the number of answers per rater."""
    key = {row["clip"]: row["id"] for row in _read_csv(key_path(kit), ["clip", "id"])}
    votes: dict[str, Counter] = {}
    rows, raters = read_answers(kit, responses, "clip", "label")
    for row in rows:
        if row["clip"] not in key:
            raise EsnError(f"{row['where']}: unknown clip {row['clip']!r}")
        try:
            label = normalize_emotion(row["label"] or "", EMOTIONS)
        except EsnError as exc:
            raise EsnError(f"{row['where']}: {exc}") from None
        votes.setdefault(key[row["clip"]], Counter())[label] += 1
    rows = []
    for rid in sorted(votes):
        (top, n1), *rest = votes[rid].most_common()
        if rest and rest[0][1] == n1:
            continue  # a tie between raters: no human label
        rows.append({"id": rid, "label": top})
    return atomic_write_text(run.dir / "human" / "labels.csv", _csv(rows, ["id", "label"])), raters


REIMPORT = "run `esn human import` again to write it from the responses"  # what to do about a damaged results.json


def responses_summary(run: Run) -> dict | None:
    """The imported listening-test results of a run (``human/results.json``), or None before an import."""
    path = run.dir / "human" / "results.json"
    return read_sealed(path, REIMPORT) if path.exists() else None
