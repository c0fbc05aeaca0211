"""The browser listening test: a self-contained page for a human kit, and the answers it produces.

``esn human export`` writes ``index.html`` next to the kit's clips: plain HTML and JavaScript, no
external assets, with the trial list (never the key) embedded as JSON. The page plays each trial's
clips blind, in the kit's order, takes A / B / tie (``ab``) or an emotion (``labels``), keeps the answers
in the browser's localStorage (a reload resumes) and downloads them as the responses CSV that
``esn human import`` reads. Served by ``esn human serve`` it also stores every answer set on the server,
through :class:`Kit` below, one file per rater.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import secrets
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from esn.emotions import EMOTIONS
from esn.errors import EsnError
from esn.pipeline.files import atomic_write_text

PAGE = "index.html"
RESPONSES = "responses"  # folder of the kit where `esn human serve` keeps one CSV per rater
KEY = "key.csv"  # which clip is which: in the kit's private folder, never in the folder raters get
CODES = "codes.csv"  # rater,code: the raters' login codes (esn human export --raters N), private too
RATER = re.compile(r"[A-Za-z0-9_-]{1,64}")  # rater ids become file names
AB_CHOICES = ("A", "B", "tie")
# What each kit kind lists (file, id column, clip columns) and what a response row holds.
KINDS = {
    "ab": {"listing": "trials.csv", "id": "trial", "clips": ("clip_a", "clip_b"),
           "columns": ("rater", "trial", "choice")},
    "labels": {"listing": "clips.csv", "id": "clip", "clips": ("file",),
               "columns": ("rater", "clip", "label")},
}


@dataclass(frozen=True)
class Kit:
    """A kit folder as raters see it: its kind, an id (hash of its trial list), and the blind trials."""

    dir: Path
    kind: str
    id: str
    trials: tuple[dict, ...]  # {"id": "3", "question": "...", "clips": ("clips/t003_A.wav", ...)}

    @property
    def columns(self) -> tuple[str, ...]:
        """The responses file's header: rater, trial or clip id, answer."""
        return KINDS[self.kind]["columns"]

    @property
    def choices(self) -> tuple[str, ...]:
        """The answers a rater may give: A/B/tie for an A/B kit, the emotions for a labels kit."""
        return AB_CHOICES if self.kind == "ab" else EMOTIONS

    @property
    def clips(self) -> set[str]:
        """Every clip path the kit's trials play (relative to the kit folder): all a server may send."""
        return {c for t in self.trials for c in t["clips"]}

    def check_answers(self, answers: object) -> dict[str, str]:
        """``{trial id: choice}`` from untrusted JSON, every id in the kit and every choice allowed."""
        if not isinstance(answers, dict):
            raise EsnError("answers must be an object {trial: choice}")
        ids = {t["id"] for t in self.trials}
        for trial, choice in answers.items():
            if trial not in ids:
                raise EsnError(f"unknown {KINDS[self.kind]['id']} {trial!r} (not in this kit)")
            if choice not in self.choices:
                raise EsnError(f"{KINDS[self.kind]['id']} {trial}: answer {choice!r} must be one of "
                               f"{', '.join(self.choices)}")
        return dict(answers)

    def responses_csv(self, rater: str, answers: dict[str, str]) -> str:
        """The responses file of one rater, rows in the kit's order: what ``esn human import`` reads."""
        rows = [",".join(self.columns)]
        rows += [f"{rater},{t['id']},{answers[t['id']]}" for t in self.trials if t["id"] in answers]
        return "\n".join(rows) + "\n"

    def read_responses(self, path: Path) -> dict[str, str]:
        """The answers of a responses file written by :meth:`responses_csv`."""
        rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
        return {r[self.columns[1]]: r[self.columns[2]] for r in rows}


def check_rater(rater: str) -> str:
    """``rater`` if it is a safe rater id (it becomes a file name), else an EsnError."""
    if not RATER.fullmatch(rater or ""):
        raise EsnError(f"rater id {rater!r} must be 1 to 64 letters, digits, - or _")
    return rater


