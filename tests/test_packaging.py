"""Distributions: honest metadata, `make dist` wheels and sdists that install into a fresh venv and run there,
third-party adapters plug in."""

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ["core", *sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("adapters/*/pyproject.toml")),
                 *sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("plugins/*/pyproject.toml"))]


def _esn(*args, env_extra=None, python=sys.executable):
    env = {k: v for k, v in os.environ.items() if k != "ESN_LOAD_PLUGINS"}
    env.update(env_extra or {})
    return subprocess.run([python, "-m", "esn", *args], capture_output=True, text=True, env=env, timeout=300)


def _write_package(root: Path, name: str, plugin_source: str) -> Path:
    pkg = root / name
    (pkg / "src" / name).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        [project]
        name = "{name.replace('_', '-')}"
        version = "1.2.3"
        [project.entry-points.esn]
        {name} = "{name}.plugin"
        [tool.hatch.build.targets.wheel]
        packages = ["src/{name}"]
    """))
    (pkg / "src" / name / "__init__.py").write_text("")
    (pkg / "src" / name / "plugin.py").write_text(textwrap.dedent(plugin_source))
    return pkg


def _pip_install_target(pkg: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(pkg)], check=True, capture_output=True, timeout=300)


GOOD = """
    from esn.adapters import ModelAdapter
    from esn.plugins import hookimpl

    class ParrotAdapter(ModelAdapter):
        name = "parrot"
        architectures = ("ParrotForSpeech",)
        streams = ("lm",)
        description = "a third-party test adapter"

        @classmethod
        def load(cls, source, **kw):
            raise NotImplementedError

        @classmethod
        def write_tiny(cls, directory, *, seed=0):
            raise NotImplementedError

        def hook_points(self):
            return []

        def generate(self, requests, config):
            return []

    @hookimpl
    def register_adapters(register):
        register(ParrotAdapter)
