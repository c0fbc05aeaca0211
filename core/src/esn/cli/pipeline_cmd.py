"""``esn init | run | record | select | evaluate | report | judge-eval | demo | human``: the study end to end."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from rich.text import Text

from esn.cli import ui
from esn.cli.argtypes import positive_int
from esn.cli.ui import console


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="run configuration (.toml, .json, or .yaml with PyYAML)")
    p.add_argument("--run-dir", type=Path, help="override the config's run_dir")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads for this process (default: torch's choice)")


def _parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", metavar="K/N",
                   help="record/evaluate only the batches k with k %% N == K; run K = 0..N-1 at once, on one GPU "
                        "or several (CUDA_VISIBLE_DEVICES), to share the work; they write what one process would")
    p.add_argument("--workers", type=int, metavar="N",
                   help="run the record and evaluate stages as N processes (--shard 0/N .. N-1/N) and wait for them")
    p.add_argument("--devices", metavar="LIST",
                   help="with --workers: comma-separated CUDA devices the workers take in turn, e.g. 0,1 "
                        "(worker k sees only device k mod len(LIST) through CUDA_VISIBLE_DEVICES)")


def _positions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positions", choices=("all", "generated"),
                   help="override record.positions: count P over all positions or the generated ones only (both "
                        "are recorded, so select can switch without recording again)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``init``, ``run``, the four stage commands, ``judge-eval``, ``demo`` and ``human export|import``."""
    init = sub.add_parser("init", help="write a run configuration to start from (--paper: the paper's full protocol)")
    init.add_argument("out", type=Path, help="the config file to write, e.g. study.toml")
    init.add_argument("--paper", action="store_true",
                      help="every value of the paper's protocol and sweeps (docs/paper.md); default: a minimal config")
    init.add_argument("--adapter", help="model adapter (default: qwen_omni)")
    init.add_argument("--source", help="checkpoint directory or hub id")
    init.add_argument("--data-root", help="ESD root folder")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)

    run = sub.add_parser("run", help="record, select, evaluate and report, resumable, into one run directory")
    _common(run)
    _parallel(run)
    _positions(run)
    run.add_argument("--stages", default="record,select,evaluate,report",
                     help="comma-separated subset of record,select,evaluate,report (in that order)")
    run.set_defaults(func=cmd_run)
    for stage, text in (("record", "stage 1: convert identification speech and record gate statistics"),
                        ("select", "stage 2: filter successes, aggregate statistics, select neuron masks"),
                        ("evaluate", "stage 3: the evaluation grid (baseline and every mask x target cell)")):
        p = sub.add_parser(stage, help=text)
        _common(p)
        _parallel(p)  # select refuses them with a clear message
        _positions(p)
        p.set_defaults(func=cmd_run, stages=stage)
    report = sub.add_parser("report", help="stage 4: report.md, report.html and figures; --compare: several models")
    report.add_argument("config", type=Path, nargs="?", help="run configuration (not with --compare)")
    report.add_argument("--run-dir", type=Path, help="override the config's run_dir")
    report.add_argument("--threads", type=positive_int, help="torch CPU threads for this process (default: torch's choice)")
    _parallel(report)  # refused with a clear message, as for select (it runs as one process)
    _positions(report)
    report.add_argument("--compare", type=Path, nargs="+", metavar="RUN",
                        help="run directories (or their configs) of finished runs: Tables 2 and 3 side by side")
    report.add_argument("--names", help="with --compare: comma-separated column names, one per RUN")
    report.add_argument("--out", type=Path, default=Path("compare.md"),
                        help="with --compare: the Markdown file to write (HTML next to it)")
    report.set_defaults(func=cmd_report, stages="report")

    jev = sub.add_parser("judge-eval", help="each emotion judge's accuracy on labelled ESD clips (paper section 4.1)")
    _common(jev)
    jev.add_argument("--split", default="development", help="ESD split the clips come from (default: development)")
    jev.add_argument("--per-emotion", type=positive_int, default=100, help="clips per emotion (default: 100, as in the paper)")
    jev.add_argument("--judge", action="append", help="only this emotion judge of the config (repeatable)")
    jev.set_defaults(func=cmd_judge_eval)

    demo = sub.add_parser("demo", help="the whole study on CPU, on a model with planted emotion neurons and a judge "
                                       "that hears them: prints how many the selectors recover")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (report.md lands here)")
    # Tiny models are launch-bound: one thread is fastest, and immune to oversubscription on busy machines.
    demo.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: 1)")
    demo.set_defaults(func=cmd_demo)

    human = sub.add_parser("human", help="human listening study: export a blind kit, import responses")
    hsub = human.add_subparsers(dest="human_command", metavar="ACTION", required=True)
    exp = hsub.add_parser("export", help="write randomised, loudness-normalised clips and a blind key")
    _common(exp)
    exp.add_argument("--kind", choices=("ab", "labels"), default="ab",
                     help="ab: intervened vs baseline pairs (Figure 8); labels: recorded attempts to label (CAS-H)")
    exp.add_argument("--per-emotion", type=positive_int, default=None,
                     help="trials per target emotion (default: 25 A/B pairs as in the paper; for labels, 2 c clips "
                          "drawn from the WER-passing attempts)")
    exp.add_argument("--out", type=Path, help="kit folder (default: <run_dir>/human/<kind>-kit)")
    exp.set_defaults(func=cmd_human_export)
    imp = hsub.add_parser("import", help="read raters' responses: win/tie/loss (ab) or human labels (labels)")
    _common(imp)
    imp.add_argument("responses", type=Path, nargs="+", help="response CSV file(s)")
    imp.add_argument("--kind", choices=("ab", "labels"), default="ab")
    imp.add_argument("--kit", type=Path, help="kit folder (default: <run_dir>/human/<kind>-kit)")
    imp.set_defaults(func=cmd_human_import)
    srv = hsub.add_parser("serve", help="serve a kit's listening page; store answers on the server, one file per rater")
    srv.add_argument("path", type=Path, help="kit folder, or run directory (serves <run_dir>/human/<kind>-kit)")
    srv.add_argument("--kind", choices=("ab", "labels"), default="ab", help="which kit of a run directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for raters on the LAN)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    srv.set_defaults(func=_human_serve)


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_run(args: argparse.Namespace) -> int:
    """``esn run`` and ``esn record|select|evaluate|report``: check the stage and parallelism flags, then run the stages."""
    from esn.errors import EsnError
    from esn.pipeline import preflight
    from esn.pipeline.parallel import SHARDED_STAGES, parse_shard
    from esn.pipeline.run import load_run
    from esn.pipeline.stages import STAGES, run_stages

    _threads(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise EsnError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    stages = sorted(stages, key=STAGES.index)
    shard = None if args.shard is None else parse_shard(args.shard)
    workers = args.workers
    if workers is not None and workers < 1:
        raise EsnError(f"--workers {workers}: need at least 1 process")
    once = [s for s in stages if s not in SHARDED_STAGES]
    if shard is not None and workers is not None:
        raise EsnError("--shard and --workers exclude each other: --workers N starts the N shards itself")
    if shard is not None and once:
        raise EsnError(f"--shard {args.shard}: {', '.join(once)} cannot run as a shard (only record and evaluate "
                       "split their batches); run it once without --shard, or give --stages record or evaluate")
    devices = worker_devices(args.devices) if getattr(args, "devices", None) is not None else None
    if devices is not None and workers is None:
        raise EsnError("--devices needs --workers: it maps the workers to devices (with --shard, set "
                       "CUDA_VISIBLE_DEVICES yourself)")
    if workers is not None and len(once) == len(stages):
        raise EsnError(f"--workers {workers}: {', '.join(once)} runs as one process; only record and evaluate "
                       "take --workers")
    run = load_run(args.config, run_dir=args.run_dir, console=ui.progress_console(), shard=shard)
    if getattr(args, "positions", None):
        run.cfg.record.positions = args.positions
    preflight.check(run, stages)  # all these stages need, before the first one (not hours later)
    with run:  # the run directory stays locked for the whole command, every stage
        for stage in stages:
            label = stage + ("" if shard is None else f" (shard {shard[0]}/{shard[1]})")
            ui.progress_console().rule(Text(label, style="bold"))
            if workers is not None and workers > 1 and stage in SHARDED_STAGES:
                with run.rundir.shared():  # the workers are shards of this run: let them in, and only them
                    run_shards(stage, args, run.dir, workers, devices)
            else:
                run_stages(run, [stage])
        if shard is None and ("evaluate" in stages or "report" in stages):
            print_summary(run)
    if "report" in stages:
        console.print(Text.assemble("report: ", (str(run.dir / "report.md"), "bold")))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``esn report``: one run's report, or with ``--compare`` Tables 2 and 3 across finished runs."""
    from esn.errors import EsnError
    from esn.pipeline import compare

    if args.compare is None:
        if args.config is None:
            raise EsnError("esn report needs a run configuration, or --compare RUN RUN ...")
        return cmd_run(args)
    if args.shard is not None or args.workers is not None:
        raise EsnError("esn report --compare runs as one process: it takes no --shard or --workers")
    if args.config is not None:
        raise EsnError("esn report --compare takes run directories only: give the config's run directory to "
                       "--compare with the others")
    names = [n.strip() for n in args.names.split(",")] if args.names else [None] * len(args.compare)
    if len(names) != len(args.compare):
        raise EsnError(f"--names gives {len(names)} names for {len(args.compare)} runs")
    runs = [compare.load_run_results(root, name) for root, name in zip(args.compare, names, strict=True)]
    path = compare.write_comparison(runs, args.out)
    for block in compare.compare_blocks(runs):
        if block.kind == "table":
            ui.print_table(rich_table("", block.body))
    console.print(Text.assemble("comparison: ", (str(path), "bold"), f" (and {path.with_suffix('.html').name})"))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """``esn init``: write a minimal run config, or the paper preset with ``--paper``."""
    from esn.errors import EsnError
    from esn.pipeline.presets import write_config

    if args.out.exists() and not args.force:
        raise EsnError(f"{args.out} exists; use --force to overwrite it")
    path = write_config(args.out, paper=args.paper, adapter=args.adapter, source=args.source,
                        data_root=args.data_root)
    console.print(Text.assemble("wrote ", (str(path), "bold"), " (the paper preset)" if args.paper else "",
                                f"; check model.source and data.root, then `esn run {path}`"))
    return 0


def cmd_judge_eval(args: argparse.Namespace) -> int:
    """``esn judge-eval``: each emotion judge's accuracy on labelled ESD clips (the paper's section 4.1)."""
    from esn.pipeline.judge_eval import judge_eval
    from esn.pipeline.run import load_run

    _threads(args)
    run = load_run(args.config, run_dir=args.run_dir, console=ui.progress_console())
    with run:
        result = judge_eval(run, split=args.split, per_emotion=args.per_emotion, judges=args.judge)
    emotions = result["emotions"]
    rows = [[name, f"{100 * r['accuracy']:.1f}%", *[f"{100 * r['per_emotion'][e]:.1f}%" for e in emotions]]
            for name, r in result["judges"].items()]
    title = f"judge accuracy on {result['per_emotion']} labelled ESD clips per emotion ({result['split']})"
    ui.print_table(rich_table(title, {"head": ["judge", "accuracy", *emotions], "rows": rows}))
    console.print(Text.assemble("written to ", (str(run.dir / "judge_eval.json"), "bold"), "; `esn report` shows it"))
    return 0


def worker_devices(text: str) -> list[str]:
    """``--devices 0,1`` -> ``["0", "1"]``: device ids or UUIDs as CUDA_VISIBLE_DEVICES takes them."""
    from esn.errors import EsnError

    devices = [d.strip() for d in text.split(",")]
    if not devices or any(not d or any(c.isspace() for c in d) for d in devices):
        raise EsnError(f"--devices {text!r}: expected a comma-separated list of CUDA devices, e.g. 0,1")
    return devices


def worker_env(k: int, n: int, devices: list[str] | None, base: dict[str, str]) -> dict[str, str]:
    """The environment of worker ``k`` of ``n``: ``ESN_SHARD=k/n``, and with ``devices`` its one device."""
    env = {**base, "ESN_SHARD": f"{k}/{n}"}
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[k % len(devices)]
    return env


# The installed esn, whatever the working directory: -P keeps Python from putting the current folder first
# on sys.path, where an unrelated esn/ package would be imported instead (python -m looks there first).
ESN_COMMAND = (sys.executable, "-P", "-m", "esn")


def run_shards(stage: str, args: argparse.Namespace, run_dir: Path, n: int,
               devices: list[str] | None = None) -> None:
    """Run ``esn <stage> --shard k/n`` for k < n as child processes and wait for all of them.

    Children get ``ESN_SHARD=k/n`` in their environment and, with ``--devices``, one device each
    (``CUDA_VISIBLE_DEVICES``; several workers may share one). A failed shard fails the stage; what the
    others wrote stays (resume).
    """
    from esn.errors import EsnError

    procs: list[subprocess.Popen] = []
    try:
        for k in range(n):
            cmd = [*ESN_COMMAND, stage, str(args.config), "--run-dir", str(run_dir), "--shard", f"{k}/{n}"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if ui.level != ui.NORMAL:
                cmd.append("--quiet" if ui.level == ui.QUIET else "--verbose")
            # One progress bar on the terminal: shard 0 draws it; the others show only their errors.
            procs.append(subprocess.Popen(cmd, env=worker_env(k, n, devices, os.environ),
                                          stdout=None if k == 0 else subprocess.DEVNULL))
        codes = [p.wait() for p in procs]
    finally:  # interrupted: stop the children too (they resume like any killed run)
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    failed = [f"shard {k}/{n} " + (f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}")
              for k, rc in enumerate(codes) if rc != 0]
    if failed:
        raise EsnError(f"{stage}: {'; '.join(failed)}; the batches every shard finished are kept: run the same "
                       "command again to resume")
    console.print(f"{stage}: {n} workers done")


def print_summary(run) -> None:
    """The selector comparison of each stream (Table 3 / Table 6 shape) in the terminal."""
    from esn.pipeline.config import settings
    from esn.pipeline.files import read_json
    from esn.pipeline.report import effect_table, selector_title, sweeps

    path = run.rundir.evaluate / "results.json"
    if not path.exists():
        return
    res = read_json(path)
    judges = res["meta"]["judges"]
    group = "all" if "all" in res["groups"] else res["meta"]["splits"][0]
    sts = settings(run.cfg)
    random_rows = {st.label for st in sts if st.selector == "random"}
    for stream, rows in sweeps(sts)["selectors"].items():
        data = effect_table([(st.label, res["groups"][group][st.key]) for st in rows], judges, judges[0], random_rows)
        console.print(rich_table(f"{selector_title(stream)}: Δ emotion match vs baseline, pp ({' / '.join(judges)}) "
                                 f"— {group}", data))


def rich_table(title: str, data: dict):
    """A report table (``{"head", "rows"}``) as a rich ``Table`` for the terminal."""
    from rich.table import Table

    table = Table(title=title)
    for h in data["head"]:
        table.add_column(h, justify="right")
    for row in data["rows"]:
        table.add_row(*row)
    return table


def cmd_demo(args: argparse.Namespace) -> int:
    """``esn demo``: the whole study on planted ground truth (``esn-planted``) and synthetic ESD."""
    from esn.pipeline.demo import run_demo

    _threads(args)
    report = run_demo(args.out, console=ui.progress_console())
    console.print(Text.assemble("demo report: ", (str(report), "bold")))
    return 0


def cmd_human_export(args: argparse.Namespace) -> int:
    """``esn human export``: a blind listening kit from a finished run."""
    from esn.pipeline import human
    from esn.pipeline.run import load_run

    run = load_run(args.config, run_dir=args.run_dir, console=ui.progress_console())
    out = args.out or run.dir / "human" / f"{args.kind}-kit"
    with run:  # nothing else writes the run directory meanwhile
        if args.kind == "ab":
            n = human.export_ab(run, out, per_emotion=25 if args.per_emotion is None else args.per_emotion)
        else:
            n = human.export_labels(run, out, per_emotion=args.per_emotion)
    console.print(Text.assemble(f"wrote {n} trials to ", (str(out), "bold"), f": raters open {out / 'index.html'} "
                                f"(or `esn human serve {out}`); keep key.csv away from them"))
    return 0


def _human_serve(args: argparse.Namespace) -> int:
    from esn.cli.serve_cmd import cmd_human_serve

    return cmd_human_serve(args)


def cmd_human_import(args: argparse.Namespace) -> int:
    """``esn human import``: raters' responses back into the run (A/B rates, or labels for CAS-H)."""
    from esn.pipeline.run import load_run

    run = load_run(args.config, run_dir=args.run_dir, console=ui.progress_console())
    kit = args.kit or run.dir / "human" / f"{args.kind}-kit"
    with run:  # nothing else writes the run directory meanwhile
        return _human_import(run, kit, args)


def _human_import(run, kit: Path, args: argparse.Namespace) -> int:
    from esn.pipeline import human

    if args.kind == "ab":
        from rich.table import Table

        result = human.import_ab(run, kit, args.responses)
        table = Table(title="intervened vs baseline (listeners)")
        for col in ("emotion", "win", "tie", "loss", "n"):
            table.add_column(col, justify="right")
        for e, r in result["rates"].items():
            table.add_row(e, *[f"{100 * r[k]:.0f}%" for k in ("win", "tie", "loss")], str(result["counts"][e]["n"]))
        console.print(table)
    else:
        path = human.import_labels(run, kit, args.responses)
        console.print(Text.assemble("human labels written to ", (str(path), "bold"),
                                    "; set filter.human_labels to it for CAS-H"))
    return 0
