"""Log agents going offline and coming back online.

An agent goes offline by falling silent, which no request shows, so a background thread
of the server compares the agents' states every few seconds. Each server process logs
the transitions it detects, so two servers on one database both log them.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Optional

import peewee

from models import Agent, database, utc_now

log = logging.getLogger("taskscheduler.server")


class AgentStateWatcher:
    """Compares each agent's online state with the previous check and logs the changes at INFO.

    An agent is online while the server has heard from it within `agent_timeout` seconds,
    as in `GET /api/v1/agents`. The first check logs how many agents are online and
    offline. An agent that registers is logged by its registration, not here.
    """

    def __init__(self, agent_timeout: float, interval: Optional[float] = None):
        self.agent_timeout = agent_timeout
        # A transition is logged at most `interval` seconds after it happens.
        self.interval = interval if interval is not None else max(1.0, min(5.0, agent_timeout / 3))
        self.online: Optional[set[str]] = None
        self.last_seen: dict[str, dt.datetime] = {}
        self.database_failing = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def check(self, now: Optional[dt.datetime] = None) -> list[tuple[str, str]]:
        """Read every agent's last contact at the naive UTC `now`, and log and return the
        state changes since the previous check as (agent_id, "online" or "offline")."""
        now = now or utc_now()
        with database.connection_context():
            current = {agent.id: agent.last_seen_at
                       for agent in Agent.select(Agent.id, Agent.last_seen_at).order_by(Agent.id)}
        online_since = now - dt.timedelta(seconds=self.agent_timeout)
        online = {agent_id for agent_id, seen in current.items() if seen >= online_since}
        previous_online, previous_seen = self.online, self.last_seen
        self.online, self.last_seen = online, current
        if previous_online is None:
            log.info("agents at start: %d online, %d offline", len(online), len(current) - len(online))
            return []

        changes = []
        for agent_id, seen in current.items():
            if agent_id not in previous_seen:
                continue  # registered since the previous check, which its registration logged
            if agent_id in previous_online and agent_id not in online:
                log.info("agent %s is offline: last seen %sZ, %.0f s ago (agent timeout %.0f s)",
                         agent_id, seen.isoformat(timespec="seconds"), (now - seen).total_seconds(),
                         self.agent_timeout)
                changes.append((agent_id, "offline"))
            elif agent_id not in previous_online and agent_id in online:
                log.info("agent %s is online again after %.0f s without contact",
                         agent_id, (seen - previous_seen[agent_id]).total_seconds())
                changes.append((agent_id, "online"))
        return changes

    def run(self) -> None:
        """Check every `interval` seconds until `stop` is called; log database errors once per outage."""
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except (peewee.OperationalError, peewee.InterfaceError) as error:
                if not self.database_failing:
                    log.warning("agent state check failed, retrying every %.0f s: the database did "
                                "not respond: %s", self.interval, error)
                self.database_failing = True
                continue
            if self.database_failing:
                log.info("agent state check works again")
            self.database_failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="agent-state-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
