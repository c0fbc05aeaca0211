"""Regression tests of issue #13, one group per numbered defect (1 lives in plugins/emotion2vec/tests/
test_no_code_from_folders.py). No model is loaded here: run directories, stores and masks are real,
written through esn's own code; records stand in for what a record stage writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from esn.cli import main
from esn.errors import EsnError
from esn.files import atomic_write_bytes
from esn.hookpoints import HookPoint, Layout
from esn.pipeline.config import parse_config
from esn.pipeline.run import Run
from esn.pipeline.rundir import RunDir
from esn.store import AttemptRecord, AttemptStore
from hypothesis import given, settings
from hypothesis import strategies as st

LAYOUT = Layout([HookPoint("lm", 0, 8, "m.0"), HookPoint("lm", 1, 8, "m.1")])
TARGETS = ["happy", "sad"]


def config(tmp_path: Path, **sections) -> dict:
    data = {"run_dir": str(tmp_path / "run"), "seed": 1, "model": {"source": "ckpt"},
            "data": {"root": str(tmp_path / "esd")}, "judges": {"emotion": [{"name": "emotion2vec"}]},
            "record": {"targets": TARGETS}, "filter": {"require_match": True, "tau_wer": 0.5},
            "anchor": {"rate": 0.25, "c": 3}, "sweep": {"selectors": ["cas", "random"]}}
    for name, section in sections.items():
        data[name] = {**data.get(name, {}), **section} if isinstance(section, dict) else section
    return data


def make_run(tmp_path: Path, **sections) -> Run:
    return Run(parse_config(config(tmp_path, **sections), base=tmp_path))


def fill_record(run: Run, n: int = 4, seed: int = 0) -> AttemptStore:
    """A record store as the record stage leaves it: every source to every target, judged."""
    store = AttemptStore(run.rundir.record, LAYOUT, architecture="tiny")
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        for t in TARGETS:
            label = t if (i + TARGETS.index(t)) % 3 else "neutral"
            recs.append(AttemptRecord(f"s{i}|{t}", t, f"words {i}", f"words {i}",
                                      {"label": label, "labels": {"emotion2vec": label}}))
    tokens = rng.integers(5, 20, size=(len(recs), 2))
    counts = (rng.random((len(recs), 16)) * np.repeat(tokens, 8, axis=1)).astype(np.int64)
    store.append(recs, counts, tokens, worker="b000000")
    return store


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 2. esn writes only into its own run directories and deletes only its own temp files --------------
def test_a_foreign_folder_is_refused_and_left_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / ".draft.wav").write_bytes(b"RIFF")
    before = sorted(p.name for p in mine.iterdir())
    run = make_run(tmp_path, run_dir=str(mine))
    with pytest.raises(EsnError, match=r"not an esn run directory \(no manifest.json\) and not empty"):
        run.open()
    assert sorted(p.name for p in mine.iterdir()) == before  # no manifest, no lock files, nothing deleted


def test_reopening_deletes_only_esn_temp_files_in_its_layout(tmp_path):
    from esn.pipeline.convert import audio_name

    run = make_run(tmp_path)
    with run:
        fill_record(run)
    d = run.dir
    keep = [d / ".notes.wav", d / ".scratch.tmp", d / "record" / "audio" / ".take1.wav",
            d / "record" / "shards" / ".b000000-000000.json.tmp", d / "mine" / ".x.json.abcdefgh.esn-tmp",
            d / "record" / audio_name(".hidden|happy")]  # the wav of an id that starts with a dot
    gone = [d / "record" / "shards" / ".b000001-000000.json.k3j4h5g6.esn-tmp",
            d / "evaluate" / "audio" / ".x%7Chappy.wav.a1b2c3d4.esn-tmp"]
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"data")
    changed = make_run(tmp_path, generation={"max_new_tokens": 5})
    with pytest.raises(EsnError, match="holds record results made with a different configuration"):
        changed.open()  # a refused open, too, touches no file that is not esn's temp file
    assert [p for p in keep if not p.exists()] == [] and [p for p in gone if p.exists()] == []


def test_a_folder_holding_only_an_esn_manifest_being_written_is_still_new(tmp_path):
    # Two shards started at once: one checks the folder while the other writes its first manifest (seen in
    # CI as "not an esn run directory ... not empty (.manifest.json.<8>.esn-tmp)"); or that write was killed.
    out = tmp_path / "run"
    out.mkdir()
    (out / ".manifest.json.b8_8fnkt.esn-tmp").write_text("{")
    RunDir(out).claim()
    (out / ".notes.json.tmp").write_text("{")  # not esn's temp name: a foreign file still counts
    with pytest.raises(EsnError, match=r"not empty \(.notes.json.tmp\)"):
        RunDir(out).claim()


def test_the_demo_marks_its_folder_before_writing_inputs_into_it(tmp_path):
    out = tmp_path / "demo"
    RunDir(out).claim(mark=True)
    (out / "demo.toml").write_text("")  # inputs written next to the (future) results
    RunDir(out).claim()  # still a run directory
    assert json.loads((out / "manifest.json").read_text())["fingerprints"] == {}


# -- 3. select never keeps stale statistics or masks -------------------------------------------------
def test_select_after_a_changed_store_equals_a_fresh_select(tmp_path):
    from esn.pipeline.select import select

    a = make_run(tmp_path / "a")
    with a:
        fill_record(a)
        select(a)
        sidecar = next((a.rundir.record / "shards").glob("*.json"))
        side = json.loads(sidecar.read_text())
        for rec in side["records"][:4]:  # hand-relabelled attempts change the success sets
            rec["meta"]["label"] = rec["emotion"]
        sidecar.write_text(json.dumps(side))
        select(a)
    b = make_run(tmp_path / "b")
    with b:
        shutil.copytree(a.rundir.record, b.rundir.record)
        select(b)
    assert snapshot(a.rundir.select) == snapshot(b.rundir.select)


def test_human_labels_count_by_content_not_by_path(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\ns0|happy,happy\n")
    run = make_run(tmp_path, filter={"human_labels": str(labels)})
    with run:
        (run.rundir.select).mkdir(parents=True)
        (run.rundir.select / "summary.json").write_text("{}")  # select results exist
    labels.write_text("id,label\ns0|happy,sad\n")  # re-imported: same path, other labels
    with pytest.raises(EsnError, match=r"select results made with a different configuration .*the content of "
                                       r"filter.human_labels"):
        make_run(tmp_path, filter={"human_labels": str(labels)}).open()


def test_evaluate_refuses_batches_steered_by_masks_select_has_replaced(tmp_path):
    from esn.pipeline.evaluate import check_masks
    from esn.pipeline.select import select

    run = make_run(tmp_path, anchor={"c": 50})
    with run:
        store = fill_record(run)
        select(run)
        keys = {"cas_r0.25_c50", "random_r0.25_c50"}
        check_masks(run, keys)  # the first batch records the masks it is steered with
        check_masks(run, keys)
        # new successes whose gates fire only in layer 1: happy's most specific neurons move there
        more = [AttemptRecord(f"t{i}|happy", "happy", "w", "w", {"label": "happy"}) for i in range(20)]
        store.append(more, np.repeat([[0] * 8 + [9] * 8], 20, axis=0), np.full((20, 2), 9), worker="b000001")
        select(run)
        with pytest.raises(EsnError, match=r"evaluate/ holds conversions steered with other masks .*cas_r0.25_c50"):
            check_masks(run, keys)
        mask = run.rundir.select / "masks_cas_r0.25_c50.safetensors"
        mask.write_bytes(mask.read_bytes()[:-1] + b"\x01")
        with pytest.raises(EsnError, match="not the mask file the last finished `esn select` wrote"):
            check_masks(run, keys)


# -- 4. the config-change guard does not depend on a file users may delete ---------------------------
def test_a_deleted_manifest_does_not_switch_off_the_config_guard(tmp_path):
    run = make_run(tmp_path)
    with run:
        fill_record(run)
    (run.dir / "manifest.json").unlink()
    for cfg in (make_run(tmp_path, generation={"max_new_tokens": 5}), make_run(tmp_path)):
        with pytest.raises(EsnError, match=r"holds record results but no manifest.json, .*Restore manifest.json"):
            cfg.open()
    RunDir(run.dir).manifest.write_text(json.dumps({"config": None, "fingerprints": {}}))  # emptied by hand
    with pytest.raises(EsnError, match="has no fingerprint for them"):
        make_run(tmp_path).open()


def test_a_damaged_manifest_is_never_to_be_deleted(tmp_path):
    run = make_run(tmp_path)
    with run:
        fill_record(run)
    for damage in (b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"):
        (run.dir / "manifest.json").write_bytes(damage)
        with pytest.raises(EsnError) as info:
            make_run(tmp_path).open()
        assert "manifest.json" in str(info.value) and "restore it" in str(info.value)
        assert "delete" not in str(info.value)


# -- 5. the whole config is checked before the first stage -------------------------------------------
@pytest.fixture
def study(tmp_path):
    pytest.importorskip("esn_emotion2vec")
    from esn.pipeline.synthetic import write_esd

    write_esd(tmp_path / "esd", speakers=[11, 19], indices=[1, 2, 251], emotions=["neutral"], seconds=0.1)
    return tmp_path


SPLITS = {"splits": {"identification": [{"speakers": ["0011"], "first": 1, "last": 2}],
                     "test_seen": [{"speakers": ["0011"], "first": 251, "last": 251}],
                     "test_unseen": [{"speakers": ["0019"], "first": 1, "last": 2}]}}


@pytest.mark.parametrize(("sections", "words"), [
    ({"judges": {"emotion": [{"name": "emotion2vec", "options": {"mapping": "top3"}}]}},
     r"judges.emotion\[0\].options: .*mapping 'top3' is unknown"),
    ({"judges": {"emotion": [{"name": "emotion2vec", "options": {"colour": 1}}]}},
     r"judges.emotion\[0\].options: .*unknown option\(s\) colour"),
    ({"judges": {"emotion": [{"name": "emotion2vec"}, {"name": "sentiment9000"}]}},
     r"judges.emotion\[1\].name: unknown judge 'sentiment9000'"),
    ({"judges": {"emotion": [{"name": "emotion2vec"}], "quality": {"name": "emotion2vec"}}},
     r"judges.quality: judge 'emotion2vec' judges emotion"),
    ({"evaluate": {"splits": ["test_seen", "test_unsene"]}}, r"evaluate.splits\[1\]: unknown split 'test_unsene'"),
    ({"record": {"split": "train"}}, r"record.split: unknown split 'train'"),
    ({"model": {"adapter": "qwen_omnii"}}, r"model.adapter: unknown adapter 'qwen_omnii'"),
    ({"model": {"device": "cuda:7"}}, r"model.device: device 'cuda:7': .*(sees no CUDA device|only \d+ CUDA device)"),
    ({"filter": {"human_labels": "missing.csv"}}, r"filter.human_labels: .*missing.csv: label file not found"),
])
def test_preflight_names_the_field(study, sections, words):
    from esn.pipeline import preflight

    run = make_run(study, data=SPLITS, **sections)
    with pytest.raises(EsnError, match=words):
        preflight.check(run)


def test_preflight_passes_a_good_config(study):
    from esn.pipeline import preflight

    preflight.check(make_run(study, data=SPLITS))


def test_select_and_report_need_no_model_judge_or_device(study):
    """A stage command checks what its stages use: select and report run where the GPU run's model is not."""
    from esn.pipeline import preflight

    run = make_run(study, data=SPLITS, model={"device": "cuda:7"}, judges={"emotion": [{"name": "sentiment9000"}]})
    preflight.check(run, ["select", "report"])
    with pytest.raises(EsnError, match=r"judges\.emotion\[0\]\.name: unknown judge"):
        preflight.check(run, ["evaluate"])


