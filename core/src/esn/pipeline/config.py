"""The run configuration users write (TOML, JSON, or YAML when PyYAML is installed).

Every section forbids unknown keys, and every out-of-range value is refused with the field's dotted path,
so a typo never silently runs the paper's defaults. Relative paths are relative to the config file.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from esn.adapters import GenerationConfig
from esn.emotions import TARGET_EMOTIONS, normalize_emotion
from esn.errors import EsnError
from esn.files import read_bytes
from esn.pipeline.data import SplitRule

SELECTORS = ("random", "lap", "lape", "mad", "cas")
POSITIONS = ("all", "generated")
Positions = Literal["all", "generated"]
# A torch device name (cpu, cuda, cuda:1, mps, ...); whether it exists is checked before a run starts.
_DEVICE = re.compile(r"[a-z][a-z_]*(:\d+)?")


def _selector(name: str) -> str:
    """A selector name the plugin registry knows (built-ins and installed selector plugins)."""
    from esn.plugins import registry

    try:
        registry().selector(name)
    except EsnError as exc:
        raise ValueError(str(exc)) from None
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """``[model]``: which adapter loads which checkpoint, where, and which streams are recorded."""
    adapter: str = "qwen_omni"
    source: str = Field(description="checkpoint directory or hub id")
    dtype: str = "auto"
    device: str = "cpu"
    streams: list[Literal["lm", "synth"]] = Field(default_factory=lambda: ["lm"], min_length=1)
    # Remote-code checkpoints (MiniCPM-o, Kimi-Audio) run their own Python: an explicit opt-in.
    trust_remote_code: StrictBool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"{v!r} is not a torch device name (cpu, cuda, cuda:1, mps, ...)")
        return v


class DataSection(_Section):
    """``[data]``: the dataset (ESD layout or a CSV) and its splits."""
    kind: Literal["esd", "csv"] = "esd"
    root: Path = Field(description="ESD root folder, or the CSV file (or a folder holding metadata.csv)")
    splits: dict[str, list[SplitRule]] | None = Field(None, description="ESD splits; default: the paper's Table 1")
    max_sources: int | None = Field(None, ge=1, description="use at most this many sources per split (seeded)")


class JudgeSpec(_Section):
    """One judge: its registered name, checkpoint (default: the judge's) and load options."""
    name: str
    source: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class JudgesSection(_Section):
    """``[judges]``: emotion judges (the first decides success), the quality judge, input handling."""
    emotion: list[JudgeSpec] = Field(min_length=1, description="emotion judges; the first decides success")
    quality: JudgeSpec | None = Field(None, description="naturalness judge (UTMOS)")
    # Input handling before judging. The paper only resamples to 16 kHz (the defaults). Near-silent or very
    # short clips are not judged (label None: a miss) unless these ask for normalisation / padding.
    loudness_dbfs: float | None = Field(None, le=0, description="RMS-normalise each clip to this level first")
    min_seconds: float = Field(0.0, ge=0, le=10, description="zero-pad shorter clips to this length")


class RecordSection(_Section):
    """``[record]``: the split converted for identification, its target emotions, batch size."""
    split: str = "identification"
    targets: list[str] = Field(default_factory=lambda: list(TARGET_EMOTIONS), min_length=2)
    batch_size: int = Field(8, ge=1)
    save_audio: StrictBool = Field(False, description="keep every converted wav (needed for the human label kit)")
    # Both parts are always stored (prompt and generated counts per attempt): this picks the one select uses.
    positions: Positions = Field("all", description="positions counted in P: all (prompt and generated) or "
                                                    "generated only")
    # What each attempt keeps on disk (docs/pipeline.md, "The record store's size"): neither changes a selection.
    moments: Literal["auto"] | StrictBool = Field(
        "auto", description="also store gate sums and sums of squares (8 more bytes a neuron per attempt): "
                            "auto = only when a configured selector takes moments")
    compress: StrictBool = Field(True, description="store the counts compressed (about half their bytes; read "
                                                   "back bit for bit)")

    @field_validator("targets")
    @classmethod
    def _emotions(cls, v: list[str]) -> list[str]:
        try:
            out = [normalize_emotion(e, TARGET_EMOTIONS) for e in v]
        except EsnError as exc:
            raise ValueError(str(exc)) from None
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate target emotions {v}")
        return out


class FilterSection(_Section):
    """``[filter]``: what counts as a successful conversion (judge label, WER <= ``tau_wer``), human labels."""
    tau_wer: float = Field(0.15, ge=0, allow_inf_nan=False, description="max WER of decoded text vs transcript")
    require_match: StrictBool = Field(True, description="judge label must equal the target emotion")
    human_labels: Path | None = Field(None, description="CSV of human labels: adds CAS-H (human-filtered) masks")


class InterventionSpec(_Section):
    """One intervention of the sweep: a registered method and its alpha (checked, defaulted)."""
    method: str = "steer"
    alpha: float | None = None

    @model_validator(mode="after")
    def _alpha(self) -> InterventionSpec:
        from esn.plugins import registry

        try:
            cls = registry().intervention(self.method)
        except EsnError as exc:
            raise ValueError(str(exc)) from None
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        try:
            self.alpha = cls.check_alpha(self.alpha)
        except EsnError as exc:
            raise ValueError(str(exc)) from None
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (the paper's interventions strengthen), got {self.alpha}")
        return self


class AnchorSection(_Section):
    """The paper's anchor setting: CAS, r = 0.5 %, c = 50, steering with alpha = 1."""

    selector: str = "cas"
    rate: float = Field(0.005, gt=0, le=1)
    c: int = Field(50, ge=1)
    method: str = "steer"
    alpha: float | None = 1.0
    stream: Literal["lm", "synth"] | None = Field(None, description="stream the sweeps vary on (default: the "
                                                                    "first of model.streams)")

    @model_validator(mode="after")
    def _check(self) -> AnchorSection:
        spec = InterventionSpec(method=self.method, alpha=self.alpha)
        self.alpha = spec.alpha
        return self

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, v: str) -> str:
        return _selector(v)


class SweepSection(_Section):
    """One factor at a time around the anchor (Table 3 selectors, Figures 4-7, Table 4 alphas)."""

    selectors: list[str] = Field(default_factory=lambda: list(SELECTORS))
    rates: list[float] = Field(default_factory=list)
    c: list[int] = Field(default_factory=list)
    alphas: list[float] = Field(default_factory=list)
    interventions: list[InterventionSpec] = Field(default_factory=list)
    # The ablation of record.positions: the anchor again with P counted over these positions.
    positions: list[Positions] = Field(default_factory=list)
    # LAPE's global percentile tau_p (the paper leaves its value open): the anchor with LAPE at each quantile.
    lape_quantiles: list[float] = Field(default_factory=list)

    @field_validator("selectors")
    @classmethod
    def _selectors(cls, v: list[str]) -> list[str]:
        return [_selector(name) for name in v]

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        for i, r in enumerate(v):
            if not 0 < r <= 1:
                raise ValueError(f"rates[{i}] = {r}: a selection rate r must be in (0, 1]")
        return v

    @field_validator("c")
    @classmethod
    def _c(cls, v: list[int]) -> list[int]:
        for i, c in enumerate(v):
            if c < 1:
                raise ValueError(f"c[{i}] = {c}: a success-set cap c must be >= 1")
        return v

    @field_validator("lape_quantiles")
    @classmethod
    def _quantiles(cls, v: list[float]) -> list[float]:
        for i, q in enumerate(v):
            if not (math.isfinite(q) and 0 <= q <= 1):
                raise ValueError(f"lape_quantiles[{i}] = {q}: a percentile of P must be in [0, 1]")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        for i, a in enumerate(v):
            if not (math.isfinite(a) and a >= 0):
                raise ValueError(f"alphas[{i}] = {a}: alpha must be finite and >= 0")
        return v


class EvaluateSection(_Section):
    """``[evaluate]``: the splits of the evaluation grid, batch size, bootstrap resamples."""
    splits: list[str] = Field(default_factory=lambda: ["test_seen", "test_unseen"], min_length=1)
    batch_size: int = Field(8, ge=1)
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% CIs (0: none)")
    save_audio: StrictBool = Field(True, description="keep converted wavs (needed for the human A/B kit)")
    positions: Positions = Field("all", description="positions steered: every forward (prompt and generated) "
                                                    "or generated steps only")


def check_selector_options(name: str, options: dict[str, Any]) -> None:
    """``options`` must be keyword parameters of selector ``name`` with values it accepts (EsnError)."""
    import numpy as np

    from esn.plugins import registry
    from esn.selection import check_options

    fn = registry().selector(name)
    check_options(name, fn, options)
    # A dry run on a small made-up P: a bad value fails here, before any recording.
    probe = np.linspace(0.1, 0.9, 16).reshape(2, 8)
    fn(probe, 1, rate=0.25, seed=0, emotions=("happy", "sad"), **options)


class RunConfig(_Section):
    """A whole run configuration (the file ``esn run`` reads), every section checked."""
    run_dir: Path | None = Field(None, description="default: runs/<config name> next to the config")
    seed: int = 0
    model: ModelSection
    data: DataSection
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    judges: JudgesSection
    record: RecordSection = Field(default_factory=RecordSection)
    filter: FilterSection = Field(default_factory=FilterSection)
    anchor: AnchorSection = Field(default_factory=AnchorSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    selectors: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options per selector, e.g. [selectors.lape] quantile = 0.95")
    notes: str = Field("", description="free text shown at the top of the report")

    @field_validator("selectors")
    @classmethod
    def _selector_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, options in v.items():
            try:
                check_selector_options(name, options)
            except EsnError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _streams(self) -> RunConfig:
        if self.anchor.stream is not None and self.anchor.stream not in self.model.streams:
            raise ValueError(f"anchor.stream {self.anchor.stream!r} is not recorded (model.streams = "
                             f"{self.model.streams})")
        return self

    @property
    def anchor_stream(self) -> str:
        """The stream the sweeps vary on: ``anchor.stream``, else the first recorded stream."""
        return self.anchor.stream or self.model.streams[0]

    def resolve(self, base: Path, stem: str) -> RunConfig:
        """Make every relative path absolute against ``base`` (the config's folder)."""
        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

        out = self.model_copy(deep=True)
        out.run_dir = fix(self.run_dir) if self.run_dir else (base / "runs" / stem).resolve()
        out.data.root = fix(self.data.root)
        out.filter.human_labels = fix(self.filter.human_labels)
        src = Path(self.model.source)
        if not src.is_absolute() and (base / src).exists():
            out.model.source = str((base / src).resolve())
        for spec in [*out.judges.emotion, out.judges.quality]:
            if spec is not None and spec.source and not Path(spec.source).is_absolute() and (base / spec.source).exists():
                spec.source = str((base / spec.source).resolve())
        return out


# -- settings: one (mask recipe, intervention) of the evaluation grid ---------------------------------
@dataclass(frozen=True, order=True)
class Recipe:
    """How one mask set is made: selector, r, c, which successes (``labels``: ``"ser"`` judge-filtered or
    ``"human"`` for CAS-H), the stream it is selected on, and the positions P counts."""

    selector: str
    rate: float
    c: int
    labels: str = "ser"
    stream: str = "lm"
    positions: str = "all"
    quantile: float | None = None  # LAPE's percentile when swept (None: [selectors.lape] or its default)

    @property
    def stats_key(self) -> str:
        """The statistics the recipe selects from: ``c<c>_<labels>[_gen]``."""
        return f"c{self.c}_{self.labels}{'' if self.positions == 'all' else '_gen'}"

    @property
    def key(self) -> str:
        """``<selector>[-h][_synth]_r<r>_c<c>[_gen][_q<quantile>]``: the name of its mask file."""
        stream = "" if self.stream == "lm" else f"_{self.stream}"
        positions = "" if self.positions == "all" else "_gen"
        q = "" if self.quantile is None else f"_q{self.quantile:g}"
        return (f"{self.selector}{'-h' if self.labels == 'human' else ''}{stream}_r{self.rate:g}_c{self.c}"
                f"{positions}{q}")


@dataclass(frozen=True, order=True)
class Setting:
    """One cell recipe of the evaluation grid: a mask (selector, rate, c, labels) and an intervention."""
    selector: str
    rate: float
    c: int
    labels: str  # "ser" (judge-filtered successes) or "human" (CAS-H)
    method: str
    alpha: float
    stream: str = "lm"  # the stream the mask is selected on and applied to
    positions: str = "all"  # the positions P counted when the mask was selected
    quantile: float | None = None  # LAPE's percentile, on the points of sweep.lape_quantiles

    @property
    def recipe(self) -> Recipe:
        """The mask half of the setting (everything but the intervention)."""
        return Recipe(self.selector, self.rate, self.c, self.labels, self.stream, self.positions, self.quantile)

    @property
    def mask_key(self) -> str:
        """The mask's file key (``Recipe.key``), e.g. ``cas_r0.005_c50``, ``cas-h_synth_r0.005_c50_gen``."""
        return self.recipe.key

    @property
    def key(self) -> str:
        """The setting's result key: mask key, method and alpha, e.g. ``cas_r0.005_c50_steer_a1``."""
        return f"{self.mask_key}_{self.method}_a{self.alpha:g}"

    @property
    def label(self) -> str:
        """The selector as tables show it: ``CAS``, ``CAS-H``, ``Random``."""
        name = self.selector.upper() + ("-H" if self.labels == "human" else "")
        if self.quantile is not None:
            name += f" q={self.quantile:g}"
        return name.replace("RANDOM", "Random")


def settings(cfg: RunConfig) -> list[Setting]:
    """The anchor first, then every one-factor-at-a-time variation, without duplicates.

    The selector comparison runs on every recorded stream (Table 3 for ``lm``, Table 6 for ``synth``): masks
    are always selected within one stream. The other sweeps vary the anchor on its own stream.
    """
    a, s = cfg.anchor, cfg.sweep
    base = Setting(a.selector, a.rate, a.c, "ser", a.method, float(a.alpha), cfg.anchor_stream,
                   cfg.record.positions)
    streams = [base.stream, *(st for st in cfg.model.streams if st != base.stream)]
    out = [base]
    for k, stream in enumerate(streams):
        selectors = s.selectors if k == 0 else dict.fromkeys([a.selector, *s.selectors])
        out += [replace(base, selector=sel, stream=stream) for sel in selectors]
    out += [replace(base, rate=r) for r in s.rates]
    out += [replace(base, c=c) for c in s.c]
    out += [replace(base, alpha=float(al)) for al in s.alphas]
    out += [replace(base, method=i.method, alpha=float(i.alpha)) for i in s.interventions]
    out += [replace(base, positions=p) for p in s.positions]
    out += [replace(base, selector="lape", quantile=float(q)) for q in s.lape_quantiles]
    if cfg.filter.human_labels is not None:
        out.append(replace(base, labels="human"))
    seen: set[Setting] = set()
    return [x for x in out if not (x in seen or seen.add(x))]


def mask_recipes(cfg: RunConfig) -> list[Recipe]:
    """Distinct mask recipes needed by the grid, in grid order."""
    return list(dict.fromkeys(st.recipe for st in settings(cfg)))


# -- loading ------------------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    if path.is_dir():
        raise EsnError(f"config {path} is a folder, not a file")
    if not path.is_file():
        raise EsnError(f"config file not found: {path}")
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EsnError(f"{path}: a config must be UTF-8 text ({exc})") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                from esn.install import pip_install

                raise EsnError(f"{path}: YAML configs need PyYAML ({pip_install('esn-core[yaml]')}), or use TOML") from None
            return yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise EsnError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    except RecursionError:
        raise EsnError(f"{path}: nested too deeply to be a config") from None
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise EsnError(f"{path}: not valid YAML: {exc}") from None
        raise
    raise EsnError(f"{path}: unknown config format {path.suffix!r} (use .toml, .json or .yaml)")


def format_validation(exc: ValidationError, where: str) -> str:
    """A pydantic validation error as one line per field: dotted path, what is wrong, the value given."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo? see docs/pipeline.md for the allowed keys)"
        got = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {msg}{shown}")
    return f"{where}: invalid configuration:\n" + "\n".join(lines)


def parse_config(data: dict, *, where: str = "config", base: Path | None = None, stem: str = "run") -> RunConfig:
    """A config from parsed data, validated (EsnError listing every bad field) and paths made absolute."""
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise EsnError(format_validation(exc, where)) from None
    except RecursionError:
        raise EsnError(f"{where}: nested too deeply to be a config") from None
    try:
        return cfg.resolve(base or Path.cwd(), stem)
    except (OSError, ValueError) as exc:  # a path with a NUL byte, or too long for the filesystem
        raise EsnError(f"{where}: a path in the config cannot be used ({exc})") from None


def load_config(path: str | Path, *, run_dir: str | Path | None = None) -> RunConfig:
    """Read and validate a config file (.toml, .json, .yaml); ``run_dir`` overrides the file's."""
    path = Path(path).resolve()
    cfg = parse_config(_read(path), where=str(path), base=path.parent, stem=path.stem)
    if run_dir is not None:
        cfg.run_dir = Path(run_dir).resolve()
    return cfg
