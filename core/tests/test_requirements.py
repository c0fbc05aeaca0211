"""esn.requirements and `esn adapters check`: what an adapter's real model needs, against this environment."""

from __future__ import annotations

import json

import numpy
import pytest
import torch
from esn.adapters import ModelAdapter
from esn.cli import main
from esn.errors import EsnError
from esn.requirements import Requirement, check, ensure, finding, install_line, satisfies


class NeedyAdapter(ModelAdapter):
    """Declares needs only; nothing here loads."""

    name = "needy"
    architectures = ("Needy",)
    model_name = "Needy-7B"
    requirements = (
        Requirement("numpy", ">=1.0", why="arrays"),
        Requirement("numpy", "<1.0", install="numpy==0.9", why="an old API"),
        Requirement("esn-no-such-dist", module="json", why="a package present only as a module"),
        Requirement("esn-missing-dist", install="git+https://example.invalid/missing.git", why="not on PyPI"),
        Requirement("esn-optional-dist", optional=True, why="faster"),
    )
    needs_cuda = True
    remote_code = True

    @classmethod
    def load(cls, source, **kwargs):
        raise NotImplementedError

    @classmethod
    def write_tiny(cls, directory, *, seed=0):
        raise NotImplementedError

    def hook_points(self):
        return []

    def generate(self, requests, config):
        return []


def test_a_requirement_needs_a_valid_range():
    with pytest.raises(ValueError, match=r"'>>1' is not a PEP 440 version range"):
        Requirement("transformers", ">>1")


def test_versions_against_ranges():
    assert satisfies("2.8.0+cu121", "<=2.8.0")  # the local label does not count
    assert satisfies("4.52.4", ">=4.51.0,<4.53") and not satisfies("4.53.0", ">=4.51.0,<4.53")
    assert not satisfies("5.0.0.dev0", "<5")  # a 5.0 pre-release is not a 4.x
    assert satisfies("anything", "") and not satisfies("not-a-version", ">=1")


def test_findings():
    rows = {(f.need, f.required): f for f in map(finding, NeedyAdapter.requirements)}
    assert rows[("numpy", ">=1.0")].status == "ok" and rows[("numpy", ">=1.0")].found == numpy.__version__
    assert rows[("numpy", "<1.0")].status == "mismatch"
    module_only = rows[("esn-no-such-dist", "any version")]
    assert module_only.status == "ok" and module_only.found == "importable as json (no version)"
    assert rows[("esn-missing-dist", "any version")].status == "missing"
    assert rows[("esn-optional-dist", "any version")].status == "optional"


def test_install_line_keeps_order_and_runs_option_packages_alone():
    reqs = [Requirement("torch", install="torch==2.4.1"), Requirement("transformers", ">=4.37,<5"),
            Requirement("flash-attn", pip_options="--no-build-isolation"), Requirement("kimi", install="git+https://x/k.git")]
    assert install_line(reqs) == ('pip install torch==2.4.1 "transformers>=4.37,<5" && '
                                  'pip install --no-build-isolation flash-attn && pip install git+https://x/k.git')
    assert install_line([Requirement("minicpmo-utils", install="minicpmo-utils[all]>=1.0.5")]) == \
        'pip install "minicpmo-utils[all]>=1.0.5"'


def test_check_reports_every_need_with_the_install_lines():
    report = check(NeedyAdapter)
    assert [f.need for f in report.findings] == ["numpy", "numpy", "esn-no-such-dist", "esn-missing-dist",
                                                 "esn-optional-dist", "CUDA", "trust_remote_code"]
    assert not report.ok
    assert report.install == "pip install numpy==0.9 git+https://example.invalid/missing.git"
    assert report.install_all.startswith('pip install "numpy>=1.0" numpy==0.9 esn-no-such-dist ')
    cuda = report.findings[5]
    assert cuda.status == ("ok" if torch.cuda.is_available() else "missing")
    assert report.findings[6].status == "opt-in"
    assert json.loads(json.dumps(report.as_dict()))["findings"][1]["status"] == "mismatch"


def test_ensure_names_every_unmet_need_in_one_error():
    with pytest.raises(EsnError) as info:
        ensure(NeedyAdapter.requirements, "Needy-7B")
    message = str(info.value)
    assert message.startswith(f"Needy-7B needs numpy<1.0 (you have {numpy.__version__}: an old API); "
                              "esn-missing-dist (not installed: not on PyPI). Install the stack it was written for: ")
    assert "esn-optional-dist" in message.split("Install")[1] and "esn-optional-dist (" not in message
    ensure(NeedyAdapter.requirements[:1], "Needy-7B")  # all met: nothing raised


def test_adapters_check_covers_every_installed_adapter(capsys):
    code = main(["adapters", "check", "--json"])
    reports = {r["adapter"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"qwen_omni", "minicpm_o", "kimi_audio", "planted"} <= set(reports)
    assert code == (0 if all(r["ok"] for r in reports.values()) else 1)
    for report in reports.values():
        packages = [f["need"] for f in report["findings"] if f["need"] not in ("CUDA", "trust_remote_code")]
        assert "CUDA" in [f["need"] for f in report["findings"]]
        assert report["install_all"].startswith("pip install") if packages else report["install_all"] == ""
    # the planted demo model needs nothing beyond esn-core: CUDA optional, nothing to install
    assert reports["planted"]["ok"] and [f["need"] for f in reports["planted"]["findings"]] == ["CUDA"]
    kimi = {f["need"]: f for f in reports["kimi_audio"]["findings"]}
    assert kimi["kimi-audio"]["status"] == "missing" and kimi["CUDA"]["required"] == "a CUDA device"
    assert kimi["trust_remote_code"]["status"] == "opt-in"
    assert "pip install git+https://github.com/MoonshotAI/Kimi-Audio.git" in reports["kimi_audio"]["install"]
    minicpm = {f["need"]: f for f in reports["minicpm_o"]["findings"]}
    assert minicpm["transformers"]["required"] == ">=4.51.0,<4.53"
    assert "transformers==4.51.0" in reports["minicpm_o"]["install_all"]
    assert "trust_remote_code" not in {f["need"] for f in reports["qwen_omni"]["findings"]}


def test_adapters_check_table(capsys):
    code = main(["adapters", "check", "minicpm_o"])
    out = capsys.readouterr().out
    assert "minicpm_o: what MiniCPM-o needs" in out and "cosyvoice-minicpmo" in out and "opt-in" in out
    assert "pip install transformers==4.51.0" in out  # printed as is: no markup eats brackets or quotes
    assert code == 1  # transformers 5 here is outside the remote code's range
    assert main(["adapters", "check", "no_such_adapter"]) == 2
    assert "unknown adapter 'no_such_adapter'" in capsys.readouterr().err


def test_adapters_check_qwen_omni_is_met_by_the_dev_stack(capsys):
    """qwen_omni runs transformers' native class: no remote code, CUDA optional, and the dev stack's
    transformers is inside its range, so the check passes (exit 0) and says so."""
    code = main(["adapters", "check", "qwen_omni"])
    out = capsys.readouterr().out
    assert "qwen_omni: what Qwen2.5-Omni needs" in out and ">=5.15" in out
    assert "qwen_omni: everything its model needs is installed" in out
    assert 'pip install "transformers>=5.15" accelerate' in out  # the whole stack, accelerate optional
    assert code == 0