def test_selector_names_come_from_the_registry(tmp_path):
    with pytest.raises(EsnError, match=r"sweep.selectors: unknown selector 'lapee'"):
        parse_config(config(tmp_path, sweep={"selectors": ["cas", "lapee"]}))
    with pytest.raises(EsnError, match=r"anchor.selector: unknown selector 'kas'"):
        parse_config(config(tmp_path, anchor={"selector": "kas"}))


def test_esn_run_stops_on_a_bad_split_before_recording(study, capsys):
    cfg = study / "study.json"
    cfg.write_text(json.dumps(config(study, data=SPLITS, evaluate={"splits": ["test_seen", "dev"]})))
    assert main(["run", str(cfg)]) == 1  # the config is wrong, not the command line
    err = capsys.readouterr().err
    assert "evaluate.splits[1]: unknown split 'dev'" in err and "Traceback" not in err
    assert not (study / "run" / "record").exists()  # not one attempt was generated first


# -- 6. ids -> file names: injective, reversible, never hidden, checked up front ---------------------
@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=2, max_size=6, unique=True))
def test_id_to_name_is_injective_reversible_and_safe(ids):
    from esn.files import id_to_name, is_temp, name_to_id

    names = [id_to_name(i, ".wav") for i in ids]
    assert len({n.casefold() for n in names}) == len(ids)  # distinct even on case-insensitive filesystems
    for i, n in zip(ids, names, strict=True):
        assert name_to_id(n, ".wav") == i
        assert "/" not in n and not n.startswith(".") and not is_temp(n) and n.isascii()


