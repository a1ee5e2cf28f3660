"""A second importable plug-in module, so a flag and a variable can name different ones."""

from __future__ import annotations

from typing import Any


class Jobs:
    @staticmethod
    def run(context: Any) -> None:
        pass


def reconcile_runs() -> None:
    pass
