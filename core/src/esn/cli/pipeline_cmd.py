"""``esn init | run | record | select | evaluate | report | judge-eval | demo | human``: the study end to end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.text import Text

from esn.cli import ui
from esn.cli.argtypes import command_line, positive_int
from esn.cli.ui import console


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="run configuration (.toml, .json, or .yaml with PyYAML)")
    p.add_argument("--run-dir", type=Path, help="override the config's run_dir")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads for this process (default: torch's choice)")


def _parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (record and evaluate share their batches; see docs/pipeline.md)")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run as N processes on this machine through torch's launcher (torch.distributed.run "
                        "--standalone --nproc-per-node N): ranks claim batches, rank 0 runs select and report")
    g.add_argument("--devices", metavar="LIST",
                   help="with --workers: the CUDA devices to use, e.g. 0,1 (CUDA_VISIBLE_DEVICES); more workers "
                        "than devices share them")
    g.add_argument("--max-restarts", type=int, metavar="R",
                   help="with --workers: restart the group up to R times after a process fails; it resumes")
    g.add_argument("--ranks-per-gpu", type=int, default=1, metavar="M",
                   help="under torchrun, accelerate launch or srun: M ranks share each GPU (rank takes "
                        "cuda:LOCAL_RANK // M; default 1)")
    g.add_argument("--all-ranks", action="store_true",
                   help="under a launcher: every rank reports its batches (default: rank 0's global bar only)")
    g.add_argument("--resize", action="store_true",
                   help="finish a stage left unfinished by another number of processes (refused otherwise)")
    g.add_argument("--shard", metavar="K/N",
                   help="for job arrays without a rendezvous: record/evaluate only the batches k with k %% N == K; "
                        "run K = 0..N-1 on the same run directory; they write what one process would")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print what was written (run directory, masks, results, report) as JSON on stdout; "
                        "progress goes to stderr")


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
    _json(run)
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
        _json(p)
        p.set_defaults(func=cmd_run, stages=stage)
    report = sub.add_parser("report", help="stage 4: report.md, report.html and figures; --compare: several models")
    report.add_argument("config", type=Path, nargs="?", help="run configuration (not with --compare)")
    report.add_argument("--run-dir", type=Path, help="override the config's run_dir")
    report.add_argument("--threads", type=positive_int, help="torch CPU threads for this process (default: torch's choice)")
    _parallel(report)  # report runs on rank 0 alone: under a launcher the others wait; --workers/--shard are refused
    _positions(report)
    _json(report)
    report.add_argument("--compare", type=Path, nargs="+", metavar="RUN",
                        help="run directories (or their configs) of finished runs: Tables 2, 3, 4, 6 and Figure 9 side by side")
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
    exp.add_argument("--raters", type=positive_int, default=None, metavar="N",
                     help="issue N raters' login codes (<kit>-private/codes.csv) for `esn human serve --codes`")
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
    srv.add_argument("--codes", type=Path, metavar="FILE",
                     help="require raters' login codes from this file (<kit>-private/codes.csv, written by "
                          "`esn human export --raters N`): only they can store answers, one rater per code")
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    from esn.cli.serve_cmd import add_access_args

    add_access_args(srv, secret="--codes")
    srv.set_defaults(func=_human_serve)


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_run(args: argparse.Namespace) -> int:
    """``esn run`` and ``esn record|select|evaluate|report``: check the stage and parallelism flags, then run the stages."""
    from rich.console import Console

    from esn.errors import EsnError
    from esn.pipeline import parallel, preflight
    from esn.pipeline.run import load_run
    from esn.pipeline.stages import STAGES, run_stages

    _threads(args)
    with command_line():  # the flags alone, before the config or the run directory is read
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise EsnError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
        stages = sorted(stages, key=STAGES.index)
        shard = None if args.shard is None else parallel.parse_shard(args.shard)
        workers = args.workers
        if workers is not None and workers < 1:
            raise EsnError(f"--workers {workers}: need at least 1 process")
        once = [s for s in stages if s not in parallel.SHARDED_STAGES]
        if shard is not None and workers is not None:
            raise EsnError("--shard and --workers exclude each other: --workers N starts the N processes itself")
        if shard is not None and once:
            raise EsnError(f"--shard {args.shard}: {', '.join(once)} cannot run as a shard (only record and evaluate "
                           "split their batches); run it once without --shard, or give --stages record or evaluate")
        devices = worker_devices(args.devices) if args.devices is not None else None
        if devices is not None and workers is None:
            raise EsnError("--devices needs --workers: it gives the workers their GPUs (under torchrun or with "
                           "--shard, set CUDA_VISIBLE_DEVICES yourself)")
        if args.max_restarts is not None and (workers is None or args.max_restarts < 0):
            raise EsnError(f"--max-restarts {args.max_restarts}: needs --workers and R >= 0 (under torchrun, give "
                           "torchrun its own --max-restarts)")
        if workers is not None and len(once) == len(stages):
            raise EsnError(f"--workers {workers}: {', '.join(once)} runs as one process; only record and evaluate "
                           "take --workers")
        if args.ranks_per_gpu < 1:
            raise EsnError(f"--ranks-per-gpu {args.ranks_per_gpu}: need at least 1")
    launch = parallel.detect_launch()  # a launcher's environment that does not fit is not a usage error
    with command_line():
        parallel.check_shard_launch(shard, launch)
        if launch is not None and workers is not None:
            raise EsnError(f"--workers starts torch's launcher itself; this process already is rank {launch.rank} of "
                           f"{launch.world_size} under {launch.launcher}: drop --workers")
    positions = getattr(args, "positions", None)
    if workers is not None and workers > 1:
        run = load_run(args.config, run_dir=args.run_dir, console=ui.progress_console(), resize=args.resize)
        if positions:
            run.cfg.record.positions = positions
        preflight.check(run, stages)  # all these stages need, before N processes start
        # Check the config against the run directory once; the workers' rank 0 then holds the directory's
        # lock for the whole launch (an unsharded group opens it exclusively, so this process cannot keep it).
        with run:
            pass
        rc = run_workers(args, stages, run.dir, workers, devices)
        if args.json:
            print(json.dumps(run_summary(run, stages, None), indent=2))
        return rc

    team = parallel.team(shard=shard, launch=launch, ranks_per_gpu=args.ranks_per_gpu, talkative=args.all_ranks)
    try:
        team.same_everywhere({"stages": stages, "--resize": args.resize, "--ranks-per-gpu": args.ranks_per_gpu,
                              "--positions": positions})
        # one terminal, one voice: rank 0 prints (its progress bars count every rank's batches)
        out = ui.progress_console() if team.is_leader else Console(quiet=True)
        run = load_run(args.config, run_dir=args.run_dir, console=out, team=team, resize=args.resize)
        if positions:
            run.cfg.record.positions = positions
        preflight.check(run, stages)  # all these stages need, before the first one (not hours later)
        with run:  # the run directory stays locked for the whole command, every stage (by rank 0 in a group)
            for stage in stages:
                label = stage + ("" if shard is None else f" (shard {shard[0]}/{shard[1]})")
                out.rule(Text(label, style="bold"))
                run_stages(run, [stage])
            if shard is None and team.is_leader and ("evaluate" in stages or "report" in stages) and not args.json:
                print_summary(run)
    finally:
        team.close()
    if args.json and team.is_leader:
        print(json.dumps(run_summary(run, stages, shard), indent=2))
    elif "report" in stages and team.is_leader:
        console.print(Text.assemble("report: ", (str(run.dir / "report.md"), "bold")))
    return 0


def run_summary(run, stages: list[str], shard: tuple[int, int] | None) -> dict:
    """``--json`` of ``esn run`` and the stage commands: what the run directory now holds, paths absolute."""
    rd = run.rundir
    existing = lambda path: str(path) if path.exists() else None  # noqa: E731
    return {"run_dir": str(run.dir), "stages": stages, "shard": None if shard is None else list(shard),
            "masks": [str(p) for p in sorted(rd.select.glob("masks_*.safetensors"))],
            "results": existing(rd.evaluate / "results.json"),
            "report": existing(run.dir / "report.md"), "report_html": existing(run.dir / "report.html")}


def cmd_report(args: argparse.Namespace) -> int:
    """``esn report``: one run's report, or with ``--compare`` Tables 2, 3, 4, 6 and Figure 9 across finished runs."""
    from esn.errors import EsnError
    from esn.pipeline import compare

    with command_line():
        if args.compare is None and args.config is None:
            raise EsnError("esn report needs a run configuration, or --compare RUN RUN ...")
    if args.compare is None:
        return cmd_run(args)
    with command_line():
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
    if args.json:
        print(json.dumps({"comparison": str(path), "comparison_html": str(path.with_suffix(".html")),
                          "runs": [str(r) for r in args.compare]}, indent=2))
        return 0
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
    from esn.errors import EsnError
    from esn.pipeline.judge_eval import judge_eval
    from esn.pipeline.run import load_run

    _threads(args)
    run = load_run(args.config, run_dir=args.run_dir, console=ui.progress_console())
    configured = [j.name for j in run.cfg.judges.emotion]
    with command_line():  # --judge must name a judge of this config
        unknown = [name for name in args.judge or [] if name not in configured]
        if unknown:
            raise EsnError(f"--judge {', '.join(unknown)}: not among the config's emotion judges "
                           f"({', '.join(configured)})")
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


