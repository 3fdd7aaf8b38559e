"""Shared fixtures: a fresh database per test (SQLite file or a PostgreSQL schema) and the app.

PostgreSQL tests run when TASKSCHEDULER_TEST_POSTGRES contains a database URL (the Makefile
sets postgresql://postgres@127.0.0.1:5432/test). Each test session works in its own
schema of that database, so parallel runs do not see each other's tables.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
import uuid

import pytest
import webtest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import server  # noqa: E402

POSTGRES_URL = os.environ.get("TASKSCHEDULER_TEST_POSTGRES", "")


def postgres_url_with_schema(base_url: str, schema: str) -> str:
    """Return `base_url` with its search_path set to `schema`."""
    options = urllib.parse.quote(f"-c search_path={schema}")
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}options={options}"


@pytest.fixture(scope="session")
def postgres_base_url():
    """A URL of a fresh PostgreSQL schema for this test session, dropped at its end."""
    if not POSTGRES_URL:
        pytest.skip("TASKSCHEDULER_TEST_POSTGRES is not set; PostgreSQL tests are skipped")
    import psycopg2

    schema = f"taskscheduler_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    connection = psycopg2.connect(POSTGRES_URL)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield postgres_url_with_schema(POSTGRES_URL, schema)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP SCHEMA "{schema}" CASCADE')
        connection.close()


def reset_postgres_tables(url: str) -> None:
    db = models.open_database(url)
    with db.connection_context():
        db.drop_tables(models.MODELS, safe=True, cascade=True)
    db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A URL of an empty database: a SQLite file, then the PostgreSQL schema."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "taskscheduler.db")
    url = request.getfixturevalue("postgres_base_url")
    reset_postgres_tables(url)
    return url


@pytest.fixture
def db(database_url):
    database = models.open_database(database_url)
    yield database
    database.close()


class RecordingPusher:
    """Stands in for the pusher in API tests; the end-to-end tests use the real one."""

    def __init__(self):
        self.pushes = []

    def push(self, task_id, targets):
        self.pushes.append((task_id, targets))

    def shutdown(self):
        pass


@pytest.fixture
def pusher():
    return RecordingPusher()


@pytest.fixture
def config():
    return server.ServerConfig()


@pytest.fixture
def app(db, config, pusher):
    """A webtest client of a fresh server app on a fresh database."""
    return webtest.TestApp(server.create_app(config, pusher=pusher))
