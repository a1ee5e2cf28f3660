"""The invariant checks of bench/chaos.py: pure functions over what the harness recorded.

Status polls (`/v1/status` of every node, every few ms) give, per process incarnation, samples
`(sent, received, ok, enabled, term)` in harness monotonic seconds. Two nodes that both answer
"scheduler enabled" in one polling round prove nothing (the round takes time). What proves an
overlap:

    If incarnation X answers enabled with term T in two polls p1 < p2 (any failed polls in
    between included), then no other node may be enabled at any moment between p1's answer and
    p2's request. Any other incarnation's enabled answer whose whole request [sent, received]
    falls inside [p1.received, p2.sent] is a proven overlap.

Why that is sound against a correct fleet (SPEC §5, §9): X enabled with T at p2 means X holds a
local validity (send time of a successful renewal of T + TTL − margin) past p2.sent. If Y was
enabled inside the span with another term T', the server granted T' before that moment, so T had
expired on the server by then; a renewal of T processed before that grant set T's expiry past
X's local validity (the server receives after the node sends), and none can be processed after
it (the server then names Y, or grants X a new term). So X cannot be enabled with T at p2: the
answer pair itself is the violation, whether or not X acted in between. Y with the same term T
is impossible (one holder per term). The check can miss overlaps shorter than a poll interval;
it never reports one that a correct fleet could produce.

The child log (bench/chaos_child.py) gives `flock_overlaps` (a child that found the lock held)
and `stale_writes` (a write under the lock whose term is below a term already in the log).

Liveness: `leaderless` integrates, over the run, the time during which no incarnation's latest
answer was "enabled" (a failed poll counts as not enabled: a paused leader does no work);
`failover_times` measures, per fault that hit the leader, the time from the fault to the first
enabled answer of another incarnation.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Span:
    """Incarnation `key` answered enabled with `term` at both ends: [lo, hi] is covered."""

    key: str
    term: int | None
    lo: float  # the first answer's receive time
    hi: float  # the last answer's send time
    polls: int


@dataclass(frozen=True, slots=True)
class Enabled:
    """One poll answered "scheduler enabled"."""

    key: str
    term: int | None
    sent: float
    received: float


@dataclass
class PollRecord:
    """What the poller keeps of one incarnation, updated one sample at a time (`add`).

    Spans are built online (a run of enabled answers with one term), so a long run keeps only
    its enabled answers and state changes, not every sample.
    """

    key: str
    spans: list[Span] = field(default_factory=list)
    enabled: list[Enabled] = field(default_factory=list)
    changes: list[tuple[float, bool]] = field(default_factory=list)  # (time, enabled now)
    polls: int = 0
    failures: int = 0
    last_enabled: bool = False
    last_term: int | None = None
    last_at: float | None = None
    _run: tuple[int | None, float, float, int] | None = None  # term, lo, hi, polls

    def add(self, sent: float, received: float, ok: bool, enabled: bool, term: int | None) -> None:
        self.polls += 1
        if not ok:
            self.failures += 1
            enabled = False
        else:
            self.last_term = term
        at = (sent + received) / 2.0
        self.last_at = at
        if enabled != self.last_enabled or not self.changes:
            self.changes.append((at, enabled))
        self.last_enabled = enabled
        if not ok:
            return  # no information: a run of enabled answers goes on across failed polls
        if not enabled:
            self._close()
            return
        self.enabled.append(Enabled(self.key, term, sent, received))
        if self._run is not None and self._run[0] == term:
            run_term, lo, _, polls = self._run
            self._run = (run_term, lo, sent, polls + 1)
        else:
            self._close()
            self._run = (term, received, received, 1)

    def finish(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._run is not None and self._run[3] >= 2:
            term, lo, hi, polls = self._run
            self.spans.append(Span(self.key, term, lo, hi, polls))
        self._run = None


@dataclass(frozen=True, slots=True)
class Proof:
    key: str
    term: int | None
    span: tuple[float, float]
    other: str
    other_term: int | None
    other_at: tuple[float, float]

    def as_dict(self, t0: float) -> dict[str, Any]:
        return {
            "node": self.key,
            "term": self.term,
            "enabled_from_s": round(self.span[0] - t0, 3),
            "enabled_to_s": round(self.span[1] - t0, 3),
            "other": self.other,
            "other_term": self.other_term,
            "other_sent_s": round(self.other_at[0] - t0, 3),
            "other_received_s": round(self.other_at[1] - t0, 3),
        }


def proven_overlaps(records: Iterable[PollRecord]) -> list[Proof]:
    """Every (span of X, enabled answer of another incarnation inside it) pair."""
    records = list(records)
    enabled = sorted((e for r in records for e in r.enabled), key=lambda e: e.sent)
    sent_times = [e.sent for e in enabled]
    proofs: list[Proof] = []
    for record in records:
        for span in record.spans:
            i = bisect.bisect_left(sent_times, span.lo)
            while i < len(enabled) and enabled[i].sent <= span.hi:
                other = enabled[i]
                if other.key != span.key and other.received <= span.hi:
                    proofs.append(
                        Proof(
                            span.key,
                            span.term,
                            (span.lo, span.hi),
                            other.key,
                            other.term,
                            (other.sent, other.received),
                        )
                    )
                i += 1
    return proofs


def episodes(proofs: Iterable[Proof]) -> list[dict[str, Any]]:
    """Proofs grouped by (node, term, other, other term): one episode each, with its length.

    `seconds` runs from the first to the last of the other's enabled answers inside the node's
    span: how long the other led while the node still claimed the lease (paused or not).
    """
    grouped: dict[tuple[Any, ...], list[Proof]] = {}
    for proof in proofs:
        grouped.setdefault((proof.key, proof.term, proof.other, proof.other_term), []).append(proof)
    found = []
    for (key, term, other, other_term), group in grouped.items():
        first = min(p.other_at[0] for p in group)
        last = max(p.other_at[1] for p in group)
        found.append(
            {
                "node": key,
                "term": term,
                "other": other,
                "other_term": other_term,
                "polls": len(group),
                "at": first,
                "seconds": round(last - first, 3),
            }
        )
    return sorted(found, key=lambda e: e["at"])


def leaderless(records: Iterable[PollRecord], start: float, end: float) -> tuple[float, float, int]:
    """(seconds with no enabled incarnation, the longest such stretch, stretches) in [start, end].

    Counting begins at `start` if some incarnation is enabled then, else at the first enabled
    answer after it (the fleet's first election is not an outage).
    """
    points = sorted((at, id(record), value) for record in records for at, value in record.changes)
    state: dict[int, bool] = {}
    i = 0
    while i < len(points) and points[i][0] < start:
        _, owner, value = points[i]
        state[owner] = value
        i += 1
    counting = any(state.values())
    total = longest = 0.0
    stretches = 0
    gap_since: float | None = None
    for at, owner, value in points[i:]:
        if at > end:
            break
        state[owner] = value
        any_on = any(state.values())
        if not counting:
            counting = any_on
        elif not any_on and gap_since is None:
            gap_since = at
        elif any_on and gap_since is not None:
            total += at - gap_since
            longest = max(longest, at - gap_since)
            stretches += 1
            gap_since = None
    if not counting:
        return max(end - start, 0.0), max(end - start, 0.0), 1
    if gap_since is not None and end > gap_since:
        total += end - gap_since
        longest = max(longest, end - gap_since)
        stretches += 1
    return total, longest, stretches


class EnabledIndex:
    """Every enabled answer of the run, by send time, for failover look-ups."""

    def __init__(self, records: Iterable[PollRecord]) -> None:
        self._answers = sorted((e for r in records for e in r.enabled), key=lambda e: e.sent)
        self._sent = [e.sent for e in self._answers]

    def first_after(self, at: float, *, not_key: str, until: float) -> float | None:
        """The receive time of the first enabled answer of another incarnation sent after `at`."""
        best: float | None = None
        i = bisect.bisect_left(self._sent, at)
        while i < len(self._answers) and self._answers[i].sent <= until:
            answer = self._answers[i]
            if answer.key != not_key and answer.received <= until:
                if best is None or answer.received < best:
                    best = answer.received
                if answer.sent > best:
                    break  # later sends cannot be received earlier than one already found
            i += 1
        return best


def summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "median": None, "max": None}
    return {
        "count": len(values),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


@dataclass
class ChildFindings:
    lines: int = 0
    runs: int = 0  # children that got the lock
    flock_overlaps: int = 0
    stale_writes: int = 0
    bad_lines: int = 0
    max_term: int | None = None
    evidence: list[dict[str, Any]] = field(default_factory=list)


def child_log(lines: Iterable[str], *, t0_wall: float, evidence_cap: int = 10) -> ChildFindings:
    """Findings of the shared child log, in append order."""
    found = ChildFindings()
    highest: dict[str, Any] | None = None
    for text in lines:
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            event, term = line["event"], int(line["term"])
        except (ValueError, KeyError, TypeError):
            found.bad_lines += 1
            continue
        found.lines += 1
        shown = {
            "event": event,
            "node": line.get("node"),
            "term": term,
            "pid": line.get("pid"),
            "at_s": round(float(line.get("t", t0_wall)) - t0_wall, 3),
        }
        if event == "overlap":
            found.flock_overlaps += 1
            if len(found.evidence) < evidence_cap:
                found.evidence.append({"finding": "flock_overlap", **shown})
        elif event in ("start", "tick"):
            found.runs += event == "start"
            if highest is not None and term < highest["term"]:
                found.stale_writes += 1
                if len(found.evidence) < evidence_cap:
                    found.evidence.append({"finding": "stale_write", **shown, "after": highest})
        if highest is None or term > highest["term"]:
            highest = shown
            found.max_term = term
    return found
