"""A tiny stand-in for MiniCPM-o 4.5's remote code (``configuration_minicpmo.py``, ``modeling_minicpmo.py``).

``write_tiny`` copies these two files into a checkpoint directory whose ``config.json`` has an
``auto_map``, so the checkpoint loads through the real ``AutoModel.from_pretrained(...,
trust_remote_code=True)`` path, exactly like the published checkpoint. They reproduce the module tree
(``llm`` = Qwen3ForCausalLM, ``tts.model`` = LlamaModel, ``tts.emb_text``, ``tts.projector_semantic``,
an audio tokenizer that is not an ``nn.Module`` child), the config fields and the ``init_tts`` / ``chat``
signatures the adapter relies on. Written from the public code's structure, not copied from it.
"""

from pathlib import Path

FILES = ("configuration_minicpmo.py", "modeling_minicpmo.py")
DIRECTORY = Path(__file__).parent
