"""Entry point ``esn: moshi``: registers the adapter class (no heavy import happens here)."""

from esn.plugins import hookimpl

from esn_moshi.adapter import MoshiAdapter


@hookimpl
def register_adapters(register):
    register(MoshiAdapter)
