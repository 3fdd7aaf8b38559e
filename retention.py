"""Pruning of old run history, in a background thread of the server.

A task keeps the reports of its newest `keep_runs` executions (distinct `scheduled_for`
instants; a manual run counts as one) and none older than `keep_days`. A deleted task
goes, with its manual runs, once none of its reports is left. Deletes run in batches of
`batch_size` rows, each its own transaction, so a request that needs the database lock
waits for one batch at most, not for the whole pruning.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from typing import Optional

import peewee

from models import ManualRun, Result, Task, database, utc_now

log = logging.getLogger("taskscheduler.retention")


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """The history limits of a server, and the interval between two prunings."""

    keep_runs: int = 100
    keep_days: float = 30.0
    interval: float = 300.0
    batch_size: int = 1000
    # Seconds between two delete batches, so that waiting writers get the lock.
    batch_pause: float = 0.01


def _delete_in_batches(condition, policy: RetentionPolicy) -> int:
    """Delete the reports that match `condition`, `batch_size` rows per transaction."""
    deleted = 0
    while True:
        ids = [row.id for row in Result.select(Result.id).where(condition).limit(policy.batch_size)]
        if not ids:
            return deleted
        with database.atomic():
            deleted += Result.delete().where(Result.id.in_(ids)).execute()
        if policy.batch_pause:
            time.sleep(policy.batch_pause)


def prune_history(policy: RetentionPolicy, now: Optional[dt.datetime] = None) -> dict[str, int]:
    """Delete the history that `policy` does not keep at `now` (naive UTC).

    Returns the number of reports, manual runs and deleted tasks removed.
    """
    now = now or utc_now()
    cutoff = now - dt.timedelta(days=policy.keep_days)
    removed = {"runs": 0, "manual_runs": 0, "tasks": 0}

    # 1. Reports older than keep_days, of every task.
    removed["runs"] += _delete_in_batches(Result.scheduled_for < cutoff, policy)

    # 2. Reports beyond the newest keep_runs executions of each task.
    for task_id in [task.id for task in Task.select(Task.id).order_by(Task.id)]:
        oldest_kept = (Result.select(Result.scheduled_for)
                       .where(Result.task == task_id)
                       .distinct()
                       .order_by(Result.scheduled_for.desc())
                       .offset(policy.keep_runs - 1)
                       .limit(1)
                       .scalar())
        if oldest_kept is not None:
            removed["runs"] += _delete_in_batches(
                (Result.task == task_id) & (Result.scheduled_for < oldest_kept), policy)

    # 3. Manual runs older than keep_days; agents no longer run them after an hour anyway.
    with database.atomic():
        removed["manual_runs"] += ManualRun.delete().where(ManualRun.requested_at < cutoff).execute()

    # 4. Deleted tasks without reports. The state filter and the NOT EXISTS are checked in
    # the same statement, so a report that arrives meanwhile keeps its task.
    without_reports = ~peewee.fn.EXISTS(Result.select(Result.id).where(Result.task == Task.id))
    # Their manual runs go with them (ON DELETE CASCADE).
    for task in Task.select(Task.id).where((Task.state == "deleted") & without_reports):
        removed["tasks"] += (Task.delete()
                             .where((Task.id == task.id) & (Task.state == "deleted") & without_reports)
                             .execute())
    return removed


class RetentionThread(threading.Thread):
    """Runs `prune_history` every `policy.interval` seconds until `stop` is called."""

    def __init__(self, policy: RetentionPolicy):
        super().__init__(name="retention", daemon=True)
        self.policy = policy
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.policy.interval):
            self.prune_once()

    def prune_once(self) -> Optional[dict[str, int]]:
        started = time.monotonic()
        try:
            with database.connection_context():
                removed = prune_history(self.policy)
        except peewee.PeeweeException as error:
            log.error("pruning history failed, retrying in %.0f s: %s", self.policy.interval, error)
            return None
        if any(removed.values()):
            log.info("pruned history in %.2f s: %d runs, %d manual runs, %d deleted tasks",
                     time.monotonic() - started, removed["runs"], removed["manual_runs"],
                     removed["tasks"])
        return removed

    def stop(self) -> None:
        self._stop_event.set()
