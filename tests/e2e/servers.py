"""Real Prometheus and carbon-cache servers on loopback, each in its own
temporary folder with its own config, on free ports; every wait polls a
condition until a deadline. Without the programs a test skips (or fails
under CI): see tests/tools.py."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..tools import require_program, whisper_module
from .harness import free_port, wait_for


class Prometheus:
    """`prometheus` scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.program = require_program("prometheus")
        self.workdir = workdir
        self.target = target
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: statsd\n"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(self.target)}]\n"
        )
        self.port = free_port()
        log = (self.workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                self.program,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self._ready, timeout, "prometheus /-/ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError("prometheus exited:\n" + self.log())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError as exc:  # 503 while it starts
            exc.close()
            return False

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector, [{"metric": {...}, "value": [ts, "v"]}]."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """{labels other than __name__, job and instance: value} of an instant query."""
        out = {}
        for row in self.query(expr):
            labels = tuple(
                sorted(
                    (k, v)
                    for k, v in row["metric"].items()
                    if k not in ("__name__", "job", "instance")
                )
            )
            out[labels] = float(row["value"][1])
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Carbon:
    """`carbon-cache` with whisper files of 1 s resolution, restartable on the same ports."""

    def __init__(self, workdir: Path) -> None:
        self.program = require_program("carbon-cache")
        self.whisper = whisper_module()
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.line_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.line_port}"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("whisper", "lists", "log"):
            (self.storage / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage-schemas.conf").write_text(
            "[everything]\npattern = .*\nretentions = 1s:1h\n"
        )
        conf = self.workdir / "carbon.conf"
        settings = {
            "STORAGE_DIR": f"{self.storage}/",
            "LOCAL_DATA_DIR": f"{self.storage}/whisper/",
            "WHITELISTS_DIR": f"{self.storage}/lists/",
            "CONF_DIR": f"{self.workdir}/",
            "LOG_DIR": f"{self.storage}/log/",
            "PID_DIR": f"{self.workdir}/",
            "USER": "",
            "MAX_CACHE_SIZE": "inf",
            "MAX_UPDATES_PER_SECOND": "100000",
            "MAX_CREATES_PER_MINUTE": "inf",
            "LINE_RECEIVER_INTERFACE": "127.0.0.1",
            "LINE_RECEIVER_PORT": str(self.line_port),
            "ENABLE_UDP_LISTENER": "False",
            "PICKLE_RECEIVER_INTERFACE": "127.0.0.1",
            "PICKLE_RECEIVER_PORT": str(free_port()),
            "CACHE_QUERY_INTERFACE": "127.0.0.1",
            "CACHE_QUERY_PORT": str(free_port()),
            # Tagged series are stored under _tagged/; the tag index of
            # graphite-web is not part of this test: a closed loopback port.
            "ENABLE_TAGS": "True",
            "GRAPHITE_URL": f"http://127.0.0.1:{free_port()}",
            "LOG_LISTENER_CONN_SUCCESS": "False",
        }
        conf.write_text("[cache]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        return conf

    def start(self, timeout: float = 30.0) -> Carbon:
        conf = self._write_config()
        self.starts += 1
        log = (self.workdir / f"carbon-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                self.program,
                f"--config={conf}",
                "--nodaemon",
                f"--pidfile={self.workdir / 'carbon.pid'}",
                "start",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self._listening, timeout, "carbon's line receiver")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError("carbon-cache exited:\n" + self.log())
        with socket.create_connection(("127.0.0.1", self.line_port), timeout=1):
            return True

    def log(self) -> str:
        path = self.workdir / f"carbon-{self.starts}.log"
        return path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as the service manager does; carbon writes its cache out first."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def whisper_file(self, path: str) -> Path:
        """Where carbon keeps `path` (carbon.util.TaggedSeries.encode, hashed names)."""
        name, *tags = path.split(";")
        if not tags:
            return self.storage / "whisper" / (name.replace(".", "/") + ".wsp")
        normal = name + "".join(sorted(f";{tag}" for tag in tags))
        digest = hashlib.sha256(normal.encode()).hexdigest()
        return self.storage / "whisper" / "_tagged" / digest[:3] / digest[3:6] / f"{digest}.wsp"

    def points(self, path: str) -> dict[int, float]:
        """{timestamp: value} of every point carbon wrote for `path` (none yet: {}).

        A file carbon is still creating has no header yet: none yet too.
        """
        file = self.whisper_file(path)
        if not file.exists():
            return {}
        now = int(time.time())
        try:
            (start, _, step), values = self.whisper.fetch(str(file), now - 3500, now)
        except self.whisper.CorruptWhisperFile:
            return {}
        return {start + i * step: v for i, v in enumerate(values) if v is not None}
