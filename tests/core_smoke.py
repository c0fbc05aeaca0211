"""A run through esn-core's use of each of its dependencies, for the lowest declared versions.

``tests/test_packaging.py::test_core_runs_on_the_lowest_declared_versions`` runs this in a subprocess with
those versions first on ``PYTHONPATH`` (not under pytest: pytest itself needs a newer pluggy). It prints
the versions it ran with, then ``SMOKE OK``; any failure is a traceback and a non-zero exit.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

DEPENDENCIES = ("numpy", "packaging", "pydantic", "pluggy", "rich", "safetensors", "soundfile", "soxr",
                "jiwer", "whisper-normalizer")


def main() -> None:
    print(json.dumps({name: md.version(name) for name in DEPENDENCIES}))
    out = Path(tempfile.mkdtemp())

    # pluggy + rich: plugin discovery and the CLI's tables
    from esn.cli import main as esn

    assert esn(["adapters", "list"]) == 0 and esn(["plugins", "list"]) == 0

    # packaging: the version ranges `esn adapters check` compares (a local label such as +cu121 ignored)
    from esn.requirements import Requirement, finding, satisfies

    assert satisfies("4.51.0", ">=4.51.0,<4.53") and not satisfies("4.54.0", ">=4.51.0,<4.53")
    assert satisfies("2.8.0+cu121", "<=2.8.0") and finding(Requirement("numpy", ">=1.26")).status == "ok"

    # pydantic: a run configuration and a generation config
    from esn.adapters import GenerationConfig
    from esn.pipeline.config import parse_config

    cfg = parse_config({"model": {"source": "x"}, "data": {"root": "y"}, "judges": {"emotion": [{"name": "e"}]},
                        "anchor": {"rate": 0.1}}, base=out)
    assert cfg.anchor.rate == 0.1 and GenerationConfig(max_new_tokens=3).max_new_tokens == 3

    # torch + numpy: record, select and steer a tiny SwiGLU decoder
    from esn.hookpoints import HookPoint
    from esn.hooks import ModelTarget
    from esn.masks import Mask
    from esn.recording import GateRecorder
    from esn.selection import select_neurons
    from esn.steering import steer

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.down_proj, self.act_fn = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), torch.nn.SiLU()

        def forward(self, x):  # x [batch, pos, 4]
            return self.down_proj(self.act_fn(self.gate_proj(x)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(MLP(), MLP())
    target = ModelTarget(model, [HookPoint("lm", i, 8, module=f"{i}.act_fn", down_proj=f"{i}.down_proj")
                                 for i in range(2)])
    x = torch.randn(2, 5, 4)
    with GateRecorder(target) as rec:
        base = model(x)
    stats = rec.stats()
    probs = (stats.counts / stats.tokens_per_neuron()).numpy()
    masks = select_neurons(probs, "lap", 0.25, emotions=["happy", "sad"])
    with steer(target, Mask(masks["happy"], target.layout()), "steer", alpha=1.0):
        steered = model(x)
    assert not torch.equal(base, steered)

    # safetensors: masks and statistics files
    from esn.artifacts import load_masks, save_masks

    save_masks(out / "m.safetensors", masks, layout=target.layout())
    assert np.array_equal(load_masks(out / "m.safetensors")["sad"].indices, masks["sad"])

    # jiwer + whisper-normalizer: WER as the filter computes it
    from esn.wer import wer

    assert wer("Hello, world!", "hello world") == 0.0 and wer("good morning", "good") == 0.5

    # soundfile + soxr: read, resample, write
    from esn.audio import prepare_audio, write_audio

    write_audio(out / "a.wav", (0.1 * np.sin(np.arange(8_000) / 5)).astype(np.float32), 8_000)
    assert prepare_audio(out / "a.wav").shape == (16_000,)
    print("SMOKE OK")


if __name__ == "__main__":
    sys.exit(main())
