"""Datasets: the Emotional Speech Database (ESD) as people actually have it, and a plain CSV corpus.

EVC converts NEUTRAL speech, so a dataset's job here is to list the neutral source utterances of each
split, each with its reference transcript.

ESD (Zhou et al. 2021), English speakers ``0011``-``0020``::

    <root>[/Emotion Speech Dataset]/<speaker>/<Emotion>[/train|evaluation|test]/<speaker>_<NNNNNN>.wav
    <root>[/Emotion Speech Dataset]/<speaker>/<speaker>.txt      id<TAB>text<TAB>emotion

Ids are parallel across emotions: 1-350 Neutral, 351-700 Angry, 701-1050 Happy, 1051-1400 Sad,
1401-1750 Surprise, so utterance *index* ``i`` (1-350) has the same words in every emotion. Splits work on
(speaker, index); the default is the paper's hybrid split (Table 1), see :data:`PAPER_SPLITS`.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from esn.audio import audio_file_problem
from esn.errors import EsnError
from esn.files import read_bytes

ESD_EMOTIONS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "surprise")  # id-block order
PER_EMOTION = 350
ENGLISH_SPEAKERS: tuple[str, ...] = tuple(f"{i:04d}" for i in range(11, 21))
OFFICIAL_SUBSETS = ("train", "evaluation", "test")
# Emotion words found in ESD transcripts and folder names (English and the Mandarin speakers' files).
_EMOTION_WORDS = {
    "neutral": "neutral", "angry": "angry", "happy": "happy", "sad": "sad", "surprise": "surprise",
    "surprised": "surprise", "中立": "neutral", "生气": "angry", "快乐": "happy", "伤心": "sad", "惊讶": "surprise",
}
_ID = re.compile(r"^(\d{4})_(\d{6})$")
_LOOSE_LINE = re.compile(r"^(\d{4}_\d{6})\s+(.+?)\s+(\S+)$")


@dataclass(frozen=True)
class Source:
    """One neutral source utterance. ``id`` is unique in the dataset (ESD: ``0011_000001``)."""

    id: str
    speaker: str
    index: int  # utterance index, parallel across emotions (ESD: 1-350); 0 if the corpus has none
    path: Path
    transcript: str


# -- splits -------------------------------------------------------------------------------------------
class SplitRule(BaseModel):
    """Utterance indices ``first``..``last`` (inclusive) of ``speakers`` belong to a split."""

    model_config = ConfigDict(extra="forbid")
    speakers: list[str] = Field(min_length=1)
    first: int = Field(ge=1)
    last: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self) -> SplitRule:
        if self.last < self.first:
            raise ValueError(f"last ({self.last}) must be >= first ({self.first})")
        return self


def _rule(speakers: Iterable[int], first: int, last: int) -> SplitRule:
    return SplitRule(speakers=[f"{s:04d}" for s in speakers], first=first, last=last)


SEEN, DEV, UNSEEN = range(11, 17), range(17, 19), range(19, 21)
# The paper's Table 1 (S1-S10 = 0011-0020): a 6/2/2 speaker partition plus index ranges. Sizes per
# emotion: identification 1200, development 800, test_seen 800, test_unseen 700. The paper prints 1100
# for development, which its own ranges (6 x 50 + 2 x 250 = 800) do not give; we implement the ranges.
PAPER_SPLITS: dict[str, list[SplitRule]] = {
    "identification": [_rule(SEEN, 1, 200)],
    "development": [_rule(SEEN, 201, 250), _rule(DEV, 1, 250)],
    "test_seen": [_rule(SEEN, 251, 350), _rule(DEV, 251, 350)],
    "test_unseen": [_rule(UNSEEN, 1, 350)],
}


def check_splits(splits: dict[str, list[SplitRule]]) -> None:
    """Refuse splits that share a (speaker, index): that would leak test words into identification."""
    owner: dict[tuple[str, int], str] = {}
    for name, rules in splits.items():
        for rule in rules:
            for spk in rule.speakers:
                for i in range(rule.first, rule.last + 1):
                    other = owner.setdefault((spk, i), name)
                    if other != name:
                        raise EsnError(f"splits {other!r} and {name!r} both contain speaker {spk} index {i}")


def split_of(splits: dict[str, list[SplitRule]], speaker: str, index: int) -> str | None:
    """The split whose rules contain utterance ``index`` of ``speaker``, or None."""
    for name, rules in splits.items():
        if any(speaker in r.speakers and r.first <= index <= r.last for r in rules):
            return name
    return None


# -- transcripts --------------------------------------------------------------------------------------
def check_id(sid: str, where: str) -> None:
    """An utterance id must be printable text: a control character (a line break, a tab) is refused here,
    before it could vanish from a CSV or a file name. File names come from ``esn.files.id_to_name``."""
    bad = [c for c in sid if unicodedata.category(c) in ("Cc", "Cs")]
    if bad:
        raise EsnError(f"{where}: id {sid!r} contains the control character(s) {''.join(sorted(set(bad)))!r}; "
                       "ids must be printable text")


def read_text(path: Path, what: str = "transcript file") -> str:
    """Decode a transcript file whatever its encoding: UTF-16 (BOM), UTF-8 (BOM or not), GB18030, Latin-1."""
    if path.is_dir():
        raise EsnError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise EsnError(f"{what} not found: {path}")
    raw = read_bytes(path, what)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise EsnError(f"{path}: starts like UTF-16 text but is not ({exc})") from None
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")  # never fails; ESD's English files are ASCII in practice


def parse_esd_transcript(path: Path) -> dict[str, tuple[str, str]]:
    """``{utt_id: (text, emotion)}`` from an ESD ``<speaker>.txt``; every bad line is reported by number."""
    out: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip().lstrip("\ufeff")
        if not line:
            continue
        fields = [f.strip() for f in line.split("\t") if f.strip()]
        if len(fields) != 3 and "\t" not in line:
            loose = _LOOSE_LINE.match(line)  # some copies lost their tabs to spaces
            fields = list(loose.groups()) if loose else fields
        if len(fields) != 3:
            missing = ("id", "text", "emotion")[len(fields)] if len(fields) < 3 else None
            problems.append(f"line {number}: expected id<TAB>text<TAB>emotion, got {len(fields)} field(s)"
                            + (f" (missing {missing})" if missing else "") + f": {line[:60]!r}")
            continue
        utt, text, emotion = fields
        if not _ID.match(utt):
            problems.append(f"line {number}: bad utterance id {utt!r} (expected like 0011_000001)")
            continue
        word = _EMOTION_WORDS.get(emotion.lower())
        expected = ESD_EMOTIONS[(int(utt[5:]) - 1) // PER_EMOTION] if 1 <= int(utt[5:]) <= 1750 else None
        if word is None or word != expected:
            problems.append(f"line {number}: emotion {emotion!r} does not match id {utt} (expected {expected})")
            continue
        out[utt] = (text, word)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise EsnError(f"transcript {path} has {len(problems)} bad line(s):\n  {shown}")
    return out


# -- datasets -----------------------------------------------------------------------------------------
def find_esd_root(root: Path) -> Path:
    """The folder that holds the speaker folders (tolerates an extra ``Emotion Speech Dataset/`` level)."""
    root = Path(root)
    if not root.is_dir():
        raise EsnError(f"ESD root not found: {root}")
    for candidate in (root, root / "Emotion Speech Dataset", root / "Emotional Speech Dataset (ESD)"):
        if candidate.is_dir() and any(_ID.match(f"{p.name}_000001") for p in candidate.iterdir() if p.is_dir()):
            return candidate
    raise EsnError(f"no ESD speaker folders (like 0011/) under {root} or {root / 'Emotion Speech Dataset'}")


def _emotion_dir(speaker_dir: Path, emotion: str) -> Path | None:
    for child in speaker_dir.iterdir():
        if child.is_dir() and _EMOTION_WORDS.get(child.name.lower()) == emotion:
            return child
    return None


class ESDDataset:
    """The neutral utterances of ESD speakers, assigned to splits by (speaker, utterance index)."""

    def __init__(self, root: str | Path, splits: dict[str, list[SplitRule]] | None = None):
        self.root = find_esd_root(Path(root))
        self.splits = splits if splits is not None else PAPER_SPLITS
        check_splits(self.splits)
        self._cache: dict[tuple[str, str], list[Source]] = {}

    def speakers(self) -> list[str]:
        """Every speaker that some split names, sorted."""
        return sorted({s for rules in self.splits.values() for r in rules for s in r.speakers})

    def neutral(self, speaker: str) -> list[Source]:
        """Every neutral utterance of one speaker that has a wav file, by index."""
        return self.utterances(speaker, "neutral")

    def utterances(self, speaker: str, emotion: str) -> list[Source]:
        """Every ``emotion`` utterance of one speaker that has a wav file, by its parallel index (1-350)."""
        if (speaker, emotion) in self._cache:
            return self._cache[(speaker, emotion)]
        spk_dir = self.root / speaker
        if not spk_dir.is_dir():
            raise EsnError(f"ESD speaker folder not found: {spk_dir}")
        transcripts = parse_esd_transcript(spk_dir / f"{speaker}.txt")
        folder = _emotion_dir(spk_dir, emotion)
        if folder is None:
            raise EsnError(f"no {emotion.capitalize()} folder in {spk_dir}")
        block = ESD_EMOTIONS.index(emotion) * PER_EMOTION  # ids of this emotion are block + 1 .. block + 350
        wavs = {p.stem: p for p in folder.rglob("*.wav")}  # flat or under train/evaluation/test
        sources = []
        for utt in sorted(wavs):
            m = _ID.match(utt)
            if not m or m.group(1) != speaker:
                continue
            if utt not in transcripts:
                raise EsnError(f"{wavs[utt]} has no line in transcript {spk_dir / f'{speaker}.txt'}")
            index = int(m.group(2)) - block
            if not 1 <= index <= PER_EMOTION:
                raise EsnError(f"{wavs[utt]} is in the {folder.name} folder but id {m.group(2)} is not a "
                               f"{emotion} id ({block + 1}-{block + PER_EMOTION})")
            sources.append(Source(utt, speaker, index, wavs[utt], transcripts[utt][0]))
        self._cache[(speaker, emotion)] = sources
        return sources

    def labelled(self, split: str, emotion: str) -> list[tuple[Source, Source]]:
        """``(clip, parallel neutral clip)`` pairs of ``emotion`` in a split: labelled speech for judges."""
        neutral = {(s.speaker, s.index): s for s in self.sources(split)}
        out = []
        for rule in self.splits[split]:
            for spk in rule.speakers:
                out += [(u, neutral[(spk, u.index)]) for u in self.utterances(spk, emotion)
                        if rule.first <= u.index <= rule.last and (spk, u.index) in neutral]
        return sorted(out, key=lambda p: (p[0].speaker, p[0].index))

    def sources(self, split: str) -> list[Source]:
        """Neutral sources of a split, sorted by (speaker, index). Missing speakers are errors."""
        if split not in self.splits:
            raise EsnError(f"unknown split {split!r}; this dataset has {', '.join(self.splits)}")
        out = []
        for rule in self.splits[split]:
            for spk in rule.speakers:
                found = [s for s in self.neutral(spk) if rule.first <= s.index <= rule.last]
                if not found:
                    raise EsnError(
                        f"split {split!r}: no neutral wav of speaker {spk} with index {rule.first}-{rule.last} "
                        f"under {self.root / spk}"
                    )
                out.extend(found)
        return sorted(out, key=lambda s: (s.speaker, s.index))


class CSVDataset:
    """Any corpus as a CSV: columns ``path``, ``transcript``, ``speaker``, ``split`` (optional ``id``).

    Paths are relative to the CSV's folder. Each row is one neutral source utterance.
    """

    REQUIRED = ("path", "transcript", "speaker", "split")

    def __init__(self, csv_path: str | Path):
        self.csv_path = Path(csv_path)
        if self.csv_path.is_dir():
            self.csv_path = self.csv_path / "metadata.csv"
        text = read_text(self.csv_path, "CSV file")
        try:  # parsed from the text itself, so that a quoted field keeps its line breaks
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
            fields = list(rows[0]) if rows else next(csv.reader(io.StringIO(text, newline="")), [])
        except csv.Error as exc:
            raise EsnError(f"{self.csv_path}: not a readable CSV file ({exc})") from None
        missing = [c for c in self.REQUIRED if c not in fields]
        if missing:
            raise EsnError(f"{self.csv_path}: missing column(s) {', '.join(missing)} (need {', '.join(self.REQUIRED)})")
        self.rows: dict[str, list[Source]] = {}
        seen: set[str] = set()
        for number, row in enumerate(rows, start=2):
            where = f"{self.csv_path} line {number}"
            empty = [c for c in self.REQUIRED if not isinstance(row.get(c), str) or not row[c].strip()]
            if empty:
                raise EsnError(f"{where}: empty field(s) {', '.join(empty)}")
            try:
                path = (self.csv_path.parent / row["path"].strip()).absolute()
                problem = audio_file_problem(path)  # before resolve(), which fails on a link loop
                path = path.resolve() if problem is None else path
            except (OSError, ValueError) as exc:
                raise EsnError(f"{where}: unusable audio path {row['path'].strip()!r} ({exc})") from None
            if problem is not None:
                raise EsnError(f"{where}: {problem}")
            given = row.get("id")
            sid = (given.strip() if isinstance(given, str) else "") or path.stem
            check_id(sid, where)
            if sid in seen:
                raise EsnError(f"{where}: duplicate id {sid!r}")
            seen.add(sid)
            src = Source(sid, row["speaker"].strip(), 0, path, row["transcript"].strip())
            self.rows.setdefault(row["split"].strip(), []).append(src)

    @property
    def splits(self) -> list[str]:
        """The split names found in the CSV, sorted."""
        return sorted(self.rows)

    def sources(self, split: str) -> list[Source]:
        """The rows of a split, sorted by (speaker, id); EsnError for a split the CSV does not have."""
        if split not in self.rows:
            raise EsnError(f"{self.csv_path}: no rows with split {split!r} (found: {', '.join(self.splits) or 'none'})")
        return sorted(self.rows[split], key=lambda s: (s.speaker, s.id))