def test_ids_that_used_to_collide_or_vanish(tmp_path):
    from esn.pipeline.convert import audio_name

    assert audio_name("s/1|happy") != audio_name("s_1|happy")
    assert audio_name("Spk|happy").casefold() != audio_name("spk|happy").casefold()
    with pytest.raises(EsnError, match="too long for a file name"):
        audio_name("x" * 300 + "|happy")  # an OSError after generating, before #13


def test_a_line_break_in_an_id_is_refused_not_dropped(tmp_path):
    from esn.pipeline.data import CSVDataset
    from esn.pipeline.synthetic import write_esd

    write_esd(tmp_path / "esd", speakers=[11], indices=[1], emotions=["neutral"], seconds=0.1)
    wav = next((tmp_path / "esd").rglob("*.wav"))
    (tmp_path / "c.csv").write_text(f'path,transcript,speaker,split,id\n{wav},"two\nlines",s,x,"ab\ncd"\n')
    with pytest.raises(EsnError, match=r"c.csv line 2: id 'ab\\ncd' contains the control character"):
        CSVDataset(tmp_path / "c.csv")
    (tmp_path / "ok.csv").write_text(f'path,transcript,speaker,split,id\n{wav},"two\nlines",s,x,s/1\n')
    (src,) = CSVDataset(tmp_path / "ok.csv").sources("x")
    assert (src.id, src.transcript) == ("s/1", "two\nlines")


