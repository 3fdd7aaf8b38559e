"""Keyset pagination of list endpoints: `limit` and an opaque `cursor`.

A cursor is the sort key of the last item of a page, as base64url-encoded JSON. The
next page starts after that key, so items created or removed between two requests
neither repeat nor shift the pages, unlike an offset. Clients must treat a cursor as
opaque: its content may change between versions.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Optional

import bottle

from agent import parse_time
from jsonapi import api_error, time_text

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR_LENGTH = 512


def read_limit() -> int:
    """Return the request's `limit` query parameter, 1 to 1000, default 100; or raise a 400."""
    text = bottle.request.query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise api_error(400, f"limit must be a whole number from 1 to {MAX_LIMIT}, not {text[:20]!r}",
                        "limit")
    return int(text)


def encode_cursor(instant: dt.datetime, key: "str | int") -> str:
    """Return the cursor after an item whose sort key is (`instant`, `key`)."""
    raw = json.dumps([time_text(instant), key]).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def read_cursor(key_type: type) -> Optional[tuple[dt.datetime, "str | int"]]:
    """Return the sort key in the request's `cursor` query parameter, None without one; or raise a 400."""
    text = bottle.request.query.get("cursor")
    if text is None or text == "":
        return None
    invalid = api_error(400, "cursor is invalid: pass the next_cursor of the previous page unchanged",
                        "cursor")
    if len(text) > MAX_CURSOR_LENGTH:
        raise invalid
    try:
        decoded = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        instant_text, key = decoded
        instant = parse_time(instant_text).replace(tzinfo=None)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise invalid from None
    if type(key) is not key_type:
        raise invalid
    return instant, key
