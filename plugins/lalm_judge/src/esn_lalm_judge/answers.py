"""The judge's question and the reading of its answer.

The answer is read conservatively: it must point to exactly one of the five options, by letter
("B", "(B)", "b.", "Answer: B", "option b") or by name ("happy", "Happiness", "surprised"), or
both in agreement ("(B) happy"). Anything else (no option, two different options, "(B) sad") is
unparseable: ``None``, counted by the caller, never guessed.
"""

from __future__ import annotations

import re

from esn.emotions import EMOTIONS

LETTERS = "ABCDE"
OPTIONS = dict(zip(LETTERS, EMOTIONS, strict=True))  # A neutral, B happy, C angry, D sad, E surprise

SYSTEM_PROMPT = "You are an expert listener who rates the emotion expressed in speech."
QUESTION = (
    "Which emotion does the speaker express in the {target}? Choose exactly one option and answer "
    "with its letter only.\n" + "\n".join(f"({k}) {v}" for k, v in OPTIONS.items())
)
WITH_SOURCE = (
    "The first audio is the original recording. The second audio is the same sentence after an "
    "attempt to change how it is said. "
)


def question(with_source: bool) -> str:
    """The user turn's text, after the audio: the five-way multiple-choice question."""
    if with_source:
        return WITH_SOURCE + QUESTION.format(target="second audio")
    return QUESTION.format(target="audio")


_WORDS = {
    "neutral": "neutral", "calm": "neutral", "neutrality": "neutral",
    "happy": "happy", "happiness": "happy", "joy": "happy", "joyful": "happy",
    "angry": "angry", "anger": "angry",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
}
_LETTER_PATTERNS = (
    re.compile(r"^\(?([a-e])\)?[.:,)]?$"),  # the whole answer is a letter
    re.compile(r"\(([a-e])\)"),  # "(b)" anywhere
    re.compile(r"^([a-e])[.:)]"),  # "b. happy", "b) ..."
    re.compile(r"\b(?:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*\(?([a-e])\b"),  # "answer: b"
)


def parse_answer(text: str) -> str | None:
    """One of ``EMOTIONS`` if ``text`` names exactly one option, else ``None`` (unparseable)."""
    text = re.sub(r"<think>.*?</think>", " ", text or "", flags=re.S).strip().lower()
    found: set[str] = set()
    for pattern in _LETTER_PATTERNS:
        found.update(OPTIONS[m.upper()] for m in pattern.findall(text))
    found.update(_WORDS[w] for w in re.findall(r"[a-z]+", text) if w in _WORDS)
    return found.pop() if len(found) == 1 else None
