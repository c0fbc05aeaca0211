"""Entry point ``esn: bench_random``: the random-weight adapter and the stand-in judge."""

from esn.plugins import hookimpl

from esn_bench_random.adapter import RandomQwenOmniAdapter
from esn_bench_random.judge import StandInJudge


@hookimpl
def register_adapters(register):
    register(RandomQwenOmniAdapter)


@hookimpl
def register_judges(register):
    register(StandInJudge)
