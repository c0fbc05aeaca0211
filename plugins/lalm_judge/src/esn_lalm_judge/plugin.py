"""Entry point ``esn: lalm_judge``. Importing this is cheap: transformers is imported only by ``load``."""

from esn.plugins import hookimpl

from esn_lalm_judge.judge import LalmJudge


@hookimpl
def register_judges(register):
    register(LalmJudge)
