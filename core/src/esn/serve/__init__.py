"""Emotion control as an HTTP service (``esn serve``) and the listening test's server (``esn human serve``).

The pieces, each small and testable on its own:

- ``convert``: what one conversion request asks for, checked (audio, emotion, mask, method, alpha), and
  how a list of requests becomes ONE batched ``generate`` with a different steering condition per row.
  No HTTP in it.
- ``batcher``: gathers concurrent requests into batches (bounded queue, configurable wait) and runs each
  batch on the single model thread.
- ``metrics``: Prometheus counters and histograms (requests, queue depth, batch sizes, latency).
- ``app``: the FastAPI application of ``esn serve``; ``listening``: the one of ``esn human serve``.
- ``openai_api``: ``esn serve``'s OpenAI-compatible endpoints (``/v1/models``, ``/v1/chat/completions``,
  streamed as server-sent events), on the same checks and batcher as ``/v1/convert``.
- ``server``: uvicorn on a socket bound first (port 0 works), with graceful shutdown.

The web stack is the ``serve`` extra of esn-core (``pip install --find-links dist 'esn-core[serve]'``, docs/install.md): nothing in esn
imports it except these modules, and the CLI imports them only for the two serve commands.
"""

from __future__ import annotations

import importlib.util

from esn.errors import EsnError

# import name -> distribution, for the message when the extra is missing
EXTRA = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart",
         "prometheus_client": "prometheus-client"}


def require_extra(command: str) -> None:
    """EsnError naming the missing packages unless the ``serve`` extra is installed."""
    missing = [dist for mod, dist in EXTRA.items() if importlib.util.find_spec(mod) is None]
    if missing:
        from esn.install import pip_install

        raise EsnError(f"{command} needs the serve extra ({', '.join(missing)} missing): "
                       f"{pip_install('esn-core[serve]')} (docs/install.md)")
