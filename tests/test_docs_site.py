"""The documentation site builds in strict mode, and a public name without a docstring fails it by name."""

import importlib.util
import json
import re
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


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """`mkdocs build --strict`, as `make docs`: links checked, the API reference generated and checked."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.slow
def test_the_site_builds_strictly(site):
    assert (site / "reference" / "esn.adapters" / "index.html").is_file()
    page = (site / "reference" / "esn.testing" / "index.html").read_text()
    assert "check_checkpoint" in page and "check_generation" in page
    assert (site / "install" / "index.html").is_file()


@pytest.mark.slow
def test_the_site_needs_no_network(site):
    """Search, highlighting and fonts come with the site: no page loads a script, style sheet, font or image
    from elsewhere, code is highlighted at build time (Pygments spans, no highlight.js), search has its index."""
    foreign = []
    for page in site.rglob("*.html"):
        text = page.read_text()
        foreign += [f"{page.relative_to(site)}: {m.group(0)}" for m in re.finditer(
            r"<(?:script|img|iframe|source|audio)[^>]*\ssrc=[\"']?(?:https?:)?//[^>]*>|<link[^>]*\shref=[\"']?(?:https?:)?//[^>]*>",
            text)]
    assert not foreign, "\n".join(foreign[:10])
    home = (site / "index.html").read_text()
    assert "highlight.js" not in home and "hljs" not in home
    assert re.search(r'<div class="highlight"><pre><span></span><code><span class="kn">import</span>', home)
    assert json.loads((site / "search" / "search_index.json").read_text())["docs"]


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_home_page_starts_with_the_task():
    """Install, the record -> select -> steer example (the README's, word for word), loading the mask file
    `esn select` writes, serving; the table of pages comes after."""
    home = (ROOT / "docs" / "index.md").read_text()
    headings = re.findall(r"^## (.+)$", home, re.M)
    assert headings[:5] == ["Install", "Record, select, steer", "The whole study", "Load a saved mask", "Serve"]
    readme = (ROOT / "README.md").read_text()
    assert _code_blocks(home, "python")[0] == _code_blocks(readme, "python")[0]
    assert "load_masks(" in _code_blocks(home, "python")[1] and "/select/masks_cas_r0.005_c50.safetensors" in home


@pytest.mark.slow
def test_the_home_page_examples_run(tmp_path):
    """The record -> select -> steer example as written, then the saved-mask recipe on a mask file written
    where `esn select` writes it (select's own file: the example's masks saved by esn.artifacts)."""
    tour, saved = _code_blocks((ROOT / "docs" / "index.md").read_text(), "python")[:2]
    tour = tour.replace('"/tmp/tiny-qwen"', repr(str(tmp_path / "tiny-qwen")))
    path = re.search(r'"([^"]+\.safetensors)"', saved).group(1)
    write = ("from esn.artifacts import save_masks\n"
             f"save_masks({str(tmp_path / path)!r}, masks, layout=layout, meta={{'selector': 'cas'}})\n")
    code = tour + write + saved.replace(repr(path)[1:-1], str(tmp_path / path)) + "print('SAVED', out.text, out.sample_rate)\n"
    (tmp_path / path).parent.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].endswith("24000") and "SAVED" in done.stdout
