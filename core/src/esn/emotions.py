"""The emotion vocabulary of the paper (ESD's five categories)."""

from esn.errors import EsnError

EMOTIONS: tuple[str, ...] = ("neutral", "happy", "angry", "sad", "surprise")
# EVC converts neutral speech into one of these (the paper's section 4.3).
TARGET_EMOTIONS: tuple[str, ...] = ("happy", "angry", "sad", "surprise")

_ALIASES = {"surprised": "surprise", "anger": "angry", "happiness": "happy", "sadness": "sad"}


def normalize_emotion(name: str, allowed: tuple[str, ...] = EMOTIONS) -> str:
    """Lower-case ``name``, map common aliases, and fail clearly if it is not in ``allowed``."""
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in allowed:
        raise EsnError(f"unknown emotion {name!r}: expected one of {', '.join(allowed)}")
    return key
