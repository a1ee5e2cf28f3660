"""The dependency pins of pyproject.toml and the lowest-versions CI step built from them."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "lowest_constraints.py"


def load_script():
    spec = importlib.util.spec_from_file_location("lowest_constraints", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def test_every_runtime_dependency_has_both_bounds_and_urllib3_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\[<>=]", r)[0] for r in project["dependencies"]]
    assert {"gevent", "requests", "urllib3", "marshmallow", "structlog"} <= set(names)
    bounds = load_script().lower_bounds()
    assert set(bounds) >= set(names) | {"psycopg", "psycopg-pool"}
    # Exact versions that exist, so `name==bound` installs (a `>=4.0` would mean 4.0.0).
    assert all(len(release(low)) == 3 for low in bounds.values()), bounds


def test_the_installed_versions_lie_within_the_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
    for requirement in requirements:
        name, low, high = re.fullmatch(
            r"([\w.-]+)(?:\[\w+\])?>=([\w.]+),<([\w.]+)", requirement
        ).groups()
        installed = release(metadata.version(name))
        assert release(low) <= installed < release(high), (requirement, installed)


def test_lowest_constraints_prints_pins_and_rejects_an_unbounded_requirement(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True, timeout=30
    )
    lines = result.stdout.splitlines()
    assert "urllib3==" + load_script().lower_bounds()["urllib3"] in lines
    assert all(re.fullmatch(r"[\w.-]+==\d+\.\d+\.\d+", line) for line in lines), lines
    bad = tmp_path / "pyproject.toml"
    bad.write_text(
        '[project]\ndependencies = ["requests>=2.31"]\n'
        "[project.optional-dependencies]\npostgres = []\n"
    )
    try:
        load_script().lower_bounds(bad)
    except ValueError as err:
        assert "needs a >= lower and a < upper bound" in str(err)
    else:
        raise AssertionError("an unbounded requirement was accepted")
