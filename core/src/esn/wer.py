"""Word error rate on normalised English text: whisper-normalizer's ``EnglishTextNormalizer`` + jiwer.

Both sides are normalised first (lower case, punctuation dropped, contractions expanded, spelled-out
numbers turned into digits: "twenty five" -> "25", British spellings Americanised, fillers such as "uh"
removed; a stray "." word left by a trailing "..." is dropped), then split on whitespace and aligned by
jiwer.

Empty sides (after normalisation), the rule used everywhere in esn:

* reference and hypothesis both empty: WER 0.0 (nothing to say, nothing said);
* reference empty, hypothesis not: WER 1.0 for that utterance (any content against none is a total
  failure, and it fails every success threshold below 1); its words count as insertions;
* hypothesis empty, reference not: every reference word is a deletion, WER 1.0.

At corpus level the WER is total errors (S + D + I) over total reference words; a corpus whose
references are all empty follows the per-utterance rule (0.0 without errors, else 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import jiwer

from esn.errors import EsnError


@lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalisation, whitespace collapsed. ``None`` is an error, not empty text.

    One fix on top: the normaliser turns a trailing "..." into a lone "." word ("no way..." -> "no way ."),
    which would count as an extra word; words made only of dots are dropped.
    """
    if not isinstance(text, str):
        raise EsnError(f"WER needs text, got {type(text).__name__}: {text!r}")
    return " ".join(w for w in _normalizer()(text).split() if w.strip("."))


@dataclass(frozen=True)
class WordErrors:
    """Alignment counts of one utterance or a whole corpus."""

    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_words(self) -> int:
        """Words in the reference: substitutions + deletions + hits."""
        return self.substitutions + self.deletions + self.hits

    @property
    def wer(self) -> float:
        """errors / reference words (0 or 1 when the reference is empty)."""
        if self.reference_words == 0:
            return 0.0 if self.errors == 0 else 1.0
        return self.errors / self.reference_words

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(self.substitutions + other.substitutions, self.deletions + other.deletions,
                          self.insertions + other.insertions, self.hits + other.hits)


def measure(reference: str, hypothesis: str) -> WordErrors:
    """Substitutions, deletions, insertions and hits of ``hypothesis`` against ``reference``."""
    for text in (reference, hypothesis):
        if not isinstance(text, str):
            raise EsnError(f"WER needs text, got {type(text).__name__}: {text!r}")
    return _measure(reference, hypothesis)


# Reports recount the same (transcript, decoded text) pairs for every group and setting; the
# normaliser's many regular expressions make that the slow part.
@lru_cache(maxsize=2**17)
def _measure(reference: str, hypothesis: str) -> WordErrors:
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref or not hyp:  # jiwer aligns empty strings too, but the counts are obvious
        return WordErrors(0, len(ref.split()), len(hyp.split()), 0)
    out = jiwer.process_words(ref, hyp)
    return WordErrors(out.substitutions, out.deletions, out.insertions, out.hits)


def wer(reference: str, hypothesis: str) -> float:
    """WER of one utterance after normalisation (see the module docstring for empty sides)."""
    return measure(reference, hypothesis).wer


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> WordErrors:
    """Corpus counts; ``.wer`` is total errors / total reference words."""
    if len(references) != len(hypotheses):
        raise EsnError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = WordErrors(0, 0, 0, 0)
    for ref, hyp in zip(references, hypotheses, strict=True):
        total = total + measure(ref, hyp)
    return total
