"""Fast greedy decoding: a static step captured as a CUDA graph, with esn's hooks inside.

``Decoder`` (``esn.decode.engine``) is model-agnostic: an adapter supplies the step of its stream.
``esn.decode.graphs`` says how hooks take part; ``CausalLMDecoding`` is a ready step for plain
transformers causal LMs.
"""

from esn.decode.causal_lm import CausalLMDecoding, left_padding, prompt_positions
from esn.decode.engine import Decoded, Decoder, DecodeState, Greedy

__all__ = ["CausalLMDecoding", "DecodeState", "Decoded", "Decoder", "Greedy", "left_padding", "prompt_positions"]
