"""Entry point ``esn: minicpm_o``: registers the adapter class (no heavy import happens here)."""

from esn.plugins import hookimpl

from esn_minicpm_o.adapter import MiniCPMOAdapter


@hookimpl
def register_adapters(register):
    register(MiniCPMOAdapter)
