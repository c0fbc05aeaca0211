"""Benchmark plugins: a random-weight Qwen2.5-Omni adapter and a stand-in emotion judge (see README.md)."""

from esn_bench_random.adapter import RandomQwenOmniAdapter, write_random_checkpoint
from esn_bench_random.judge import StandInJudge

__all__ = ["RandomQwenOmniAdapter", "StandInJudge", "write_random_checkpoint"]
