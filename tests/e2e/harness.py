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
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


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

    def start(self, timeout: float = 20.0) -> Daemon:
        self.log = []
        self._ready.clear()
        cmd = [
            sys.executable,
            "-m",
            "aggregator",
            "--config",
            str(self.config_path),
            "--db",
            str(self.db),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
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

    def value(self, metric: str, **params: str) -> float | None:
        """The whole-range value of a metric, or None while it has no data."""
        status, body = self.request(
            "/api/v1/series", [("metric", metric), ("from", "-1h"), *params.items()]
        )
        if status != 200 or not body["series"]:
            return None
        value: float = body["series"][0]["value"]
        return value

    def wait_value(self, metric: str, expected: float, timeout: float = 15.0, **params: str) -> float:
        def reached() -> bool:
            got = self.value(metric, **params)
            return got is not None and abs(got - expected) <= 1e-9 * max(1.0, abs(expected))

        wait_for(reached, timeout, f"{metric} {params} == {expected}")
        return expected

    # -------------------------------------------------------------- stopping

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def config_text(flush_interval: int = 1, extra: str = "", **listen: str) -> str:
    """A config on ephemeral loopback ports; `listen` overrides [listen] keys."""
    addresses = {"udp": "127.0.0.1:0", "tcp": "127.0.0.1:0", "http": "127.0.0.1:0", **listen}
    lines = ["[listen]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in addresses.items()]
    lines += ["", "[aggregation]", f"flush_interval = {flush_interval}", "", extra]
    return "\n".join(lines) + "\n"
