"""Arithmetic, with one known bug marked as an expected failure."""

import math
import time

import pytest


def test_sqrt():
    time.sleep(0.1)
    assert math.isqrt(144) == 12


def test_gcd():
    assert math.gcd(84, 36) == 12


def test_factorial():
    time.sleep(0.2)
    assert math.factorial(10) == 3_628_800


def test_float_sum_is_exact_with_fsum():
    assert math.fsum([0.1] * 10) == 1.0


@pytest.mark.xfail(reason="floating point: 0.1 * 3 is not 0.3", strict=True)
def test_float_multiplication_is_exact():
    assert 0.1 * 3 == 0.3
