"""Shared fixtures for the demo suite: a session-wide "service" that is slow to start, the kind
of setup fly's persistent workers pay once per worker instead of once per test."""

import time

import pytest


@pytest.fixture(scope="session")
def service():
    time.sleep(0.3)
    return {"name": "demo-service", "started": time.time()}
