"""A real node against a hostile Control API: generated answers, bounded in count and time.

Issue 15, the node's side. A seeded server answers every heartbeat, acquire and release with
something drawn from a deck of hostile behaviours (lone surrogates, huge or mistyped
fields, the token echoed whole or cut, another holder named as the token, deep nesting,
invalid UTF-8, HTML error pages, wrong envelopes, truncated bodies, resets, slow answers)
mixed with honest grants and denials. While it runs, the test polls the node's status
endpoint. The node must keep a valid lease state the whole time (or exit 1 on a bug, never
linger), never print a traceback or a non-JSON stdout line, never let any piece of the token
of 8 characters or more reach stdout, stderr or the status endpoint, and stop with exit 0
within its budget on SIGTERM.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
from typing import Any

import pytest
import requests

from tests.support.daemon import DaemonProcess
from tests.support.scripted_server import Recorded, Reply, ScriptedServer

TOKEN = "fuzz-token-5d8f0b6a2c9e4471a3"
NODE = "fuzz-node"
SEEDS = (11, 12)
RUN_S = 3.0


def _pieces(text: str, size: int = 8) -> set[str]:
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def _envelope(data: Any) -> dict[str, Any]:
    return {"ok": True, "request_id": "r", "data": data}


def _grant(rng: random.Random, rec: Recorded) -> dict[str, Any]:
    now = int(time.time())
    return {
        "holder_id": NODE,
        "holder_host": "h",
        "term": rng.randint(1, 5),
        "lease_expires_at": now + 3,
        "renewed_at": now,
        "is_leader": True,
        "operation": rng.choice(["acquire", "renew"]),
    }


def _deck(rng: random.Random, auth: str) -> list:
    """Each entry: rec -> Reply | dict. Drawn with replacement, seeded."""
    now = int(time.time())
    cut = rng.randint(1, len(auth) - 1)
    return [
        lambda rec: _envelope(_grant(rng, rec)),
        lambda rec: _envelope(_grant(rng, rec)),
        lambda rec: _envelope({**_grant(rng, rec), "holder_id": "other", "is_leader": False}),
        # A lone surrogate, as the JSON escape a real server would send.
        lambda rec: Reply(
            200,
            raw=None,
            body=b'{"ok":true,"data":{"holder_id":"\\ud800","term":1,"lease_expires_at":1}}',
        ),
        lambda rec: Reply(
            200,
            body=b'{"ok":true,"data":{"holder_id":"fuzz-node","term":1,'
            b'"lease_expires_at":1,"holder_host":"\\udfff\\ud800"}}',
        ),
        # The token as the holder, whole and in pieces.
        lambda rec: _envelope({**_grant(rng, rec), "holder_id": TOKEN, "is_leader": False}),
        lambda rec: _envelope({**_grant(rng, rec), "holder_host": TOKEN[3:17]}),
        # The Authorization header echoed across the cut of an error text.
        lambda rec: Reply(500, body="x" * (200 - cut) + auth),
        lambda rec: Reply(400, {"ok": False, "error": "bad", "message": "y" * 990 + auth}),
        lambda rec: Reply(200, {"ok": False, "error": auth, "message": auth[::-1]}),
        # Odd types and sizes.
        lambda rec: _envelope({**_grant(rng, rec), "term": 2**70}),
        lambda rec: _envelope({**_grant(rng, rec), "term": "7"}),
        lambda rec: _envelope({**_grant(rng, rec), "lease_expires_at": 1e309}),
        lambda rec: _envelope({**_grant(rng, rec), "holder_id": "n" * 100_000}),
        lambda rec: _envelope({**_grant(rng, rec), "is_leader": "yes"}),
        lambda rec: _envelope([_grant(rng, rec)]),
        lambda rec: _envelope(None),
        lambda rec: Reply(200, body=b'{"ok":true,"data":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        lambda rec: Reply(200, body=b'{"ok":true,"data":{"holder_id":"\xff\xfe","term":1}}'),
        lambda rec: Reply(200, body=b"NaN"),
        lambda rec: Reply(200, body="<html><body>proxy error</body></html>"),
        lambda rec: Reply(503, body=b""),
        lambda rec: Reply(200, raw=b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"ok":tr'),
        lambda rec: Reply(200, raw=b"HTTP/1.1 9999 What\r\n\r\n"),
        lambda rec: Reply(reset=True),
        lambda rec: Reply(
            close=True, body=_envelope({"holder_id": "x", "term": 1, "lease_expires_at": now})
        ),
        lambda rec: Reply(delay=0.6, body=_envelope(_grant(rng, rec))),  # past the timeout
    ]


class HostileServer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.answers = 0
        self.lock = threading.Lock()
        self.deck = _deck(self.rng, f"Bearer {TOKEN}")

    def __call__(self, rec: Recorded) -> Reply | dict[str, Any]:
        with self.lock:
            self.answers += 1
            pick = self.rng.choice(self.deck)
        return pick(rec)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_node_survives_a_hostile_control_api(seed: int) -> None:
    hostile = HostileServer(seed)
    port = _port()
    with ScriptedServer() as server:
        for path in ("/v1/controllers/heartbeat", "/v1/leader/acquire", "/v1/leader/release"):
            server.handler(path, hostile)
        args = [
            *("--node-id", NODE, "--host", "h", "--control-api-base", server.url),
            *("--shared-token", TOKEN, "--local-api", f"http://127.0.0.1:{port}"),
            *("--heartbeat-interval-ms", "100", "--lease-renew-interval-ms", "100"),
            *("--lease-ttl-sec", "2", "--request-timeout-ms", "500"),
        ]
        bodies: list[str] = []
        states: list[str] = []
        with DaemonProcess(args) as node:
            node.wait_event("status_api.listening", timeout=15)
            session = requests.Session()
            session.trust_env = False
            deadline = time.monotonic() + RUN_S
            while time.monotonic() < deadline and node.proc.poll() is None:
                for route in ("/v1/status", "/readyz", "/healthz"):
                    try:
                        answer = session.get(f"http://127.0.0.1:{port}{route}", timeout=2)
                    except requests.RequestException:
                        continue
                    assert answer.status_code in (200, 503), (route, answer.text[:300])
                    bodies.append(answer.text)
                    if route == "/v1/status":
                        states.append(answer.json()["daemon"]["lease_state"])
                time.sleep(0.02)
            assert node.proc.poll() is None, f"the node exited: {node.stderr[-2000:]}"
            node.send(signal.SIGTERM)
            assert node.wait_exit(timeout=10) == 0
            assert hostile.answers > 20
            assert set(states) <= {"leader", "standby", "degraded"} and states
            assert node.non_json_lines == []
            assert "Traceback" not in node.stderr
            everything = "\n".join(
                [node.stderr, *bodies, *(json.dumps(e, ensure_ascii=False) for e in node.events)]
            )
            leaked = {piece for piece in _pieces(TOKEN) if piece in everything}
            assert leaked == set()
            assert node.named("conductor.stopped")
