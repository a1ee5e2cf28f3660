"""Importable plug-ins for the config tests: a scheduler callable and two hooks."""

from __future__ import annotations

from typing import Any


def schedule(context: Any) -> None:
    pass


def load_runs() -> int:
    return 0


def on_lease_state_change(snapshot: Any) -> None:
    pass
