"""``esn.adapters.parse_options`` and ``flag``: the option checks every adapter shares."""

import pytest
from esn.adapters import flag, parse_options
from esn.errors import EsnError

KINDS = {"steps": int, "scale": float, "fast": flag}


def test_known_options_are_converted():
    assert parse_options("demo", {"steps": "3", "scale": 2, "fast": "On"}, KINDS) == {"steps": 3, "scale": 2.0, "fast": True}
    assert parse_options("demo", {}, KINDS) == {}


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False), ("yes", True),
                                             (" FALSE ", False), ("off", False), ("1", True), ("0", False)])
def test_flag_reads_booleans_as_people_write_them(value, expected):
    assert flag(value) is expected


@pytest.mark.parametrize("options, message", [
    ({"stepz": 3}, "unknown demo option 'stepz'; known: steps, scale, fast"),
    ({"steps": "many"}, "demo option steps='many' must be int"),
    ({"scale": None}, "demo option scale=None must be float"),
    ({"fast": "maybe"}, "demo option fast='maybe' must be true or false"),
    ({"fast": 2}, "demo option fast=2 must be true or false"),
])
def test_bad_options_name_the_key_and_the_expected_kind(options, message):
    with pytest.raises(EsnError) as err:
        parse_options("demo", options, KINDS)
    assert str(err.value) == message
