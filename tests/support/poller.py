"""Poll several nodes' `/v1/status` every few milliseconds and find proven scheduler overlaps.

`StatusPoller(urls)` runs one thread that asks each node in turn (a keep-alive session per
node, a short timeout) and records `(monotonic time, node, scheduler_enabled, term,
lease_state)`. `overlaps()` returns the proven moments when two nodes had the scheduler
enabled at once:

a node seen enabled in two consecutive polls with one term was enabled in between (under the
server's rules it cannot lose that term and regain the same one); another node's enabled
answer inside that span is a proven overlap. An answer's moment is known only to lie between
its request and its reply, so the span runs from the first poll's reply to the second poll's
request, and the other answer must lie wholly inside it: a proven overlap is never an
artefact of polling. One thread polls the nodes in turn, so another node's answer always
falls between two polls of a node.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class Sample:
    sent: float
    answered: float
    node: str
    enabled: bool
    term: int | None
    state: str | None


class StatusPoller:
    def __init__(self, urls: dict[str, str], *, interval_s: float = 0.003) -> None:
        self.urls = dict(urls)
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StatusPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        sessions = {name: requests.Session() for name in self.urls}
        for session in sessions.values():
            session.trust_env = False
        try:
            while not self._stop.is_set():
                for name, url in self.urls.items():
                    sent = time.monotonic()
                    try:
                        answer = sessions[name].get(f"{url}/v1/status", timeout=0.5)
                        daemon = answer.json()["daemon"]
                    except (requests.RequestException, ValueError, KeyError):
                        continue  # not up yet, or gone: no sample
                    sample = Sample(
                        sent,
                        time.monotonic(),
                        name,
                        bool(daemon.get("scheduler_enabled")),
                        daemon.get("current_term"),
                        daemon.get("lease_state"),
                    )
                    with self._lock:
                        self.samples.append(sample)
                self._stop.wait(self.interval_s)
        finally:
            for session in sessions.values():
                session.close()

    def of(self, node: str) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.node == node]

    def count(self, node: str) -> int:
        return len(self.of(node))

    def wait_samples(self, node: str, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(node) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} status samples of {node}")
            time.sleep(0.01)

    def overlaps(self) -> list[tuple[Sample, Sample, Sample]]:
        """(span start, span end, other node's enabled sample) for each proven overlap."""
        with self._lock:
            samples = list(self.samples)
        by_node: dict[str, list[Sample]] = {}
        for sample in samples:
            by_node.setdefault(sample.node, []).append(sample)
        found = []
        for node, own in by_node.items():
            for first, second in itertools.pairwise(own):
                if not (first.enabled and second.enabled and first.term == second.term):
                    continue
                lo, hi = first.answered, second.sent
                for other in samples:
                    inside = lo <= other.sent and other.answered <= hi
                    if other.node != node and other.enabled and inside:
                        found.append((first, second, other))
        return found
