"""Bearer tokens of the server's API: who a request comes from and what it may do.

Four kinds of token exist. Admin and read tokens belong to operators and come from
token files or environment variables. The enrollment token lets an agent enroll, which
gives it an agent token of its own and a push secret. The server stores only the SHA-256
of each agent token. With no admin, read or enrollment token configured, the API is
open, as before tokens existed, and every request is treated as allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
from typing import Iterable, Optional

import bottle

from jsonapi import api_error, json_response
from models import Agent, Task, database, utc_now
from targeting import targets_agent_id

log = logging.getLogger("taskscheduler.server")

# RFC 6750's b64token syntax; operator tokens must also be this long at least.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_LENGTH = 16
AGENT_ID_HINT = "agent ids are 1-64 letters, digits, '.', '_' or '-'"


class TokenFileError(ValueError):
    """A token file or variable that cannot be read or contains an invalid token."""


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_tokens(lines: Iterable[str], source: str) -> list[str]:
    """Return the tokens of `lines`, skipping blank lines and lines starting with '#'.

    Raises TokenFileError naming `source` and the line number, never the token itself.
    """
    tokens = []
    for number, line in enumerate(lines, start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not TOKEN_PATTERN.fullmatch(token) or len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(
                f"token {number} of {source} is invalid: a token is at least {MIN_TOKEN_LENGTH} "
                "characters of letters, digits and -._~+/ (generate one with "
                "python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
        tokens.append(token)
    return tokens


def read_tokens(path: Optional[str], variable: str, value: Optional[str]) -> list[str]:
    """Return the tokens of a token file (one per line) and of a comma-separated variable."""
    tokens = []
    if path:
        try:
            with open(path, encoding="utf-8") as token_file:
                tokens += parse_tokens(token_file.read().splitlines(), path)
        except (OSError, UnicodeDecodeError) as error:
            raise TokenFileError(f"cannot read token file {path}: {error}") from None
    if value:
        tokens += parse_tokens(value.split(","), f"environment variable {variable}")
    return tokens


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    """The SHA-256 digests of the operator and enrollment tokens a server accepts."""

    admin: tuple[bytes, ...] = ()
    read: tuple[bytes, ...] = ()
    enrollment: tuple[bytes, ...] = ()

    @classmethod
    def from_tokens(cls, admin: Iterable[str] = (), read: Iterable[str] = (),
                    enrollment: Iterable[str] = ()) -> "TokenConfig":
        return cls(admin=tuple(token_digest(token) for token in admin),
                   read=tuple(token_digest(token) for token in read),
                   enrollment=tuple(token_digest(token) for token in enrollment))

    @property
    def enabled(self) -> bool:
        return bool(self.admin or self.read or self.enrollment)


def digest_in(digest: bytes, accepted: tuple[bytes, ...]) -> bool:
    """Compare `digest` with every accepted digest in constant time, without stopping early.

    Comparing digests of equal length keeps a token's length from showing in the timing.
    """
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(digest, candidate)
    return found


@dataclasses.dataclass(frozen=True)
class Identity:
    """The sender of a request. `kind` is open (no tokens configured), admin, read,
    enrollment or agent, and `agent_id` is set for agent tokens."""

    kind: str
    agent_id: Optional[str] = None


OPEN = Identity("open")


def unauthorized(message: str, invalid_token: bool) -> bottle.HTTPResponse:
    response = api_error(401, message)
    challenge = 'Bearer realm="taskscheduler"'
    if invalid_token:
        challenge += ', error="invalid_token"'
    response.set_header("WWW-Authenticate", challenge)
    return response


def forbidden(message: str) -> bottle.HTTPResponse:
    return api_error(403, message)


def bearer_token() -> str:
    """Return the request's bearer token, or raise a 401 response when it has none."""
    header = bottle.request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if not header:
        raise unauthorized("this server requires a token: send the header "
                           "Authorization: Bearer TOKEN", invalid_token=False)
    if scheme.lower() != "bearer" or not TOKEN_PATTERN.fullmatch(token):
        raise unauthorized("the Authorization header is malformed: use Authorization: Bearer TOKEN",
                           invalid_token=True)
    return token


def authenticate(tokens: TokenConfig) -> Identity:
    """Return who sent the current request, or raise a 401 response.

    Operator and enrollment tokens are compared in constant time. An agent token is
    found by its SHA-256 in an index lookup. A timing difference there could at most
    hint at a stored digest, and a token for a digest means inverting SHA-256 of 32
    random bytes.
    """
    if not tokens.enabled:
        return OPEN
    token = bearer_token()
    digest = token_digest(token)
    if digest_in(digest, tokens.admin):
        return Identity("admin")
    if digest_in(digest, tokens.read):
        return Identity("read")
    if digest_in(digest, tokens.enrollment):
        return Identity("enrollment")
    agent = Agent.get_or_none(Agent.token_hash == digest.hex())
    if agent is not None:
        return Identity("agent", agent.id)
    log.info("request %s %s from %s rejected: the token is not valid", bottle.request.method,
             bottle.request.path, bottle.request.remote_addr)
    raise unauthorized("the token is not valid", invalid_token=True)