def test_an_overlong_id_stops_the_run_before_it_starts(study):
    from esn.pipeline import preflight

    wav = next((study / "esd").rglob("*.wav"))
    rows = [f"{wav},hi,s,identification,{'x' * 300}", f"{wav},hi,s,test_seen,short"]
    (study / "c.csv").write_text("path,transcript,speaker,split,id\n" + "\n".join(rows) + "\n")
    run = make_run(study, data={"kind": "csv", "root": str(study / "c.csv")}, record={"save_audio": True},
                   evaluate={"splits": ["test_seen"]})
    with pytest.raises(EsnError, match="too long for a file name"):
        preflight.check(run)


# -- 7. messages are printed as plain text -----------------------------------------------------------
def test_errors_with_brackets_print_as_written(tmp_path, capsys):
    weird = tmp_path / "a[/]b" / "[bold]x[/bold].toml"
    assert main(["run", str(weird)]) == 1
    err = capsys.readouterr().err
    assert f"config file not found: {weird}" in err and err.count("\n") == 1


def test_warnings_with_brackets_print_as_written(tmp_path, capsys):
    from esn.cli import _show_warning

    _show_warning(UserWarning("shard [b000001] [/] skipped"), UserWarning, "f", 1)
    assert "warning: shard [b000001] [/] skipped" in capsys.readouterr().err


