"""Installing esn-core alone never pulls the judges' heavy dependencies (funasr, utmos-pytorch)."""

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("funasr", "utmos-pytorch", "utmos", "modelscope")


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_core_pyproject_does_not_depend_on_judge_backends():
    project = tomllib.loads((ROOT / "core" / "pyproject.toml").read_text())["project"]
    required = names(project["dependencies"])
    assert not required & set(HEAVY), required
    for extra, reqs in project.get("optional-dependencies", {}).items():
        assert not names(reqs) & set(HEAVY), (extra, reqs)
    # ...and the judge packages do declare them
    for plugin, dep in (("emotion2vec", "funasr"), ("utmos", "utmos-pytorch")):
        deps = tomllib.loads((ROOT / "plugins" / plugin / "pyproject.toml").read_text())["project"]["dependencies"]
        assert dep in names(deps)


def test_built_core_wheel_metadata_requires_no_judge_backend(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT / "core")], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("esn_core-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires, "the wheel lists esn-core's own requirements"
    assert not names(requires) & set(HEAVY), requires