def read_kit(kit_dir: str | Path) -> Kit:
    """The kit in ``kit_dir`` (``trials.csv``: an A/B kit; ``clips.csv``: a labels kit)."""
    kit_dir = Path(kit_dir)
    found = [k for k, spec in KINDS.items() if (kit_dir / spec["listing"]).is_file()]
    if len(found) != 1:
        raise EsnError(f"{kit_dir} is not a listening kit: expected trials.csv (ab) or clips.csv (labels) "
                       "from `esn human export`")
    kind = found[0]
    spec = KINDS[kind]
    listing = (kit_dir / spec["listing"]).read_bytes()
    try:
        # Rows end at \n or \r\n only (the csv module's rule): str.splitlines would also end them at U+2028,
        # U+0085, form feeds ... inside a question, and split one row into two.
        rows = list(csv.DictReader(io.StringIO(listing.decode("utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EsnError(f"{kit_dir / spec['listing']}: not a readable UTF-8 CSV file ({exc})") from None
    need = [spec["id"], "question", *spec["clips"]]
    if not rows or any(c not in rows[0] for c in need):
        raise EsnError(f"{kit_dir / spec['listing']}: needs rows with columns {', '.join(need)}")
    trials = []
    for n, row in enumerate(rows, start=2):
        if None in row or any(row[c] is None for c in need):
            raise EsnError(f"{kit_dir / spec['listing']} line {n}: not the header's {len(rows[0])} fields")
        clips = tuple(row[c] for c in spec["clips"])
        for clip in clips:
            # Clips live under the kit's clips/ folder; anything else would let the page (or the server
            # serving it) reach files outside the kit.
            if not re.fullmatch(r"clips/[A-Za-z0-9_.-]+\.wav", clip) or not (kit_dir / clip).is_file():
                raise EsnError(f"{kit_dir / spec['listing']}: clip {clip!r} is not a wav file under clips/")
        trials.append({"id": row[spec["id"]], "question": row["question"], "clips": clips})
    return Kit(kit_dir, kind, hashlib.sha256(listing).hexdigest()[:16], tuple(trials))


def page(kit: Kit) -> str:
    """The listening page of ``kit``: the template with the kit (no key) embedded as JSON."""
    if kit.kind == "ab":
        choices = [{"value": "A", "label": "A", "key": "a"}, {"value": "B", "label": "B", "key": "b"},
                   {"value": "tie", "label": "Tie / can't tell", "key": "t"}]
        intro = (f"{len(kit.trials)} trials. In each, listen to clips A and B, then pick the one that better "
                 "matches the emotion asked for, or Tie.")
    else:
        choices = [{"value": e, "label": e.capitalize(), "key": str(k)} for k, e in enumerate(EMOTIONS, start=1)]
        intro = f"{len(kit.trials)} clips. Listen to each one and pick the emotion you hear."
    data = {
        "id": kit.id, "kind": kit.kind, "columns": list(kit.columns), "choices": choices,
        "clip_names": ["A", "B"], "title": "Listening test", "intro": intro,
        "trials": [{"id": t["id"], "question": t["question"], "clips": list(t["clips"])} for t in kit.trials],
    }
    # "<" escaped: the JSON sits inside a <script> element, which "</script>" in a question would end; the
    # line and paragraph separators too (JavaScript before ES2019 ended string literals at them).
    embedded = (json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
                .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    template = resources.files("esn.pipeline").joinpath("listening.html").read_text(encoding="utf-8")
    return template.replace("/*KIT*/", embedded)


def write_page(kit_dir: str | Path) -> Path:
    """Write ``index.html`` into a kit folder (what ``esn human export`` calls last)."""
    kit = read_kit(kit_dir)
    return atomic_write_text(kit.dir / PAGE, page(kit))


def private_dir(kit_dir: str | Path) -> Path:
    """The kit's private folder, beside it (``<kit>-private/``): the key and the raters' codes, which must
    not travel with the folder raters get."""
    kit_dir = Path(kit_dir).resolve()
    return kit_dir.parent / f"{kit_dir.name}-private"


def key_path(kit_dir: str | Path) -> Path:
    """The kit's key: in its private folder (older kits kept it in the kit folder itself)."""
    private = private_dir(kit_dir) / KEY
    legacy = Path(kit_dir) / KEY
    if not private.is_file() and legacy.is_file():
        return legacy
    return private


def issue_codes(kit_dir: str | Path, n: int) -> Path:
    """Write ``n`` raters' login codes (``rater,code``; raters r01, r02, ...) into the kit's private folder.
    Codes are random (``secrets``), 20 hex digits: 80 bits, not guessable over HTTP."""
    width = max(2, len(str(n)))
    rows = [f"r{k:0{width}d},{secrets.token_hex(10)}" for k in range(1, n + 1)]
    return atomic_write_text(private_dir(kit_dir) / CODES, "rater,code\n" + "\n".join(rows) + "\n")


def read_codes(path: str | Path) -> dict[str, str]:
    """``{code: rater}`` of a codes file written by :func:`issue_codes` (or by hand: ``rater,code`` rows)."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    except OSError as exc:
        raise EsnError(f"codes file {path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EsnError(f"codes file {path}: not a readable UTF-8 CSV file ({exc})") from None
    codes: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):
        rater, code = (row.get("rater") or "").strip(), (row.get("code") or "").strip()
        try:
            check_rater(rater)
        except EsnError as exc:
            raise EsnError(f"codes file {path} line {n}: {exc}") from None
        if len(code) < 8:
            raise EsnError(f"codes file {path} line {n}: code of rater {rater!r} must have at least 8 characters")
        if code in codes or rater in codes.values():
            raise EsnError(f"codes file {path} line {n}: rater {rater!r} or its code appears twice")
        codes[code] = rater
    if not codes:
        raise EsnError(f"codes file {path}: no rows (expected rater,code; `esn human export --raters N` writes one)")
    return codes
