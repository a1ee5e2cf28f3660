"""Structured logs: one JSON object per line, flushed per line.

Configured once per process by `configure()`; every later `get_logger()` shares it. Each
line starts with `timestamp` (ISO 8601 UTC), `level` and `event`, followed by the fields
bound at configure time (for the daemon: `node_id`, `host`, `role`) and the event's own.

Secrets handed to `configure(secrets=...)` are replaced by `***` in every string value as a
last line of defence; code should never log them in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

import structlog

LEVELS = ("debug", "info", "warning", "error")

_LEADING_KEYS = ("timestamp", "level", "event")


def _leading_keys_first(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


class _Redactor:
    """Replace any configured secret inside string values (nested ones too) by `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(s for s in secrets if s)

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value

    def __call__(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if not self._secrets:
            return event_dict
        return {k: self._scrub(v) for k, v in event_dict.items()}


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=False)


def configure(
    *,
    level: str = "info",
    stream: IO[str] | None = None,
    secrets: Iterable[str] = (),
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
            _Redactor(secrets),
            _leading_keys_first,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(**bound)


def get_logger(**bound: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger().bind(**bound)
