"""Tests that write files in pytest's per-test temporary directories."""

import json
import time


def test_write_and_read(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_text("hello")
    assert path.read_text() == "hello"


def test_json_round_trip(tmp_path):
    time.sleep(0.1)
    data = {"tests": 40, "workers": 2}
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    assert json.loads(path.read_text()) == data


def test_directory_listing(tmp_path):
    for name in "abc":
        (tmp_path / name).touch()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_tmp_paths_are_private(tmp_path):
    time.sleep(0.05)
    assert list(tmp_path.iterdir()) == []
