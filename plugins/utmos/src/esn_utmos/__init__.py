"""esn judge plugin: UTMOS22 naturalness (a MOS on a 1-5 scale) through ``utmos-pytorch``."""

from esn_utmos.judge import UtmosJudge

__all__ = ["UtmosJudge"]
