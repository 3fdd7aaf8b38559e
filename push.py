"""Pushing new tasks to the agents that accept pushes."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import requests

log = logging.getLogger("taskscheduler.server")


class TaskPusher:
    """Pushes new tasks to the agents that gave a push URL, in background threads.

    A failed push is only logged: the agent gets the task at its next sync anyway.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="push")
        self._session = requests.Session()

    def push(self, task: dict, agents: list[tuple[str, str]]) -> None:
        for agent_id, push_url in agents:
            self._pool.submit(self._push_one, task, agent_id, push_url)

    def _push_one(self, task: dict, agent_id: str, push_url: str) -> None:
        url = push_url.rstrip("/") + "/api/v1/tasks/schedule"
        try:
            response = self._session.post(url, json=task, timeout=self.timeout)
        except requests.RequestException as error:
            log.info("push of task %s to agent %s at %s failed, it will pull the task: %s",
                     task["task_id"], agent_id, url, error)
            return
        if response.status_code >= 300:
            log.warning("push of task %s to agent %s at %s returned %d",
                        task["task_id"], agent_id, url, response.status_code)
        else:
            log.debug("pushed task %s to agent %s", task["task_id"], agent_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
