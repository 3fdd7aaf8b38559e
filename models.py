"""Database models of the taskscheduler server, and the connection set-up.

All times are stored as naive UTC datetimes. SQLite is the default; any peewee
database URL works, PostgreSQL included.
"""

from __future__ import annotations

import datetime as dt
import logging
import os

import peewee
from playhouse.db_url import connect
from playhouse.migrate import SchemaMigrator, migrate

log = logging.getLogger("taskscheduler.models")

database = peewee.DatabaseProxy()

# Key of the PostgreSQL advisory lock that serializes schema set-up between servers.
SCHEMA_LOCK_KEY = 0x7461736B

UTC = dt.timezone.utc


def utc_now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(tzinfo=None)


def sql_default(value: str) -> list:
    """Return the constraint list of a column DEFAULT, with `value` as SQL text.

    Columns added after the first release are NOT NULL with a DEFAULT in the database
    too. Then `add_missing_columns` adds each to a filled table in one ALTER TABLE, and
    a server of the previous version can still insert rows.
    """
    return [peewee.SQL(f"DEFAULT {value}")]


class BaseModel(peewee.Model):
    class Meta:
        database = database


TASK_STATES = ("active", "paused", "deleted")


class Task(BaseModel):
    """A periodic shell command that the agents it targets run.

    The options from `timezone` to `environment` are those of `agent.Task`, which
    documents them. Times are in seconds, and a null `timeout` means the task's period,
    at most 1 hour. Only `active` tasks are in the agents' task lists. A `deleted` task
    keeps its history until retention removes it, and then the task row goes too.
    """

    id = peewee.CharField(primary_key=True, max_length=36)
    command = peewee.TextField()
    frequency = peewee.CharField(max_length=200)
    created_at = peewee.DateTimeField(default=utc_now)
    updated_at = peewee.DateTimeField(default=utc_now)
    timezone = peewee.CharField(max_length=64, default="UTC", constraints=sql_default("'UTC'"))
    catchup = peewee.DoubleField(default=0, constraints=sql_default("0"))
    overlap = peewee.CharField(max_length=16, default="skip", constraints=sql_default("'skip'"))
    jitter = peewee.DoubleField(default=0, constraints=sql_default("0"))
    timeout = peewee.DoubleField(null=True)
    # A JSON object of variable names to values.
    environment = peewee.TextField(default="{}", constraints=sql_default("'{}'"))
    state = peewee.CharField(max_length=16, default="active", constraints=sql_default("'active'"))
    deleted_at = peewee.DateTimeField(null=True)
    # Targeting, as JSON: a list of agent ids, or an object of labels that an agent must
    # all carry. Both null means every agent.
    target_agents = peewee.TextField(null=True)
    target_labels = peewee.TextField(null=True)


class Agent(BaseModel):
    """A host that runs tasks. `registered_at` is its first registration and never moves."""

    id = peewee.CharField(primary_key=True, max_length=64)
    hostname = peewee.CharField(max_length=255, default="")
    platform = peewee.CharField(max_length=255, default="")
    version = peewee.CharField(max_length=64, default="")
    push_url = peewee.CharField(max_length=2048, null=True)
    registered_at = peewee.DateTimeField(default=utc_now)
    last_seen_at = peewee.DateTimeField(default=utc_now, index=True)
    # Reports waiting in the agent's outbox, and reports it dropped because the outbox
    # was full, as of its last heartbeat.
    outbox_depth = peewee.IntegerField(default=0, constraints=sql_default("0"))
    outbox_dropped = peewee.IntegerField(default=0, constraints=sql_default("0"))
    # Set by enrollment: the hex SHA-256 of the agent's bearer token (the token itself is
    # never stored), and the key the server signs this agent's push wake-ups with.
    token_hash = peewee.CharField(max_length=64, null=True, unique=True)
    push_secret = peewee.CharField(max_length=128, null=True)
    enrolled_at = peewee.DateTimeField(null=True)
    # When the agent token stops being accepted; null means never.
    token_expires_at = peewee.DateTimeField(null=True)
    # A JSON object of label names to values, as the agent sent them at its last heartbeat.
    labels = peewee.TextField(default="{}", constraints=sql_default("'{}'"))
    # Seconds the agent's clock was ahead of the server's at its last heartbeat that
    # carried its clock (negative: behind); null before the first one.
    clock_offset = peewee.DoubleField(null=True)


