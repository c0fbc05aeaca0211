"""Speaker conditioning for token2wav, read without unpickling anything.

Each speaker has ``bos_token`` (a thinker-vocabulary id that opens the talker's text stream), ``cond``
``[1, enc_emb_dim]`` (x-vector) and ``ref_mel`` ``[1, T, mel_dim]`` (reference mel). Two file forms:

- ``speakers.safetensors`` (written by esn, e.g. for tiny checkpoints): tensors ``{name}.bos_token``,
  ``{name}.cond``, ``{name}.ref_mel``.
- ``spk_dict.pt`` (the released Qwen2.5-Omni checkpoints): a torch pickle of plain dicts and tensors.
  It is read with ``torch.load(weights_only=True)`` only, which refuses arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esn.errors import EsnError

SAFETENSORS_NAME = "speakers.safetensors"
TORCH_NAME = "spk_dict.pt"
_FIELDS = ("bos_token", "cond", "ref_mel")


def save_speakers(path: str | Path, speakers: dict[str, dict[str, Any]]) -> Path:
    """Write speakers (``bos_token``, ``cond``, ``ref_mel`` each) as ``speakers.safetensors``."""
    import torch
    from safetensors.torch import save_file

    flat = {}
    for name, params in speakers.items():
        if "." in name:
            raise EsnError(f"speaker name {name!r} must not contain '.'")
        flat[f"{name}.bos_token"] = torch.tensor(int(params["bos_token"]), dtype=torch.int64)
        flat[f"{name}.cond"] = params["cond"].detach().float().contiguous()
        flat[f"{name}.ref_mel"] = params["ref_mel"].detach().float().contiguous()
    save_file(flat, str(path))
    return Path(path)


def _check(speakers: dict, path: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(speakers, dict) or not speakers:
        raise EsnError(f"{path}: no speakers found")
    for name, params in speakers.items():
        missing = [f for f in _FIELDS if not isinstance(params, dict) or f not in params]
        if missing:
            raise EsnError(f"{path}: speaker {name!r} lacks {', '.join(missing)}")
    return speakers


def load_speakers(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{speaker: {"bos_token": int, "cond": Tensor, "ref_mel": Tensor}}`` from either file form."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise EsnError(f"cannot read speaker file {path}: {exc}") from None
        speakers: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            name, _, field = key.rpartition(".")
            speakers.setdefault(name, {})[field] = int(value) if field == "bos_token" else value
        return _check(speakers, path)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but plain containers and tensors
        raise EsnError(f"cannot read speaker file {path} safely (weights_only): {exc}") from None
    speakers = {str(k): dict(v) for k, v in raw.items()} if isinstance(raw, dict) else raw
    for params in speakers.values() if isinstance(speakers, dict) else ():
        if isinstance(params, dict) and torch.is_tensor(params.get("bos_token")):
            params["bos_token"] = int(params["bos_token"])
    return _check(speakers, path)
