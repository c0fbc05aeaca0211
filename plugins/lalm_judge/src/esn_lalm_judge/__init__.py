"""esn judge plugin: an audio-language model (Qwen3-Omni-MoE) answering a five-way emotion question."""

from esn_lalm_judge.answers import parse_answer
from esn_lalm_judge.judge import LalmJudge

__all__ = ["LalmJudge", "parse_answer"]