class Result(BaseModel):
    """One agent's report for one execution of a task.

    An execution is identified by the slot it belongs to (`scheduled_for`), the same
    on every agent, so (task, agent, slot) is unique and a repeated report is stored once.
    A `missed` report covers `missed_slots` slots from `first_missed` to `scheduled_for`.
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
    missed_slots = peewee.IntegerField(null=True)
    first_missed = peewee.DateTimeField(null=True)
    late = peewee.BooleanField(default=False, constraints=sql_default("FALSE"))
    reason = peewee.CharField(max_length=500, default="", constraints=sql_default("''"))
    # The exact bytes kept of stdout and stderr, when the text view is lossy (bytes that
    # are not UTF-8, or NUL, which PostgreSQL text cannot hold).
    stdout_raw = peewee.BlobField(null=True)
    stderr_raw = peewee.BlobField(null=True)
    # "scheduled" for a slot of the frequency, "manual" for a run requested with
    # POST /api/v1/tasks/{task_id}/run, whose `scheduled_for` is the request instant.
    trigger = peewee.CharField(max_length=16, default="scheduled", constraints=sql_default("'scheduled'"))
    manual_run = peewee.CharField(max_length=36, null=True)

    class Meta:
        indexes = (
            (("task", "agent_id", "scheduled_for"), True),
            (("task", "scheduled_for"), False),
        )


class ManualRun(BaseModel):
    """A request to run a task once on its agents now, outside its schedule.

    `requested_at` is never a slot of the task's frequency at request time, so the
    reports of a manual run never collide with those of a slot.
    """

    id = peewee.CharField(primary_key=True, max_length=36)
    task = peewee.ForeignKeyField(Task, backref="manual_runs", on_delete="CASCADE")
    requested_at = peewee.DateTimeField(index=True)

    class Meta:
        indexes = ((("task", "requested_at"), True),)


MODELS = (Task, Agent, Result, ManualRun)


def sqlite_url(data_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(data_dir, "taskscheduler.db"))


def open_database(url: str) -> peewee.Database:
    """Connect the models to the database at `url`, create missing tables and add missing columns.

    SQLite runs in WAL mode with a busy timeout and IMMEDIATE transactions, so that the
    server's threads can write at once without "database is locked" errors.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            # Only the server's user may enter a new data directory: the database keeps
            # outputs and the agents' push secrets.
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
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
    with db.connection_context(), db.atomic():
        if isinstance(db, peewee.PostgresqlDatabase):
            # Servers that start at once take turns, so only the first one changes the schema.
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        # Indexes come after the new columns: creating the tables of an earlier version
        # again would index columns they still lack (token_hash).
        existing = set(db.get_tables())
        db.create_tables([model for model in MODELS if model._meta.table_name not in existing])
        add_missing_columns(db)
        for model in MODELS:
            model._schema.create_indexes(safe=True)
    return db


def add_missing_columns(db: peewee.Database) -> list[str]:
    """Add the model columns that tables created by an earlier version lack.

    Returns the added columns as TABLE.COLUMN. Existing rows get the column's DEFAULT,
    or NULL for a nullable column. Raises RuntimeError for a missing NOT NULL column
    without a DEFAULT in the database, which no ALTER TABLE can add to a filled table.
    """
    migrator = SchemaMigrator.from_database(db)
    operations = []
    added = []
    for model in MODELS:
        table = model._meta.table_name
        existing = {column.name for column in db.get_columns(table)}
        for field in model._meta.sorted_fields:
            if field.column_name in existing:
                continue
            has_sql_default = any(isinstance(constraint, peewee.SQL)
                                  and constraint.sql.upper().startswith("DEFAULT ")
                                  for constraint in field.constraints or ())
            if not field.null and not has_sql_default:
                raise RuntimeError(f"cannot add column {table}.{field.column_name}: it is NOT NULL "
                                   "without a DEFAULT in the database; give the field null=True "
                                   "or constraints=sql_default(...)")
            # With allow_not_null the column gets NOT NULL and its DEFAULT in one statement.
            # Without it, peewee 4.5 adds NOT NULL afterwards, which rebuilds the whole
            # table on SQLite before 3.53.
            operations.append(migrator.add_column(table, field.column_name, field,
                                                  allow_not_null=not field.null))
            added.append(f"{table}.{field.column_name}")
    if operations:
        migrate(*operations)
        log.info("added columns missing from tables of an earlier version: %s", ", ".join(added))
    return added
