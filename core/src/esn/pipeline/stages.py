"""The paper's four stages in order: record -> select -> evaluate -> report, each resumable."""

from __future__ import annotations

from collections.abc import Sequence

from esn.errors import EsnError
from esn.pipeline.evaluate import evaluate
from esn.pipeline.parallel import SHARDED_STAGES
from esn.pipeline.record import record
from esn.pipeline.report import write_report
from esn.pipeline.run import Run
from esn.pipeline.select import select

STAGES = ("record", "select", "evaluate", "report")
RUNNERS = {"record": record, "select": select, "evaluate": evaluate, "report": write_report}


def run_stages(run: Run, stages: Sequence[str] = STAGES) -> None:
    """Run ``stages`` on an opened ``run``, in the given order."""
    once = [s for s in stages if s not in SHARDED_STAGES]
    if run.shard is not None and once:
        raise EsnError(f"{', '.join(once)} cannot run as a shard: only {' and '.join(SHARDED_STAGES)} split "
                       "their batches across processes; run the others once, without --shard")
    for stage in stages:
        if stage in SHARDED_STAGES:
            RUNNERS[stage](run)  # every process takes its share of the batches
        else:
            run.team.on_leader(lambda stage=stage: RUNNERS[stage](run))  # the others wait for rank 0
