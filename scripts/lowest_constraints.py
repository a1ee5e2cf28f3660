#!/usr/bin/env python3
"""The lowest versions pyproject.toml allows, as a pip constraints file, and a check of them.

    python scripts/lowest_constraints.py            # print `name==lower-bound` lines
    python scripts/lowest_constraints.py --check    # exit 1 unless those versions are installed

Reads the runtime dependencies and the `postgres` extra; every one must have a `>=` lower bound
and a `<` upper bound (the test tools of the `test` extra are not pinned). `scripts/dev.sh
test-lowest` installs with these constraints and runs the tests there, so a lower bound that no
longer installs or passes fails CI instead of a user's install. Stdlib only (Python >= 3.11).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# `name[extra]>=1.2.3,<4` -- the only shape our own pyproject uses.
_REQUIREMENT = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?"
    r"\s*>=\s*(?P<low>[0-9][0-9A-Za-z.]*)\s*,\s*<\s*(?P<high>[0-9][0-9A-Za-z.]*)"
)


def lower_bounds(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """{distribution name: lowest allowed version}; raises ValueError on an unbounded one."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
    bounds: dict[str, str] = {}
    for requirement in requirements:
        match = _REQUIREMENT.fullmatch(requirement.strip())
        if match is None:
            raise ValueError(f"{requirement!r} needs a >= lower and a < upper bound")
        bounds[match["name"].lower()] = match["low"]
    return bounds


def main(argv: list[str]) -> int:
    try:
        bounds = lower_bounds()
    except ValueError as err:
        print(f"lowest_constraints: {err}", file=sys.stderr)
        return 2
    if argv == ["--check"]:
        wrong = []
        for name, low in bounds.items():
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                installed = "missing"
            if installed != low:
                wrong.append(f"{name} {installed} (want {low})")
        if wrong:
            print(
                "lowest_constraints: not the lowest versions: " + ", ".join(wrong), file=sys.stderr
            )
            return 1
        print("lowest versions installed: " + ", ".join(f"{n}=={v}" for n, v in bounds.items()))
        return 0
    if argv:
        print("usage: lowest_constraints.py [--check]", file=sys.stderr)
        return 2
    for name, low in bounds.items():
        print(f"{name}=={low}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