def require_operator(tokens: TokenConfig, admin: bool) -> Identity:
    """Authenticate the request as an operator's: an admin token, or a read token if not `admin`."""
    identity = authenticate(tokens)
    if identity.kind in ("open", "admin"):
        return identity
    if identity.kind == "read" and not admin:
        return identity
    needed = "an admin token" if admin else "an admin or read token"
    raise forbidden(f"{bottle.request.method} {bottle.request.path} needs {needed}; "
                    f"this is {describe(identity)}")


def require_agent(tokens: TokenConfig, agent_id: str) -> Identity:
    """Authenticate the request as agent `agent_id`'s own, or raise a 401 or 403 response.

    Operator tokens are not accepted here, so an operator can neither pose as an agent
    nor forge its reports.
    """
    identity = authenticate(tokens)
    if identity.kind == "open" or (identity.kind == "agent" and identity.agent_id == agent_id):
        return identity
    raise forbidden(f"only agent {agent_id} itself may do this, with its own agent token; "
                    f"this is {describe(identity)}")


def may_report(identity: Identity, task: Task, agent_id: str) -> Optional[str]:
    """Return why `identity` may not report a run of `task` as agent `agent_id`, or None.

    An agent may report, as itself, the tasks that target it (`targeting.targets`). The
    targeting check applies on a server without tokens too.
    """
    if identity.kind not in ("open", "agent"):
        return f"reports need the reporting agent's own token; this is {describe(identity)}"
    if identity.kind == "agent" and identity.agent_id != agent_id:
        return (f"server_id {agent_id} is another agent; the token belongs to agent "
                f"{identity.agent_id}, which may report only as itself")
    if not targets_agent_id(task, agent_id):
        return (f"task {task.id} does not target agent {agent_id}, so the agent may not report it; "
                f"GET /api/v1/tasks/{task.id} shows its agents or labels")
    return None


def describe(identity: Identity) -> str:
    if identity.kind == "agent":
        return f"the agent token of {identity.agent_id}"
    return f"an {identity.kind} token"


def add_enrollment_routes(app: bottle.Bottle, tokens: TokenConfig, agent_id_pattern: re.Pattern) -> None:
    """Add the enrollment call for agents and the token revocation call for admins."""

    def check_agent_id(agent_id: str) -> None:
        if not agent_id_pattern.fullmatch(agent_id):
            raise api_error(400, f"invalid agent id: {AGENT_ID_HINT}, starting with a letter or digit",
                            "agent_id")

    @app.post("/api/v1/agents/<agent_id>/enroll")
    def enroll_agent(agent_id):
        if not tokens.enabled:
            raise api_error(404, "this server runs without tokens, so agents need no enrollment")
        identity = authenticate(tokens)
        if identity.kind not in ("enrollment", "admin"):
            raise forbidden(f"enrollment needs the enrollment token; this is {describe(identity)}")
        check_agent_id(agent_id)

        agent_token = secrets.token_urlsafe(32)
        push_secret = secrets.token_urlsafe(32)
        now = utc_now()
        credentials = dict(token_hash=token_digest(agent_token).hex(), push_secret=push_secret,
                           enrolled_at=now)
        with database.atomic():
            inserted = (Agent.insert(id=agent_id, registered_at=now, last_seen_at=now, **credentials)
                        .on_conflict_ignore().as_rowcount().execute())
            if not inserted:
                # An agent registered before tokens were turned on, or one whose token an
                # admin revoked, has no token hash and may enroll. The filter makes this a
                # compare-and-swap, so two enrollments at once cannot both win.
                inserted = (Agent.update(**credentials)
                            .where((Agent.id == agent_id) & Agent.token_hash.is_null())
                            .execute())
                if not inserted:
                    log.warning("enrollment of agent %s from %s rejected: the id is already enrolled",
                                agent_id, bottle.request.remote_addr)
                    raise api_error(409, f"agent {agent_id} is already enrolled; if this host is "
                                         f"{agent_id} and lost its credentials, an admin must revoke "
                                         f"them first with DELETE /api/v1/agents/{agent_id}/token, "
                                         "otherwise choose another agent id", "agent_id")
                log.warning("agent %s enrolled again from %s, replacing its revoked or missing token",
                            agent_id, bottle.request.remote_addr)
            else:
                log.info("agent %s enrolled from %s", agent_id, bottle.request.remote_addr)
        return json_response({"agent_id": agent_id, "agent_token": agent_token,
                              "push_secret": push_secret}, 201)

    @app.delete("/api/v1/agents/<agent_id>/token")
    def revoke_agent_token(agent_id):
        require_operator(tokens, admin=True)
        check_agent_id(agent_id)
        updated = (Agent.update(token_hash=None, push_secret=None)
                   .where(Agent.id == agent_id).execute())
        if not updated:
            raise api_error(404, f"agent {agent_id} not found", "agent_id")
        log.warning("token of agent %s revoked from %s; the agent may enroll again",
                    agent_id, bottle.request.remote_addr)
        return json_response({"agent_id": agent_id, "revoked": True})
