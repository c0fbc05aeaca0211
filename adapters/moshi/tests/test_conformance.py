"""esn-moshi passes the adapter conformance suite (esn.testing) on its tiny checkpoint."""

import pytest
from esn.testing import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(adapter, check):
    check(adapter)
