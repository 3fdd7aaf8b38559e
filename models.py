"""Database models of the taskscheduler server, and the connection set-up.

All times are stored as naive UTC datetimes. SQLite is the default; any peewee
database URL works, PostgreSQL included.
"""

from __future__ import annotations

import datetime as dt
import os

import peewee
from playhouse.db_url import connect

database = peewee.DatabaseProxy()

UTC = dt.timezone.utc


def utc_now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(tzinfo=None)


class BaseModel(peewee.Model):
    class Meta:
        database = database


class Task(BaseModel):
    """A periodic shell command that every agent runs."""

    id = peewee.CharField(primary_key=True, max_length=36)
    command = peewee.TextField()
    frequency = peewee.CharField(max_length=200)
    created_at = peewee.DateTimeField(default=utc_now)
    updated_at = peewee.DateTimeField(default=utc_now)


class Agent(BaseModel):
    """A host that runs tasks. `registered_at` is its first registration and never moves."""

    id = peewee.CharField(primary_key=True, max_length=64)
    hostname = peewee.CharField(max_length=255, default="")
    platform = peewee.CharField(max_length=255, default="")
    version = peewee.CharField(max_length=64, default="")
    push_url = peewee.CharField(max_length=2048, null=True)
    registered_at = peewee.DateTimeField(default=utc_now)
    last_seen_at = peewee.DateTimeField(default=utc_now, index=True)


class Result(BaseModel):
    """One agent's report for one execution of a task.

    An execution is identified by the slot it belongs to (`scheduled_for`), the same
    on every agent, so (task, agent, slot) is unique and a repeated report is stored once.
    """

    task = peewee.ForeignKeyField(Task, backref="results", on_delete="CASCADE")
    agent_id = peewee.CharField(max_length=64)
    scheduled_for = peewee.DateTimeField()
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField()
    received_at = peewee.DateTimeField(default=utc_now)
    status = peewee.CharField(max_length=32)
    exit_code = peewee.IntegerField(null=True)
    stdout = peewee.TextField(default="")
    stderr = peewee.TextField(default="")
    stdout_bytes = peewee.BigIntegerField(default=0)
    stderr_bytes = peewee.BigIntegerField(default=0)
    truncated = peewee.BooleanField(default=False)

    class Meta:
        indexes = (
            (("task", "agent_id", "scheduled_for"), True),
            (("task", "scheduled_for"), False),
        )


MODELS = (Task, Agent, Result)


def sqlite_url(data_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(data_dir, "taskscheduler.db"))


def open_database(url: str) -> peewee.Database:
    """Connect the models to the database at `url` and create missing tables.

    SQLite runs in WAL mode with a busy timeout and IMMEDIATE transactions, so that the
    server's threads can write at once without "database is locked" errors.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        db = connect(
            url,
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": 10000,
            },
            lock_type="IMMEDIATE",
            timeout=10,
        )
    else:
        db = connect(url)
    database.initialize(db)
    with db.connection_context():
        db.create_tables(MODELS, safe=True)
    return db
