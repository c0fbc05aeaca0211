"""What an adapter's real model needs, checked against this environment without loading any weights.

Each adapter declares its own needs on its class (core knows no model)::

    class MyAdapter(ModelAdapter):
        requirements = (Requirement("transformers", ">=4.51.0,<4.53", why="..."),)
        needs_cuda = True     # the model's own code runs on CUDA only
        remote_code = True    # loading runs Python shipped inside the checkpoint

``esn adapters check NAME`` prints ``check(cls)``: each need against what is installed, and the pip line
that installs what is missing. An adapter's ``load`` calls ``ensure(...)`` so that a wrong stack fails with
one EsnError before any weights load, instead of deep inside the model's own code.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from esn.errors import EsnError


@dataclass(frozen=True)
class Requirement:
    """One package the real model needs. ``spec`` is the version range checked; ``install`` is what the
    install line asks pip for (a known-good pin inside that range, or a source that is not on PyPI)."""

    distribution: str  # pip name, e.g. "transformers"
    spec: str = ""  # PEP 440 range, e.g. ">=4.51.0,<4.53"; "" accepts any version
    why: str = ""  # what needs it and where the bounds come from
    install: str = ""  # pip argument; default "<distribution><spec>"
    module: str = ""  # top-level import name: finds a package present without pip metadata (a cloned repo)
    pip_options: str = ""  # e.g. "--no-build-isolation": installed by its own pip call, after the ones before it
    optional: bool = False  # reported, never a failure

    def __post_init__(self) -> None:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            SpecifierSet(self.spec)
        except InvalidSpecifier:
            raise ValueError(f"Requirement({self.distribution!r}): {self.spec!r} is not a PEP 440 version range") from None

    @property
    def pip_argument(self) -> str:
        """What the install line asks pip for: ``install``, else ``<distribution><spec>``."""
        return self.install or f"{self.distribution}{self.spec}"


@dataclass(frozen=True)
class Finding:
    """One row of a check. ``status``: ok, missing, mismatch, optional (absent, not needed) or opt-in."""

    need: str
    required: str
    found: str
    status: str
    why: str = ""

    @property
    def ok(self) -> bool:
        """Nothing to do about this row: met, optional, or an opt-in the user gives when loading."""
        return self.status in ("ok", "optional", "opt-in")


@dataclass(frozen=True)
class Report:
    """Everything one adapter's real model needs, against this environment."""

    adapter: str
    model: str
    findings: tuple[Finding, ...]
    install: str  # installs every unmet requirement ("" when none is unmet)
    install_all: str  # installs the whole stack the model was written for

    @property
    def ok(self) -> bool:
        """Every row is ok."""
        return all(f.ok for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``esn adapters check --json``)."""
        return {"adapter": self.adapter, "model": self.model, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings], "install": self.install, "install_all": self.install_all}


def installed_version(req: Requirement) -> str | None:
    """The installed version of ``req`` ("unknown" if only importable, e.g. a cloned repo), or None."""
    try:
        return metadata.version(req.distribution)
    except metadata.PackageNotFoundError:
        pass
    if req.module:
        try:
            if importlib.util.find_spec(req.module) is not None:
                return "unknown"
        except (ImportError, ValueError):
            pass
    return None


def satisfies(version: str, spec: str) -> bool:
    """True if ``version`` is in the PEP 440 range ``spec`` (local labels like ``+cpu`` are ignored)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not spec:
        return True
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def finding(req: Requirement) -> Finding:
    """``req`` against this environment: ok, missing, mismatch (wrong version) or optional."""
    version = installed_version(req)
    required = req.spec or "any version"
    if version is None:
        status = "optional" if req.optional else "missing"
        return Finding(req.distribution, required, "not installed", status, req.why)
    if version == "unknown":  # importable without metadata: the version cannot be checked
        status = "ok" if not req.spec or req.optional else "mismatch"
        return Finding(req.distribution, required, f"importable as {req.module} (no version)", status, req.why)
    status = "ok" if satisfies(version, req.spec) else ("optional" if req.optional else "mismatch")
    return Finding(req.distribution, required, version, status, req.why)


def cuda_finding(needed: bool) -> Finding:
    """Whether torch sees a CUDA device; a failure only if the model ``needed`` one."""
    import torch

    if torch.cuda.is_available():
        found = f"{torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"
        status = "ok"
    else:
        found = "not available" + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)")
        status = "missing" if needed else "optional"
    why = "the model's own code runs on CUDA only" if needed else "runs on CPU too (slowly)"
    return Finding("CUDA", "a CUDA device" if needed else "optional", found, status, why)


def remote_code_finding() -> Finding:
    """The opt-in a model that ships its own code needs (``--trust-remote-code``)."""
    return Finding("trust_remote_code", "opt-in", "pass --trust-remote-code (TOML: trust_remote_code = true)",
                   "opt-in", "loading runs Python code shipped inside the checkpoint")


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in "<>![]*?;, ") else arg


def install_line(requirements: Iterable[Requirement]) -> str:
    """pip commands installing ``requirements`` in order; one with ``pip_options`` gets its own call."""
    commands: list[str] = []
    plain: list[str] = []
    for req in requirements:
        if req.pip_options:
            if plain:
                commands.append("pip install " + " ".join(plain))
                plain = []
            commands.append(f"pip install {req.pip_options} {_quote(req.pip_argument)}")
        else:
            plain.append(_quote(req.pip_argument))
    if plain:
        commands.append("pip install " + " ".join(plain))
    return " && ".join(commands)


def check(adapter_cls: Any) -> Report:
    """What ``adapter_cls`` declares its real model needs, against this environment (no weights load)."""
    requirements: Sequence[Requirement] = tuple(getattr(adapter_cls, "requirements", ()))
    rows = [finding(r) for r in requirements]
    unmet = [r for r, f in zip(requirements, rows, strict=True) if not f.ok]
    rows.append(cuda_finding(bool(getattr(adapter_cls, "needs_cuda", False))))
    if getattr(adapter_cls, "remote_code", False):
        rows.append(remote_code_finding())
    model = getattr(adapter_cls, "model_name", "") or adapter_cls.name
    return Report(adapter_cls.name, model, tuple(rows), install_line(unmet), install_line(requirements))


def ensure(requirements: Sequence[Requirement], model: str) -> None:
    """One EsnError naming every unmet requirement and what is installed instead, with the line that installs
    the whole stack (its parts are pinned to each other, e.g. torchaudio to torch); else nothing."""
    problems = []
    for req in requirements:
        row = finding(req)
        if row.ok:
            continue
        have = "not installed" if row.status == "missing" else f"you have {row.found}"
        why = f": {req.why}" if req.why else ""
        problems.append(f"{req.distribution}{req.spec} ({have}{why})")
    if problems:
        raise EsnError(f"{model} needs {'; '.join(problems)}. Install the stack it was written for: "
                       f"{install_line(requirements)}")
