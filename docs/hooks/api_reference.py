"""MkDocs hook: the API reference, one page per public module of every esn distribution, and a check
that every public name has a docstring.

Distributions are found, not listed: ``core/src/esn`` and every ``adapters/*/src/<pkg>`` and
``plugins/*/src/<pkg>``, so a new module or package is in the reference (and checked) as soon as it
exists. A public module, class, function, method or property without a docstring is logged as a
warning naming it and its file and line, which fails ``mkdocs build --strict`` (``make docs`` and
``tests/test_docs_site.py``). A method that overrides a documented one inherits its docstring.

Public: a module whose dotted path has no part starting with ``_`` (``__init__`` aside); in a module,
the names of ``__all__`` if it has one, else every name without a leading ``_`` defined in that
module (imported names are documented where they are defined); in a class, every such attribute that
is a function, class method, static method or property, and nested classes. A hook implementation
(``@hookimpl def register_adapters``) is documented by its hook in ``esn.hookspecs``.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import importlib
import inspect
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "reference"
# Stand-ins reproduce a third party's remote-code module tree for tests; they are not esn's API.
EXCLUDE = ("*.standin", "*.standin.*")

log = logging.getLogger("mkdocs.plugins.esn_api_reference")


def distributions(root: Path = ROOT) -> dict[str, list[str]]:
    """``{distribution folder: [top-level import packages]}`` for core and every adapter and plugin."""
    found: dict[str, list[str]] = {}
    for folder in [root / "core", *sorted(root.glob("adapters/*")), *sorted(root.glob("plugins/*"))]:
        packages = sorted(p.parent.name for p in (folder / "src").glob("*/__init__.py"))
        if packages:
            found[str(folder.relative_to(root))] = packages
    return found


def distribution_name(folder: Path) -> str:
    """The ``[project] name`` of the distribution in ``folder``."""
    import tomllib

    return tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"]


def modules(package: str, src: Path) -> list[str]:
    """Dotted names of the public modules of ``package`` under ``src``, the package first."""
    names = []
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(p.startswith("_") for p in parts):
            continue
        name = ".".join(parts)
        if not any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDE):
            names.append(name)
    return sorted(names, key=lambda n: (n != package, n))


def all_modules(root: Path = ROOT) -> dict[str, list[str]]:
    """``{distribution folder: [public module names]}``."""
    return {folder: [m for pkg in packages for m in modules(pkg, root / folder / "src")]
            for folder, packages in distributions(root).items()}


def _own_docstring(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    if not doc:
        return None
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        return None  # the signature dataclasses writes when there is no docstring
    if issubclass(cls, enum.Enum) and doc == "An enumeration.":
        return None
    return doc


def _where(obj: object) -> str:
    try:
        target = inspect.unwrap(obj.fget if isinstance(obj, property) else obj)
        file = Path(inspect.getsourcefile(target) or "?")
        line = inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        return ""
    try:
        file = file.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return f" ({file}:{line})"


def _members(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    out = []
    for name in names:
        obj = getattr(module, name, None)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__:
            out.append((name, obj))
    return out


def _class_missing(cls: type, path: str) -> list[str]:
    missing = [] if _own_docstring(cls) else [f"class {path}{_where(cls)}"]
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if inspect.isclass(raw) and raw.__qualname__.startswith(cls.__qualname__ + "."):
            missing += _class_missing(raw, f"{path}.{name}")
        elif isinstance(raw, (staticmethod, classmethod, property)) or inspect.isfunction(raw):
            # getdoc looks the docstring up the class hierarchy: overrides of documented methods pass.
            if not inspect.getdoc(getattr(cls, name) if not isinstance(raw, property) else raw):
                kind = "property" if isinstance(raw, property) else "method"
                missing.append(f"{kind} {path}.{name}{_where(raw.__func__ if hasattr(raw, '__func__') else raw)}")
    return missing


def _is_hookimpl(fn: object) -> bool:
    """A plugin's implementation of a documented hook (``@esn.plugins.hookimpl``) shares the hook's docs."""
    from esn import hookspecs

    return hasattr(fn, "esn_impl") and bool(inspect.getdoc(getattr(hookspecs, fn.__name__, None)))


def missing_docstrings(module_names: list[str]) -> list[str]:
    """Every public module, class, function, method and property of these modules without a docstring,
    as ``"<kind> <dotted.name> (<file>:<line>)"``."""
    missing = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        if not (module.__doc__ or "").strip():
            missing.append(f"module {module_name} ({_where(module).strip(' ()') or module_name})")
        for name, obj in _members(module):
            path = f"{module_name}.{name}"
            if inspect.isclass(obj):
                missing += _class_missing(obj, path)
            elif not inspect.getdoc(obj) and not _is_hookimpl(obj):
                missing.append(f"function {path}{_where(obj)}")
    return missing


def _page(module: str) -> str:
    return f"{REFERENCE}/{module}.md"


def _index(found: dict[str, list[str]]) -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings of every public module, one page each, grouped by distribution.",
             "Import names are the module paths.", ""]
    for folder, names in found.items():
        lines += [f"## {distribution_name(ROOT / folder)} (`{folder}/`)", ""]
        lines += [f"- [`{m}`]({m}.md)" for m in names]
        lines.append("")
    return "\n".join(lines)


# -- MkDocs events --------------------------------------------------------------------------------


def on_config(config):
    """Add the API reference to the navigation: an index page, then one section per distribution."""
    found = all_modules()
    section = [{"Index": f"{REFERENCE}/index.md"}]
    section += [{distribution_name(ROOT / folder): [{m: _page(m)} for m in names]} for folder, names in found.items()]
    config["nav"] = [*(config["nav"] or []), {"API reference": section}]
    return config


def on_files(files, config):
    """Generate the reference pages; warn about every public name without a docstring."""
    from mkdocs.structure.files import File

    found = all_modules()
    files.append(File.generated(config, f"{REFERENCE}/index.md", content=_index(found)))
    for names in found.values():
        for module in names:
            files.append(File.generated(config, _page(module), content=f"# `{module}`\n\n::: {module}\n"))
    for item in missing_docstrings([m for names in found.values() for m in names]):
        log.warning(f"{item} has no docstring: public names need one (say what it is, with tensor shapes)")
    return files