# -- 8. one line instead of a traceback --------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad_json = tmp_path / "latin1.json"
    bad_json.write_bytes('{"notes": "caf\xe9"}'.encode("latin-1"))
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    device = tmp_path / "device.json"
    device.write_text(json.dumps(config(tmp_path, model={"device": "gpu 0"})))
    cases = [([str(bad_json)], "a config must be UTF-8 text"), ([str(folder)], "is a folder, not a file"),
             ([str(device)], "model.device: 'gpu 0' is not a torch device name")]
    for args, words in cases:
        assert main(["run", *args]) == 1  # bad configs: runtime failures (exit 1)
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(device), "--threads", "-2"])
    assert exit_info.value.code == 2
    assert "--threads: -2 is not >= 1" in capsys.readouterr().err


def test_a_folder_where_esn_expects_a_file(tmp_path):
    run = make_run(tmp_path)
    with run:
        pass
    (run.dir / "manifest.json").unlink()
    (run.dir / "manifest.json").mkdir()
    with pytest.raises(EsnError, match=r"cannot read .*manifest.json: it is a folder, not a file"):
        make_run(tmp_path).open()
    with pytest.raises(EsnError, match=r"cannot write .*: it is a folder, not a file"):
        atomic_write_bytes(run.dir / "manifest.json", b"{}")


