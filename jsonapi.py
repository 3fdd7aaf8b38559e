"""JSON request parsing, input validation and error responses of the server's API.

Every error has one shape, {"error": MESSAGE, "field": NAME}, with "field" present
when one field of the request is at fault.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
from typing import Any, Optional

import bottle
import waitress.channel
import waitress.task

from agent import UTC, format_time, parse_time, printable

log = logging.getLogger("taskscheduler.server")

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_COMMAND_LENGTH = 8192
MAX_FREQUENCY_LENGTH = 200
MAX_OUTPUT_LENGTH = 4 * 1024 * 1024
MAX_TIMEZONE_LENGTH = 64
MAX_REASON_LENGTH = 500
MAX_PUSH_URL_LENGTH = 2048
MAX_HOSTNAME_LENGTH = 255
MAX_PLATFORM_LENGTH = 255
MAX_VERSION_LENGTH = 64
# The characters that str.isspace() and str.strip() count as white space. They are spelled
# out because `\s` means other characters in ECMA-262 than in Python (U+0085, U+FEFF), and
# this class must mean the same in the server and in the OpenAPI document.
WHITESPACE_CLASS = ("\\t\\n\\x0b\\x0c\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029"
                    "\\u202f\\u205f\\u3000")
# An http(s) URL without white space or control characters.
PUSH_URL_REGEX = (f"^https?://[^{WHITESPACE_CLASS}/?#\\x00-\\x1f\\x7f-\\x9f]+"
                  f"(?:/[^{WHITESPACE_CLASS}\\x00-\\x1f\\x7f-\\x9f]*)?$")
# A skipped slot did not run because the previous run was still going or the agent was
# busy. Missed slots are slots the agent could not start in time. A cancelled run was
# stopped because the next run replaced it.
RESULT_STATUSES = ("succeeded", "failed", "timed_out", "lost", "skipped", "missed", "cancelled")


def json_response(body: Any, status: int = 200) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        body=json.dumps(body), status=status,
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def api_error(status: int, message: str, field: Optional[str] = None) -> bottle.HTTPResponse:
    """Build the one error shape of the API: {"error": MESSAGE, "field": NAME}."""
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return json_response(body, status)


def render_http_error(error: bottle.HTTPError) -> str:
    """Render bottle's own errors (404, 405, 413, 500) as JSON instead of HTML."""
    bottle.response.content_type = "application/json"
    if error.status_code == 404:
        message = f"no endpoint at {bottle.request.method} {bottle.request.path}"
    elif error.status_code == 405:
        message = (f"method {bottle.request.method} is not allowed on {bottle.request.path}; "
                   f"allowed: {error.headers.get('Allow', 'see the README')}")
    elif error.status_code == 413:
        message = f"request body is larger than {MAX_BODY_BYTES} bytes"
    elif error.status_code >= 500:
        if error.exception is not None:
            log.error("unhandled error on %s %s: %r", bottle.request.method,
                      printable(bottle.request.path), error.exception, exc_info=error.exception)
        message = "internal server error; the server log has the details"
    else:
        message = str(error.body)
    return json.dumps({"error": message})


