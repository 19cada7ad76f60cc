"""A fake HTTP-ish client, set up once per module."""

import time

import pytest


@pytest.fixture(scope="module")
def client(service):
    time.sleep(0.2)
    routes = {"/health": 200, "/users": 200, "/admin": 403}
    return lambda path: routes.get(path, 404)


@pytest.mark.parametrize("path,status", [("/health", 200), ("/users", 200), ("/admin", 403), ("/nope", 404)])
def test_status(client, path, status):
    time.sleep(0.1)
    assert client(path) == status


def test_service_is_shared(service):
    assert service["name"] == "demo-service"