"""


@pytest.mark.slow
def test_third_party_adapter_shows_up_and_a_broken_one_is_skipped(tmp_path):
    target = tmp_path / "site"
    _pip_install_target(_write_package(tmp_path, "esn_parrot", GOOD), target)
    _pip_install_target(_write_package(tmp_path, "esn_broken", "raise ImportError('missing libfoo')\n"), target)
    result = _esn("adapters", "list", "--json", env_extra={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["parrot"]["distribution"] == "esn-parrot"
    assert rows["parrot"]["version"] == "1.2.3"
    assert rows["parrot"]["streams"] == ["lm"]
    assert "esn-broken" in result.stderr and "skipped" in result.stderr and "missing libfoo" in result.stderr
    # the broken plugin costs nothing else: the repository's own adapters are still listed
    assert {"qwen_omni", "minicpm_o", "kimi_audio"} <= set(rows)


def test_adapters_list_json_lists_exactly_the_repositorys_adapters():
    result = _esn("adapters", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert sorted(r["name"] for r in rows) == ["kimi_audio", "minicpm_o", "moshi", "planted", "qwen3_omni", "qwen_omni"]
    dists = {r["name"]: r["distribution"] for r in rows}
    assert dists == {"qwen_omni": "esn-qwen-omni", "minicpm_o": "esn-minicpm-o", "kimi_audio": "esn-kimi-audio",
                     "qwen3_omni": "esn-qwen3-omni", "moshi": "esn-moshi",
                     "planted": "esn-planted"}  # five LALMs and the demo's synthetic model
    assert all(r["version"] and r["streams"] for r in rows)


def test_user_errors_are_one_line_without_traceback():
    result = _esn("adapters", "tiny", "no_such_adapter", "/tmp/x")
    assert result.returncode == 2
    assert "unknown adapter 'no_such_adapter'" in result.stderr
    assert "Traceback" not in result.stderr


def _pyproject(dist: str) -> dict:
    return tomllib.loads((ROOT / dist / "pyproject.toml").read_text())


def _requirement_names(project: dict) -> dict[str, str]:
    """``{normalised name: requirement}`` of a project's dependencies and every extra's."""
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]): r for r in reqs}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_distributions(dist: str) -> dict[str, set[str]]:
    """Third-party distributions whose modules ``dist``'s source imports (anywhere, also inside functions)."""
    src = ROOT / dist / "src"
    own = {p.name for p in src.iterdir()}
    providers = md.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - own - set(sys.stdlib_module_names):
                for provider in providers.get(top, ["esn-core"] if top == "esn" else [top]):
                    found.setdefault(_norm(provider), set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_every_distribution_declares_what_it_imports_with_a_lower_bound(dist):
    project = _pyproject(dist)["project"]
    declared = _requirement_names(project)
    imported = _imported_distributions(dist)
    undeclared = {name: sorted(files) for name, files in imported.items() if name not in declared}
    assert not undeclared, f"{dist}/pyproject.toml does not declare what its code imports: {undeclared}"
    for req in declared.values():
        assert ">=" in req or "==" in req, f"{dist}: {req!r} has no lower bound"


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_every_distribution_has_complete_metadata_a_license_and_an_index_readme(dist):
    project = _pyproject(dist)["project"]
    folder = ROOT / dist
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (folder / "LICENSE").read_text() == (ROOT / "LICENSE").read_text(), f"{dist}/LICENSE: copy the root LICENSE"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert project["authors"] and project["keywords"] and project["description"]
    assert {"Typing :: Typed", "Programming Language :: Python :: 3.11"} <= set(project["classifiers"])
    assert set(project["urls"]) >= {"Homepage", "Documentation", "Repository", "Issues"}
    assert project["urls"] == _pyproject("core")["project"]["urls"], "every distribution points at the same place"
    package = "src/" + _pyproject(dist)["tool"]["flit"]["module"]["name"]
    assert (folder / package / "py.typed").is_file(), f"{dist}: {package}/py.typed marks the package as typed"
    readme = (folder / "README.md").read_text()
    assert readme.startswith(f"# {project['name']}\n") and "## Install" in readme and len(readme) > 600
    relative = [link for link in re.findall(r"\]\(([^)]+)\)", readme) if not link.startswith("https://")]
    assert not relative, f"{dist}/README.md: links a package index cannot follow: {relative}"
    assert "Not on PyPI yet" in readme, "say how to install until the distributions are published"


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory):
    """`make dist` into a fresh folder, with a build venv of its own (made by `make dist` itself)."""
    out = tmp_path_factory.mktemp("dist")
    build_venv = tmp_path_factory.mktemp("build-venv") / "venv"
    subprocess.run(["make", "-s", "dist", f"BUILD_VENV={build_venv}", f"DIST={out}", f"PYTHON={sys.executable}",
                    "VENV=/nonexistent/no-dev-venv"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    listed = subprocess.run([str(build_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True).stdout
    out.joinpath(".build-venv-packages.json").write_text(listed)
    return out


@pytest.mark.slow
def test_make_dist_needs_only_a_build_backend(dist_dir):
    """`make dist` works without the development venv (VENV points nowhere) and installs nothing but the
    build frontend and flit_core (with what they need) into its own small venv."""
    names = {p["name"].lower().replace("_", "-") for p in json.loads((dist_dir / ".build-venv-packages.json").read_text())}
    assert {"build", "flit-core"} <= names
    assert names <= {"build", "flit-core", "packaging", "pyproject-hooks", "pip", "setuptools", "wheel"}, names
    assert not Path("/nonexistent/no-dev-venv").exists()


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()


@pytest.mark.slow
def test_make_dist_builds_complete_wheels_and_clean_sdists(dist_dir):
    names = {_pyproject(d)["project"]["name"].replace("-", "_"): d for d in DISTRIBUTIONS}
    wheels = {w.name.split("-")[0]: w for w in dist_dir.glob("*.whl")}
    sdists = {s.name.split("-")[0]: s for s in dist_dir.glob("*.tar.gz")}
    assert set(wheels) == set(names) == set(sdists), (sorted(wheels), sorted(sdists))
    for name, dist in names.items():
        meta = _metadata(wheels[name])
        assert "License-Expression: Apache-2.0" in meta and "Classifier: Typing :: Typed" in meta
        assert "Author: The esn maintainers" in meta and "Project-URL: Repository, " in meta
        assert "Description-Content-Type: text/markdown" in meta
        assert meta.split("\n\n", 1)[1].strip() == (ROOT / dist / "README.md").read_text().strip()
        with zipfile.ZipFile(wheels[name]) as zf:
            files = zf.namelist()
        assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files), files
        assert any(f.endswith("/py.typed") for f in files)
        assert not any("/tests/" in f or f.startswith("tests/") for f in files)
        with tarfile.open(sdists[name]) as tf:
            members = [m.split("/", 1)[1] for m in tf.getnames() if "/" in m]
        assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"} <= set(members)
        stray = [m for m in members if m.startswith("tests") or m.endswith(".gitignore") or "__pycache__" in m]
        assert not stray, f"{name} sdist carries {stray}"
    # esn-core's metadata does not pull adapter or judge dependencies
    with zipfile.ZipFile(wheels["esn_core"]) as zf:
        assert "esn/pipeline/paper.toml" in zf.namelist()  # `esn init --paper` reads it from the package
    core = [line for line in _metadata(wheels["esn_core"]).splitlines()
            if line.startswith("Requires-Dist") and "extra ==" not in line]
    for heavy in ("funasr", "utmos", "transformers", "modelscope"):
        assert heavy not in " ".join(core).lower(), core


@pytest.mark.slow
def test_core_and_an_adapter_from_the_wheels_work_in_a_fresh_venv(dist_dir, tmp_path):
    """A new user's first steps from `make dist` output: torch first (the Makefile's CPU build), esn-core alone,
    then esn-qwen-omni with what it declares, then the adapter's first commands."""
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    subprocess.run(["make", "-s", "torch", f"VENV={env_dir}"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    pip = [py, "-m", "pip", "install", "-q", "--find-links", str(dist_dir)]
    subprocess.run([*pip, "esn-core"], check=True, capture_output=True, timeout=900)
    listed = _esn("adapters", "list", python=py)
    assert listed.returncode == 0 and "No adapter is installed" in listed.stdout, listed.stderr
    installed = {p["name"].lower() for p in json.loads(subprocess.run(
        [py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True).stdout)}
    assert not installed & {"funasr", "utmos-pytorch", "transformers"}, installed
    assert "torch" in installed

    subprocess.run([*pip, "esn-qwen-omni"], check=True, capture_output=True, timeout=900)
    rows = json.loads(_esn("adapters", "list", "--json", python=py).stdout)
    assert [(r["name"], r["distribution"]) for r in rows] == [("qwen_omni", "esn-qwen-omni")]
    tiny = tmp_path / "tiny"
    wrote = _esn("adapters", "tiny", "qwen_omni", str(tiny), python=py)
    assert wrote.returncode == 0 and "Traceback" not in wrote.stderr, wrote.stderr
    table = _esn("hookpoints", "--adapter", "qwen_omni", "--model", str(tiny), python=py)
    assert table.returncode == 0, table.stderr
    assert "synth.layers.1.mlp.gate" in table.stdout and "talker.model.layers.1.mlp.act_fn" in table.stdout
    assert str(ROOT) not in subprocess.run([py, "-c", "import esn, esn_qwen_omni; print(esn.__file__, "
                                            "esn_qwen_omni.__file__)"], capture_output=True, text=True).stdout


@pytest.mark.slow
def test_demo_and_run_from_the_wheels_in_a_fresh_venv(dist_dir, tmp_path):
    """The README's install without the plots extra: `esn demo` finishes (every stage, the report's tables)
    and its report says in one note which extra draws the figures; with the extra installed, `esn run` on
    the same config redraws the report from the saved results (nothing recorded or evaluated again)."""
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    subprocess.run(["make", "-s", "torch", f"VENV={env_dir}"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    pip = [py, "-m", "pip", "install", "-q", "--find-links", str(dist_dir)]
    subprocess.run([*pip, "esn-core", "esn-planted"], check=True, capture_output=True, timeout=900)
    out = tmp_path / "demo"
    done = _esn("demo", "--out", str(out), python=py)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "figure(s) left out: matplotlib is not installed" in report
    assert "pip install --find-links dist 'esn-core[plots]'" in report and "![" not in report
    assert "## Table 2" in report and "| CAS |" in report and not list((out / "figures").glob("*.png"))
    assert done.stderr.count("matplotlib is not installed") == 1  # one note in the terminal too
    before = {p.name: p.stat().st_mtime_ns for p in (out / "evaluate" / "batches").iterdir()}

    subprocess.run([*pip, "esn-core[plots]"], check=True, capture_output=True, timeout=900)
    done = _esn("run", str(out / "demo.toml"), "--json", python=py)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["report"] == str(out / "report.md") and summary["masks"]
    report = (out / "report.md").read_text()
    assert "left out" not in report and "![" in report and (out / "figures" / "curves.png").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "evaluate" / "batches").iterdir()} == before
    assert str(ROOT) not in subprocess.run([py, "-c", "import esn; print(esn.__file__)"], capture_output=True,
                                           text=True).stdout


@pytest.mark.slow
def test_core_runs_on_the_lowest_declared_versions(tmp_path):
    """esn-core's declared lower bounds are tested: install exactly those versions over this venv and run
    tests/core_smoke.py (plugins, CLI tables, configs, record/select/steer, safetensors files, WER, audio).
    torch is the exception: see core/pyproject.toml."""
    pins = []
    for req in _pyproject("core")["project"]["dependencies"]:
        name, lowest = re.fullmatch(r"([\w.-]+)>=([\w.]+)", req.split(";")[0].strip()).groups()
        if name != "torch":
            pins.append((name, lowest))
    overlay = tmp_path / "lowest"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(overlay),
                    *[f"{n}=={v}" for n, v in pins]], check=True, capture_output=True, timeout=900)
    env = {**os.environ, "PYTHONPATH": str(overlay)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "core_smoke.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and "SMOKE OK" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    ran = json.loads(done.stdout.splitlines()[0])
    from packaging.version import Version

    assert {n: Version(ran[n]) for n, _ in pins} == {n: Version(v) for n, v in pins}, ran
