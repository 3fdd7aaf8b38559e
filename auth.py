"""Bearer tokens of the server's API: who a request comes from and what it may do.

Four kinds of token exist. Admin and read tokens belong to operators and come from
token files or environment variables. The enrollment token lets an agent enroll, which
gives it an agent token of its own and a push secret. The server stores only the SHA-256
of each agent token. With no admin, read or enrollment token configured, the API is
open, as before tokens existed, and every request is treated as allowed.

Every token may expire. An operator or enrollment token may be followed by
`expires=RFC3339` in its file or variable. Agent tokens expire when the server sets an
agent token lifetime. An expired token gets a 401, and an agent whose token expired may
enroll again with the enrollment token.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from typing import Iterable, Optional

import bottle

from agent import UTC, format_time, parse_time
from jsonapi import api_error, json_response, read_json_object, time_text
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


EXPIRY_EXAMPLE = "expires=2027-01-31T00:00:00Z"


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    """One token of a token file or variable, with its expiry (aware, UTC) if it has one.

    `origin` names where the token was given, such as "line 3 of /etc/admin-tokens", so
    that logs can point at it without showing it.
    """

    token: str
    expires_at: Optional[dt.datetime] = None
    origin: str = ""

    def __repr__(self) -> str:
        # Keeps the token out of tracebacks and debug logs.
        return f"TokenEntry(origin={self.origin!r}, expires_at={self.expires_at!r})"


def parse_token_line(text: str, where: str) -> TokenEntry:
    """Parse `TOKEN` or `TOKEN expires=RFC3339` from one line or list entry.

    Raises TokenFileError naming `where` and never the line's text, which contains a token.
    """
    token, *options = text.split()
    if not TOKEN_PATTERN.fullmatch(token) or len(token) < MIN_TOKEN_LENGTH:
        raise TokenFileError(
            f"{where} is invalid: a token is at least {MIN_TOKEN_LENGTH} "
            "characters of letters, digits and -._~+/ (generate one with "
            "python -c \"import secrets; print(secrets.token_urlsafe(32))\"), optionally "
            f"followed by a space and {EXPIRY_EXAMPLE}")
    expires_at = None
    for option in options:
        name, _, value = option.partition("=")
        if name != "expires" or expires_at is not None:
            raise TokenFileError(
                f"{where} is invalid: after the token only one {EXPIRY_EXAMPLE} may follow")
        try:
            expires_at = parse_time(value)
        except ValueError:
            raise TokenFileError(
                f"{where} has an invalid expiry: write it as RFC 3339 with an offset, "
                f"such as {EXPIRY_EXAMPLE} or expires=2027-01-31T01:00:00+01:00") from None
    return TokenEntry(token, expires_at, where)


def parse_tokens(lines: Iterable[str], source: str, unit: str = "line") -> list[TokenEntry]:
    """Return the tokens of `lines`, skipping blank lines and lines starting with '#'.

    Raises TokenFileError naming `source` and the `unit` number ("line 3 of FILE"),
    never the token itself.
    """
    tokens = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        tokens.append(parse_token_line(text, f"{unit} {number} of {source}"))
    return tokens


def read_tokens(path: Optional[str], variable: str, value: Optional[str]) -> list[TokenEntry]:
    """Return the tokens of a token file (one per line) and of a comma-separated variable."""
    tokens = []
    if path:
        try:
            with open(path, encoding="utf-8") as token_file:
                lines = token_file.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise TokenFileError(f"cannot read token file {path}: {error}") from None
        tokens += parse_tokens(lines, path)
    if value:
        tokens += parse_tokens(value.split(","), f"environment variable {variable}", unit="entry")
    return tokens


@dataclasses.dataclass(frozen=True)
class AcceptedToken:
    """An operator or enrollment token as the server keeps it: its SHA-256, kind and expiry."""

    kind: str
    digest: bytes
    expires_at: Optional[dt.datetime] = None
    origin: str = ""

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    """The operator and enrollment tokens a server accepts, expired ones included.

    Expired tokens stay in the configuration, so a request with one gets a 401 that names
    its expiry, and a server whose tokens all expired still counts as one with tokens.
    """

    admin: tuple[AcceptedToken, ...] = ()
    read: tuple[AcceptedToken, ...] = ()
    enrollment: tuple[AcceptedToken, ...] = ()

    @classmethod
    def from_tokens(cls, admin: Iterable["TokenEntry | str"] = (), read: Iterable["TokenEntry | str"] = (),
                    enrollment: Iterable["TokenEntry | str"] = ()) -> "TokenConfig":
        """Build the configuration from token entries or plain tokens (which never expire)."""

        def accepted(kind: str, entries: Iterable["TokenEntry | str"]) -> tuple[AcceptedToken, ...]:
            result = []
            for entry in entries:
                if isinstance(entry, str):
                    entry = TokenEntry(entry)
                result.append(AcceptedToken(kind, token_digest(entry.token), entry.expires_at,
                                            entry.origin))
            return tuple(result)

        return cls(admin=accepted("admin", admin), read=accepted("read", read),
                   enrollment=accepted("enrollment", enrollment))

    @property
    def enabled(self) -> bool:
        return bool(self.admin or self.read or self.enrollment)

    @property
    def all(self) -> tuple[AcceptedToken, ...]:
        """Every token, admin tokens first, so a token given as two kinds acts as the first."""
        return self.admin + self.read + self.enrollment

    def expired_counts(self, now: dt.datetime) -> dict[str, int]:
        """Return how many tokens of each kind have expired at `now`."""
        return {kind: sum(token.expired(now) for token in getattr(self, kind))
                for kind in ("admin", "read", "enrollment")}


def find_token(digest: bytes, accepted: Iterable[AcceptedToken]) -> Optional[AcceptedToken]:
    """Return the first of `accepted` whose digest equals `digest`, or None.

    Every digest is compared in constant time, and the loop does not stop at a match, so
    the time taken shows neither which token matched nor its kind. Comparing digests of
    equal length keeps a token's length from showing in the timing too.
    """
    found = None
    for candidate in accepted:
        if hmac.compare_digest(digest, candidate.digest) and found is None:
            found = candidate
    return found


@dataclasses.dataclass(frozen=True)
class Identity:
    """The sender of a request. `kind` is open (no tokens configured), admin, read,
    enrollment or agent, and `agent_id` is set for agent tokens."""

    kind: str
    agent_id: Optional[str] = None


OPEN = Identity("open")


def unauthorized(message: str, invalid_token: bool, expired: bool = False) -> bottle.HTTPResponse:
    """Build a 401 response with the RFC 6750 challenge of a bearer token."""
    response = api_error(401, message)
    challenge = 'Bearer realm="taskscheduler"'
    if invalid_token:
        challenge += ', error="invalid_token"'
    if expired:
        challenge += ', error_description="The access token expired"'
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


def authenticate(tokens: TokenConfig, now: Optional[dt.datetime] = None) -> Identity:
    """Return who sent the current request, or raise a 401 response.

    Operator and enrollment tokens are compared in constant time, all of them on every
    request. An agent token is found by its SHA-256 in an index lookup. A timing
    difference there could at most hint at a stored digest, and a token for a digest
    means inverting SHA-256 of 32 random bytes. An expired token of either sort gets a
    401 that names the instant it expired. `now` is an aware datetime (default: the clock).
    """
    if not tokens.enabled:
        return OPEN
    now = now or dt.datetime.now(UTC)
    token = bearer_token()
    digest = token_digest(token)
    accepted = find_token(digest, tokens.all)
    if accepted is not None:
        if accepted.expired(now):
            which = f"{accepted.kind} token"
            if accepted.origin:
                which += f" from {accepted.origin}"
            reject_expired(which, accepted.expires_at,
                           f"the {accepted.kind} token expired at {format_time(accepted.expires_at)}; "
                           "ask an admin of this server for a new one")
        return Identity(accepted.kind)
    agent = Agent.get_or_none(Agent.token_hash == digest.hex())
    if agent is not None:
        expires_at = agent_token_expiry(agent)
        if expires_at is not None and now >= expires_at:
            reject_expired(f"agent token of {agent.id}", expires_at,
                           f"the agent token of {agent.id} expired at {format_time(expires_at)}; "
                           f"enroll again with the enrollment token: POST "
                           f"/api/v1/agents/{agent.id}/enroll (an agent that has the enrollment "
                           "token does this by itself)")
        return Identity("agent", agent.id)
    log.info("request %s %s from %s rejected: the token is not valid", bottle.request.method,
             bottle.request.path, bottle.request.remote_addr)
    raise unauthorized("the token is not valid", invalid_token=True)


def agent_token_expiry(agent: Agent) -> Optional[dt.datetime]:
    """Return when `agent`'s token expires, as an aware datetime, or None for never."""
    if agent.token_expires_at is None:
        return None
    return agent.token_expires_at.replace(tzinfo=UTC)


