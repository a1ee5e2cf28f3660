"""The shipped Prometheus alert rules (ops/prometheus/, SPEC §16).

`promtool check rules` and `promtool test rules` run the real promtool (Debian's `prometheus`
package). Without it the tests fail when `CI` is set, so CI can never pass by skipping them,
and skip elsewhere with the command that installs it.

Live part: a real Prometheus server (same package) loads alerts.yml and scrapes a real
`conductord start` leader and the real `conductord control-api` it leads through, once a
second. Its rules API gives each rule as Prometheus parsed it (no YAML parser of our own);
every metric and label matcher the rules use must be in the fixed contract
(`NODE_METRICS`, `CONTROL_API_METRICS`), and the node's part of that contract must be what the
node exposes today (its `/metrics` parsed with prometheus-client's parser; the Control API's
too, once it has one). A healthy fleet raises no alert; once the leader stops,
ConductordNoLeader goes pending (promtool's unit tests show it firing after its `for:`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.control_api import ControlApiProcess
from tests.support.daemon import DaemonProcess, clean_env
from tests.support.wait import wait_until

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "ops" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"

# The fixed metric names (CONTRACTS, "Metric names"): name -> (type, label names, known values
# of enumerated labels). Counters carry their `_total` suffix, as exposed and as queried.
Contract = dict[str, tuple[str, frozenset[str], dict[str, frozenset[str]]]]


def _metric(kind: str, *labels: str, **values: tuple[str, ...]) -> tuple[str, Any, Any]:
    return kind, frozenset(labels), {k: frozenset(v) for k, v in values.items()}


_STATES = ("leader", "standby", "degraded")
NODE_METRICS_TODAY: Contract = {
    "conductord_lease_state": _metric("gauge", "state", state=_STATES),
    "conductord_lease_term": _metric("gauge"),
    "conductord_is_leader": _metric("gauge"),
    "conductord_scheduler_enabled": _metric("gauge"),
    "conductord_lease_expires_timestamp_seconds": _metric("gauge"),
    "conductord_last_heartbeat_timestamp_seconds": _metric("gauge"),
    "conductord_last_renew_timestamp_seconds": _metric("gauge"),
    "conductord_loop_progress_age_seconds": _metric("gauge", "loop", loop=("heartbeat", "lease")),
    "conductord_lease_renew_failures_total": _metric("counter"),
    "conductord_heartbeat_failures_total": _metric("counter"),
    "conductord_lease_transitions_total": _metric(
        "counter", "from_state", "to_state", from_state=_STATES, to_state=_STATES
    ),
    "conductord_build_info": _metric("gauge", "version"),
}
NODE_METRICS_NEW: Contract = {
    "conductord_exec_running": _metric("gauge"),
    "conductord_exec_starts_total": _metric("counter"),
    "conductord_exec_exits_total": _metric(
        "counter", "reason", reason=("exited", "leadership_lost", "stopping", "deadline")
    ),
    "conductord_control_api_calls_total": _metric(
        "counter", "base_url", "outcome", outcome=("ok", "error", "moved")
    ),
}
NODE_METRICS: Contract = {**NODE_METRICS_TODAY, **NODE_METRICS_NEW}
CONTROL_API_METRICS: Contract = {
    "conductord_control_api_requests_total": _metric("counter", "route", "status"),
    "conductord_control_api_request_duration_seconds": _metric("histogram", "route"),
    "conductord_control_api_waiters": _metric("gauge"),
    "conductord_control_api_lease_term": _metric("gauge"),
    "conductord_control_api_lease_live": _metric("gauge"),
    "conductord_control_api_lease_seconds_left": _metric("gauge"),
    "conductord_control_api_holder_changes_total": _metric(
        "counter",
        "reason",
        reason=("granted", "taken_over", "released", "instance_conflict"),
    ),
    "conductord_control_api_store_errors_total": _metric("counter"),
    "conductord_control_api_instance_conflicts_total": _metric("counter"),
}
ALL_METRICS: Contract = {**NODE_METRICS, **CONTROL_API_METRICS}
# Labels a scrape adds to every series; `le` is every histogram bucket's.
TARGET_LABELS = frozenset({"job", "instance"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

EXPECTED_ALERTS = {
    "ConductordNoLeader",
    "ConductordMultipleLeaders",
    "ConductordLeaderFlapping",
    "ConductordDuplicateNodeId",
    "ConductordNodeDegraded",
    "ConductordNodeFlapping",
    "ConductordHeartbeatsStale",
    "ConductordRenewFailures",
    "ConductordLoopStalled",
    "ConductordControlApiErrors",
    "ConductordControlApiStoreErrors",
    "ConductordControlApiSlow",
}


def tool(name: str, package: str) -> str:
    """Path of a Debian tool; fail under CI, skip elsewhere, when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (sudo apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so this is a failure, not a skip")
        pytest.skip(message)
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


# -- promtool ----------------------------------------------------------------------------------


def test_promtool_accepts_the_rules():
    result = run(tool("promtool", "prometheus"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = run(tool("promtool", "prometheus"), "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    # Line patterns, not a YAML parser: `alertname: X` is followed by its `exp_alerts:`,
    # which is `[]` when the alert must not fire. promtool validated the file's structure.
    names = set(re.findall(r"(?m)^\s*- alert: (\w+)$", ALERTS.read_text()))
    assert names == EXPECTED_ALERTS
    checks = re.findall(r"(?m)^\s*alertname: (\w+)\n\s*exp_alerts:(.*)$", ALERTS_TEST.read_text())
    firing = {name for name, rest in checks if rest.strip() != "[]"}
    quiet = {name for name, rest in checks if rest.strip() == "[]"}
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


# -- reading PromQL ----------------------------------------------------------------------------

_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}

Usage = tuple[set[str], list[tuple[str, str, str, str]], set[str]]


def metric_family(name: str) -> str:
    """The contract name a queried series belongs to (histogram suffixes removed)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and ALL_METRICS.get(base, ("",))[0] == "histogram":
            return base
    return name


def expression_usage(expr: str) -> Usage:
    """(metric names, (metric, label, op, value) matchers, grouping labels) of an expression.

    A small tokenizer, enough for these rules as Prometheus prints them: it strips selectors'
    matchers, groupings, ranges, strings and numbers; then every identifier that is not a
    function call or a keyword is a metric name.
    """
    matchers: list[tuple[str, str, str, str]] = []
    for name, body in _SELECTOR.findall(expr):
        assert name, f"a selector without a metric name in {expr!r}"
        found = list(_MATCHER.finditer(body))
        assert "".join(m.group(0) for m in found).strip() == body.strip(), body
        matchers += [(name, *m.groups()) for m in found]
    grouping = {
        label.strip() for _, labels in _GROUPING.findall(expr) for label in labels.split(",")
    } - {""}
    rest = _SELECTOR.sub(lambda m: m.group(1), expr)
    rest = _GROUPING.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)
    rest = _NUMBER.sub(" ", rest)
    names = set()
    for match in _IDENT.finditer(rest):
        ident = match.group(0)
        is_call = rest[match.end() :].lstrip().startswith("(")
        if not is_call and ident.lower() not in _KEYWORDS:
            names.add(ident)
    return names, matchers, grouping


def test_the_expression_reader_finds_what_an_expression_uses():
    names, matchers, grouping = expression_usage(
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{route=~"x|y"}[5m])))'
        ' > 0.5 or (b_total > 0 unless c) or label_replace(vector(1), "v", "n", "", "")'
    )
    assert names == {"a_bucket", "b_total", "c"}
    assert matchers == [("a_bucket", "route", "=~", "x|y")]
    assert grouping == {"le", "instance"}


def exposed(text: str) -> dict[str, tuple[str, set[str]]]:
    """conductord_* families of a scrape: contract name -> (type, label names seen)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        # The parser drops a counter's `_total`; the contract (and PromQL) keeps it.
        name = family.name + "_total" if family.type == "counter" else family.name
        if name.startswith("conductord_"):
            labels = {label for sample in family.samples for label in sample.labels} - {"le"}
            found[name] = (family.type, labels)
    return found


def assert_matches_contract(found: dict[str, tuple[str, set[str]]], contract: Contract) -> None:
    for name, (kind, labels) in found.items():
        assert name in contract, f"{name} is exposed but not in the fixed list"
        assert kind == contract[name][0], (name, kind)
        assert labels <= contract[name][1], (name, labels)


# -- a real Prometheus over a real fleet -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Fleet:
    control_api: ControlApiProcess
    node: DaemonProcess
    node_url: str
    prometheus_url: str

    def api(self, path: str, **params: str) -> Any:
        answer = requests.get(f"{self.prometheus_url}/api/v1/{path}", params=params, timeout=5)
        answer.raise_for_status()
        return answer.json()["data"]

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]


def start_prometheus(root: Path, targets: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    binary = tool("prometheus", "prometheus")
    scrape = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        for job, target in targets.items()
    )
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ALERTS}\nscrape_configs:\n{scrape}"
    )
    url = f"http://127.0.0.1:{free_port()}"
    log = (root / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--log.level=warn",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(root / 'prometheus.log').read_text()}")
        try:
            return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, 30, lambda: (root / "prometheus.log").read_text())
    return proc, url


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    tool("prometheus", "prometheus")  # fail or skip before starting anything
    root = tmp_path_factory.mktemp("alerts")
    token = f"alerts-{os.urandom(8).hex()}"
    node_url = f"http://127.0.0.1:{free_port()}"
    prometheus: subprocess.Popen[bytes] | None = None
    with ControlApiProcess(str(root / "control.sqlite3"), token=token) as control_api:
        node = DaemonProcess(
            [
                "--node-id",
                "alerts-node",
                "--host",
                "alerts-host",
                "--control-api-base",
                control_api.url,
                "--local-api",
                node_url,
                "--heartbeat-interval-ms",
                "200",
                "--lease-renew-interval-ms",
                "200",
                "--lease-ttl-sec",
                "5",
                "--request-timeout-ms",
                "1000",
            ],
            env=clean_env(BAA_SHARED_TOKEN=token),
        )
        with node:
            try:
                node.transition_to("leader", timeout=20)
                node.wait_event("conductor.started", timeout=20)
                prometheus, url = start_prometheus(
                    root,
                    {
                        "conductord": node_url.removeprefix("http://"),
                        "conductord-control-api": control_api.url.removeprefix("http://"),
                    },
                )
                yield Fleet(control_api, node, node_url, url)
            finally:
                if prometheus is not None:
                    prometheus.terminate()
                    try:
                        prometheus.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        prometheus.kill()
                        prometheus.wait(timeout=10)


