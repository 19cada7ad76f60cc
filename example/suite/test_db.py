"""An in-memory SQLite database, created once per module."""

import sqlite3
import time

import pytest


@pytest.fixture(scope="module")
def db():
    time.sleep(0.2)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE users (name TEXT PRIMARY KEY, age INTEGER)")
    conn.executemany("INSERT INTO users VALUES (?, ?)", [("ada", 36), ("alan", 41), ("grace", 85)])
    yield conn
    conn.close()


def test_count(db):
    time.sleep(0.05)
    assert db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 3


def test_oldest(db):
    time.sleep(0.1)
    assert db.execute("SELECT name FROM users ORDER BY age DESC LIMIT 1").fetchone()[0] == "grace"


def test_missing_user(db):
    assert db.execute("SELECT * FROM users WHERE name = 'nobody'").fetchone() is None


def test_average_age(db):
    time.sleep(0.15)
    assert db.execute("SELECT AVG(age) FROM users").fetchone()[0] == pytest.approx(54.0)


def test_names_are_unique(db):
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO users VALUES ('ada', 1)")
