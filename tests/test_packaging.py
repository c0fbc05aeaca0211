"""Distributions: every package builds a wheel; esn-core installs alone; third-party adapters plug in."""

import json
import os
import subprocess
import sys
import textwrap
import venv
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


def test_adapters_list_json_lists_exactly_the_three_adapters():
    result = _esn("adapters", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert sorted(r["name"] for r in rows) == ["kimi_audio", "minicpm_o", "qwen_omni"]
    dists = {r["name"]: r["distribution"] for r in rows}
    assert dists == {"qwen_omni": "esn-qwen-omni", "minicpm_o": "esn-minicpm-o", "kimi_audio": "esn-kimi-audio"}
    assert all(r["version"] and r["streams"] for r in rows)


def test_user_errors_are_one_line_without_traceback():
    result = _esn("adapters", "tiny", "no_such_adapter", "/tmp/x")
    assert result.returncode == 2
    assert "unknown adapter 'no_such_adapter'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_every_distribution_builds_a_wheel_and_core_installs_alone(tmp_path):
    wheels = tmp_path / "wheels"
    for dist in DISTRIBUTIONS:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(ROOT / dist)], check=True, capture_output=True, timeout=300)
    built = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert len(built) == len(DISTRIBUTIONS), built
    core_wheel = next(wheels.glob("esn_core-*.whl"))
    # esn-core's metadata must not pull adapter or judge dependencies
    import zipfile

    with zipfile.ZipFile(core_wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist") and "extra ==" not in line]
    joined = " ".join(requires).lower()
    for heavy in ("funasr", "utmos", "transformers", "modelscope"):
        assert heavy not in joined, f"esn-core requires {heavy}: {requires}"

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True, capture_output=True, timeout=600)
    subprocess.run([py, "-m", "pip", "install", "-q", str(core_wheel)], check=True, capture_output=True, timeout=600)
    result = _esn("adapters", "list", python=py)
    assert result.returncode == 0, result.stderr
    assert "No adapter is installed" in result.stdout
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"funasr", "utmos-pytorch", "transformers"}, names