# The installed esn, whatever the working directory: -P keeps Python from putting the current folder first
# on sys.path, where an unrelated esn/ package would be imported instead (python -m looks there first).
ESN_COMMAND = (sys.executable, "-P", "-m", "esn")


def workers_command(args: argparse.Namespace, stages: list[str], run_dir: Path, n: int,
                    devices: list[str] | None, base_env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The torch launcher command (and its environment) that ``--workers n`` stands for."""
    ranks_per_gpu = args.ranks_per_gpu
    env = dict(base_env)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        ranks_per_gpu = max(ranks_per_gpu, -(-n // len(devices)))  # more workers than GPUs: they share
    if not args.threads and "OMP_NUM_THREADS" not in env:
        # torchrun would give every rank 1 CPU thread; the host's tokenising, feature extraction and eager
        # prefill ran up to 15% slower per GPU that way (2 x H200). Each rank gets its share of the cores.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    # --no-python: torchrun starts ESN_COMMAND as it is (its own ``python -u -m`` would drop the -P)
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           f"--max-restarts={args.max_restarts or 0}", "--no-python", *ESN_COMMAND, "run", str(args.config),
           "--run-dir", str(run_dir), "--stages", ",".join(stages)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if ranks_per_gpu != 1:
        cmd += ["--ranks-per-gpu", str(ranks_per_gpu)]
    cmd += ["--all-ranks"] * args.all_ranks + ["--resize"] * args.resize
    if getattr(args, "positions", None):
        cmd += ["--positions", args.positions]
    if ui.level != ui.NORMAL:
        cmd.append("--quiet" if ui.level == ui.QUIET else "--verbose")
    return cmd, env


def run_workers(args: argparse.Namespace, stages: list[str], run_dir: Path, n: int,
                devices: list[str] | None) -> int:
    """``--workers n``: the same command as n ranks under torch's own launcher (torch.distributed.run)."""
    from esn.errors import EsnError

    cmd, env = workers_command(args, stages, run_dir, n, devices, dict(os.environ))
    shown = " ".join(cmd[3:]).replace("torch.distributed.run", "torchrun", 1)
    say = ui.note if getattr(args, "json", False) else console.print  # --json: stdout holds the JSON alone
    say(Text.assemble(f"{n} workers: ", (shown, "bold")))
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    finally:  # interrupted: torchrun stops its workers on SIGTERM (they resume like any killed run)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if rc != 0:
        reason = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        raise EsnError(f"the {n} workers failed (torch.distributed.run {reason}); the batches they finished are "
                       "kept: run the same command again to resume")
    say(f"{', '.join(stages)}: {n} workers done")
    return 0


def print_summary(run) -> None:
    """The selector comparison of each stream (Table 3 / Table 6 shape) in the terminal."""
    from esn.pipeline import evaluate
    from esn.pipeline.config import settings
    from esn.pipeline.report import effect_table, selector_title, sweeps

    path = run.rundir.evaluate / "results.json"
    if not path.exists():
        return
    res = evaluate.results(path)
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
    from esn.pipeline.listening import private_dir
    from esn.pipeline.run import load_run

    run = load_run(args.config, run_dir=args.run_dir, console=ui.progress_console())
    out = args.out or run.dir / "human" / f"{args.kind}-kit"
    with run:  # nothing else writes the run directory meanwhile
        if args.kind == "ab":
            n = human.export_ab(run, out, per_emotion=25 if args.per_emotion is None else args.per_emotion,
                                raters=args.raters)
        else:
            n = human.export_labels(run, out, per_emotion=args.per_emotion, raters=args.raters)
    private = private_dir(out)
    serve = f"esn human serve {out}" + (f" --codes {private / 'codes.csv'}" if args.raters else "")
    console.print(Text.assemble(f"wrote {n} trials to ", (str(out), "bold"), f": raters open {out / 'index.html'} "
                                f"(or `{serve}`); ", "the key and the raters' codes are" if args.raters else "the key is",
                                f" in {private}: keep that folder away from raters"))
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


def _print_raters(raters: dict[str, int]) -> None:
    shown = ", ".join(f"{r} {n}" for r, n in raters.items())
    console.print(f"{len(raters)} rater{'s' if len(raters) != 1 else ''}, {sum(raters.values())} answers "
                  f"(answers per rater: {shown})", highlight=False)


def _human_import(run, kit: Path, args: argparse.Namespace) -> int:
    from esn.pipeline import human

    if args.kind == "ab":
        from rich.table import Table

        result = human.import_ab(run, kit, args.responses)
        _print_raters(result["raters"])
        table = Table(title="intervened vs baseline (listeners)")
        for col in ("emotion", "win", "tie", "loss", "n"):
            table.add_column(col, justify="right")
        for e, r in result["rates"].items():
            table.add_row(e, *[f"{100 * r[k]:.0f}%" for k in ("win", "tie", "loss")], str(result["counts"][e]["n"]))
        console.print(table)
    else:
        path, raters = human.import_labels(run, kit, args.responses)
        _print_raters(raters)
        console.print(Text.assemble("human labels written to ", (str(path), "bold"),
                                    "; set filter.human_labels to it for CAS-H"))
    return 0
