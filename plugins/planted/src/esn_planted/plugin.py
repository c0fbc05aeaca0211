"""Entry point ``esn: planted``: the planted adapter and judge. Importing this is cheap (transformers is
imported by ``load``)."""

from esn.plugins import hookimpl

from esn_planted.adapter import PlantedAdapter
from esn_planted.judge import PlantedJudge


@hookimpl
def register_adapters(register):
    register(PlantedAdapter)


@hookimpl
def register_judges(register):
    register(PlantedJudge)