def _in_tiny_filesystem(tmp_path: Path, script: str, *, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``script`` with a 64 KiB tmpfs at ``tmp_path/mnt`` (read-only if asked), in a private mount
    namespace. Skips where mount namespaces are not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    remount = f" && mount -o remount,ro {mnt}" if read_only else ""
    shell = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && mkdir {mnt}/run{remount} && "
             f"exec {sys.executable} -c \"$0\"")
    flags = "-m" if os.geteuid() == 0 else "-rm"
    probe = subprocess.run(["unshare", flags, "sh", "-c", f"mount -t tmpfs tmpfs {mnt}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not available here: {probe.stderr.decode().strip()}")
    return subprocess.run(["unshare", flags, "sh", "-c", shell, script], capture_output=True, text=True, timeout=120)


PROBE = textwrap.dedent("""
    import sys
    from esn.errors import EsnError
    from esn.files import atomic_write_bytes
    from esn.pipeline.rundir import RunDir
    root = {mnt!r}
    try:
        {action}
        print("no error")
    except EsnError as exc:
        print("EsnError:", exc)
""")


@pytest.mark.parametrize(("read_only", "action", "words"), [
    (False, "atomic_write_bytes(root + '/run/big.bin', bytes(200_000))", "no space left on the device: free some"),
    (False, "open(root + '/fill', 'wb').write(bytes(63_000)); "
            "RunDir(root + '/run').open({'seed': 0}, {'record': 1, 'select': 2, 'evaluate': 3})",
     "cannot write .*manifest.json: no space left on the device"),
    (True, "RunDir(root + '/run').open({'seed': 0}, {'record': 1, 'select': 2, 'evaluate': 3})",
     "cannot open run directory .*read-only file system"),
])
def test_a_full_or_read_only_disk_is_one_clear_error(tmp_path, read_only, action, words):
    import re

    out = _in_tiny_filesystem(tmp_path, PROBE.format(mnt=str(tmp_path / "mnt"), action=action), read_only=read_only)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(words, out.stdout), out.stdout
    assert "Traceback" not in out.stderr


# -- 9. --workers runs the installed esn, not one in the current folder -----------------------------
def test_workers_never_import_an_esn_package_from_the_working_directory(tmp_path, monkeypatch):
    import argparse

    from esn.cli.pipeline_cmd import run_workers

    marker = tmp_path / "impostor-ran"
    (tmp_path / "esn").mkdir()
    (tmp_path / "esn" / "__init__.py").write_text("")
    (tmp_path / "esn" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')")
    monkeypatch.chdir(tmp_path)  # where `python -m esn` would look first
    args = argparse.Namespace(config=tmp_path / "missing.toml", threads=None, ranks_per_gpu=1, max_restarts=None,
                              all_ranks=False, resize=False, positions=None)
    with pytest.raises(EsnError, match="the 1 workers failed"):  # the real esn under torchrun: no such config
        run_workers(args, ["record"], tmp_path / "run", 1, None)
    assert not marker.exists()


# -- 10. permissions, checksums, the lock, fsync, strict booleans ------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_wav_csv_and_png_writes_are_fsynced(tmp_path, monkeypatch):
    from esn.filtering import filter_attempts
    from esn.pipeline import plots
    from esn.pipeline.files import atomic_write_wav

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write_wav(tmp_path / "a.wav", np.zeros(160, np.float32), 16000)
    recs = [AttemptRecord("a|happy", "happy", "hi", "hi")]
    filter_attempts(recs, {"a|happy": "happy"}, cap=1, seed=0).write_csv(tmp_path / "v.csv")
    plots.win_tie_loss({"happy": {"win": 0.5, "tie": 0.25, "loss": 0.25}}, tmp_path / "w.png", title="t")
    assert len(synced) >= 3  # each file, and its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "v.csv", "w.png"]  # no temp file left


def test_a_damaged_or_missing_wav_is_caught_when_read_back(tmp_path):
    from esn.files import sha256_file
    from esn.pipeline.files import atomic_write_wav
    from esn.pipeline.human import _clip

    src = tmp_path / "a.wav"
    digest = atomic_write_wav(src, np.linspace(-0.5, 0.5, 1600, dtype=np.float32), 16000)
    assert digest == sha256_file(src)
    _clip(src, tmp_path / "kit" / "c.wav", digest, "redo it")
    src.write_bytes(src.read_bytes()[:-2] + b"\x7f\x7f")
    with pytest.raises(EsnError, match=r"a.wav is damaged or was replaced .*; redo it"):
        _clip(src, tmp_path / "kit" / "c.wav", digest, "redo it")


def test_a_damaged_evaluation_batch_is_done_again_not_fatal(tmp_path):
    from esn.files import sha256
    from esn.pipeline.evaluate import finished, write_batch
    from esn.pipeline.grid import EvalAttempt

    batch = [EvalAttempt("test_seen", "baseline", None, "s0", "happy")]
    path = tmp_path / "batches" / "000000.json"
    path.parent.mkdir()
    write_batch(path, [{"id": batch[0].id, "audio": "audio/x.wav", "audio_sha256": sha256(b"RIFF")}])
    assert not finished(tmp_path, path, batch)  # its wav is gone: the batch is converted again
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "x.wav").write_bytes(b"RIFF")
    assert finished(tmp_path, path, batch)
    path.write_bytes(b'[{"id": "test_seen|basel')  # cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not finished(tmp_path, path, batch)
    assert "is damaged and will be computed again" in str(caught[0].message)


def test_the_run_lock_is_held_for_the_whole_command(study, monkeypatch):
    from esn.pipeline import stages

    seen = []

    def probe(run):  # each stage: the same lock, and no other process gets in
        seen.append(run.rundir._lock)
        with pytest.raises(EsnError, match="another esn process is using run directory"):
            make_run(study, data=SPLITS).open()

    monkeypatch.setattr(stages, "RUNNERS", dict.fromkeys(stages.STAGES, probe))  # no model: the stages' frame only
    cfg = study / "study.json"
    cfg.write_text(json.dumps(config(study, data=SPLITS)))
    assert main(["run", str(cfg)]) == 0
    assert len(seen) == 4 and seen[0] is not None and all(lock is seen[0] for lock in seen)
    make_run(study, data=SPLITS).open().close()  # released at the end


@pytest.mark.parametrize("field", [("filter", "require_match"), ("record", "save_audio"), ("evaluate", "save_audio"),
                                   ("model", "trust_remote_code")])
def test_booleans_must_be_booleans(tmp_path, field):
    section, key = field
    for word in ("yes", "true", 1, "on"):
        with pytest.raises(EsnError, match=rf"{section}.{key}: Input should be a valid boolean"):
            parse_config(config(tmp_path, **{section: {key: word}}))
    assert getattr(getattr(parse_config(config(tmp_path, **{section: {key: True}})), section), key) is True
