"""GET /metrics end to end: a real Prometheus scrapes the daemon every second
and its query API must show exactly what a real client (datadog) sent;
`promtool check metrics` reads the live exposition; idle series expire;
the API token does not guard /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..tools import require_program
from .harness import Daemon, config_text, nearest_rank, wait_for
from .servers import Prometheus

DaemonFactory = Callable[..., Daemon]

pytestmark = pytest.mark.e2e


def scrape(d: Daemon, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of GET /metrics."""
    request = urllib.request.Request(d.http + "/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def datadog_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Daemon], Any]]:
    from datadog.dogstatsd.base import DogStatsd

    for key in [k for k in os.environ if k.startswith("DD_")]:
        monkeypatch.delenv(key)  # DD_ENV and friends would become tags
    made: list[Any] = []

    def make(d: Daemon) -> Any:
        host, port = d.addr("udp")
        client = DogStatsd(
            host=host,
            port=port,
            disable_telemetry=True,
            origin_detection_enabled=False,
            socket_timeout=5,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close_socket()


LATENCIES = [12.5, 3.0, 7.25, 40.0, 5.5, 9.0, 22.0, 18.5, 1.0, 30.0]
USERS = ["alice", "bob", "carol", "alice"]


def test_prometheus_scrapes_exactly_what_the_client_sent(
    start_daemon: DaemonFactory, datadog_client: Callable[[Daemon], Any], tmp_path: Path
) -> None:
    d = start_daemon()
    prometheus = Prometheus(tmp_path / "prometheus", d.addresses["http"]).start()
    try:
        client = datadog_client(d)
        lines = 0
        for route, code, times in (("/a", "200", 3), ("/b", "500", 2), ("/a", "500", 1)):
            for _ in range(times):
                client.increment("app.requests", tags=[f"route:{route}", f"code:{code}"])
                lines += 1
        client.increment("app.requests", 4, tags=["code:200", "route:/a"])  # other order
        lines += 1
        client.gauge("app.queue_depth", 17, tags=["host:h1"])
        client.gauge("app.queue_depth", 12.5, tags=["host:h1"])
        lines += 2
        # One datagram each, so each lands whole in one window, whose exact
        # percentiles the summary shows.
        with client:
            for value in LATENCIES:
                client.timing("app.latency", value, tags=["route:/a"])
        with client:
            for member in USERS:
                client.set("app.users", member)
        lines += len(LATENCIES) + len(USERS)

        last: dict[str, object] = {}

        def seen(expr: str, expected: dict[tuple[tuple[str, str], ...], float]) -> bool:
            last[expr] = got = prometheus.values(expr)
            return got == expected

        expectations: list[tuple[str, dict[tuple[tuple[str, str], ...], float]]] = [
            (
                "app_requests_total",
                {
                    (("code", "200"), ("route", "/a")): 7.0,
                    (("code", "500"), ("route", "/b")): 2.0,
                    (("code", "500"), ("route", "/a")): 1.0,
                },
            ),
            ("app_queue_depth", {(("host", "h1"),): 12.5}),
            ("app_users", {(): 3.0}),
            ("app_latency_sum", {(("route", "/a"),): sum(LATENCIES)}),
            ("app_latency_count", {(("route", "/a"),): float(len(LATENCIES))}),
            (
                "app_latency",
                {
                    (("quantile", str(q / 100)), ("route", "/a")): nearest_rank(LATENCIES, q)
                    for q in (50, 90, 95, 99)
                },
            ),
            ("statsd_aggregator_lines_received_total", {(): float(lines)}),
            ('statsd_aggregator_bad_lines_total{job="statsd"}', {(): 0.0}),
            ('up{job="statsd"}', {(): 1.0}),
        ]
        for expr, expected in expectations:
            try:
                wait_for(lambda e=expr, x=expected: seen(e, x), 30, f"{expr} == {expected}")  # type: ignore[misc]
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}; prometheus had {last.get(expr)}; /metrics:\n{scrape(d)[2]}"
                ) from None
        # the type Prometheus recorded for each family
        metadata = prometheus_metadata(prometheus)
        assert {
            name: metadata[name]
            for name in ("app_requests_total", "app_queue_depth", "app_users", "app_latency")
        } == {
            "app_requests_total": "counter",
            "app_queue_depth": "gauge",
            "app_users": "gauge",
            "app_latency": "summary",
        }
    finally:
        prometheus.stop()


def prometheus_metadata(prometheus: Prometheus) -> dict[str, str]:
    url = f"http://127.0.0.1:{prometheus.port}/api/v1/targets/metadata"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    return {row["metric"]: row["type"] for row in body["data"]}


def test_promtool_checks_the_live_exposition(start_daemon: DaemonFactory) -> None:
    promtool = require_program("promtool")
    d = start_daemon()
    d.send_udp(
        b'app.requests:1|c|#route:/a b,note:say "hi" \\ there\n'
        b"app.requests:2|c|#route:/b,canary\n"
        b"app.temperature:-3.5|g|#room:r\xc3\xa9union\n"
        b"app.latency:12|ms|#quantile:x,le:1\n"
        b"app.payload:3|h\napp.payload:4|d|#kind:d\n"
        b"app.visitors:alice|s\n"
        b"app.requests_per_page:1|g\n"
        b"no_type:1\n"
    )

    def ready() -> str | None:
        _, _, body = scrape(d)
        wanted = ("app_requests_total", "app_latency_count", "bad_lines_by_reason_total")
        return body if all(w in body for w in wanted) else None

    body = wait_for(ready, 20, "the metrics in /metrics")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), body
    assert 'app_requests_total{note="say \\"hi\\" \\\\ there",route="/a b"} 1\n' in body
    assert 'app_requests_total{route="/b"} 2\n' in body
    assert 'app_temperature{room="réunion"} -3.5\n' in body
    assert 'app_latency{exported_le="1",exported_quantile="x",quantile="0.5"} 12\n' in body
    assert 'statsd_aggregator_bad_lines_by_reason_total{reason="missing_type"} 1\n' in body


def test_idle_series_expire_and_metrics_needs_no_token(start_daemon: DaemonFactory) -> None:
    extra = '[prometheus]\nexpire_after = "2s"\n\n[http]\ntoken = "s3cret"\n'
    d = start_daemon(config_text(extra=extra))
    d.send_udp(b"once.hits:5|c\nonce.temp:21|g\nonce.lat:3|ms\nonce.users:a|s")

    def has(*needles: str) -> bool:
        status, content_type, body = scrape(d)
        assert status == 200, body
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        return all(n in body for n in needles)

    wanted = ("once_hits_total 5\n", "once_temp 21\n", "once_lat_count 1\n", "once_users 1\n")
    wait_for(lambda: has(*wanted), 20, "the series in /metrics")

    # nothing more arrives: two seconds later every one of them is gone,
    # while the daemon's own metrics (updated every flush) stay
    def expired() -> bool:
        _, _, body = scrape(d)
        return "once_" not in body and "statsd_aggregator_packets_received_total" in body

    wait_for(expired, 20, "the idle series to leave /metrics")
    assert d.request("/api/v1/metrics")[0] == 401  # the token still guards /api/*
