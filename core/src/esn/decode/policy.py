"""How an adapter decodes, decided in one place: the ``decode`` option, whether steps are captured as CUDA
graphs, and the decoding state an adapter keeps between ``generate`` calls.

Two names that sound alike mean different things: the adapter option ``decode`` picks ``"graph"`` (static
steps through ``esn.decode``) or ``"generate"`` (transformers' ``generate``); a ``Decoder``'s
``info["decode"]`` says whether its static step was replayed from a graph (``"graph"``) or ran uncaptured
(``"eager"``, e.g. on CPU). ``GraphDecoding`` holds an adapter's decoding state. No torch import here:
adapters subclass ``GraphDecoding`` at import time, and registering an adapter must stay light.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from esn.errors import EsnError

DECODE_MODES = ("graph", "generate")
SESSIONS_PER_STREAM = 2  # static caches kept per stream (e.g. a full batch and the last, smaller one)


def capture_default(device: Any) -> bool:
    """Whether static decode steps are captured as CUDA graphs when nobody says: on CUDA only."""
    import torch

    return torch.device(device).type == "cuda"


def decode_mode(adapter: str, value: str | None, device: Any, *, capturable: bool = True) -> str:
    """The adapter option ``decode`` of ``adapter``: ``value`` if given, else ``"graph"`` where the steps are
    captured (CUDA) and ``capturable``, else ``"generate"``. The old value ``"eager"`` (transformers'
    generate) still works, with a FutureWarning."""
    if value is None:
        return "graph" if capture_default(device) and capturable else "generate"
    if value == "eager":
        warnings.warn(f"{adapter} option decode='eager' is now called decode='generate' (transformers' generate); "
                      "'eager' will stop working in a later release", FutureWarning, stacklevel=3)
        return "generate"
    if value not in DECODE_MODES:
        raise EsnError(f"{adapter} option decode must be one of {', '.join(DECODE_MODES)}, got {value!r}")
    return value


def greedy_generate_options(prefix: str, max_new_tokens: int, eos_token_ids: Sequence[int] | None = None,
                            pad_token_id: int | None = None, *, unset_sampling: bool = False) -> dict[str, Any]:
    """transformers' ``generate`` keywords for greedy decoding of one sub-model of a composite model, named
    ``{prefix}_...`` (e.g. ``thinker_do_sample``). ``unset_sampling``: also clear top-k/top-p/temperature, so a
    sub-model's sampling defaults do not warn or apply."""
    out: dict[str, Any] = {f"{prefix}_do_sample": False, f"{prefix}_max_new_tokens": max_new_tokens}
    if unset_sampling:
        out.update({f"{prefix}_top_k": None, f"{prefix}_top_p": None, f"{prefix}_temperature": None})
    if eos_token_ids is not None:
        out[f"{prefix}_eos_token_id"] = list(eos_token_ids)
    if pad_token_id is not None:
        out[f"{prefix}_pad_token_id"] = pad_token_id
    return out


def reply_text(tokenizer: Any, generated: Sequence[int], stop_ids: Sequence[int]) -> tuple[str, int]:
    """Text of a generated reply up to its first stop token (special tokens dropped) and its token count."""
    tokens = list(generated)
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            tokens = tokens[:i]
            break
    text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.strip(), len(tokens)


class Sessions:
    """An adapter's static decoding sessions, a few per stream, reused across generate calls."""

    def __init__(self) -> None:
        self._kept: dict[str, OrderedDict] = {}

    def get(self, stream: str, key: tuple, make: Callable[[], Any]) -> Any:
        """The session of ``stream`` for ``key`` (made by ``make()`` if new; the oldest beyond
        ``SESSIONS_PER_STREAM`` dropped)."""
        kept = self._kept.setdefault(stream, OrderedDict())
        if key not in kept:
            kept[key] = make()
            while len(kept) > SESSIONS_PER_STREAM:
                kept.popitem(last=False)
        kept.move_to_end(key)
        return kept[key]

    def clear(self) -> None:
        """Drop every session (their caches and captured graphs)."""
        for kept in self._kept.values():
            kept.clear()


class GraphDecoding:
    """Mixin for an adapter whose ``decode="graph"`` keeps static sessions between calls (put it before
    ``ModelAdapter`` in the bases). It declares ``capture_graphs``, ``last_decode_info`` and
    ``release_decode_buffers`` once for every such adapter."""

    # decode="graph": capture the steps as CUDA graphs (None: on CUDA). False runs the very same steps
    # uncaptured, which is how benchmarks check that a replay computes what the steps compute.
    capture_graphs: bool | None = None
    device: Any  # from ModelAdapter

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions = Sessions()  # static caches and captured steps, made on first use
        self.last_decode_info: dict[str, Any] = {}  # decode="graph": how the last call's decoders ran

    @property
    def capture(self) -> bool:
        """Whether this adapter's decode steps are captured: ``capture_graphs``, else on CUDA."""
        return capture_default(self.device) if self.capture_graphs is None else bool(self.capture_graphs)

    def release_decode_buffers(self) -> None:
        """Free the static caches and CUDA graphs that ``decode="graph"`` keeps between calls."""
        self._sessions.clear()
