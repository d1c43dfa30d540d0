"""The two daemons under test, started the same way and read the same way.

Each is a subprocess pinned to one core (taskset, so every thread it starts
inherits the mask; ours with ``--workers`` gets both cores), listening on
127.0.0.1 port 0, with the same flush interval and the same 32 MiB UDP
receive buffer. Each tells how much of the bench counters it has received,
cumulatively, as of its latest flush:

- ours: the sum of the stored counter rollups named bench.* at the flush
  resolution, read from its SQLite file (a read-only WAL reader, as the API
  itself reads). `api_counter_sums` reads the same sums through the HTTP
  query API, one request per metric; the runner checks both agree.
- Etsy statsd: the counting backend (bench/etsy/counting_backend.js) adds up
  the bench.* counters of every flush and writes the running total to a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
ETSY_STATS = BENCH / "node_modules" / "statsd" / "stats.js"
RECEIVE_BUFFER = 32 * 1024 * 1024
#: ours with ingest workers (--workers) may use every core, the generator's too
ALL_CPUS = "0-1"
READY = re.compile(r"\bready\b(?P<rest>.*)$")


@dataclass(frozen=True, slots=True)
class Totals:
    counters: float  # sum of bench.* counter values received, as of the flush
    flushed_at: float  # wall-clock time the flush began (ours) or ended (Etsy)
    flushes: int


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Daemon:
    """Common process handling: start, wait for `ready`, stop, log capture."""

    name = "?"

    def __init__(self, workdir: Path, flush_interval: int, cpu: int | str) -> None:
        self.workdir = workdir
        self.flush_interval = flush_interval
        #: the cores, as taskset takes them: "0", or "0,1"
        self.cpu = cpu
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self.addresses: dict[str, str] = {}
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def udp_port(self) -> int:
        return int(self.addresses["udp"].rpartition(":")[2])

    def command(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path:
        return self.workdir

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["taskset", "-c", str(self.cpu), *self.command()]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.cwd(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"{self.name} did not log ready:\n" + "".join(self.log[-30:]))

    def _read_log(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if len(self.log) < 5000:
                self.log.append(line)
            match = READY.search(line)
            if match and not self._ready.is_set():
                for word in match.group("rest").split():
                    key, _, value = word.partition("=")
                    if value:
                        self.addresses[key] = value
                self._ready.set()

    def stop(self, timeout: float = 60.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def totals(self) -> Totals:
        raise NotImplementedError

    def flushed_at(self) -> float:
        """When the latest flush began (wall clock; 0.0 before the first): cheap to poll."""
        return self.totals().flushed_at

    def wait_flush_after(self, moment: float, timeout: float) -> Totals:
        """Totals of the first flush that began after `moment` (wall clock)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n" + "".join(self.log[-30:]))
            if self.flushed_at() > moment:
                return self.totals()
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no flush after {moment:.1f} within {timeout:.0f}s")


