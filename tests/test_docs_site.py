"""The documentation site builds in strict mode, and a public name without a docstring fails it by name."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "docs" / "hooks" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_a_docstring():
    """The check the docs build runs, on every module of every distribution (new ones included)."""
    hook = _hook()
    found = hook.all_modules()
    assert {"core", "adapters/qwen_omni", "plugins/emotion2vec"} <= set(found)
    assert "esn.testing" in found["core"] and "esn.pipeline.config" in found["core"]
    missing = hook.missing_docstrings([m for names in found.values() for m in names])
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_a_missing_docstring_is_named_with_its_file_and_line(tmp_path, monkeypatch):
    package = tmp_path / "pkg_for_doc_check"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "api.py").write_text(textwrap.dedent('''
        """A module."""
        from dataclasses import dataclass

        from esn.interventions import Intervention
        from esn.plugins import hookimpl


        def documented():
            """Yes."""


        def bare():
            pass


        @dataclass
        class Record:
            x: int


        class Gain(Intervention):
            """A gain."""

            @classmethod
            def affine(cls, alpha):  # documented on Intervention: inherits
                return None

            @property
            def width(self):
                return 1

            def _private(self):
                pass


        @hookimpl
        def register_interventions(register):  # documented by its hook
            register(Gain)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    missing = _hook().missing_docstrings(["pkg_for_doc_check", "pkg_for_doc_check.api"])
    assert [m.split(" (")[0] for m in missing] == [
        "function pkg_for_doc_check.api.bare", "class pkg_for_doc_check.api.Record",
        "property pkg_for_doc_check.api.Gain.width"]
    assert missing[0].endswith("pkg_for_doc_check/api.py:13)")  # the def line


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`, as `make docs`: links checked, the API reference generated and checked."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "esn.adapters" / "index.html").is_file()
    page = (tmp_path / "site" / "reference" / "esn.testing" / "index.html").read_text()
    assert "check_checkpoint" in page and "check_generation" in page
    assert (tmp_path / "site" / "install" / "index.html").is_file()
