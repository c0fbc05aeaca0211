"""esn-planted: a tiny model with planted emotion neurons and a judge that hears them (``esn demo``)."""

from esn_planted.adapter import PlantedAdapter
from esn_planted.judge import PlantedJudge

__all__ = ["PlantedAdapter", "PlantedJudge"]
