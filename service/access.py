"""Request ids and the structured access log: one JSON line per request.

    request_id(request.headers.get("X-Request-ID"))   # the client's id, bounded and sanitised, or a new one
    access_line(method=..., route=..., status=..., ...)  # -> the JSON text logged to "captioner.access"

A client's id is kept when it is made of visible ASCII characters that are safe in a header and a
log line (letters, digits and `-_.:/+=@`), cut to `MAX_ID_LENGTH`; anything else is dropped from
it, and an id left empty is replaced by a fresh uuid4, so every response and log line has one.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

MAX_ID_LENGTH = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9\-_.:/+=@]")

log = logging.getLogger("captioner.access")


def request_id(given: str | None) -> str:
    cleaned = _UNSAFE.sub("", (given or "")[: 4 * MAX_ID_LENGTH])[:MAX_ID_LENGTH]
    return cleaned or uuid.uuid4().hex


def access_line(**fields: Any) -> str:
    """The fields (None values left out) as one JSON object on one line."""
    return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"),
                      ensure_ascii=True)


def configure(level: int = logging.INFO) -> None:
    """Access lines go to stderr as they are, one per line (gunicorn's error log has the rest)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
