"""A run: one config, its run directory, and what every stage shares (dataset, model, judges).

The stages are modules of their own (``record``, ``select``, ``evaluate``, ``report``) that take a ``Run``;
``esn.pipeline.stages`` runs them in order. Resuming: the unit of work is a batch cut from a fixed,
ordered attempt list (``esn.pipeline.batches``), written atomically as one unit, so a killed run leaves
whole batches or nothing and a rerun computes only the missing ones; the final artifacts are
byte-identical to an uninterrupted run's. Several processes share record and evaluate through
``esn.pipeline.parallel``; the run directory and its locks are ``esn.pipeline.rundir``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from esn.pipeline.batches import derive_seed
from esn.pipeline.config import RunConfig
from esn.pipeline.data import CSVDataset, ESDDataset, Source
from esn.pipeline.parallel import Solo
from esn.pipeline.parallel import team as _team
from esn.pipeline.rundir import RunDir, fingerprint


class Run:
    """One run directory and the config that made it, with the resources the stages share (loaded once)."""

    def __init__(self, cfg: RunConfig, *, console: Console | None = None, shard: tuple[int, int] | None = None,
                 team: Solo | None = None, resize: bool = False):
        self.cfg = cfg
        self.rundir = RunDir(cfg.run_dir)
        self.dir: Path = self.rundir.root
        self.console = console or Console(quiet=True)
        # the processes this one shares the run with (esn.pipeline.parallel): alone, a shard, or a rank
        self.team = team if team is not None else _team(shard=shard)
        self.resize = resize  # finish an unfinished stage with another number of processes (RunDir.begin)

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(K, N)`` for a static shard ``--shard K/N``, else None."""
        return self.team.shard

    def begin(self, stage: str, under_way: bool) -> None:
        """The leader notes a sharded stage as under way (or complete); static shards leave the manifest alone."""
        if self.team.shard is None:
            if under_way:
                self.rundir.begin(stage, self.team.world_size, resize=self.resize)
            else:
                self.rundir.end(stage)

    # -- the run directory ---------------------------------------------------------------------------
    def stage_config(self) -> dict[str, Any]:
        """The config parts each stage's results depend on (a change invalidates that stage). Input files
        count by content: re-imported human labels at the same path change the select stage."""
        c = self.cfg.model_dump(mode="json")
        # record.positions only picks which stored counts select uses (both parts are always recorded).
        positions = c["record"].pop("positions")
        # How attempts are stored changes no result (select checks that moments are there when a selector
        # needs them), and leaving these out keeps the fingerprints of run directories made before them.
        c["record"].pop("moments")
        c["record"].pop("compress")
        record = {k: c[k] for k in ("seed", "model", "data", "generation", "judges", "record")}
        select = {"record": record, "positions": positions,
                  **{k: c[k] for k in ("filter", "anchor", "sweep", "selectors")}}
        files = {k: v for k, v in self.inputs().items() if v is not None}
        if files:  # only when set, so that runs without input files keep the fingerprints they had
            select["inputs"] = files
        evaluate = {"select": select, "evaluate": c["evaluate"]}
        return {"record": record, "select": select, "evaluate": evaluate}

    def inputs(self) -> dict[str, str | None]:
        """Digests of the input files the config names, by field (None: not set)."""
        from esn.files import sha256_file

        labels = self.cfg.filter.human_labels  # not there yet (about to be imported): no digest
        return {"filter.human_labels": sha256_file(labels) if labels is not None and labels.is_file() else None}

    def open(self) -> Run:
        """Create or reopen the run directory and take this process's locks (see ``RunDir.open``).

        In a group, every rank must hold the same config; rank 0 alone opens the directory."""
        config = self.cfg.model_dump(mode="json")
        self.team.same_everywhere({f"config {k}": fingerprint(v) for k, v in config.items()})
        self.team.on_leader(lambda: self.rundir.open(config, self.stage_config(), self.shard, self.inputs()))
        return self

    def close(self) -> None:
        """Release the run directory's locks."""
        self.rundir.close()

    def __enter__(self) -> Run:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared resources ----------------------------------------------------------------------------
    @cached_property
    def device(self) -> str:
        """The configured device; ``cuda`` is this rank's own GPU in a group."""
        return self.team.device(self.cfg.model.device)

    @cached_property
    def dataset(self) -> ESDDataset | CSVDataset:
        d = self.cfg.data
        if d.kind == "csv":
            return CSVDataset(d.root)
        return ESDDataset(d.root, d.splits)

    def sources(self, split: str) -> list[Source]:
        """The neutral sources of a split, capped at ``data.max_sources`` by a seeded draw."""
        found = self.dataset.sources(split)
        cap = self.cfg.data.max_sources
        if cap is not None and len(found) > cap:
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "sources", split))
            keep = np.sort(rng.choice(len(found), size=cap, replace=False))
            found = [found[i] for i in keep]
        return found

    @cached_property
    def adapter(self):
        from esn.plugins import registry

        m = self.cfg.model
        cls = registry().adapter(m.adapter)
        self.console.print(f"loading {m.adapter} from {m.source}", markup=False, highlight=False)
        return cls.load(m.source, dtype=m.dtype, device=self.device, trust_remote_code=m.trust_remote_code)

    @cached_property
    def emotion_judges(self) -> dict[str, Any]:
        return {spec.name: self._load_judge(spec) for spec in self.cfg.judges.emotion}

    @cached_property
    def quality_judge(self):
        spec = self.cfg.judges.quality
        return None if spec is None else self._load_judge(spec)

    def load_judges(self) -> None:
        """Load every judge now (they load on first use otherwise)."""
        _ = self.emotion_judges, self.quality_judge

    @property
    def filter_judge(self) -> str:
        """The judge whose label decides success (the first emotion judge)."""
        return self.cfg.judges.emotion[0].name

    def _load_judge(self, spec):
        from esn.plugins import registry

        cls = registry().judge(spec.name)
        return cls.load(spec.source, device=self.device, **spec.options)


def load_run(config: str | Path, *, run_dir: str | Path | None = None, console: Console | None = None,
             shard: tuple[int, int] | None = None, team: Solo | None = None, resize: bool = False) -> Run:
    """A ``Run`` of the config file at ``config`` (``run_dir`` overrides the config's), in ``team`` (alone by
    default); ``resize`` lets it finish a stage another number of processes left unfinished."""
    from esn.pipeline.config import load_config

    return Run(load_config(config, run_dir=run_dir), console=console, shard=shard, team=team, resize=resize)
