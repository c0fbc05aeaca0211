"""The EVC contract for models without an instruction channel, that speak given words, or that write no text,
through the pipeline (record -> filter -> report's protocol) on tiny variants of the planted adapter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from esn import plugins
from esn.pipeline import record, select
from esn.pipeline.demo import write_inputs
from esn.pipeline.report import _protocol
from esn.pipeline.run import load_run
from esn.plugins import hookimpl
from esn_planted import PlantedAdapter
from esn_planted import model as planted
from rich.console import Console


class NoInstruction(PlantedAdapter):
    """No instruction channel: the prompt carries no emotion token, nothing names the target."""

    name = "planted_no_instruction"
    instruction_channel = False

    def prompt(self, request):
        return [t for t in super().prompt(request) if t != self.instruction_ids[request.emotion]]


class SpeaksGivenWords(PlantedAdapter):
    name = "planted_speaks_words"
    speaks_given_words = True
    text_out = True  # its text (the words it was given) is checked as a text-writing model's would be


class NoTextOut(PlantedAdapter):
    """Writes no text at all: an empty decoded text, whose WER against any transcript is 1."""

    name = "planted_no_text"

    def generate(self, requests, config):
        return [dataclasses.replace(r, text="") for r in super().generate(requests, config)]


class Variants:
    @hookimpl
    def register_adapters(self, register):
        for cls in (NoInstruction, SpeaksGivenWords, NoTextOut):
            register(cls)


CONFIG_EDITS = {
    'adapter = "planted"': 'adapter = "{name}"',
    'run_dir = "."': 'run_dir = "runs/{name}"',
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo")
    return write_inputs(out, Console(quiet=True)).read_text(), out


@pytest.fixture()
def variants(monkeypatch):
    monkeypatch.setattr(plugins, "_cached", plugins.registry_with(Variants(), load_installed=True))


def _recorded(inputs, name):
    text, out = inputs
    for old, new in CONFIG_EDITS.items():
        assert old in text
        text = text.replace(old, new.format(name=name))
    # a few sources: the recording stage, not the study
    text = text.replace('first = 1, last = 6}]\nsplits.development', 'first = 1, last = 1}]\nsplits.development')
    path = out / f"{name}.toml"
    path.write_text(text)
    run = load_run(path, console=Console(quiet=True))
    with run:
        record.record(run)
    return run


def _rows(run):
    return dict(_protocol(run, {"main": {}}, "main", [run.filter_judge])[1].body["rows"])


def test_no_instruction_channel_reports_that_nothing_was_sent(inputs, variants):
    run = _recorded(inputs, NoInstruction.name)
    sent = record.prompts(run)
    assert sent["instruction_channel"] is False and sent["instruction"] is None and sent["system_prompt"] is None
    rows = _rows(run)
    assert rows["instruction"].startswith("nothing was sent: the model has no instruction channel")
    assert "system prompt" not in rows  # no "the adapter's default" claim, no "None"
    assert "None" not in " ".join(rows.values()) and "default" not in rows["instruction"]
    stored = record.store(run).records()
    assert stored and {r.emotion for r in stored} == set(run.cfg.record.targets)  # the target is recorded
    ids = NoInstruction.prompt(run.adapter, _request(run))
    assert not set(ids) & set(planted.EMO.values())  # and never sent


def _request(run):
    from esn.adapters import EVCRequest
    from esn.testing import speech_like

    return EVCRequest(speech_like(0.5), run.cfg.record.targets[0], transcript="kids are talking")


def test_speaks_given_words_is_stated_in_the_report(inputs, variants):
    run = _recorded(inputs, SpeaksGivenWords.name)
    assert record.prompts(run)["speaks_given_words"] is True
    rows = _rows(run)
    assert rows["words"].startswith("the model speaks the given words: each source's transcript is its input")
    assert "WER ≤" in rows["success filter"]  # its text is checked as usual


def test_no_text_out_filters_by_the_judge_alone_and_says_so(inputs, variants):
    run = _recorded(inputs, NoTextOut.name)
    stored = record.store(run).records()
    assert stored and all(r.text == "" and r.meta["wer"] == 1.0 for r in stored)  # WER would reject them all
    assert record.prompts(run)["text_out"] is False
    result = select.success_sets(run, 100, "judge")
    judged = [r for r in stored if r.meta["label"] == r.emotion]
    assert sum(len(v) for v in result.success.values()) == len(judged) > 0  # the judge alone decides
    rows = _rows(run)
    assert "no content check: the model writes no text and no ASR is configured, so the filter is the judge " \
           "alone (WER not checked)" in rows["success filter"]
    assert rows["WER"].startswith("not a measure of the speech: the model writes no text")
