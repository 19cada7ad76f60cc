"""Table-driven parsing tests."""

import time

import pytest


def parse_duration(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    raise ValueError(text)


@pytest.mark.parametrize(
    "text,seconds",
    [("250ms", 0.25), ("3s", 3), ("2m", 120), ("1h", 3600), ("1.5s", 1.5), ("0ms", 0)],
)
def test_parse_duration(text, seconds):
    time.sleep(0.05)
    assert parse_duration(text) == pytest.approx(seconds)


def test_rejects_garbage():
    with pytest.raises(ValueError):
        parse_duration("soon")
