"""A memoising cache shared by the tests of this module."""

import functools
import time

import pytest


@pytest.fixture(scope="module")
def fib():
    time.sleep(0.2)

    @functools.lru_cache(maxsize=None)
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    return fib


@pytest.mark.parametrize("n,expected", [(10, 55), (20, 6765), (50, 12586269025)])
def test_fib(fib, n, expected):
    time.sleep(0.1)
    assert fib(n) == expected


def test_cache_fills(fib):
    fib(30)
    assert fib.cache_info().currsize >= 31
