"""`esn human import` counts each rater's answer once (issue #26, item 3): every row names its rater, a file
given twice, a copy of a file, or a rater answering a trial twice is refused; raters and their answer
counts are reported; a kit that issued codes admits only their raters. Kits and responses are written by
hand in the layout `esn human export` leaves (key and codes in the private folder beside the kit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from esn.cli import main
from esn.errors import EsnError
from esn.pipeline import human
from esn.pipeline.config import parse_config
from esn.pipeline.listening import issue_codes, private_dir, read_codes
from esn.pipeline.run import Run

TARGETS = ["happy", "sad"]


@pytest.fixture
def study(tmp_path: Path):
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 1, "model": {"source": "ckpt"},
           "data": {"root": str(tmp_path / "esd")}, "judges": {"emotion": [{"name": "emotion2vec"}]},
           "record": {"targets": TARGETS}, "anchor": {"rate": 0.25, "c": 3}, "sweep": {"selectors": ["cas"]}}
    run = Run(parse_config(cfg, base=tmp_path))
    kit = tmp_path / "ab-kit"
    kit.mkdir()
    (kit / "trials.csv").write_text("trial,emotion,clip_a,clip_b,question\n")  # what raters get; unread here
    private_dir(kit).mkdir()
    # trials 1, 3: A is the intervened clip; 2, 4: B is
    rows = [f"{t},{TARGETS[t % 2]},{'intervened' if t % 2 else 'baseline'},{'baseline' if t % 2 else 'intervened'}"
            for t in range(1, 5)]
    (private_dir(kit) / "key.csv").write_text("trial,emotion,a,b\n" + "\n".join(rows) + "\n")
    labels = tmp_path / "labels-kit"
    labels.mkdir()
    private_dir(labels).mkdir()
    (private_dir(labels) / "key.csv").write_text("clip,id,target\n1,s1|happy,happy\n2,s2|sad,sad\n")
    return run, kit, labels, tmp_path


def write(path: Path, *rows: str, header: str = "rater,trial,choice") -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_answers_per_rater_are_counted_and_reported(study):
    run, kit, _, root = study
    one = write(root / "r1.csv", "r1,1,A", "r1,2,B", "r1,3,tie")
    two = write(root / "r2.csv", "r2,1,B", "r2,4,b")
    result = human.import_ab(run, kit, [one, two])
    assert result["raters"] == {"r1": 3, "r2": 2}
    assert result["counts"]["average"] == {"win": 3, "tie": 1, "loss": 1, "n": 5}
    assert json.loads((run.dir / "human" / "results.json").read_text())["raters"] == {"r1": 3, "r2": 2}


def test_the_same_file_twice_is_refused(study):
    run, kit, _, root = study
    one = write(root / "r1.csv", "r1,1,A", "r1,2,B")
    with pytest.raises(EsnError, match=r"r1\.csv is given twice"):
        human.import_ab(run, kit, [one, one])
    with pytest.raises(EsnError, match=r"r1\.csv is given twice"):
        human.import_ab(run, kit, [one, root / "." / "r1.csv"])
    copy = shutil.copy(one, root / "copy.csv")
    with pytest.raises(EsnError, match=r"copy.csv and .*r1.csv hold the same responses"):
        human.import_ab(run, kit, [one, copy])
    assert not (run.dir / "human" / "results.json").exists()  # nothing written from a refused import


def test_a_rater_answering_a_trial_twice_is_refused(study):
    run, kit, _, root = study
    # the audit's case: one file with 500 copies of an answer
    many = write(root / "many.csv", "r1,2,B", *["r1,1,A"] * 500)
    with pytest.raises(EsnError, match=r"many.csv line 4: rater 'r1' answers trial '1' again \(first at .*many.csv "
                                       r"line 3\)"):
        human.import_ab(run, kit, [many])
    # the same rater's answers split over two files (a partial and a complete download)
    first = write(root / "a.csv", "r1,1,A")
    second = write(root / "b.csv", "r1,1,A", "r1,2,B")
    with pytest.raises(EsnError, match=r"b.csv line 2: rater 'r1' answers trial '1' again"):
        human.import_ab(run, kit, [first, second])
    # ... while two raters answering the same trial is what a study is made of
    other = write(root / "c.csv", "r2,1,A", "r2,2,B")
    assert human.import_ab(run, kit, [first, other])["raters"] == {"r1": 1, "r2": 2}


def test_every_row_names_its_rater(study):
    run, kit, _, root = study
    with pytest.raises(EsnError, match="line 3: no rater id"):
        human.import_ab(run, kit, [write(root / "x.csv", "r1,1,A", " ,2,B")])
    with pytest.raises(EsnError, match="missing column"):
        human.import_ab(run, kit, [write(root / "y.csv", "1,A", header="trial,choice")])


def test_a_kit_with_codes_counts_only_their_raters(study):
    run, kit, _, root = study
    codes = {rater: code for code, rater in read_codes(issue_codes(kit, 2)).items()}
    assert sorted(codes) == ["r01", "r02"]
    with pytest.raises(EsnError, match=r"rater 'mallory' has no code in .*ab-kit-private/codes.csv"):
        human.import_ab(run, kit, [write(root / "m.csv", "r01,1,A", "mallory,2,B")])
    assert human.import_ab(run, kit, [write(root / "ok.csv", "r01,1,A", "r02,2,B")])["raters"] == {"r01": 1, "r02": 1}


def test_labels_import_refuses_repeats_too(study):
    run, _, labels, root = study
    header = "rater,clip,label"
    with pytest.raises(EsnError, match="rater 'r1' answers clip '1' again"):
        human.import_labels(run, labels, [write(root / "l.csv", "r1,1,happy", "r1,1,happy", header=header)])
    path, raters = human.import_labels(run, labels, [write(root / "l1.csv", "r1,1,happy", "r1,2,sad", header=header),
                                                     write(root / "l2.csv", "r2,1,happy", header=header)])
    assert raters == {"r1": 2, "r2": 1} and path.read_text() == "id,label\ns1|happy,happy\ns2|sad,sad\n"


def test_cli_prints_raters_and_refuses_repeats(study, capsys):
    run, kit, _, root = study
    (root / "study.toml").write_text(
        f'run_dir = "{run.dir}"\nseed = 1\n[model]\nsource = "ckpt"\n[data]\nroot = "{root / "esd"}"\n'
        '[[judges.emotion]]\nname = "emotion2vec"\n[record]\ntargets = ["happy", "sad"]\n'
        '[anchor]\nrate = 0.25\nc = 3\n[sweep]\nselectors = ["cas"]\n')
    one = write(root / "r1.csv", "r1,1,A", "r1,2,B")
    two = write(root / "r2.csv", "r2,1,A")
    args = ["human", "import", str(root / "study.toml"), "--kit", str(kit)]
    assert main([*args, str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "2 raters, 3 answers (answers per rater: r1 2, r2 1)" in " ".join(out.split())
    assert main([*args, str(one), str(one)]) != 0
    assert "given twice" in capsys.readouterr().err


def test_an_edited_results_file_is_refused_not_reported(study):
    """human/results.json is sealed like every other output a later stage reads: a hand-edited win rate is
    refused by the report's reader, with what to do about it."""
    run, kit, _, root = study
    result = human.import_ab(run, kit, [write(root / "r1.csv", "r1,1,A", "r1,2,B", "r1,3,tie")])
    assert human.responses_summary(run)["rates"] == result["rates"]
    path = run.dir / "human" / "results.json"
    edited = json.loads(path.read_text())
    edited["rates"]["average"]["win"] = 1.0
    path.write_text(json.dumps(edited))
    with pytest.raises(EsnError, match=r"results.json is damaged or was edited.*esn human import"):
        human.responses_summary(run)
