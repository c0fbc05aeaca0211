"""A tiny stand-in for Kimi-Audio: the ``kimia_infer`` wrapper and the checkpoint's remote code.

- ``configuration_moonshot_kimia.py`` / ``modeling_moonshot_kimia.py``: written into the checkpoint
  directory with an ``auto_map``, like the published checkpoint, and loaded by the wrapper through
  ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. ``MoonshotKimiaForCausalLM``
  has ``model.layers`` and ``model.mimo_layers`` built from transformers' real ``Qwen2DecoderLayer``;
  the MIMO branch leaves after layer ``kimia_mimo_transformer_from_layer_index``.
- ``kimia.py``: ``KimiAudio(model_path, load_detokenizer=True)`` with ``.alm`` and ``generate(chats,
  output_type="both", ...) -> (wav [1, N], text)``, its own decode loop calling ``alm.forward(...)``.
  The GLM-4-Voice tokenizer, Whisper features, text tokenizer and detokenizer are small deterministic
  replacements (no downloads, no CUDA, no flash-attn).

Written from the public code's structure, not copied from it. A checkpoint written by ``write_tiny``
names ``esn_kimi_audio.standin.kimia`` in ``esn_standin.json``; the adapter imports that module in place
of ``kimia_infer.api.kimia`` (only modules inside this package are accepted).
"""

from pathlib import Path

FILES = ("configuration_moonshot_kimia.py", "modeling_moonshot_kimia.py")
DIRECTORY = Path(__file__).parent
MODULE = "esn_kimi_audio.standin.kimia"
MARKER = "esn_standin.json"
