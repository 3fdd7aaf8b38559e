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

from agent import UTC, format_time, parse_time

log = logging.getLogger("taskscheduler.server")

MAX_BODY_BYTES = 16 * 1024 * 1024


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
            log.error("unhandled error on %s %s: %r", bottle.request.method, bottle.request.path,
                      error.exception, exc_info=error.exception)
        message = "internal server error; the server log has the details"
    else:
        message = str(error.body)
    return json.dumps({"error": message})


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


def optional_exit_code(data: dict) -> Optional[int]:
    value = data.get("exit_code")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2 ** 31) <= value < 2 ** 31:
        raise api_error(400, "exit_code must be an integer (negative for a signal) or null", "exit_code")
    return value


def optional_missed_slots(data: dict) -> Optional[int]:
    value = data.get("missed_slots")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2 ** 31:
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
    value = data.get(field)
    if value is None:
        return len(text.encode("utf-8"))
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTE_COUNT:
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
    value = data.get(field)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 31:
        raise api_error(400, f"{field} must be a non-negative integer", field)
    return value
