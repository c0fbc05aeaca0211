"""Everything about a run that can be checked without generating, checked before the first stage starts.

A config parses (``esn.pipeline.config``) before this; what parsing cannot know is here: names the plugin
registry must know (adapter, judges), judge options (``Judge.check_options``), the device, the splits the
dataset must have, ids that must make file names, and the human-label file. An unknown split or judge
option found after hours of recording would waste them; found here it costs a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from esn.devices import check_device
from esn.errors import EsnError
from esn.pipeline.run import Run
from esn.pipeline.stages import STAGES


def check(run: Run, stages: Sequence[str] | None = None) -> None:
    """Raise the first problem of ``run``'s config as an EsnError naming the config field.

    ``stages`` (default: all four) limits the check to what those stages use: ``esn select`` or
    ``esn report`` on another machine needs neither the adapter, the judges nor the recording device."""
    from esn.plugins import registry

    cfg = run.cfg
    stages = set(STAGES if stages is None else stages)
    converts = bool(stages & {"record", "evaluate"})  # these load the model and the judges
    reg = registry()
    if converts:
        _field("model.adapter", lambda: reg.adapter(cfg.model.adapter))
        specs = [(f"judges.emotion[{i}]", s, "emotion") for i, s in enumerate(cfg.judges.emotion)]
        if cfg.judges.quality is not None:
            specs.append(("judges.quality", cfg.judges.quality, "quality"))
        for where, spec, kind in specs:
            cls = _field(f"{where}.name", lambda spec=spec: reg.judge(spec.name))
            if getattr(cls, "kind", "emotion") != kind:
                raise EsnError(f"{where}: judge {spec.name!r} judges {cls.kind}, this place takes a judge of {kind}")
            _field(f"{where}.options", lambda cls=cls, spec=spec: cls.check_options(spec.options))
        _field("model.device", lambda: check_device(cfg.model.device, setting="model.device"))
    splits = [("record.split", cfg.record.split)] if "record" in stages else []
    if "evaluate" in stages:
        splits += [(f"evaluate.splits[{i}]", s) for i, s in enumerate(cfg.evaluate.splits)]
    for where, split in splits:
        _field(where, lambda split=split: run.sources(split))
    _check_ids(run, stages)
    if cfg.filter.human_labels is not None and "select" in stages:
        from esn.filtering import load_label_csv

        _field("filter.human_labels", lambda: load_label_csv(cfg.filter.human_labels))


def _check_ids(run: Run, stages: set[str]) -> None:
    """Every attempt whose speech is kept gets a wav named after its id: each name must be possible."""
    from esn.pipeline import convert, evaluate, record

    cfg = run.cfg
    kept = ([a.id for a in record.attempts(run)] if cfg.record.save_audio and "record" in stages else []) + (
        [a.id for a in evaluate.attempts(run)] if cfg.evaluate.save_audio and "evaluate" in stages else [])
    for attempt_id in kept:
        convert.audio_name(attempt_id)


def _field(where: str, fn):
    try:
        return fn()
    except EsnError as exc:
        raise EsnError(f"{where}: {exc}") from None
