"""A tiny random Qwen2.5-Omni checkpoint, written once and loaded back through the adapter's own path."""

import numpy as np
import pytest
from esn.adapters import EVCRequest, GenerationConfig


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from esn_qwen_omni import QwenOmniAdapter

    return QwenOmniAdapter.write_tiny(tmp_path_factory.mktemp("qwen_omni") / "tiny", seed=0)


@pytest.fixture(scope="session")
def adapter(tiny_dir):
    from esn_qwen_omni import QwenOmniAdapter

    return QwenOmniAdapter.load(tiny_dir)


def speech(seconds: float, seed: int, rate: int = 16_000) -> np.ndarray:
    """A noisy two-tone signal: not silent, different per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


@pytest.fixture
def requests_():
    return [EVCRequest(speech(1.0, 0), "happy", id="a"), EVCRequest(speech(1.6, 1), "sad", id="b")]


@pytest.fixture
def speech_fn():
    return speech


@pytest.fixture
def config():
    # Codec length is forced so that synthesis-side effects are visible with random weights.
    # Two token2wav ODE steps instead of 10 keep the CPU tests quick.
    return GenerationConfig(
        max_new_tokens=10, max_audio_tokens=16, options={"talker_min_new_tokens": 12, "token2wav_num_steps": 2}
    )
