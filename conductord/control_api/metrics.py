"""Prometheus metrics of the reference Control API (SPEC §16): `GET /metrics`, no token.

Counts only, never a secret: no token, no controller id, no host, no URL with credentials.
The names are fixed (ops/prometheus/alerts.yml queries them):

- `conductord_control_api_requests_total{route,status}` and
  `conductord_control_api_request_duration_seconds{route}` (histogram), for every answer the
  app gives, refusals of the server's guard included. `route` is the path of a known route
  and `other` for any other path, so a scan of random paths cannot grow the label set.
- `conductord_control_api_holder_changes_total{reason}`: the lease history entries this
  process decided (`store_base.history_entry`: granted, taken_over, released,
  instance_conflict, the last once per (term, instance) as in the history), every reason
  present from the start at 0 so that `increase()` sees the first one.
- `conductord_control_api_instance_conflicts_total`: every request refused because another
  process of the holder's id holds the lease (SPEC §15), each repeat counted.
- `conductord_control_api_store_errors_total`: store failures (each a 503, or a scrape that
  could not read the lease).
- Gauges read at scrape time: `conductord_control_api_waiters` (parked long-polls),
  `conductord_control_api_lease_term`, `conductord_control_api_lease_live` (1 while a live
  lease exists, on this process's decision clock) and
  `conductord_control_api_lease_seconds_left`. A scrape whose store read fails omits the
  three lease gauges rather than report a made-up value, and counts a store error.

One registry per app (prometheus-client's default registry refuses a second app in one
process), with the standard process and platform collectors. The counts are kept here and
exposed by one collector as metric families, as the node's status endpoint does: exactly the
fixed names, without the `_created` series prometheus-client's own counter classes add.
Counters are per process: with several Control API processes over PostgreSQL, sum them across
instances.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from conductord.control_api.rules import AcquireDecision, ReleaseDecision
from conductord.control_api.store_base import (
    HISTORY_REASONS,
    RecordedConflicts,
    Store,
    StoreError,
    history_entry,
)

__all__ = ["DURATION_BUCKETS", "OTHER_ROUTE", "PATH", "ControlApiMetrics"]

PATH = "/metrics"
OTHER_ROUTE = "other"
# Upper bounds in seconds. Answers take milliseconds; a parked long-poll up to a minute.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Durations:
    """One route's latency histogram: a count per bucket (the last is +Inf) and the sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        bounds = [*(str(bound) for bound in DURATION_BUCKETS), "+Inf"]
        running, buckets = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


class ControlApiMetrics(Collector):
    """The Control API's counts, its registry, and the calls the app makes to fill them.

    `routes` are the paths whose requests are labelled by path; `parked` returns the number of
    parked long-polls. Safe to call from several threads or greenlets.
    """

    def __init__(self, store: Store, routes: Iterable[str], parked: Callable[[], int]) -> None:
        self._store = store
        self._parked = parked
        self._routes = frozenset((*routes, PATH))
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._durations: dict[str, _Durations] = {}
        self._holder_changes: Counter[str] = Counter(dict.fromkeys(HISTORY_REASONS, 0))
        self._store_errors = 0
        self._conflicts = 0
        self._conflicts_counted = RecordedConflicts()
        self.registry = CollectorRegistry(auto_describe=False)  # no store read at start
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # -- what the app reports --

    def route(self, path: str) -> str:
        return path if path in self._routes else OTHER_ROUTE

    def observe(self, path: str, status: int, seconds: float) -> None:
        """One answered request."""
        route = self.route(path)
        with self._lock:
            self._requests[route, str(status)] += 1
            durations = self._durations.get(route)
            if durations is None:
                durations = self._durations[route] = _Durations()
            durations.observe(seconds)

    def decided(self, decision: AcquireDecision | ReleaseDecision, instance_id: str | None) -> None:
        """One lease decision of this process (an acquire, a renewal, a release, a denial)."""
        entry = history_entry(decision, instance_id=instance_id, at=0.0)
        with self._lock:
            if decision.duplicate_id:  # a one-shot diagnostic run's refusal is none
                self._conflicts += 1
            if entry is None or decision.row is None:
                return
            if entry.reason == "instance_conflict":
                key = (decision.row.lease_name, entry.term, entry.instance_id)
                if self._conflicts_counted.known(key):
                    return
                self._conflicts_counted.add(key)
            self._holder_changes[entry.reason] += 1

    def store_error(self) -> None:
        with self._lock:
            self._store_errors += 1

    # -- scrapes --

    def exposition(self, accept: str) -> tuple[str, bytes]:
        """(content type, body) of a scrape, in the format the `Accept` header asks for."""
        encoder, content_type = choose_encoder(accept)
        return content_type, encoder(self.registry)

    def collect(self) -> Iterator[Metric]:
        lease = self._lease_gauges()  # the store read first: it may count a store error
        with self._lock:
            requests = CounterMetricFamily(
                "conductord_control_api_requests",
                "Requests answered, by route and HTTP status.",
                labels=["route", "status"],
            )
            for (route, status), count in sorted(self._requests.items()):
                requests.add_metric([route, status], count)
            durations = HistogramMetricFamily(
                "conductord_control_api_request_duration_seconds",
                "Time from a request's arrival at the app to its answer, by route.",
                labels=["route"],
            )
            for route, histogram in sorted(self._durations.items()):
                durations.add_metric([route], histogram.cumulative(), histogram.total)
            changes = CounterMetricFamily(
                "conductord_control_api_holder_changes",
                "Changes of lease holder or term decided here, by reason (as in the history).",
                labels=["reason"],
            )
            for reason in HISTORY_REASONS:
                changes.add_metric([reason], self._holder_changes[reason])
            store_errors = CounterMetricFamily(
                "conductord_control_api_store_errors",
                "Store failures: requests answered 503, scrapes that could not read the lease.",
                value=self._store_errors,
            )
            conflicts = CounterMetricFamily(
                "conductord_control_api_instance_conflicts",
                "Requests refused because another process of the holder's id holds the lease.",
                value=self._conflicts,
            )
        yield from (requests, durations, changes, store_errors, conflicts)
        yield GaugeMetricFamily(
            "conductord_control_api_waiters",
            "Acquire requests parked waiting for the lease (wait_ms long-polls).",
            value=self._parked(),
        )
        yield from lease

    def _lease_gauges(self) -> list[Metric]:
        """Term, live and seconds left, read from the store now; none if it cannot be read."""
        try:
            row = self._store.leader()
            now = self._store.lease_time()
        except StoreError:
            self.store_error()
            return []
        live = row is not None and row.is_live(now)
        return [
            GaugeMetricFamily(
                "conductord_control_api_lease_term",
                "Term of the lease as stored, live or not (0: never granted).",
                value=row.term if row is not None else 0,
            ),
            GaugeMetricFamily(
                "conductord_control_api_lease_live",
                "1 while a live lease exists (some controller leads), else 0.",
                value=1 if live else 0,
            ),
            GaugeMetricFamily(
                "conductord_control_api_lease_seconds_left",
                "Seconds until the live lease expires unless renewed (0 without a live lease).",
                value=max(row.expires - now, 0.0) if live and row is not None else 0.0,
            ),
        ]
