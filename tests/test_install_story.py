"""One install story, told the same way everywhere: the README, the documentation, every distribution's
index README and every message of the `esn` command install esn distributions by name from the wheels
`make dist` writes (`pip install --find-links dist ...`, torch first), never from folders of a checkout."""

import ast
import re
from pathlib import Path

import pytest
from esn.install import FIND_LINKS, TORCH_CPU, pip_install

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "core" / "README.md",
        *sorted(ROOT.glob("adapters/*/README.md")), *sorted(ROOT.glob("plugins/*/README.md"))]
SOURCES = [p for d in ("core/src", *map(str, ROOT.glob("adapters/*/src")), *map(str, ROOT.glob("plugins/*/src")))
           for p in sorted((ROOT / d).rglob("*.py"))]
ESN_DIST = re.compile(r"(?<![\w./-])['\"]?esn-(?:core|qwen-omni|qwen3-omni|minicpm-o|kimi-audio|emotion2vec|"
                      r"lalm-judge|utmos|planted)\b")


def _strings(path: Path) -> list[str]:
    """Every string constant of a module, f-string parts included."""
    return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def _pip_lines(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"pip install[^\n`;&|]*", text)]


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_install_of_an_esn_distribution_uses_the_wheels(path):
    texts = _strings(path) if path.suffix == ".py" else [path.read_text()]
    for text in texts:
        for line in _pip_lines(text):
            assert "pip install ./" not in line and 'pip install "./' not in line, f"{path}: {line}"
            if ESN_DIST.search(line.split("#")[0]):  # a comment may name a distribution
                assert FIND_LINKS in line, f"{path}: {line!r} installs an esn distribution without {FIND_LINKS}"


def test_the_readme_the_install_page_and_the_home_page_tell_the_same_steps():
    steps = [TORCH_CPU, "make dist", pip_install("esn-core[plots]", "esn-qwen-omni")]
    for page in ("README.md", "docs/install.md", "docs/index.md"):
        text = (ROOT / page).read_text()
        assert "not on PyPI yet" in text.replace("**None is on PyPI yet.**", "not on PyPI yet"), page
        block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if TORCH_CPU in b)
        lines = [line.split("#")[0].strip() for line in block.splitlines()]
        assert [line for line in lines if line in steps] == steps, (page, lines)


def test_the_messages_name_extras_and_distributions_through_one_helper():
    from esn.plugins import missing_message
    from esn.serve import EXTRA

    assert pip_install("esn-core[serve]") == "pip install --find-links dist 'esn-core[serve]'"
    assert "pip install --find-links dist esn-emotion2vec" in missing_message("judge", "emotion2vec", [])
    assert EXTRA  # the serve extra's message: tests/test_serve.py runs it without the extra
