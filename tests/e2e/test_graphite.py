"""The Graphite forwarder against a real carbon-cache: what Etsy statsd users'
clients send is read back from carbon's whisper files with Etsy's names and
exact values; then carbon stops, the clients keep sending, carbon comes
back, and what was sent meanwhile is there too (the retry buffer)."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Daemon, config_text, nearest_rank, wait_for
from .servers import Carbon

DaemonFactory = Callable[..., Daemon]

pytestmark = pytest.mark.e2e

LATENCIES = [12.0, 3.5, 7.25, 40.0, 5.0, 9.0, 22.0, 18.5, 1.0, 30.0]
TAGGED = "stats.counters.app.tagged.count;env=prod;az=b"


@pytest.fixture
def carbon(tmp_path: Path) -> Iterator[Carbon]:
    server = Carbon(tmp_path / "carbon")
    yield server.start()
    server.stop()


def total(carbon: Carbon, path: str) -> float:
    return sum(carbon.points(path).values())


def self_metric(d: Daemon, name: str) -> float | None:
    """A self metric from /metrics, as the daemon last exposed it."""
    with urllib.request.urlopen(d.http + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_carbon_gets_etsy_names_and_nothing_is_lost_while_it_is_down(
    start_daemon: DaemonFactory, carbon: Carbon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datadog.dogstatsd.base import DogStatsd
    from statsd import StatsClient

    for key in [k for k in os.environ if k.startswith("DD_")]:
        monkeypatch.delenv(key)
    extra = f'[forward.graphite]\naddress = "{carbon.address}"\n'
    d = start_daemon(config_text(extra=extra))
    host, port = d.addr("udp")
    etsy = StatsClient(host, port)
    dog = DogStatsd(host=host, port=port, disable_telemetry=True, origin_detection_enabled=False)
    try:
        for _ in range(5):
            etsy.incr("app.hits")
        etsy.gauge("app.temp", 21.5)
        with etsy.pipeline() as pipe:  # one datagram: one window, exact percentiles
            for value in LATENCIES:
                pipe.timing("app.lat", value)
        with etsy.pipeline() as pipe:
            for member in ("alice", "bob", "carol", "alice"):
                pipe.set("app.users", member)
        for _ in range(3):
            dog.increment("app.tagged", tags=["env:prod", "az:b"])

        def arrived() -> bool:
            return (
                total(carbon, "stats.counters.app.hits.count") == 5
                and total(carbon, "stats.counters.app.hits.rate") == 5  # flush_interval = 1
                and total(carbon, TAGGED) == 3
                and total(carbon, "stats.sets.app.users.count") == 3
                and total(carbon, "stats.timers.app.lat.count") == len(LATENCIES)
            )

        wait_for(arrived, 30, "the first metrics in carbon")
        timer = {
            stat: list(carbon.points(f"stats.timers.app.lat.{stat}").values())
            for stat in ("count", "count_ps", "sum", "mean", "lower", "upper", "upper_90")
        }
        assert timer == {
            "count": [10.0],
            "count_ps": [10.0],
            "sum": [sum(LATENCIES)],
            "mean": [sum(LATENCIES) / len(LATENCIES)],
            "lower": [min(LATENCIES)],
            "upper": [max(LATENCIES)],
            "upper_90": [nearest_rank(LATENCIES, 90)],
        }
        # a gauge is sent at every flush, unchanged
        temps = set(carbon.points("stats.gauges.app.temp").values())
        assert temps == {21.5}

        # ---- carbon goes away; the clients keep sending
        carbon.stop()
        for _ in range(7):
            etsy.incr("app.hits")
        for _ in range(2):
            dog.increment("app.tagged", tags=["az:b", "env:prod"])
        d.wait_value("app.hits", 12, timeout=20)  # flushed, so queued for carbon too
        wait_for(
            lambda: (self_metric(d, "statsd_aggregator_graphite_errors_total") or 0) >= 1,
            20,
            "a failed send to the stopped carbon",
        )
        assert total(carbon, "stats.counters.app.hits.count") == 5

        # ---- carbon comes back: everything sent meanwhile arrives
        carbon.start()
        wait_for(
            lambda: (
                total(carbon, "stats.counters.app.hits.count") == 12 and total(carbon, TAGGED) == 5
            ),
            30,
            "the buffered lines in carbon",
        )
        assert self_metric(d, "statsd_aggregator_graphite_lines_dropped_total") == 0
    finally:
        etsy.close()
        dog.close_socket()