class Ours(Daemon):
    name = "ours"

    def __init__(
        self, workdir: Path, flush_interval: int, cpu: int | str, workers: int = 0
    ) -> None:
        super().__init__(workdir, flush_interval, cpu)
        #: listen.workers: ingest processes that read the UDP socket
        self.workers = workers

    def command(self) -> list[str]:
        config = self.workdir / "config.toml"
        config.write_text(
            "[listen]\n"
            'udp = "127.0.0.1:0"\n'
            'tcp = ""\n'
            'http = "127.0.0.1:0"\n'
            f"udp_receive_buffer = {RECEIVE_BUFFER}\n"
            f"workers = {self.workers}\n"
            "[aggregation]\n"
            f"flush_interval = {self.flush_interval}\n"
            "[storage]\n"
            f'path = "{self.workdir / "metrics.db"}"\n'
            # the flush benchmark holds 1M series in one window: above the default limit
            "[limits]\n"
            "max_series = 2000000\n"
            "max_series_per_metric = 2000000\n"
        )
        return [str(PYTHON), "-m", "aggregator", "--config", str(config)]

    #: False: start on a fresh database; True: keep the one in workdir
    keep_db = False

    def start(self, timeout: float = 30.0) -> None:
        if not self.keep_db:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    (self.workdir / f"metrics.db{suffix}").unlink()
        self._db: sqlite3.Connection | None = None
        super().start(timeout)

    def cwd(self) -> Path:
        # `python -m aggregator` finds the package in the working directory.
        return ROOT

    def get(self, path: str, params: dict[str, str] | None = None, timeout: float = 30) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://{self.addresses['http']}{path}{query}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/healthz")
        return result

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            uri = f"file:{self.workdir / 'metrics.db'}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        return self._db

    def counter_sum(self) -> float:
        """bench.* counters stored at the flush resolution, summed in SQL."""
        row = (
            self._connection()
            .execute(
                "SELECT total(r.sum) FROM rollups r JOIN series s ON s.id = r.series_id "
                "WHERE r.resolution = ? AND s.type = 'c' AND substr(s.name, 1, 6) = 'bench.'",
                (self.flush_interval,),
            )
            .fetchone()
        )
        return float(row[0])

    def counter_sums_by_name(self) -> dict[str, float]:
        rows = self._connection().execute(
            "SELECT s.name, total(r.sum) FROM rollups r JOIN series s ON s.id = r.series_id "
            "WHERE r.resolution = ? AND s.type = 'c' AND substr(s.name, 1, 6) = 'bench.' "
            "GROUP BY s.name",
            (self.flush_interval,),
        )
        return {name: float(value) for name, value in rows}

    def api_counter_sums(self, names: list[str]) -> dict[str, float]:
        """The same sums as the HTTP query API reports them (stat=sum, last day)."""
        out: dict[str, float] = {}
        for name in names:
            params = {"metric": name, "from": "-1d", "stat": "sum"}
            try:
                body = self.get("/api/v1/series", params)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                stored = self._connection().execute(
                    "SELECT m.id, m.name, m.type, s.id, s.metric_id FROM series s "
                    "LEFT JOIN metrics m ON m.name = s.name WHERE s.name = ?",
                    (name,),
                ).fetchall()
                raise RuntimeError(
                    f"query API on {name}: HTTP {exc.code} {detail}; "
                    f"in the file: (metric id, name, type, series id, its metric id) {stored}"
                ) from exc
            out[name] = float(sum(s["value"] or 0 for s in body["series"]))
        return out

    def totals(self) -> Totals:
        health = self.health()
        flushes = int(health["flushes"])
        if flushes == 0:
            return Totals(0.0, 0.0, 0)
        return Totals(self.counter_sum(), _flush_began(health), flushes)

    def flushed_at(self) -> float:
        # /healthz only: the counter sum scans every stored window, and
        # polled every 50 ms it took CPU and SQLite from the flush it waited for
        health = self.health()
        return _flush_began(health) if int(health["flushes"]) else 0.0

    def stop(self, timeout: float = 60.0) -> None:
        if getattr(self, "_db", None) is not None:
            assert self._db is not None
            self._db.close()
            self._db = None
        super().stop(timeout)


def _flush_began(health: dict[str, Any]) -> float:
    return float(health["last_flush_at"]) - float(health["last_flush_seconds"])


class Etsy(Daemon):
    name = "etsy"

    @property
    def report_file(self) -> Path:
        return self.workdir / "counting.json"

    def command(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            self.report_file.unlink()
        config = {
            "servers": [
                {
                    "server": str(BENCH / "etsy" / "udp_server.js"),
                    "address": "127.0.0.1",
                    "port": 0,
                    "recvBufferSize": RECEIVE_BUFFER,
                }
            ],
            "mgmt_address": "127.0.0.1",
            "mgmt_port": free_tcp_port(),
            "flushInterval": self.flush_interval * 1000,
            "backends": [str(BENCH / "etsy" / "counting_backend.js")],
            "benchCounting": {"file": str(self.report_file), "prefix": "bench."},
            "automaticConfigReload": False,
        }
        path = self.workdir / "config.js"
        path.write_text(json.dumps(config, indent=2))
        return ["node", str(ETSY_STATS), str(path)]

    def totals(self) -> Totals:
        try:
            report = json.loads(self.report_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return Totals(0.0, 0.0, 0)
        # The backend runs at the end of a flush; Etsy gathers and hands
        # over the metrics in one tick, so the flush "began" then too.
        return Totals(float(report["total"]), float(report["flushed_at"]), int(report["flushes"]))


def ours(workdir: Path, flush_interval: int, cpu: int, workers: int = 0) -> Ours:
    """Ours pinned to core ``cpu``; with ``workers`` ingest processes, on every core."""
    return Ours(workdir, flush_interval, ALL_CPUS if workers else cpu, workers)


def make(kind: str, workdir: Path, flush_interval: int, cpu: int, workers: int = 0) -> Daemon:
    if kind == "ours":
        return ours(workdir, flush_interval, cpu, workers)
    if kind == "etsy":
        return Etsy(workdir, flush_interval, cpu)
    raise ValueError(kind)
