"""esn.loading: the transformers loading boilerplate the adapters share."""

from __future__ import annotations

import pytest
import torch
from esn.errors import EsnError
from esn.loading import place, placement, quiet_transformers, require_remote_code, seeded, torch_dtype


def test_quiet_transformers_restores_the_callers_logging_even_on_error():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    try:
        with pytest.raises(ValueError), quiet_transformers():
            assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
            raise ValueError("inside")
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_seeded_draws_the_seeds_numbers_and_restores_the_callers_rng():
    torch.manual_seed(123)
    expected_after = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7, torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected_after)  # the caller's stream goes on as if untouched
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(3))


def test_placement_dtype_and_the_remote_code_guard():
    assert placement("cpu") == {}
    model = torch.nn.Linear(2, 2).train()
    assert place(model, "cpu") is model and not model.training
    assert torch_dtype("auto") == "auto" and torch_dtype("bfloat16") is torch.bfloat16
    require_remote_code(True, "X ships code")
    with pytest.raises(EsnError, match=r"X ships code, and esn runs such code only when you opt in: pass "
                                       r"trust_remote_code=True \(command line: --trust-remote-code\)"):
        require_remote_code(False, "X ships code")
