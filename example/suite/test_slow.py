"""A few slow tests: with several workers they overlap with everything else."""

import time


def test_slow_one():
    time.sleep(1.0)


def test_slow_two():
    time.sleep(0.8)


def test_slow_three():
    time.sleep(0.6)