@pytest.mark.e2e
def test_prometheus_loads_every_alert_with_severity_annotations_and_for(fleet: Fleet):
    rules = fleet.rules()
    assert {rule["name"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["type"] == "alerting", rule["name"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["name"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["name"]
        assert rule["duration"] >= 60, rule["name"]  # `for:`, in seconds


@pytest.mark.e2e
def test_rules_use_only_the_contract_metric_names_and_labels(fleet: Fleet):
    every_label = set().union(*(labels for _, labels, _ in ALL_METRICS.values()))
    for rule in fleet.rules():
        alert = rule["name"]
        names, matchers, grouping = expression_usage(rule["query"])
        assert names, alert
        for name in names:
            assert metric_family(name) in ALL_METRICS, (alert, name)
        for name, label, op, value in matchers:
            _kind, labels, known_values = ALL_METRICS[metric_family(name)]
            allowed = labels | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            assert label in allowed, (alert, name, label)
            if label in known_values:
                values = value.split("|") if op in ("=~", "!~") else [value]
                assert set(values) <= known_values[label], (alert, name, label, value)
        assert grouping <= every_label | TARGET_LABELS | {"le"}, (alert, grouping)


@pytest.mark.e2e
def test_rules_use_what_the_node_and_the_control_api_expose(fleet: Fleet):
    node = exposed(requests.get(f"{fleet.node_url}/metrics", timeout=5).text)
    assert_matches_contract(node, NODE_METRICS)
    # Every metric of today's contract is there on a leader, with all its labels.
    assert set(NODE_METRICS_TODAY) <= set(node), set(NODE_METRICS_TODAY) - set(node)
    for name, (_kind, labels) in node.items():
        assert labels == NODE_METRICS[name][1], (name, labels)

    used = {
        metric_family(name) for rule in fleet.rules() for name in expression_usage(rule["query"])[0]
    }
    assert used & set(NODE_METRICS) <= set(node) | set(NODE_METRICS_NEW)
    assert used <= set(NODE_METRICS) | set(CONTROL_API_METRICS)

    # The Control API's /metrics (SPEC §16), once it has one: the same contract check, and
    # every Control API metric the rules query is among its families.
    answer = requests.get(f"{fleet.control_api.url}/metrics", timeout=5)
    if answer.status_code == 200:
        api = exposed(answer.text)
        assert_matches_contract(api, CONTROL_API_METRICS)
        assert used & set(CONTROL_API_METRICS) <= set(api), used - set(api)
    else:
        assert answer.status_code == 404, answer.text


@pytest.mark.e2e
def test_a_healthy_fleet_raises_nothing_and_a_stopped_leader_starts_no_leader(fleet: Fleet):
    # Runs last in this module: it stops the fleet's only node.
    def evaluated_with_data() -> bool:
        scraped = fleet.api("query", query='conductord_is_leader{job="conductord"}')["result"]
        rules = fleet.rules()
        return bool(scraped) and all(r["health"] == "ok" for r in rules)

    wait_until(evaluated_with_data, 30, lambda: str(fleet.rules()))

    def evaluations() -> dict[str, str]:
        return {g["name"]: g["lastEvaluation"] for g in fleet.api("rules")["groups"]}

    for _ in range(2):  # two more evaluations of every group with the leader's series in place
        seen = evaluations()
        wait_until(
            lambda seen=seen: all(now != seen[name] for name, now in evaluations().items()),
            10,
            lambda: str(evaluations()),
        )
    assert fleet.api("alerts")["alerts"] == []
    for rule in fleet.rules():
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

    fleet.node.send(signal.SIGTERM)
    assert fleet.node.wait_exit(timeout=10) == 0

    def no_leader_pending() -> list[dict[str, Any]]:
        return [
            alert
            for alert in fleet.api("alerts")["alerts"]
            if alert["labels"]["alertname"] == "ConductordNoLeader"
            and alert["labels"].get("view") == "nodes"
        ]

    (alert,) = wait_until(no_leader_pending, 30, lambda: str(fleet.api("alerts")))
    assert alert["state"] == "pending"  # firing after `for: 2m`: alerts_test.yml shows it
    assert alert["labels"]["severity"] == "critical"
