"""Waking agents up to sync when a task is created or changed.

A push carries no task. It makes the agent fetch its task list now, with the agent's own
token, as at every sync. So commands reach an agent only in the
server's responses. Each wake-up is signed with HMAC-SHA256 under the agent's push
secret (see `agent.push_signature`). Agents of a server without tokens have no secret,
so their wake-ups go unsigned.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import requests

from agent import (PUSH_NONCE_HEADER, PUSH_SIGNATURE_HEADER, PUSH_TIMESTAMP_HEADER, WAKEUP_PATH,
                   push_signature)

log = logging.getLogger("taskscheduler.server")


class PushTarget(NamedTuple):
    agent_id: str
    push_url: str
    push_secret: Optional[str]


def wakeup_request(target: PushTarget, task_id: str, now: Optional[float] = None) -> tuple[bytes, dict]:
    """Return the body and headers of a wake-up for `target`, signed when it has a secret."""
    body = json.dumps({"agent_id": target.agent_id, "task_id": task_id}).encode()
    headers = {"Content-Type": "application/json"}
    if target.push_secret is not None:
        timestamp = str(int(time.time() if now is None else now))
        nonce = secrets.token_urlsafe(16)
        headers.update({
            PUSH_TIMESTAMP_HEADER: timestamp,
            PUSH_NONCE_HEADER: nonce,
            PUSH_SIGNATURE_HEADER: push_signature(target.push_secret, timestamp, nonce, body),
        })
    return body, headers


class TaskPusher:
    """Wakes up the agents that gave a push URL, in background threads.

    A failed push is only logged: the agent gets the task at its next sync anyway.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="push")
        self._session = requests.Session()

    def push(self, task_id: str, targets: list[PushTarget]) -> None:
        for target in targets:
            self._pool.submit(self._push_one, task_id, target)

    def _push_one(self, task_id: str, target: PushTarget) -> None:
        url = target.push_url.rstrip("/") + WAKEUP_PATH
        body, headers = wakeup_request(target, task_id)
        try:
            response = self._session.post(url, data=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as error:
            log.info("wake-up for task %s to agent %s at %s failed, it will pull the task: %s",
                     task_id, target.agent_id, url, error)
            return
        if response.status_code >= 300:
            log.warning("wake-up for task %s to agent %s at %s returned %d",
                        task_id, target.agent_id, url, response.status_code)
        else:
            log.debug("woke up agent %s for task %s", target.agent_id, task_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
