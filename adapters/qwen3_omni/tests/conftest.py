"""A tiny random Qwen3-Omni checkpoint, written once and loaded back through the adapter's own path."""

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from esn_qwen3_omni import Qwen3OmniAdapter

    return Qwen3OmniAdapter.write_tiny(tmp_path_factory.mktemp("qwen3_omni") / "tiny", seed=0)


@pytest.fixture(scope="session")
def adapter(tiny_dir):
    from esn_qwen3_omni import Qwen3OmniAdapter

    return Qwen3OmniAdapter.load(tiny_dir, dtype="float32")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention on shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["grouped_mm", "eager"])
def experts(request, adapter):
    """The adapter with its experts run by ``request.param`` (restored afterwards)."""
    before = adapter.model.get_experts_implementation()
    adapter.model.set_experts_implementation(request.param)
    yield request.param
    adapter.model.set_experts_implementation(before)


def speech(seconds: float, seed: int, rate: int = 16_000) -> np.ndarray:
    """A noisy two-tone signal: not silent, different per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


@pytest.fixture
def requests_():
    # different lengths: the shorter row is left-padded in the thinker and the talker
    return [EVCRequest(speech(1.0, 0), "happy", id="a"), EVCRequest(speech(1.6, 1), "sad", id="b")]


@pytest.fixture
def speech_fn():
    return speech


@pytest.fixture
def config():
    # Codec length is forced so that synthesis-side effects are visible with random weights.
    return GenerationConfig(max_new_tokens=6, max_audio_tokens=8, system_prompt="EVC.", instruction="To {emotion}.",
                            options={"talker_min_new_tokens": 6})