class JsonErrorTask(waitress.task.ErrorTask):
    """Sends waitress's own error responses in the API's JSON error shape.

    waitress sends these before the application gets the request: a body over its
    `max_request_body_size` (413, decided from Content-Length before the body is read, or
    as soon as a chunked body passes the limit), a malformed request (400), headers that
    are too large (431), an unsupported Transfer-Encoding (501), and a failure inside
    waitress (500). The connection is closed after the response, so the rest of an
    oversized body is never read.
    """

    def execute(self):
        error = self.request.error
        if error.code == 413:
            message = f"request body is larger than {MAX_BODY_BYTES} bytes"
        elif error.code >= 500:
            message = f"{error.reason.lower()}; the server log has the details"
        else:
            message = f"{error.reason.lower()}: {error.body}"
        body = json.dumps({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend([("Content-Type", "application/json"),
                                      ("Cache-Control", "no-store")])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(waitress.channel.HTTPChannel):
    error_task_class = JsonErrorTask


def use_json_error_responses(server) -> None:
    """Make a server from `waitress.create_server` send its own errors as JSON.

    NOTE: `channel_class` and `error_task_class` are waitress internals (checked with
    waitress 3.0.2); `tests/test_body_limit.py` fails if an upgrade changes them.
    """
    server.channel_class = JsonErrorChannel


def read_json_object() -> dict:
    """Return the request body as a JSON object, or raise a 4xx error response."""
    content_type = bottle.request.content_type.split(";")[0].strip().lower()
    if content_type != "application/json":
        raise api_error(415, "send the body as JSON with the header Content-Type: application/json "
                             f"(received {content_type or 'no content type'})")
    if bottle.request.content_length > MAX_BODY_BYTES:
        raise api_error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    raw = bottle.request.body.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise api_error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise api_error(400, "request body is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise api_error(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise api_error(400, "request body is nested too deeply") from None
    except ValueError as error:  # an integer longer than Python's 4,300-digit limit
        raise api_error(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise api_error(400, "request body must be a JSON object")
    return data


def check_encodable(value: str, field: str) -> str:
    """Reject lone UTF-16 surrogates, which JSON escapes allow but UTF-8 cannot store."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise api_error(400, f"{field} contains a lone UTF-16 surrogate (\\ud800-\\udfff); "
                             "send valid Unicode", field) from None
    return value


def required_string(data: dict, field: str, max_length: int) -> str:
    if field not in data or data[field] is None:
        raise api_error(400, f"{field} is missing", field)
    value = data[field]
    if not isinstance(value, str):
        raise api_error(400, f"{field} must be a string, not {type(value).__name__}", field)
    if not value.strip():
        raise api_error(400, f"{field} is empty", field)
    if len(value) > max_length:
        raise api_error(400, f"{field} is longer than {max_length} characters", field)
    if "\x00" in value:
        raise api_error(400, f"{field} contains a NUL character", field)
    return check_encodable(value, field)


def optional_label(data: dict, field: str, max_length: int = 255) -> str:
    """Return a short descriptive string field, "" when absent or null."""
    value = data.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise api_error(400, f"{field} must be a string or null, not {type(value).__name__}", field)
    if len(value) > max_length:
        raise api_error(400, f"{field} is longer than {max_length} characters", field)
    if "\x00" in value:
        raise api_error(400, f"{field} contains a NUL character", field)
    return check_encodable(value, field)


def optional_output(data: dict, field: str, max_length: int) -> str:
    value = data.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise api_error(400, f"{field} must be a string, not {type(value).__name__}", field)
    if len(value) > max_length:
        raise api_error(413, f"{field} is longer than {max_length} characters; "
                             "send its head and tail only", field)
    check_encodable(value, field)
    # PostgreSQL text columns cannot hold NUL, so it is shown as U+FFFD like other bad bytes.
    return value.replace("\x00", "\ufffd")


def optional_boolean(data: dict, field: str) -> bool:
    value = data.get(field, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise api_error(400, f"{field} must be true or false", field)
    return value


def optional_time(data: dict, field: str) -> Optional[dt.datetime]:
    """Return a naive UTC datetime from an RFC 3339 field, or None when absent."""
    value = data.get(field)
    if value is None:
        return None
    try:
        return parse_time(value).replace(tzinfo=None)
    except ValueError as error:
        raise api_error(400, f"{field} is invalid: {error}", field) from None


def whole_number(value: object) -> Optional[int]:
    """Return a JSON integer as int, or None for any other value.

    JSON Schema counts 5.0 as an integer, like 5, so the server accepts it too. Booleans,
    fractions, infinities and NaN are not integers.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def optional_exit_code(data: dict) -> Optional[int]:
    if data.get("exit_code") is None:
        return None
    value = whole_number(data["exit_code"])
    if value is None or not -(2 ** 31) <= value < 2 ** 31:
        raise api_error(400, "exit_code must be an integer (negative for a signal) or null", "exit_code")
    return value


def optional_missed_slots(data: dict) -> Optional[int]:
    if data.get("missed_slots") is None:
        return None
    value = whole_number(data["missed_slots"])
    if value is None or not 1 <= value < 2 ** 31:
        raise api_error(400, "missed_slots must be an integer of 1 or more", "missed_slots")
    return value


def time_text(naive: Optional[dt.datetime]) -> Optional[str]:
    return format_time(naive.replace(tzinfo=UTC)) if naive is not None else None


def local_time_text(instant: dt.datetime, zone: dt.tzinfo) -> str:
    """Format an aware datetime as ISO 8601 in `zone`, with its UTC offset."""
    local = instant.astimezone(zone)
    return local.isoformat(timespec="seconds" if local.microsecond == 0 else "microseconds")


def seconds_json(value: Optional[float]) -> Optional[float]:
    """Return a number of seconds for JSON, as an integer when it is whole (30, not 30.0)."""
    if value is None:
        return None
    value = float(value)
    return int(value) if value.is_integer() else value


def read_missed_range(data: dict, status: str,
                      scheduled_for: dt.datetime) -> tuple[Optional[int], Optional[dt.datetime]]:
    """Return `missed_slots` and `first_missed` of a report, or raise a 400 error response.

    Both belong to status `missed` only, and `scheduled_for` is the newest missed slot.
    `missed_slots` defaults to 1, and then `first_missed` is `scheduled_for`. For more
    slots without `first_missed`, it stays unknown (None).
    """
    missed_slots = optional_missed_slots(data)
    first_missed = optional_time(data, "first_missed")
    if status != "missed":
        for field, value in (("missed_slots", missed_slots), ("first_missed", first_missed)):
            if value is not None:
                raise api_error(400, f"{field} is only allowed with status missed, not {status}", field)
        return None, None

    if missed_slots is None:
        missed_slots = 1
    if missed_slots == 1:
        if first_missed is not None and first_missed != scheduled_for:
            raise api_error(400, "first_missed must equal scheduled_for when missed_slots is 1",
                            "first_missed")
        first_missed = scheduled_for
    elif first_missed is not None and first_missed >= scheduled_for:
        raise api_error(400, "first_missed must be earlier than scheduled_for when missed_slots "
                             "is more than 1, because scheduled_for is the newest missed slot",
                        "first_missed")
    return missed_slots, first_missed


# A 64-bit signed column stores byte counts up to 2**63 - 1.
MAX_BYTE_COUNT = 2 ** 62


def byte_count(data: dict, field: str, text: str) -> int:
    if data.get(field) is None:
        return len(text.encode("utf-8"))
    value = whole_number(data[field])
    if value is None or not 0 <= value <= MAX_BYTE_COUNT:
        raise api_error(400, f"{field} must be a whole number of bytes from 0 to {MAX_BYTE_COUNT}", field)
    return value


def optional_base64(data: dict, field: str, max_bytes: int) -> Optional[bytes]:
    """Return the bytes of a base64 field, or None when absent."""
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise api_error(400, f"{field} must be a base64 string", field)
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise api_error(413, f"{field} is longer than {max_bytes} bytes", field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise api_error(400, f"{field} is not valid base64", field) from None


def optional_count(data: dict, field: str) -> int:
    """Return a non-negative integer field, 0 when absent."""
    if data.get(field) is None:
        return 0
    value = whole_number(data[field])
    if value is None or not 0 <= value < 2 ** 31:
        raise api_error(400, f"{field} must be a non-negative integer", field)
    return value
