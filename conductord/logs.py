"""Structured logs: one JSON object per line, flushed per line.

Configured once per process by `configure()`; every later `get_logger()` shares it. Each
line starts with `timestamp` (ISO 8601 UTC), `level` and `event`, followed by the fields
bound at configure time (for the daemon: `node_id`, `host`, `role`) and the event's own.

Logging never raises because of a value, and the line is still written: every value is made
JSON-safe before rendering (lone surrogates become U+FFFD, an object becomes its `str()` or a
placeholder when that raises, nesting is capped), and a line that still cannot be rendered is
replaced by one naming the event and the problem. A log call in a crash or stop path must not
be the thing that fails.

Secrets handed to `configure(secrets=...)` are removed from every string value, with any
piece of them of 8 characters or more (`conductord.redact`), as a last line of defence; code
should never log them in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

import structlog

from conductord.redact import clean, safe_str

LEVELS = ("debug", "info", "warning", "error")

_LEADING_KEYS = ("timestamp", "level", "event")


def _leading_keys_first(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


class _Sanitizer:
    """Make every value JSON-safe and remove the configured secrets from every string."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._secrets = tuple(s for s in secrets if s)

    def __call__(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        return clean(event_dict, self._secrets)


def _dumps(obj: Any, **kwargs: Any) -> str:
    try:
        return json.dumps(obj, default=safe_str, separators=(",", ":"), ensure_ascii=False)
    except Exception as exc:  # the line is still written, naming what went wrong
        fallback = {key: safe_str(obj.get(key)) for key in _LEADING_KEYS if key in obj}
        fallback["log_error"] = f"{type(exc).__name__}: {safe_str(exc)}"
        return json.dumps(fallback, separators=(",", ":"), ensure_ascii=False)


def configure(
    *,
    level: str = "info",
    stream: IO[str] | None = None,
    secrets: Iterable[str | None] = (),
    **bound: Any,
) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog for this process and return a logger with `bound` fields."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _Sanitizer(secrets),
            _leading_keys_first,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line, message and newline together (print() writes them apart when
        # stdout is unbuffered or the line is long), so a log rotation between two writes can
        # never cut a line in two for the shipper tailing the file.
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(**bound)


def get_logger(**bound: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger().bind(**bound)
