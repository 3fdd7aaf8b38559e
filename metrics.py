"""Prometheus metrics of the server, served at GET /metrics in the text format 0.0.4.

Counters and histograms live in memory, per process, from its start: requests by route
and status, their durations, and the reports stored by status. The agent gauges
(online and offline agents, each agent's outbox depth and last contact) are read from
the database at each scrape, so every server on one database returns the same values.
When the database does not respond, the scrape still succeeds, with
`taskscheduler_database_up 0` and without the agent gauges.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Callable, Iterator, Optional, Sequence

import bottle
import peewee
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from agent import printable
from models import Agent, database, utc_now

log = logging.getLogger("taskscheduler.server")

METRICS_PATH = "/metrics"
# Methods outside this set are counted as "other", so a client cannot add label values.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds from a report's slot to its finish: runs take from milliseconds to an hour or more.
REPORT_LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
REQUEST_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
START_KEY = "taskscheduler.request_started"
FAILED_KEY = "taskscheduler.request_failed"

# Leave out the *_created series: Prometheus does not read them from the text format 0.0.4.
# This setting is global to prometheus_client in this process.
disable_created_metrics()


class AgentCollector(Collector):
    """Agent gauges read from the database at each scrape."""

    def __init__(self, agent_timeout: float):
        self.agent_timeout = agent_timeout

    def collect(self) -> Iterator[Metric]:
        database_up = GaugeMetricFamily("taskscheduler_database_up",
                                        "1 if the database responded to this scrape's query, else 0")
        try:
            with database.connection_context():
                agents = list(Agent.select(Agent.id, Agent.last_seen_at, Agent.outbox_depth,
                                           Agent.outbox_dropped).order_by(Agent.id))
        except (peewee.OperationalError, peewee.InterfaceError) as error:
            log.warning("metrics: the database did not respond: %s", error)
            database_up.add_metric([], 0)
            yield database_up
            return
        database_up.add_metric([], 1)
        yield database_up

        online_since = utc_now() - dt.timedelta(seconds=self.agent_timeout)
        states = GaugeMetricFamily("taskscheduler_agents",
                                   "registered agents by state; an agent is offline when the server "
                                   "has not heard from it within the agent timeout", labels=["state"])
        online = sum(1 for agent in agents if agent.last_seen_at >= online_since)
        states.add_metric(["online"], online)
        states.add_metric(["offline"], len(agents) - online)
        yield states

        depth = GaugeMetricFamily("taskscheduler_agent_outbox_depth",
                                  "reports waiting in the agent's outbox, as of its last heartbeat",
                                  labels=["agent_id"])
        dropped = GaugeMetricFamily("taskscheduler_agent_outbox_dropped",
                                    "reports the agent dropped because its outbox was full, as of "
                                    "its last heartbeat", labels=["agent_id"])
        last_seen = GaugeMetricFamily("taskscheduler_agent_last_seen_timestamp_seconds",
                                      "Unix time of the server's last contact with the agent",
                                      labels=["agent_id"])
        for agent in agents:
            depth.add_metric([agent.id], agent.outbox_depth)
            dropped.add_metric([agent.id], agent.outbox_dropped)
            last_seen.add_metric([agent.id], agent.last_seen_at.replace(tzinfo=dt.timezone.utc).timestamp())
        yield depth
        yield dropped
        yield last_seen


class ServerMetrics:
    """The metrics of one application, in a registry of its own."""

    def __init__(self, agent_timeout: float):
        self.registry = CollectorRegistry()
        self.requests = Counter("taskscheduler_http_requests", "HTTP requests by method, route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.request_duration = Histogram("taskscheduler_http_request_duration_seconds",
                                          "time to handle an HTTP request, by method and route",
                                          ["method", "route"], buckets=REQUEST_DURATION_BUCKETS,
                                          registry=self.registry)
        self.reports = Counter("taskscheduler_reports",
                               "agent reports stored, by status; repeated reports are not counted",
                               ["status"], registry=self.registry)
        self.missed_slots = Counter("taskscheduler_missed_slots",
                                    "slots that agents reported as missed; one missed report can "
                                    "cover several slots", registry=self.registry)
        self.report_latency = Histogram("taskscheduler_report_latency_seconds",
                                      "time from a report's slot to its finish, as the agent reported it",
                                      buckets=REPORT_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(AgentCollector(agent_timeout))

    def record_report(self, status: str, scheduled_for: dt.datetime, finished_at: dt.datetime,
                      missed_slots: Optional[int]) -> None:
        """Count one stored report; the times are naive UTC."""
        self.reports.labels(status).inc()
        if status == "missed":
            self.missed_slots.inc(missed_slots or 1)
            return
        self.report_latency.observe(max(0.0, (finished_at - scheduled_for).total_seconds()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_label() -> str:
    """Return the matched route's rule, such as /api/v1/tasks/<task_id>, or "unmatched"."""
    route = bottle.request.environ.get("bottle.route")
    return route.rule if route is not None else "unmatched"


def install_metrics(app: bottle.Bottle, agent_timeout: float, authorize: Callable[[], None],
                    skip: Sequence = ()) -> ServerMetrics:
    """Count every request of `app` and add GET /metrics, which calls `authorize` first.

    `skip` lists plugins that GET /metrics bypasses, such as the one that opens a database
    connection per request, because the scrape must succeed while the database is down.
    Requests are also logged at DEBUG, one line each with method, path, status and duration.
    """
    metrics = ServerMetrics(agent_timeout)
    app.config["taskscheduler.metrics"] = metrics

    def mark_failures(callback):
        # An exception leaves bottle's response at status 200 while the after_request hook
        # runs, and bottle turns it into a 500 only afterwards.
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except Exception:
                bottle.request.environ[FAILED_KEY] = True
                raise

        return wrapper

    app.install(mark_failures)

    @app.hook("before_request")
    def start_timer():
        bottle.request.environ[START_KEY] = time.perf_counter()

    @app.hook("after_request")
    def count_request():
        environ = bottle.request.environ
        elapsed = time.perf_counter() - environ.get(START_KEY, time.perf_counter())
        status = bottle.response.status_code
        if environ.get(FAILED_KEY) and status == 200:
            status = 500
        method = bottle.request.method if bottle.request.method in KNOWN_METHODS else "other"
        route = route_label()
        metrics.requests.labels(method, route, str(status)).inc()
        metrics.request_duration.labels(method, route).observe(elapsed)
        log.debug("%s %s %d %.1f ms", printable(bottle.request.method), printable(bottle.request.path),
                  status, elapsed * 1000)

    @app.get(METRICS_PATH, skip=list(skip))
    def serve_metrics():
        authorize()
        return bottle.HTTPResponse(body=metrics.render(), status=200,
                                   headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
                                            "Cache-Control": "no-store"})

    return metrics
