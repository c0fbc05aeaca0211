"""WER on hand-checked pairs. Each expected value was worked out by hand from the normalised strings."""

import pytest
from esn.errors import EsnError
from esn.wer import WordErrors, corpus_wer, measure, normalize, wer


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Hello, World!", "hello world"),  # casing, punctuation
        ("twenty five", "25"),  # spelled-out numbers become digits
        ("twenty-five", "25"),
        ("Twenty five dollars", "$25"),  # ... and currency is folded in
        ("one two three", "123"),  # consecutive digits are joined: a normaliser quirk worth knowing
        ("I can't go.", "i can not go"),  # contractions are expanded ...
        ("I cannot go", "i cannot go"),  # ... but "cannot" is left alone
        ("He's here", "he is here"),
        ("won't", "will not"),
        ("Colour", "color"),  # British spelling
        ("Uh, hello", "hello"),  # fillers dropped
        ("No way...", "no way"),  # whisper's normaliser alone gives "no way ." here; esn drops the "."
        ("U.S.A.", "u s a"),
        ("  spaced\tout \n", "spaced out"),
        ("", ""),
    ],
)
def test_normalize(text, normalised):
    assert normalize(text) == normalised


def test_numbers_spelled_or_written_match():
    assert wer("twenty five", "25") == 0.0
    assert wer("It costs twenty five dollars.", "it costs $25") == 0.0


def test_contractions():
    assert wer("I can't go.", "I can not go") == 0.0
    # "can not" (4 words) vs "cannot" (3 words): i=i, can->cannot (S), not deleted (D), go=go: 2/4
    assert measure("I can't go.", "I cannot go") == WordErrors(substitutions=1, deletions=1, insertions=0, hits=2)
    assert wer("I can't go.", "I cannot go") == 0.5


def test_punctuation_and_casing_are_free():
    assert wer("Hello, World!", "hello world") == 0.0
    assert wer("WHAT? No way...", "what no way") == 0.0


def test_one_deletion_in_six_words():
    m = measure("The cat sat on the mat.", "the cat sat on mat")
    assert (m.substitutions, m.deletions, m.insertions, m.hits) == (0, 1, 0, 5)
    assert wer("The cat sat on the mat.", "the cat sat on mat") == pytest.approx(1 / 6)
    assert wer("The cat sat on the mat.", "the cat sat on mat") > 0.15  # fails the paper's threshold


def test_insertions_can_exceed_one():
    # 2 reference words, 4 inserted: WER 4/2
    assert wer("good morning", "good morning to you all today") == 2.0


def test_empty_sides():
    assert wer("", "") == 0.0
    assert normalize("...") == "" and wer("...", "") == 0.0  # punctuation only: empty
    assert wer("uh", "") == 0.0  # a filler normalises to nothing: both sides empty
    assert wer("", "hi there") == 1.0  # empty reference, some content: a total failure
    assert measure("", "hi there") == WordErrors(0, 0, 2, 0)
    assert wer("a b", "") == 1.0  # every word deleted
    assert measure("a b", "") == WordErrors(0, 2, 0, 0)


def test_corpus_wer_is_total_errors_over_total_reference_words():
    refs = ["the cat sat on the mat", "hello world", "", "good morning"]
    hyps = ["the cat sat on mat", "hello there world", "oops", "good evening"]
    c = corpus_wer(refs, hyps)
    # utt1: D=1; utt2: I=1; utt3: I=1 (empty reference); utt4: S=1. Reference words 6+2+0+2 = 10.
    assert (c.substitutions, c.deletions, c.insertions, c.hits) == (1, 1, 2, 8)
    assert c.wer == pytest.approx(4 / 10)
    # not the mean of per-utterance WERs
    assert c.wer != pytest.approx(sum(wer(r, h) for r, h in zip(refs, hyps, strict=True)) / 4)
    assert corpus_wer([], []).wer == 0.0
    assert corpus_wer(["", ""], ["", "x"]).wer == 1.0


def test_bad_input():
    with pytest.raises(EsnError, match="2 references but 1 hypotheses"):
        corpus_wer(["a", "b"], ["a"])
    with pytest.raises(EsnError, match="needs text, got NoneType"):
        wer("a", None)
