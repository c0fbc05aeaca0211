"""Checks on a loaded Qwen3-Omni: every parameter finite (transformers can leave some uninitialised)."""

from __future__ import annotations

from esn.errors import EsnError


def check_finite(model, source: str) -> None:
    """EsnError naming the first parameters with NaN or inf values (checked on their device, no copy)."""
    import torch

    bad = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type != "meta" and param.dtype.is_floating_point and not bool(torch.isfinite(param).all()):
                bad.append(name)
    if bad:
        raise EsnError(
            f"{source}: {len(bad)} parameter tensor(s) hold NaN or inf values (e.g. {', '.join(bad[:3])}); "
            "the checkpoint is damaged or was saved with uninitialised weights (transformers 5.24 leaves the "
            "talker's routed experts unset when a model is built from a config: initialise them before saving)"
        )
