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
