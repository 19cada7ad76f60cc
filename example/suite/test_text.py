"""String handling, with one test skipped on purpose."""

import sys
import time

import pytest


def test_upper():
    assert "fly".upper() == "FLY"


def test_split():
    time.sleep(0.1)
    assert "a,b,,c".split(",") == ["a", "b", "", "c"]


def test_unicode_length():
    assert len("café") == 4


def test_strip():
    time.sleep(0.05)
    assert "  padded  ".strip() == "padded"


@pytest.mark.skipif(sys.platform != "win32", reason="Windows line endings only matter on Windows")
def test_windows_newlines():
    assert "a\r\nb".splitlines() == ["a", "b"]


def test_join():
    assert "-".join(["a", "b", "c"]) == "a-b-c"


def test_replace():
    time.sleep(0.05)
    assert "fly fly".replace("fly", "run", 1) == "run fly"
