"""The one install story, as every message that asks for an install tells it (README.md and
docs/install.md tell the same; tests/test_install_story.py keeps them in step).

esn is not on PyPI yet: ``make dist`` in a checkout writes every distribution's wheel to ``dist/`` (it
needs only Python and pip, which fetch the build backend), and pip installs the distributions by name
from there. torch comes first, the build the machine needs (PyPI's Linux torch is a CUDA build of
several GB). Once esn is published, the same lines work without ``--find-links dist``.
"""

from __future__ import annotations

import shlex

# Where `make dist` puts the wheels, as pip is told to look there.
FIND_LINKS = "--find-links dist"
TORCH_CPU = "pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu"


def pip_install(*requirements: str) -> str:
    """The pip line installing esn distributions (extras allowed), e.g.
    ``pip install --find-links dist 'esn-core[serve]'``, quoted for a POSIX shell."""
    return " ".join(["pip install", FIND_LINKS, *map(shlex.quote, requirements)])
