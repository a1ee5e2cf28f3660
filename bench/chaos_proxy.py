"""A small fault-injecting TCP proxy on loopback for bench/chaos.py (threads, stdlib only).

One `FaultProxy` listens on 127.0.0.1 (port 0) and forwards every connection to an upstream
port on 127.0.0.1 that can change at runtime (`set_upstream`: a restarted Control API on a new
port). The nemesis switches faults on and off while connections are open:

- latency: every chunk waits `latency_s` before it is forwarded, in both directions; bytes that
  arrive meanwhile travel with it (so a round trip costs about 2 × latency, whatever the number
  of sends the server makes per answer).
- black hole (drop): nothing moves, no upstream connect is made; bytes wait in the kernel like
  packets in a partition and are delivered late once it lifts, to a server that may then process
  a request whose client gave up long ago (as TCP retransmission would).
- reset: every open connection is reset (RST, SO_LINGER 0) on both sides; while the mode lasts,
  each new connection is reset either at once or after its first request chunk was forwarded
  (the server acts on it, the client never hears back), chosen by the proxy's seeded RNG.

Why hand-written: the faults must be switched per node at runtime from the harness itself, and
the whole thing is a few threads; toxiproxy-like tools add a daemon and an HTTP control plane.

Threads: one accept thread per proxy, one pump thread per direction per connection. A socket is
only ever closed by the last pump of its connection, never from another thread (a closed fd
number can be reused at once), so every wait is bounded (`TICK_S`) and re-checks the flags.
Limits: loopback only; latency is per chunk, not per packet; no bandwidth shaping.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import time

TICK_S = 0.02
CONNECT_TIMEOUT_S = 1.0
SEND_TIMEOUT_S = 5.0
CHUNK = 65536


class _Conn:
    """One proxied connection: a client socket, an upstream socket (once connected)."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, variant: str | None) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.variant = variant  # reset-mode behaviour chosen at accept, or None
        self.closing = False  # stop pumping, close normally (FIN)
        self.resetting = False  # stop pumping, close with RST
        self._finished = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._run, name="proxy-conn", daemon=True).start()

    # -- lifecycle --------------------------------------------------------------------

    def _run(self) -> None:
        if self.variant == "at_once":
            self.resetting = True
            self._close()
            return
        if not self._connect():
            self.resetting = True  # the client sees a reset, as after a refused connect
            self._close()
            return
        up = threading.Thread(
            target=self._pump, args=(self.client, self.upstream, True), daemon=True
        )
        up.start()
        self._pump(self.upstream, self.client, False)
        up.join()
        self._close()

    def _connect(self) -> bool:
        deadline = time.monotonic() + 60.0  # bounded even under a long black hole
        while self.proxy.blackhole and not self._stopped() and time.monotonic() < deadline:
            time.sleep(TICK_S)
        if self._stopped():
            return False
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.proxy.upstream_port), timeout=CONNECT_TIMEOUT_S
            )
        except OSError:
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(SEND_TIMEOUT_S)  # bounds sendall; reads wait in select
        self.upstream = sock
        return True

    def _stopped(self) -> bool:
        return self.closing or self.resetting or self.proxy.closed

    def _close(self) -> None:
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if self.resetting:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy._forget(self)

    # -- pumping ----------------------------------------------------------------------

    def _pump(self, src: socket.socket, dst: socket.socket, to_upstream: bool) -> None:
        proxy = self.proxy
        while not self._stopped():
            if proxy.blackhole:
                time.sleep(TICK_S)
                continue
            try:
                readable, _, _ = select.select([src], [], [], TICK_S)
                if not readable:
                    continue
                data = src.recv(CHUNK)
            except OSError:
                break
            if not data:
                break
            if proxy.resetting and self.variant is None:
                self.resetting = True  # an old connection caught by a reset window
                break
            if not to_upstream and self.variant == "after_request":
                # The answer never comes, even one that beat the other pump's reset here.
                self.resetting = True
                break
            latency = proxy.latency_s
            if latency > 0:
                self._wait(latency)
                data += self._drain(src)
            while proxy.blackhole and not self._stopped():
                time.sleep(TICK_S)  # a chunk caught by a black hole is delivered after it
            if self._stopped():
                break
            try:
                dst.sendall(data)
            except OSError:
                break
            if to_upstream and self.variant == "after_request":
                self.resetting = True  # the server got the request; the answer never comes
                break
        # Either direction ending ends the connection (HTTP needs no half-close here).
        self.closing = True

    def _wait(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self._stopped():
            left = until - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, TICK_S))

    @staticmethod
    def _drain(src: socket.socket) -> bytes:
        extra = b""
        while len(extra) < CHUNK:
            try:
                readable, _, _ = select.select([src], [], [], 0)
                if not readable:
                    break
                more = src.recv(CHUNK)
            except OSError:
                break
            if not more:
                break  # EOF: the next recv in the loop sees it again
            extra += more
        return extra


class FaultProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`upstream_port`, with faults (module docstring)."""

    def __init__(self, name: str, upstream_port: int, *, seed: int) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.latency_s = 0.0
        self.blackhole = False
        self.resetting = False
        self.closed = False
        self.connections_total = 0
        self.resets_total = 0
        self._rng = random.Random(seed)
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(TICK_S * 5)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{name}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- controls (called by the nemesis) ---------------------------------------------

    def set_upstream(self, port: int) -> None:
        self.upstream_port = port

    def set_latency(self, seconds: float) -> None:
        self.latency_s = max(float(seconds), 0.0)

    def set_blackhole(self, on: bool) -> None:
        self.blackhole = bool(on)

    def set_reset(self, on: bool) -> None:
        """On: reset every open connection now, and each new one while the mode lasts."""
        self.resetting = bool(on)
        if on:
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                conn.resetting = True
            self.resets_total += len(conns)

    def heal(self) -> None:
        """Every fault off."""
        self.latency_s = 0.0
        self.blackhole = False
        self.resetting = False

    def close(self) -> None:
        self.closed = True
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.closing = True

    # -- internals --------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.closed:
                    return
                time.sleep(TICK_S)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.settimeout(SEND_TIMEOUT_S)
            variant = None
            if self.resetting:
                variant = self._rng.choice(("at_once", "after_request"))
                self.resets_total += 1
            conn = _Conn(self, client, variant)
            with self._lock:
                self._conns.add(conn)
                self.connections_total += 1
            conn.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
