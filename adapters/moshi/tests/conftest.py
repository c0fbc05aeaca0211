"""A tiny random Moshi checkpoint, written once and loaded back through the adapter's own path."""

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from esn_moshi import MoshiAdapter

    return MoshiAdapter.write_tiny(tmp_path_factory.mktemp("moshi") / "tiny", seed=0)


@pytest.fixture(scope="session")
def adapter(tiny_dir):
    from esn_moshi import MoshiAdapter

    return MoshiAdapter.load(tiny_dir, dtype="float32")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention on shared cores
    yield
    torch.set_num_threads(threads)


def _speech(seconds: float, seed: int, rate: int = 16_000) -> np.ndarray:
    """A noisy two-tone signal: not silent, different per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


@pytest.fixture
def request_():
    return EVCRequest(_speech(0.6, 0), "happy", id="a")


@pytest.fixture
def speech():
    return _speech


@pytest.fixture
def config():
    return GenerationConfig(max_new_tokens=4, max_audio_tokens=4)
