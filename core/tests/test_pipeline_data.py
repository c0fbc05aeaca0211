"""ESD loader and CSV dataset on synthetic trees in the layouts real copies come in."""

from __future__ import annotations

from pathlib import Path

import pytest
from esn.errors import EsnError
from esn.pipeline.data import PAPER_SPLITS, CSVDataset, ESDDataset, SplitRule, parse_esd_transcript
from esn.pipeline.synthetic import write_esd


@pytest.fixture(scope="module")
def full_esd(tmp_path_factory) -> Path:
    """All 10 English speakers, all 350 neutral utterances (tiny wavs), official train/evaluation/test layout."""
    root = tmp_path_factory.mktemp("esd")
    return write_esd(root, emotions=["neutral"], layout="official", seconds=0.02)


def test_paper_split_sizes_match_table_1(full_esd):
    ds = ESDDataset(full_esd)
    sizes = {split: len(ds.sources(split)) for split in PAPER_SPLITS}
    # Table 1 totals per emotion: 1200 / (printed 1100, ranges give) 800 / 800 / 700.
    assert sizes == {"identification": 1200, "development": 800, "test_seen": 800, "test_unseen": 700}
    ident = ds.sources("identification")
    assert {s.speaker for s in ident} == {f"{i:04d}" for i in range(11, 17)}
    assert min(s.index for s in ident) == 1 and max(s.index for s in ident) == 200
    unseen = ds.sources("test_unseen")
    assert {s.speaker for s in unseen} == {"0019", "0020"}
    # no (speaker, index) in two splits
    keys = [(s.speaker, s.index) for split in PAPER_SPLITS for s in ds.sources(split)]
    assert len(keys) == len(set(keys)) == 3500
    first = ident[0]
    assert first.id == "0011_000001" and first.path.parent.name == "train" and first.transcript.endswith(".")


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_other_layouts(tmp_path, layout):
    write_esd(tmp_path, speakers=[11, 19], indices=[1, 2, 251], emotions=["neutral", "happy"], layout=layout)
    splits = {"identification": [SplitRule(speakers=["0011"], first=1, last=2)],
              "test_unseen": [SplitRule(speakers=["0019"], first=1, last=350)]}
    ds = ESDDataset(tmp_path, splits)
    assert [s.id for s in ds.sources("identification")] == ["0011_000001", "0011_000002"]
    assert [s.id for s in ds.sources("test_unseen")] == ["0019_000001", "0019_000002", "0019_000251"]


def test_transcript_encodings_and_line_endings(tmp_path):
    lines = ["0011_000001\tCafé is open.\tNeutral", "0011_000351\tCafé is open.\tAngry",
             "0011_001401  Spaces instead of tabs.  Surprise"]
    for i, (encoding, eol) in enumerate([("utf-8-sig", "\r\n"), ("utf-16", "\n"), ("latin-1", "\r\n")]):
        path = tmp_path / f"t{i}.txt"
        path.write_bytes(eol.join(lines).encode(encoding))
        parsed = parse_esd_transcript(path)
        assert parsed["0011_000001"] == ("Café is open.", "neutral")
        assert parsed["0011_001401"] == ("Spaces instead of tabs.", "surprise")


def test_bad_transcript_lines_are_reported_by_number(tmp_path):
    path = tmp_path / "0011.txt"
    path.write_text("0011_000001\tFine.\tNeutral\n\n0011_000002\tNo emotion here\n0011_000003\tWrong.\tHappy\n")
    with pytest.raises(EsnError) as err:
        parse_esd_transcript(path)
    msg = str(err.value)
    assert str(path) in msg and "2 bad line(s)" in msg
    assert "line 3:" in msg and "missing emotion" in msg
    assert "line 4:" in msg and "expected neutral" in msg


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(EsnError, match="ESD root not found"):
        ESDDataset(tmp_path / "nope")
    write_esd(tmp_path, speakers=[11], indices=[1], emotions=["neutral"])
    (tmp_path / "0011" / "0011.txt").unlink()
    splits = {"identification": [SplitRule(speakers=["0011"], first=1, last=1)]}
    with pytest.raises(EsnError, match=r"transcript file not found: .*0011\.txt"):
        ESDDataset(tmp_path, splits).sources("identification")
    splits = {"identification": [SplitRule(speakers=["0012"], first=1, last=1)]}
    with pytest.raises(EsnError, match=r"speaker folder not found: .*0012"):
        ESDDataset(tmp_path, splits).sources("identification")


def test_overlapping_splits_are_refused(tmp_path):
    write_esd(tmp_path, speakers=[11], indices=[1], emotions=["neutral"])
    splits = {"a": [SplitRule(speakers=["0011"], first=1, last=5)], "b": [SplitRule(speakers=["0011"], first=5, last=9)]}
    with pytest.raises(EsnError, match="both contain speaker 0011 index 5"):
        ESDDataset(tmp_path, splits)


def test_csv_dataset(tmp_path):
    write_esd(tmp_path / "wav", speakers=[11], indices=[1, 2], emotions=["neutral"])
    folder = "wav/0011/Neutral"
    (tmp_path / "metadata.csv").write_text(
        "path,transcript,speaker,split\n"
        f"{folder}/0011_000001.wav,Hello there.,a,identification\n"
        f"{folder}/0011_000002.wav,General Kenobi.,b,test_seen\n"
    )
    ds = CSVDataset(tmp_path)
    assert ds.splits == ["identification", "test_seen"]
    [src] = ds.sources("test_seen")
    assert src.id == "0011_000002" and src.transcript == "General Kenobi." and src.path.is_file()
    (tmp_path / "bad.csv").write_text(f"path,transcript,speaker,split\n{folder}/missing.wav,x,a,test_seen\n")
    with pytest.raises(EsnError, match=r"bad\.csv line 2: audio file not found"):
        CSVDataset(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("path,speaker\n")
    with pytest.raises(EsnError, match="missing column"):
        CSVDataset(tmp_path / "cols.csv")
