"""Many seeds: run them (in worker processes), shrink a failing one, summarise, and the CLI.

`python -m conductord.sim` prints one JSON line and exits 1 on a violation (docs/simulation.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conductord.sim.model import MACHINES, Fault, RunResult, SimConfig
from conductord.sim.server import SERVERS
from conductord.sim.world import Simulation


def run_seed(
    seed: int,
    config: SimConfig,
    *,
    faults: Sequence[Fault] | None = None,
    trace: bool = False,
    stop_at_first_violation: bool = False,
) -> RunResult:
    """Run one seed; `faults` replaces the generated schedule (the rest of the seed stays)."""
    return Simulation(
        seed, config, faults=faults, trace=trace, stop_at_first_violation=stop_at_first_violation
    ).run()


def shrink(seed: int, config: SimConfig, kind: str | None = None) -> RunResult:
    """The seed's run with as few faults as still give a violation (of `kind` if given).

    Drops one fault at a time and keeps the drop while the violation persists, until no
    single drop keeps it; then replays the result with a trace. Latency, loss and jitter stay
    those of the seed (their random streams are per node, so they mostly survive the drops).
    """

    def violates(faults: Sequence[Fault] | None) -> RunResult | None:
        result = run_seed(seed, config, faults=faults, stop_at_first_violation=True)
        hits = [v for v in result.violations if kind is None or v.kind == kind]
        return result if hits else None

    first = violates(None)
    if first is None:
        raise ValueError(f"seed {seed} shows no violation to shrink")
    kind = kind or first.violations[0].kind
    faults = list(first.faults)
    shrunk = True
    while shrunk:
        shrunk = False
        for i in range(len(faults)):
            candidate = faults[:i] + faults[i + 1 :]
            if violates(candidate) is not None:
                faults = candidate
                shrunk = True
                break
    return run_seed(seed, config, faults=faults, trace=True, stop_at_first_violation=True)


@dataclass
class Summary:
    """What a batch of seeds found (the CLI prints it as one JSON line)."""

    seeds: int = 0
    sim_hours: float = 0.0
    events: int = 0
    passes_checked: int = 0
    acts_performed: int = 0
    acts_accepted: int = 0
    acts_rejected_by_fence: int = 0
    unfenced_violations: int = 0
    violations: int = 0
    violating_seeds: list[int] = field(default_factory=list)
    unfenced_violating_seeds: list[int] = field(default_factory=list)
    violation_kinds: dict[str, int] = field(default_factory=dict)
    liveness_windows_checked: int = 0
    liveness_windows_skipped: int = 0
    worst_failover_s: float | None = None
    median_failover_s: float | None = None
    max_cycles_per_interval: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    _failovers: list[float] = field(default_factory=list, repr=False)

    def add(self, result: RunResult) -> None:
        self.seeds += 1
        self.sim_hours += result.sim_seconds / 3600.0
        self.events += result.events
        self.passes_checked += result.passes_checked
        self.acts_performed += result.acts_performed
        self.acts_accepted += result.acts_accepted
        self.acts_rejected_by_fence += result.acts_rejected
        for kind, count in result.faults_injected.items():
            self.faults_injected[kind] = self.faults_injected.get(kind, 0) + count
        self.unfenced_violations += result.unfenced_violations
        self.violations += len(result.violations)
        if result.violations:
            self.violating_seeds.append(result.seed)
        if result.unfenced_violations:
            self.unfenced_violating_seeds.append(result.seed)
        for v in result.violations:
            self.violation_kinds[v.kind] = self.violation_kinds.get(v.kind, 0) + 1
        self.liveness_windows_checked += len(result.failovers)
        self.liveness_windows_skipped += result.liveness_windows_skipped
        self._failovers.extend(result.failovers)
        self.max_cycles_per_interval = max(
            self.max_cycles_per_interval, result.max_cycles_per_interval
        )

    def as_dict(self) -> dict[str, Any]:
        failovers = sorted(self._failovers)
        doc = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        doc["sim_hours"] = round(self.sim_hours, 3)
        doc["faults_injected"] = dict(sorted(self.faults_injected.items()))
        doc["violating_seeds"] = self.violating_seeds[:20]
        doc["unfenced_violating_seeds"] = self.unfenced_violating_seeds[:20]
        if failovers:
            doc["worst_failover_s"] = round(failovers[-1], 3)
            doc["median_failover_s"] = round(failovers[len(failovers) // 2], 3)
        return doc


def _run_chunk(args: tuple[list[int], SimConfig]) -> list[RunResult]:
    seeds, config = args
    results = []
    for seed in seeds:
        result = run_seed(seed, config)
        result.faults = ()  # keep the inter-process traffic small; the seed replays them
        results.append(result)
    return results


def run_many(
    seeds: Iterable[int], config: SimConfig, *, jobs: int = 1
) -> tuple[Summary, list[RunResult]]:
    """Run seeds (in worker processes when jobs > 1); results come back in seed order."""
    seeds = list(seeds)
    summary = Summary()
    failing: list[RunResult] = []
    if jobs <= 1:
        chunks: Iterable[list[RunResult]] = (_run_chunk(([s], config)) for s in seeds)
    else:
        from concurrent.futures import ProcessPoolExecutor

        size = max(1, min(50, len(seeds) // (jobs * 4) or 1))
        parts = [(seeds[i : i + size], config) for i in range(0, len(seeds), size)]
        pool = ProcessPoolExecutor(max_workers=jobs)
        chunks = pool.map(_run_chunk, parts)
    for chunk in chunks:
        for result in chunk:
            summary.add(result)
            if result.violations:
                failing.append(result)
    if jobs > 1:
        pool.shutdown()
    return summary, failing


# -- command line --------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conductord.sim",
        description="Deterministic fleet simulation (SPEC §13); prints one JSON line.",
    )
    parser.add_argument("--seeds", type=int, default=1000, help="number of seeds (default 1000)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-shrink", action="store_true", help="do not shrink a failing seed")
    defaults = SimConfig()
    for f in dataclasses.fields(SimConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, type=_boolean, default=default, metavar="BOOL")
        elif f.name == "margin_s":
            parser.add_argument(flag, type=float, default=None)
        elif f.name == "machine":
            parser.add_argument(flag, choices=MACHINES, default=default)
        elif f.name == "server":
            parser.add_argument(flag, choices=SERVERS, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = SimConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig)})
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    began = time.perf_counter()
    summary, failing = run_many(seeds, config, jobs=args.jobs)
    doc: dict[str, Any] = summary.as_dict()
    doc["wall_s"] = round(time.perf_counter() - began, 2)
    doc["config"] = {**dataclasses.asdict(config), "effective_margin_s": config.effective_margin_s}
    doc["failover_bound_s"] = round(config.failover_bound_s(), 3)
    if failing:
        first = failing[0]
        violation = first.violations[0]
        report: dict[str, Any] = {
            "seed": first.seed,
            "kind": violation.kind,
            "at": round(violation.at, 6),
            "detail": violation.detail,
        }
        if not args.no_shrink:
            shrunk = shrink(first.seed, config, violation.kind)
            report["faults"] = [str(f) for f in shrunk.faults]
            report["trace"] = (shrunk.trace or [])[-40:]
        doc["first_violation"] = report
    sys.stdout.write(json.dumps(doc) + "\n")
    return 1 if failing else 0

