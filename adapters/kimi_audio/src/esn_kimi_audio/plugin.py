"""Entry point ``esn: kimi_audio``: registers the adapter class (no heavy import happens here)."""

from esn.plugins import hookimpl

from esn_kimi_audio.adapter import KimiAudioAdapter


@hookimpl
def register_adapters(register):
    register(KimiAudioAdapter)