def reject_expired(which: str, expires_at: dt.datetime, message: str) -> None:
    """Log a request with an expired token, without the token, and raise its 401 response."""
    log.info("request %s %s from %s rejected: the %s expired at %s", bottle.request.method,
             bottle.request.path, bottle.request.remote_addr, which, format_time(expires_at))
    raise unauthorized(message, invalid_token=True, expired=True)


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


def add_enrollment_routes(app: bottle.Bottle, tokens: TokenConfig, agent_id_pattern: re.Pattern,
                          agent_token_lifetime: Optional[dt.timedelta] = None) -> None:
    """Add the enrollment call for agents and the token revocation call for admins.

    Agent tokens issued here expire `agent_token_lifetime` after enrollment, or never
    when it is None.
    """

    def check_agent_id(agent_id: str) -> None:
        if not agent_id_pattern.fullmatch(agent_id):
            raise api_error(400, f"invalid agent id: {AGENT_ID_HINT}, starting with a letter or digit",
                            "agent_id")

    @app.post("/api/v1/agents/<agent_id>/enroll")
    def enroll_agent(agent_id):
        if not tokens.enabled:
            raise api_error(404, "this server runs without tokens, so agents need no enrollment")
        identity = authenticate(tokens)
        # Not an admin token either: with it, an operator could revoke an agent, enroll its id
        # again and then report as that agent.
        if identity.kind != "enrollment":
            raise forbidden(f"enrollment needs the enrollment token; this is {describe(identity)}")
        check_agent_id(agent_id)
        previous_token = read_previous_token()

        agent_token = secrets.token_urlsafe(32)
        push_secret = secrets.token_urlsafe(32)
        now = utc_now()
        expires_at = now + agent_token_lifetime if agent_token_lifetime else None
        credentials = dict(token_hash=token_digest(agent_token).hex(), push_secret=push_secret,
                           enrolled_at=now, token_expires_at=expires_at)
        with database.atomic():
            inserted = (Agent.insert(id=agent_id, registered_at=now, last_seen_at=now, **credentials)
                        .on_conflict_ignore().as_rowcount().execute())
            if inserted:
                log.info("agent %s enrolled from %s, token expires %s", agent_id,
                         bottle.request.remote_addr, time_text(expires_at) or "never")
            else:
                replace_credentials(agent_id, credentials, now, previous_token)
        return json_response({"agent_id": agent_id, "agent_token": agent_token,
                              "push_secret": push_secret, "expires_at": time_text(expires_at)}, 201)

    def read_previous_token() -> Optional[str]:
        """Return the body's `previous_token`, or None when the request has no JSON body."""
        if not bottle.request.content_length:
            return None
        data = read_json_object()
        token = data.get("previous_token")
        if token is None:
            return None
        if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
            raise api_error(400, "previous_token must be the agent's earlier token, as a string",
                            "previous_token")
        return token

    def replace_credentials(agent_id: str, credentials: dict, now: dt.datetime,
                            previous_token: Optional[str]) -> None:
        """Give the known agent `agent_id` new credentials if it may enroll again, else raise a 409.

        An agent registered before tokens were turned on, or one whose token an admin
        revoked, has no token hash and may enroll. One whose token expired may enroll
        with that expired token as `previous_token`, so that others who have the
        enrollment token cannot take its id when its token expires. The filters make each
        update a compare-and-swap, so of two enrollments at once only one changes the row.
        """
        previous = Agent.get(Agent.id == agent_id)
        if Agent.update(**credentials).where(
                (Agent.id == agent_id) & Agent.token_hash.is_null()).execute():
            log.warning("agent %s enrolled again from %s, replacing its revoked or missing token",
                        agent_id, bottle.request.remote_addr)
            return
        if previous_token is not None and Agent.update(**credentials).where(
                (Agent.id == agent_id) & (Agent.token_hash == token_digest(previous_token).hex())
                & (Agent.token_expires_at <= now)).execute():
            log.warning("agent %s enrolled again from %s, replacing its token that expired at %s",
                        agent_id, bottle.request.remote_addr, time_text(previous.token_expires_at))
            return
        log.warning("enrollment of agent %s from %s rejected: the id is already enrolled",
                    agent_id, bottle.request.remote_addr)
        raise api_error(409, f"agent {agent_id} is already enrolled; an id whose token expired "
                             "enrolls again only with that token as previous_token. If this "
                             f"host is {agent_id} and lost its credentials, an admin must revoke "
                             f"them first with DELETE /api/v1/agents/{agent_id}/token, "
                             "otherwise choose another agent id", "agent_id")

    @app.delete("/api/v1/agents/<agent_id>/token")
    def revoke_agent_token(agent_id):
        require_operator(tokens, admin=True)
        check_agent_id(agent_id)
        updated = (Agent.update(token_hash=None, push_secret=None, token_expires_at=None)
                   .where(Agent.id == agent_id).execute())
        if not updated:
            raise api_error(404, f"agent {agent_id} not found", "agent_id")
        log.warning("token of agent %s revoked from %s; the agent may enroll again",
                    agent_id, bottle.request.remote_addr)
        return json_response({"agent_id": agent_id, "revoked": True})
