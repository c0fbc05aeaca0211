"""Entry point ``esn: utmos``. Importing this is cheap: utmos-pytorch is imported only by ``load``."""

from esn.plugins import hookimpl

from esn_utmos.judge import UtmosJudge


@hookimpl
def register_judges(register):
    register(UtmosJudge)
