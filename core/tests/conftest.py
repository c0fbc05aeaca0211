"""Fixtures shared by the core tests of routed (mixture-of-experts) hook points."""

import pytest
from esn.routing import IMPLEMENTATIONS


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request, model):
    """Each experts implementation esn follows, set on the test module's ``model`` fixture for the test."""
    before = model.config._experts_implementation
    model.set_experts_implementation(request.param)
    yield request.param
    model.set_experts_implementation(before)
