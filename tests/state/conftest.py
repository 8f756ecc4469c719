"""Fixtures: a throwaway PostgreSQL server for the session (`tests/postgres.py`), and `location`, every store
test's database on both backends."""

from __future__ import annotations

import pytest

from tests.postgres import pg_server  # noqa: F401 - the fixture, for every test of this folder


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """A new, empty database: an SQLite file path or a postgresql:// URL."""
    if request.param == "sqlite":
        return tmp_path / "registry.sqlite"
    return request.getfixturevalue("pg_server").new_database()
