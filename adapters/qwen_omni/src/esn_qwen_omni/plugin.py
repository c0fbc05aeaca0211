"""Entry point ``esn: qwen_omni``: registers the adapter class (no heavy import happens here)."""

from esn.plugins import hookimpl

from esn_qwen_omni.adapter import QwenOmniAdapter


@hookimpl
def register_adapters(register):
    register(QwenOmniAdapter)
