"""Success filtering (the paper's section 3.2): which attempts count towards the activation statistics.

An attempt succeeds when its judge label equals its target emotion AND
``WER(normalised decoded text, normalised transcript) <= tau_wer`` (default 0.15). Each emotion's success
set is then capped at ``c`` by a seeded uniform sample. Labels come from any judge (a dict id -> label)
or from a CSV of human labels, so the same stored attempts can be re-filtered (the paper's CAS-H) without
generating again.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esn.emotions import EMOTIONS, normalize_emotion
from esn.errors import EsnError
from esn.files import atomic_write_bytes
from esn.selection import emotion_seed
from esn.store import AttemptRecord
from esn.wer import wer

TAU_WER = 0.15


@dataclass(frozen=True)
class Verdict:
    """Why one attempt passed or failed. ``reason`` is one of the REASONS."""

    id: str
    emotion: str  # target
    label: str | None  # judge's label, None when the judge gave none for this attempt
    wer: float
    success: bool  # label matches and WER is under the threshold
    kept: bool  # success and inside the cap sample
    reason: str


REASONS = ("kept", "over cap", "no label", "wrong emotion", "wer too high", "wrong emotion, wer too high")


@dataclass
class FilterResult:
    """Success ids per emotion (sorted, after the cap) and a verdict per attempt."""

    success: dict[str, list[str]]
    verdicts: list[Verdict]
    params: dict  # tau_wer, cap, seed

    def counts(self) -> dict[str, dict[str, int]]:
        """``{emotion: {reason: number of attempts}}``, for the report table."""
        out: dict[str, dict[str, int]] = {}
        for v in self.verdicts:
            row = out.setdefault(v.emotion, dict.fromkeys(REASONS, 0))
            row[v.reason] += 1
        return out

    def csv_text(self) -> str:
        """The verdicts as CSV: a header, then one row per attempt."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(Verdict.__dataclass_fields__), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(asdict(v) for v in self.verdicts)
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write the verdicts CSV atomically (temp file, fsync, rename)."""
        atomic_write_bytes(path, self.csv_text().encode("utf-8"))


def cap_sample(ids: Iterable[str], cap: int | None, *, seed: int, emotion: str) -> list[str]:
    """At most ``cap`` of ``ids``, uniformly without replacement; the same for any order of ``ids``."""
    pool = sorted(set(ids))
    if cap is None or len(pool) <= cap:
        return pool
    pick = np.random.default_rng(emotion_seed(seed, emotion)).choice(len(pool), size=cap, replace=False)
    return sorted(pool[i] for i in pick)


def _label(raw: str) -> str:
    """A judge's label in esn's vocabulary where it has one ("Surprised" -> "surprise"); other classes a
    judge may emit (e.g. "fearful") are kept, lower-cased: they never match a target."""
    try:
        return normalize_emotion(raw)
    except EsnError:
        return str(raw).strip().lower()


def filter_attempts(
    records: Iterable[AttemptRecord],
    labels: Mapping[str, str],
    *,
    tau_wer: float = TAU_WER,
    cap: int | None = None,
    seed: int = 0,
    emotions: Sequence[str] | None = None,
    require_match: bool = True,
    check_wer: bool = True,
) -> FilterResult:
    """Judge every attempt and keep at most ``cap`` successes per target emotion.

    ``labels`` maps attempt id -> judged emotion (aliases such as "Surprised" are normalised); an attempt
    without a label (absent or None: the judge could not decide) fails with reason "no label". ``emotions`` (default: the target emotions of the
    records) orders the result; every record's target must be among them. ``require_match=False`` keeps
    the WER condition only (an ablation; the paper always requires the match). ``check_wer=False`` drops
    the WER condition: for a model that writes no text (``ModelAdapter.text_out`` False) the decoded text
    says nothing about the words spoken, so the filter is the judge alone.
    """
    if isinstance(tau_wer, bool) or not isinstance(tau_wer, (int, float)) or not math.isfinite(tau_wer) or tau_wer < 0:
        raise EsnError(f"tau_wer must be a finite number >= 0, got {tau_wer!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise EsnError(f"the success cap c must be a positive integer (or None for no cap), got {cap!r}")
    records = list(records)
    if emotions is None:
        present = {r.emotion for r in records}
        emotions = [e for e in EMOTIONS if e in present]
    emotions = [normalize_emotion(e) for e in emotions]
    judged = {str(k): _label(v) for k, v in labels.items() if v is not None}
    verdicts: list[Verdict] = []
    successes: dict[str, list[str]] = {e: [] for e in emotions}
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise EsnError(f"attempt {r.id!r} appears twice")
        seen.add(r.id)
        if r.emotion not in successes:
            raise EsnError(f"attempt {r.id!r} targets {r.emotion!r}, which is not among {emotions}")
        label = judged.get(r.id)
        score = wer(r.transcript, r.text)
        emotion_ok, wer_ok = label == r.emotion or not require_match, score <= tau_wer or not check_wer
        if label is None and require_match:
            reason = "no label"
        elif not emotion_ok:
            reason = "wrong emotion" if wer_ok else "wrong emotion, wer too high"
        else:
            reason = "kept" if wer_ok else "wer too high"
        if emotion_ok and wer_ok:
            successes[r.emotion].append(r.id)
        verdicts.append(Verdict(r.id, r.emotion, label, score, emotion_ok and wer_ok, False, reason))
    kept = {e: cap_sample(ids, cap, seed=seed, emotion=e) for e, ids in successes.items()}
    chosen = {i for ids in kept.values() for i in ids}
    verdicts = [
        v if not v.success else Verdict(**{**asdict(v), "kept": v.id in chosen,
                                            "reason": "kept" if v.id in chosen else "over cap"})
        for v in verdicts
    ]
    return FilterResult(kept, verdicts, {"tau_wer": float(tau_wer), "cap": cap, "seed": seed,
                                         "require_match": require_match})


def load_label_csv(path: str | os.PathLike, emotions: Sequence[str] = EMOTIONS) -> dict[str, str]:
    """Human (or any) labels from a CSV with a header and columns ``id,label`` (other columns ignored).

    Errors name the file and line: a missing column, an empty id or label, an unknown emotion, or an id
    labelled twice with different labels (the same label twice is accepted).
    """
    path = Path(path)
    allowed = tuple(normalize_emotion(e) for e in emotions)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "id" not in fields or "label" not in fields:
                raise EsnError(f"{path}: the header must name the columns 'id' and 'label', got {fields}")
            reader.fieldnames = fields
            out: dict[str, str] = {}
            for row in reader:
                line = reader.line_num
                rid, raw = (row.get("id") or "").strip(), (row.get("label") or "").strip()
                if not rid or not raw:
                    raise EsnError(f"{path}, line {line}: empty id or label")
                try:
                    label = normalize_emotion(raw, allowed)
                except EsnError as exc:
                    raise EsnError(f"{path}, line {line}: {exc}") from None
                if out.get(rid, label) != label:
                    raise EsnError(f"{path}, line {line}: attempt {rid!r} was already labelled {out[rid]!r}")
                out[rid] = label
    except FileNotFoundError:
        raise EsnError(f"{path}: label file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EsnError(f"{path}: not a readable CSV file ({exc})") from None
    return out
