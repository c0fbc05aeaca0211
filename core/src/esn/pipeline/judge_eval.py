"""``esn judge-eval``: how often each emotion judge names the emotion ESD's actors were asked to act.

The paper checks its judge before trusting it (section 4.1: emotion2vec+ large is 97.6% accurate on a
held-out subset of ESD, 100 clips per emotion). Here: ``per_emotion`` clips of each of the five emotions,
drawn (seeded) from one split of the run's ESD (default ``development``, held out from identification and
test), each judged with its parallel neutral utterance as the source (the pair an EVC judge hears), prepared
the way the pipeline prepares converted speech. Results go to ``<run_dir>/judge_eval.json``; the report
shows them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from esn.emotions import EMOTIONS
from esn.errors import EsnError
from esn.pipeline.batches import derive_seed
from esn.pipeline.data import ESDDataset
from esn.pipeline.files import atomic_write_json, seal
from esn.pipeline.parallel import progress_bar
from esn.pipeline.run import Run

BATCH = 16


def judge_eval(run: Run, *, split: str = "development", per_emotion: int = 100,
               judges: Sequence[str] | None = None) -> dict:
    """Accuracy, per-emotion accuracy and confusion counts of each emotion judge; written to judge_eval.json."""
    from esn.audio import prepare_audio
    from esn.judges import Audio
    from esn.pipeline.convert import JUDGE_RATE, judge_input

    if per_emotion < 1:
        raise EsnError(f"per_emotion must be at least 1, got {per_emotion}")
    if not isinstance(run.dataset, ESDDataset):
        raise EsnError("judge-eval needs ESD (data.kind = 'esd'): it scores judges on ESD's acted emotions")
    names = list(judges) if judges else list(run.emotion_judges)
    unknown = [n for n in names if n not in run.emotion_judges]
    if unknown:
        raise EsnError(f"judge(s) {', '.join(unknown)} are not among the config's emotion judges "
                       f"({', '.join(run.emotion_judges)})")
    clips = []
    for emotion in EMOTIONS:
        pairs = run.dataset.labelled(split, emotion)
        if not pairs:
            raise EsnError(f"split {split!r} has no {emotion} clips with a parallel neutral one under {run.dataset.root}")
        rng = np.random.default_rng(derive_seed(run.cfg.seed, "judge-eval", emotion))
        pick = np.sort(rng.choice(len(pairs), size=min(per_emotion, len(pairs)), replace=False))
        clips += [(emotion, *pairs[k]) for k in pick]
    j = run.cfg.judges
    labels: dict[str, list[str | None]] = {n: [] for n in names}
    with progress_bar(run.console) as bar:
        task = bar.add_task("judge-eval", total=len(clips))
        for start in range(0, len(clips), BATCH):
            batch = clips[start:start + BATCH]
            audios, sources, keep = [], [], []
            for k, (_, clip, neutral) in enumerate(batch):
                wave = judge_input(prepare_audio(clip.path, name=str(clip.path)), JUDGE_RATE,
                                   loudness_dbfs=j.loudness_dbfs, min_seconds=j.min_seconds)
                if wave is None:
                    continue
                keep.append(k)
                audios.append(Audio(wave, JUDGE_RATE, clip.id))
                sources.append(Audio(prepare_audio(neutral.path, name=str(neutral.path)), JUDGE_RATE, neutral.id))
            for name in names:
                got: list[str | None] = [None] * len(batch)
                if keep:
                    for k, v in zip(keep, run.emotion_judges[name].judge(audios, sources=sources), strict=True):
                        got[k] = v.label
                labels[name] += got
            bar.advance(task, len(batch))
    truth = [e for e, _, _ in clips]
    result = {"split": split, "per_emotion": per_emotion, "seed": run.cfg.seed, "root": str(run.dataset.root),
              "emotions": list(EMOTIONS), "clips": [c.id for _, c, _ in clips],
              "judges": {n: score(truth, labels[n]) for n in names}}
    atomic_write_json(run.dir / "judge_eval.json", seal(result))
    return result


def score(truth: Sequence[str], labels: Sequence[str | None]) -> dict:
    """Accuracy over all clips (an unlabelled clip is wrong), per true emotion, and confusion counts."""
    per, confusion = {}, {}
    for e in dict.fromkeys(truth):
        got = [lab for t, lab in zip(truth, labels, strict=True) if t == e]
        per[e] = round(sum(lab == e for lab in got) / len(got), 6)
        confusion[e] = {lab or "none": got.count(lab) for lab in dict.fromkeys(got)}
    correct = sum(t == lab for t, lab in zip(truth, labels, strict=True))
    return {"accuracy": round(correct / len(truth), 6), "n": len(truth), "per_emotion": per, "confusion": confusion,
            "unlabelled": sum(lab is None for lab in labels)}
