"""UTMOS22 (strong learner) as an esn quality judge, through ``utmos-pytorch``'s ``UTMOSScoreTorch``.

``UTMOSScoreTorch`` loads its state dict with ``strict=False``: a wrong file would leave random
weights in place and score about 3.1 without complaint. So every checkpoint is checked here first,
key by key and shape by shape, against the model's own state dict; any difference is an error.

Checkpoints: the published ``utmos_state_dict.pt`` (a torch state dict; read with
``torch.load(weights_only=True)``: tensors only, no code) or the same tensors as ``.safetensors``.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from esn.audio import MODEL_RATE, prepare_audio
from esn.errors import EsnError
from esn.judges import Audio, Judge, Judgement

CHECKPOINT_NAMES = ("utmos_state_dict.pt", "utmos_state_dict.safetensors", "model.safetensors")
HUB_REPO = "Blinorot/UTMOS-PyTorch"


@lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The UTMOS model's state-dict keys and shapes, built on the meta device (no memory, ~1 s)."""
    import torch
    from utmos_pytorch.utmos_torch import UTMOSModel

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", FutureWarning)  # its torch.nn.utils.weight_norm is deprecated
        model = UTMOSModel()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a checkpoint file, read without running any code from it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise EsnError(f"cannot read UTMOS checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise EsnError(f"UTMOS checkpoint {path} is not a plain state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}


def check_checkpoint(path: Path) -> None:
    """Fail unless ``path`` holds exactly the UTMOS model's keys with the model's shapes."""
    want, have = expected_shapes(), checkpoint_shapes(path)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    reshaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or reshaped:
        parts = [f"{len(x)} {what} (e.g. {', '.join(x[:2])})"
                 for x, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
                 if x]
        raise EsnError(
            f"{path} is not a UTMOS22 strong-learner state dict: {'; '.join(parts)} of {len(want)} weights. "
            f"Use utmos_state_dict.pt from {HUB_REPO}"
        )


def resolve(source: str | None) -> Path:
    """A checkpoint file, a directory holding one, or None for the hub file (cached or downloaded)."""
    if source is None:
        from utmos_pytorch.utils import download_utmos_ckpt

        try:
            return Path(download_utmos_ckpt())
        except Exception as exc:
            raise EsnError(f"cannot fetch the UTMOS checkpoint from {HUB_REPO} ({type(exc).__name__}: {exc}); "
                           "pass a local utmos_state_dict.pt with --model") from None
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / n for n in CHECKPOINT_NAMES if (path / n).is_file()]
        if not found:
            raise EsnError(f"no UTMOS checkpoint in {path}: expected one of {', '.join(CHECKPOINT_NAMES)}")
        path = found[0]
    if not path.is_file():
        raise EsnError(f"UTMOS checkpoint not found: {path}")
    return path


class UtmosJudge(Judge):
    """UTMOS22 strong learner: ``scores["mos"]`` per utterance (about 1-5, higher is more natural)."""

    name: ClassVar[str] = "utmos"
    kind: ClassVar[str] = "quality"
    labels: ClassVar[tuple[str, ...]] = ()

    def __init__(self, scorer: Any, checkpoint: Path):
        self.scorer = scorer  # utmos_pytorch.UTMOSScoreTorch
        self.checkpoint = checkpoint

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", **options: Any) -> UtmosJudge:
        if options:
            raise EsnError(f"utmos judge: unknown options {', '.join(sorted(options))}")
        path = resolve(source)
        check_checkpoint(path)
        from utmos_pytorch import UTMOSScoreTorch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if path.suffix == ".safetensors":  # UTMOSScoreTorch reads torch files only: hand it one
                import torch
                from safetensors.torch import load_file

                with tempfile.TemporaryDirectory() as tmp:
                    torch.save(load_file(str(path)), Path(tmp) / "utmos_state_dict.pt")
                    scorer = UTMOSScoreTorch(ckpt_path=str(Path(tmp) / "utmos_state_dict.pt"), device=device)
            else:
                scorer = UTMOSScoreTorch(ckpt_path=str(path), device=device)
        return cls(scorer, path)

    def judge(self, audios: Sequence[Audio], *, sources: Sequence[Audio] | None = None) -> list[Judgement]:
        """MOS per audio. Clips of equal length share one forward pass; others run alone, because
        UTMOS has no padding mask and padding would change the score."""
        import torch

        waves = [prepare_audio(a.samples, a.sample_rate, target_rate=MODEL_RATE, name=a.name or f"audio {i}")
                 for i, a in enumerate(audios)]
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            groups.setdefault(len(w), []).append(i)
        mos = [0.0] * len(waves)
        for idx in groups.values():
            batch = torch.from_numpy(np.stack([waves[i] for i in idx]))  # [B, samples]
            scores = self.scorer.score(batch.to(self.scorer.device)[:, None, :]).reshape(-1)  # [B]
            for i, s in zip(idx, scores.tolist(), strict=True):
                mos[i] = float(s)
        out = []
        for value in mos:
            ok = math.isfinite(value)
            out.append(Judgement(None, {"mos": value} if ok else {}, raw="" if ok else "non-finite MOS"))
        return out

    @classmethod
    def write_tiny(cls, directory: str | Path, seed: int = 0) -> Path:
        """Write ``utmos_state_dict.pt`` with every key and shape of the real model and random values.

        The UTMOS architecture is fixed in utmos-pytorch (wav2vec 2.0 base + BLSTM, 103M weights) and
        cannot be shrunk, so the file is made small instead: every matrix is a view, at its own offset,
        of one random buffer, which ``torch.save`` stores once (~25 MB instead of ~410 MB). Vectors
        (norm scales, biases) are their own small tensors: scales near 1, biases near 0.
        """
        import torch

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shapes = expected_shapes()
        generator = torch.Generator().manual_seed(seed)
        largest = max(torch.Size(s).numel() for s in shapes.values())
        buffer = torch.randn(largest + 2**20, generator=generator) * 0.02  # BERT-style init scale
        state = {}
        for i, (key, shape) in enumerate(shapes.items()):
            numel = torch.Size(shape).numel()
            if len([d for d in shape if d > 1]) >= 2:  # a matrix or kernel: a view of the buffer
                offset = (i * 104_729) % (buffer.numel() - numel + 1)
                state[key] = buffer[offset : offset + numel].view(shape)
            elif key.endswith(("weight", "weight_g")):  # norm scales, weight-norm magnitudes
                state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
            else:
                state[key] = 0.02 * torch.randn(shape, generator=generator)
        path = directory / "utmos_state_dict.pt"
        torch.save(state, path)
        return path
