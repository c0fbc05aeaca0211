"""esn judge plugin: emotion2vec+ (the paper's SER judge) through funasr's ``AutoModel``."""

from esn_emotion2vec.judge import Emotion2vecJudge

__all__ = ["Emotion2vecJudge"]
