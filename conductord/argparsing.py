"""argparse that reports usage errors as one line and never exits the process by itself.

The standard `argparse.ArgumentParser` prints a multi-line usage dump and calls `sys.exit(2)`
on any mistake, and guesses abbreviated long options (`--role` from `--ro`). Every command of
conductord wants the opposite: a one-line reason on stderr, exit status 2, no guessing. This
`ArgumentParser` raises `UsageError` instead; the caller turns it into output with `fail()`.

Limits: parsing only. There is no built-in `-h/--help` (`add_help=False`); a command that
wants one adds its own flag and prints its own text. Leftover arguments are reported by
name only up to any `=`, so a mistyped `--shared-tokn=VALUE` never echoes its value.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["ArgumentParser", "UsageError", "fail"]


class UsageError(Exception):
    """A command line that cannot be parsed; `str()` is one line without any prefix."""


def _one_line(message: str) -> str:
    return " ".join(message.split())


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that raises `UsageError` instead of printing and exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["exit_on_error"] = False
        kwargs["allow_abbrev"] = False
        kwargs["add_help"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(_one_line(message))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # Only reachable through actions such as "version" or "help", which we never add.
        raise UsageError(_one_line(message or f"argument parser exited with status {status}"))

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        try:
            return super().parse_known_args(args, namespace)
        except argparse.ArgumentError as err:
            # With exit_on_error=False, a missing value or a bad choice arrives here.
            raise UsageError(_one_line(str(err))) from None

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            raise UsageError(_describe_extra(extras[0]))
        return parsed


def _describe_extra(token: str) -> str:
    if token.startswith("-") and len(token) > 1:
        # The part after `=` may be a secret given to a mistyped option.
        return f"unknown option {token.split('=', 1)[0]}"
    return f'unexpected argument "{token}"'


def fail(message: str, code: int = 2) -> int:
    """Write `conductord: error: {message}` to stderr and return `code` (for `return fail(...)`)."""
    sys.stderr.write(f"conductord: error: {_one_line(message)}\n")
    sys.stderr.flush()
    return code
