"""esn: find and steer emotion-sensitive neurons (ESNs) in speech-generative audio-language models.

The core knows no model. Adapters (separate distributions, discovered through the ``esn`` entry-point
group) map a model's decoder MLP gates to hook points named ``{stream}.layers.{l}.mlp.gate``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("esn-core")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from esn.errors import EsnError

__all__ = ["EsnError", "__version__"]
