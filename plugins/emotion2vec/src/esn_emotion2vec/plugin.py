"""Entry point ``esn: emotion2vec``. Importing this is cheap: funasr is imported only by ``load``."""

from esn.plugins import hookimpl

from esn_emotion2vec.judge import Emotion2vecJudge


@hookimpl
def register_judges(register):
    register(Emotion2vecJudge)
