"""Every TOML run config shown in the docs parses as a RunConfig (no unknown keys, values in range)."""

import re
from pathlib import Path

import pytest
from esn.pipeline.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "pipeline.md", *sorted((ROOT / "docs" / "adapters").glob("*.md"))]
BLOCKS = [(page, block) for page in PAGES for block in re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)
          if "[model]" in block]


def test_the_docs_show_run_configs():
    assert {page.name for page, _ in BLOCKS} >= {"pipeline.md", "minicpm_o.md", "kimi_audio.md"}


@pytest.mark.parametrize("page,block", BLOCKS, ids=[f"{p.name}#{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_doc_config_parses(page, block, tmp_path):
    import tomllib

    from esn.plugins import registry

    cfg = parse_config(tomllib.loads(block), where=str(page), base=tmp_path, stem="doc")
    reg = registry()
    reg.adapter(cfg.model.adapter)  # raises for a name no installed adapter registers
    for spec in [*cfg.judges.emotion, *([cfg.judges.quality] if cfg.judges.quality else [])]:
        reg.judge(spec.name)


def test_the_demo_reports_real_config_parses(tmp_path):
    import tomllib

    from esn.pipeline.demo import REAL_TOML
    from esn.plugins import registry

    cfg = parse_config(tomllib.loads(REAL_TOML), where="esn.pipeline.demo.REAL_TOML", base=tmp_path, stem="study")
    assert [j.name for j in cfg.judges.emotion] == ["emotion2vec", "lalm_judge"]
    for spec in cfg.judges.emotion:
        registry().judge(spec.name)


def test_the_adapter_guides_sed_recipe_rewrites_what_esn_demo_writes(tmp_path):
    """The guide's `sed` line, run on the config `esn demo` writes, changes adapter, source and run_dir."""
    import shutil
    import subprocess
    import tomllib

    from esn.pipeline.demo import DEMO_TOML

    page = (ROOT / "docs" / "adapters" / "writing-an-adapter.md").read_text()
    recipe = re.search(r"^(sed .*?demo-out/demo\.toml) > demo-out/my_model\.toml$", page, re.M | re.S)
    assert recipe, "the guide's sed recipe"
    if shutil.which("sed") is None:
        pytest.skip("no sed on this machine")
    (tmp_path / "demo-out").mkdir()
    (tmp_path / "demo-out" / "demo.toml").write_text(DEMO_TOML)
    command = recipe.group(1).replace("\\\n", " ")
    out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    cfg = tomllib.loads(out)
    assert cfg["model"]["adapter"] == "my_model" and cfg["model"]["source"] == "my-tiny"
    assert cfg["run_dir"] == "runs/my_model"
    assert out.count("\n") == DEMO_TOML.count("\n")  # only the three lines changed
