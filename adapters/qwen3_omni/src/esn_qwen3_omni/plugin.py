"""Entry point ``esn: qwen3_omni``: registers the adapter class (no heavy import happens here)."""

from esn.plugins import hookimpl

from esn_qwen3_omni.adapter import Qwen3OmniAdapter


@hookimpl
def register_adapters(register):
    register(Qwen3OmniAdapter)
