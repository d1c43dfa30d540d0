"""Start the real daemon as a subprocess on port 0 and talk to it.

Every wait here polls a condition until a deadline; nothing sleeps and
hopes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

READY = re.compile(r"\bready\b(?P<rest>.*)$")
ROOT = Path(__file__).resolve().parents[2]


def wait_for(
    condition: Callable[[], T | None], timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except (AssertionError, OSError, KeyError, ValueError) as exc:
            last_error = exc
        else:
            if result:
                return result
        time.sleep(0.05)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


class Daemon:
    """One daemon subprocess; `start()` returns once it logged `ready`."""

    def __init__(self, workdir: Path, config: str = "", args: Iterable[str] = ()) -> None:
        self.workdir = workdir
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(config)
        self.db = workdir / "metrics.db"
        self.extra_args = list(args)
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self.addresses: dict[str, str] = {}
        self._ready = threading.Event()
        self.token = ""
        #: extra environment (e.g. NOTIFY_SOCKET) and a command prefix (e.g. setpriv)
        self.env: dict[str, str] = {}
        self.prefix: list[str] = []

    def start(self, timeout: float = 20.0) -> Daemon:
        self.log = []
        self._ready.clear()
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "aggregator",
            "--config",
            str(self.config_path),
            "--db",
            str(self.db),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError("daemon did not log ready:\n" + "".join(self.log))
        return self

    def _read_log(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        with proc.stderr:  # closed at EOF: no ResourceWarning for the pipe
            for line in proc.stderr:
                self.log.append(line)
                match = READY.search(line)
                if match and not self._ready.is_set():
                    for word in match.group("rest").split():
                        key, _, value = word.partition("=")
                        if value:
                            self.addresses[key] = value
                    self._ready.set()

    # -------------------------------------------------------------- addresses

    def addr(self, name: str) -> tuple[str, int]:
        host, _, port = self.addresses[name].rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def http(self) -> str:
        return "http://" + self.addresses["http"]

    # -------------------------------------------------------------- sending

    def send_udp(self, *datagrams: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in datagrams:
                sock.sendto(datagram, self.addr("udp"))

    def send_tcp(self, data: bytes) -> None:
        with socket.create_connection(self.addr("tcp"), timeout=5) as sock:
            sock.sendall(data)

    def send_unix(self, *datagrams: bytes) -> None:
        """Datagrams to the unix datagram listener (`--unix PATH`)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for datagram in datagrams:
                sock.sendto(datagram, self.addresses["unix"])

    def send_unix_stream(self, data: bytes) -> None:
        """Bytes over one connection to the unix stream listener (`--unix-stream PATH`)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.addresses["unix_stream"])
            sock.sendall(data)

    # -------------------------------------------------------------- HTTP

    def get(self, path: str, params: Iterable[tuple[str, str]] | dict[str, str] = ()) -> Any:
        status, body = self.request(path, params)
        if status != 200:
            raise AssertionError(f"GET {path} answered {status}: {body}")
        return body

    def request(
        self, path: str, params: Iterable[tuple[str, str]] | dict[str, str] = ()
    ) -> tuple[int, Any]:
        query = urllib.parse.urlencode(list(params.items()) if isinstance(params, dict) else params)
        url = self.http + path + (f"?{query}" if query else "")
        request = urllib.request.Request(url)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def series(self, metric: str, **params: str) -> dict[str, Any]:
        query = [("metric", metric), ("from", params.pop("from_", "-1h"))]
        for key, value in params.items():
            if key == "tags":
                query.extend(("tag", tag) for tag in value.split("|"))
            else:
                query.append((key, value))
        result: dict[str, Any] = self.get("/api/v1/series", query)
        return result

    def query(self, metric: str, *params: tuple[str, str]) -> dict[str, Any]:
        """GET /api/v1/series with repeatable parameters, e.g. ("tag", "a:b"), ("tag", "c:d").

        `from` defaults to -1h unless given.
        """
        query = [("metric", metric), *params]
        if not any(key == "from" for key, _ in params):
            query.append(("from", "-1h"))
        result: dict[str, Any] = self.get("/api/v1/series", query)
        return result

    def value(self, metric: str, **params: str) -> float | None:
        """The whole-range value of a metric, or None while it has no data."""
        status, body = self.request(
            "/api/v1/series", [("metric", metric), ("from", "-1h"), *params.items()]
        )
        if status != 200 or not body["series"]:
            return None
        value: float = body["series"][0]["value"]
        return value

    def wait_value(
        self, metric: str, expected: float, timeout: float = 15.0, **params: str
    ) -> float:
        def reached() -> bool:
            got = self.value(metric, **params)
            return got is not None and abs(got - expected) <= 1e-9 * max(1.0, abs(expected))

        wait_for(reached, timeout, f"{metric} {params} == {expected}")
        return expected

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/healthz")
        return result

    def wait_health(self, key: str, at_least: float, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until /healthz reports `key` >= `at_least`; returns that document."""

        def reached() -> dict[str, Any] | None:
            health = self.health()
            return health if health[key] >= at_least else None

        return wait_for(reached, timeout, f"/healthz {key} >= {at_least}")

    # -------------------------------------------------------------- stopping

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m aggregator ARGS` to completion (for --help, check-config, bad configs)."""
    return subprocess.run(
        [sys.executable, "-m", "aggregator", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def client_env() -> dict[str, str]:
    """The environment without DD_* / STATSD_* variables, which clients turn into tags."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DD_", "STATSD_"))}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago (for tests that must name a port)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nearest_rank(
    values: Iterable[float], q: float, weights: Iterable[float] | None = None
) -> float:
    """Exact weighted nearest-rank percentile: the smallest x whose cumulative
    weight is >= q/100 of the total weight."""
    if weights is None:
        pairs = sorted((v, 1.0) for v in values)
    else:
        pairs = sorted(zip(values, weights, strict=True))
    total = sum(w for _, w in pairs)
    target = q / 100.0 * total
    cumulative = 0.0
    for value, weight in pairs:
        cumulative += weight
        if cumulative >= target:
            return value
    return pairs[-1][0]


def udp_socket_stats(port: int) -> tuple[int, int]:
    """(bytes waiting in the receive queue, datagrams dropped) of the UDP socket
    bound to 127.0.0.1:`port`, from /proc/net/udp (Linux)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as table:
        next(table)
        for row in table:
            fields = row.split()
            if fields[1] == wanted:
                rx_queue = int(fields[4].split(":")[1], 16)
                return rx_queue, int(fields[-1])
    raise AssertionError(f"no UDP socket on 127.0.0.1:{port} in /proc/net/udp")


def config_text(flush_interval: int = 1, extra: str = "", **listen: str) -> str:
    """A config on ephemeral loopback ports; `listen` overrides [listen] keys."""
    addresses = {"udp": "127.0.0.1:0", "tcp": "127.0.0.1:0", "http": "127.0.0.1:0", **listen}
    lines = ["[listen]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in addresses.items()]
    lines += ["", "[aggregation]", f"flush_interval = {flush_interval}", "", extra]
    return "\n".join(lines) + "\n"
