"""``esn demo``: the whole study on a tiny random Qwen2.5-Omni, a synthetic ESD and tiny random judges.

Everything is written under one folder: ``checkpoint/``, ``esd/``, ``judges/``, ``demo.toml``, and the
run itself (``record/``, ``select/``, ``evaluate/``, ``figures/``, ``report.md``). The numbers are
meaningless by construction; the point is that every stage runs, resumably, on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from esn.errors import EsnError
from esn.pipeline.files import atomic_write_text

SPEAKERS = range(11, 21)
INDICES = range(1, 4)

DEMO_TOML = """\
# esn demo: tiny random models, synthetic ESD. Numbers are meaningless; every stage is real.
run_dir = "."
seed = 0
notes = ""

[model]
adapter = "qwen_omni"
source = "checkpoint"
streams = ["lm"]

[generation]
max_new_tokens = 8
max_audio_tokens = 16

[data]
kind = "esd"
root = "esd"
# A miniature of the paper's Table 1: seen speakers 0011-0016, unseen 0019-0020.
splits.identification = [{{speakers = ["0011", "0012", "0013", "0014", "0015", "0016"], first = 1, last = 2}}]
splits.test_seen = [{{speakers = ["0011", "0012"], first = 3, last = 3}}]
splits.test_unseen = [{{speakers = ["0019", "0020"], first = 1, last = 1}}]

[judges]
# mapping "five": argmax over the five ESD emotions (a random head rarely wins with one of them under "all9").
emotion = [{{name = "emotion2vec", source = "judges/emotion2vec", options = {{mapping = "five"}}}}]
{quality}
# The tiny model speaks ~20 ms at ~1e-8 full scale: normalise and pad it so the judges can run at all.
loudness_dbfs = -23.0
min_seconds = 0.5

[record]
batch_size = 8
save_audio = true

[filter]
# Random judges almost never say the target emotion and random text never matches the transcript, so
# the demo keeps every attempt (no emotion check, WER threshold out of reach). The paper: true / 0.15.
require_match = false
tau_wer = 1000.0

[anchor]
selector = "cas"
rate = 0.05
c = 8
method = "steer"
alpha = 1.0

[sweep]
selectors = ["random", "lap", "lape", "mad", "cas"]
alphas = [2.0]

[evaluate]
splits = ["test_seen", "test_unseen"]
batch_size = 16
bootstrap = 200
save_audio = true
"""

REAL_TOML = """\
[model]
adapter = "qwen_omni"
source = "Qwen/Qwen2.5-Omni-7B"      # or a local checkpoint directory
dtype = "bfloat16"
device = "cuda"

[data]
root = "/data/ESD"                    # the folder with 0011/ ... 0020/ (or 'Emotion Speech Dataset/')

[judges]
emotion = [{name = "emotion2vec"}, {name = "lalm_judge"}]   # emotion2vec+ large, Qwen3-Omni judge
quality = {name = "utmos"}

[record]
save_audio = true                     # keep clips for the human labelling kit (CAS-H)

[sweep]                               # Table 3 selectors, Table 4 strengths, Figures 4-6
rates = [0.001, 0.003, 0.01]
c = [10, 20, 100]
alphas = [0.3, 0.5, 2.0]
interventions = [{method = "add", alpha = 0.3}, {method = "clamp", alpha = 0.1}, {method = "deactivate"}]"""


def write_inputs(out: Path, console: Console) -> Path:
    """Tiny checkpoint, synthetic ESD, tiny judges and demo.toml (each skipped if already there)."""
    from esn.pipeline.synthetic import write_esd
    from esn.plugins import registry

    reg = registry()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "checkpoint" / "config.json").exists():
        console.print("writing the tiny random Qwen2.5-Omni checkpoint")
        reg.adapter("qwen_omni").write_tiny(out / "checkpoint", seed=0)
    if not (out / "esd" / ".complete").exists():
        console.print("writing the synthetic ESD corpus")
        write_esd(out / "esd", SPEAKERS, INDICES, seconds=0.5)
        atomic_write_text(out / "esd" / ".complete", "")
    if not (out / "judges" / "emotion2vec" / "model.pt").exists():
        console.print("writing the tiny random emotion2vec judge")
        reg.judge("emotion2vec").write_tiny(out / "judges" / "emotion2vec", seed=0)
    quality = ""
    if "utmos" in reg.judges:
        if not any((out / "judges" / "utmos").glob("*")):
            console.print("writing the tiny random UTMOS judge")
            reg.judge("utmos").write_tiny(out / "judges" / "utmos", seed=0)
        quality = 'quality = {name = "utmos", source = "judges/utmos"}'
    config = out / "demo.toml"
    atomic_write_text(config, DEMO_TOML.format(quality=quality))
    return config


def disclaimer(cfg) -> list:
    """The report's opening blocks for a demo run: random weights, meaningless numbers, the real command."""
    from esn.pipeline.report import Block

    return [
        Block("h2", "Read this first: a demo on random weights"),
        Block("p", "This report was made by `esn demo`. The model (a tiny Qwen2.5-Omni), the emotion judge "
                   "(a tiny emotion2vec) and the naturalness judge (a tiny UTMOS) all have RANDOM weights, and "
                   "the corpus is synthetic tones in ESD's layout. Every number, table and heatmap below is "
                   "therefore meaningless: it shows that each stage ran (recording, success filtering, "
                   "selection, steering, judging, bootstrap CIs, plots), not what any model does."),
        Block("p", "Two settings differ from the paper, and only because of the random weights: the success filter "
                   "keeps every attempt (filter.require_match = false, filter.tau_wer = 1000; the paper requires the "
                   "judge to say the target emotion and WER <= 0.15), and clips are RMS-normalised to -23 dBFS and "
                   "zero-padded to 0.5 s before judging (the tiny model's speech is ~20 ms at ~1e-8 full scale, which "
                   "no judge accepts), and emotion2vec picks among the five ESD emotions only (mapping = \"five\"; the "
                   "paper's protocol takes the argmax over all nine classes). UTMOS values far outside 1-5 are what a "
                   "random UTMOS head gives. The selection rate is r = 5% and c = 8 because the tiny model has 128 LM neurons."),
        Block("h2", "Run it for real"),
        Block("p", "Install the adapter and judges (`pip install esn-core esn-qwen-omni esn-emotion2vec esn-utmos`), "
                   "get ESD (the 10 English speakers 0011-0020 are used), and write a config; everything not set "
                   "takes the paper's defaults (Table 1 split, CAS, r = 0.5%, c = 50, steering with alpha = 1, "
                   "tau_wer = 0.15, all five selectors):"),
        Block("code", REAL_TOML),
        Block("p", "Then `esn run study.toml` (kill it any time and run it again: it resumes), or stage by stage with "
                   "`esn record`, `esn select`, `esn evaluate`, `esn report`. See docs/pipeline.md."),
    ]


def run_demo(out: str | Path, *, console: Console | None = None) -> Path:
    """Write the inputs, run every stage into ``out``, and return the path of ``out/report.md``."""
    from esn.pipeline.config import load_config
    from esn.pipeline.report import write_report
    from esn.pipeline.run import Run
    from esn.pipeline.stages import run_stages

    console = console or Console(quiet=True)
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise EsnError(f"--out {out} exists and is not a folder")
    config = write_inputs(out, console)
    cfg = load_config(config)
    with Run(cfg, console=console) as run:
        for stage in ("record", "select", "evaluate"):
            console.rule(f"[bold]{stage}")
            run_stages(run, [stage])
        console.rule("[bold]report")
        return write_report(run, extra=disclaimer(cfg))
