"""Real clients against the real daemon: hot-shots (Node), datadog and statsd
(Python), and raw sockets; every result is read back through the HTTP API
and compared with what was sent, exactly.

Sums are exact because every value sent is an integer or a multiple of 1/8
(exact in binary floating point, whatever the order of addition);
percentiles are compared with the exact weighted nearest-rank percentile
(SPEC §4: within 1%).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import ROOT, Daemon, client_env, nearest_rank, wait_for

DaemonFactory = Callable[..., Daemon]

pytestmark = pytest.mark.e2e

WORKLOAD = ROOT / "examples" / "workload.js"
PREFIX = "sigma_playground."
PERCENTILES = (50, 90, 99)


# ====================================================================== helpers


def close_to(got: float, expected: float, relative: float = 1e-9) -> bool:
    return abs(got - expected) <= relative * max(1.0, abs(expected))


def assert_distribution(
    d: Daemon,
    metric: str,
    values: list[float],
    *params: tuple[str, str],
    weights: Iterable[float] = (),
) -> None:
    """count, sum, min, max exactly; mean to rounding; p50/p90/p99 within 1%."""
    w = list(weights) or [1.0] * len(values)
    expected = {
        "count": sum(w),
        "sum": sum(v * x for v, x in zip(values, w, strict=True)),
        "min": min(values),
        "max": max(values),
    }
    for stat, want in expected.items():
        got = stat_value(d, metric, stat, *params)
        assert got == want, f"{metric} {params} {stat}: got {got}, sent {want}"
    mean = stat_value(d, metric, "mean", *params)
    assert close_to(mean, expected["sum"] / expected["count"]), (metric, params, mean)
    for q in PERCENTILES:
        exact = nearest_rank(values, q, w)
        got = stat_value(d, metric, f"p{q}", *params)
        assert abs(got - exact) <= 0.01 * abs(exact), f"{metric} {params} p{q}: {got} vs {exact}"


def stat_value(d: Daemon, metric: str, stat: str, *params: tuple[str, str]) -> float:
    doc = d.query(metric, ("stat", stat), *params)
    assert doc["metric"] == metric and doc["stat"] == stat, doc
    assert len(doc["series"]) == 1, doc
    value: float = doc["series"][0]["value"]
    return value


def total(d: Daemon, metric: str, *params: tuple[str, str]) -> float | None:
    """The default-stat value of a metric over the last hour (None: no data yet)."""
    doc = d.query(metric, *params)
    if not doc["series"]:
        return None
    assert len(doc["series"]) == 1, doc
    value: float = doc["series"][0]["value"]
    return value


def wait_stored(d: Daemon, lines: int, timeout: float = 30.0) -> None:
    """Wait until the flushes that stored `lines` metric lines are in SQLite.

    statsd_aggregator.lines_received is written in the same transaction as
    the window it describes, so once it adds up, every line sent is queryable.
    It must add up EXACTLY: more means a line counted twice, fewer a loss.
    """

    def stored() -> float | None:
        got = total(d, "statsd_aggregator.lines_received")
        assert got is None or got <= lines, f"daemon counted {got} lines, {lines} were sent"
        return got == lines or None

    wait_for(stored, timeout, f"statsd_aggregator.lines_received == {lines}")


def group(d: Daemon, metric: str, key: str, *params: tuple[str, str]) -> list[tuple[str, float]]:
    doc = d.query(metric, ("group_by", key), *params)
    out = []
    for series in doc["series"]:
        assert set(series["tags"]) == {key}, series
        out.append((series["tags"][key], series["value"]))
    return out


# ====================================================================== hot-shots


def run_workload(*args: str, timeout: float = 60.0) -> dict[str, Any]:
    node = shutil.which("node")
    assert node, "node is needed for the hot-shots tests (see README: npm ci)"
    assert (ROOT / "node_modules" / "hot-shots").is_dir(), "run `npm ci` first"
    proc = subprocess.run(
        [node, str(WORKLOAD), "--pause-ms", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=client_env(),
    )
    lines = proc.stdout.strip().splitlines()
    summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    code = proc.returncode
    assert code == 0, (
        f"workload.js exited {code}: {proc.stderr.strip()} "
        f"errors={summary.get('errors')} {summary.get('error_messages')}"
    )
    assert len(lines) == 1, f"expected ONE summary line, got {len(lines)}"
    assert summary["errors"] == 0, summary["error_messages"]
    return summary


class Expected:
    """What the daemon must report, computed from a workload summary."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.counters = summary["counters"]
        self.timers = summary["timers"]
        self.gauges = summary["gauges"]

    def counter_total(self, name: str, **tags: str) -> float:
        return sum(
            c["total"]
            for c in self.counters
            if c["name"] == PREFIX + name and tags.items() <= c["tags"].items()
        )

    def counter_by(self, name: str, key: str, **tags: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for c in self.counters:
            if c["name"] == PREFIX + name and tags.items() <= c["tags"].items():
                out[c["tags"][key]] += c["total"]
        return dict(out)

    def timer_values(self, name: str, **tags: str) -> list[float]:
        values: list[float] = []
        for t in self.timers:
            if t["name"] == PREFIX + name and tags.items() <= t["tags"].items():
                values += t["values"]
        return values

    def names(self) -> dict[str, str]:
        """metric name -> API type name."""
        out = {c["name"]: "counter" for c in self.counters}
        out.update({t["name"]: "timer" for t in self.timers})
        out.update({g["name"]: "gauge" for g in self.gauges})
        return out


def check_workload(d: Daemon, summary: dict[str, Any]) -> None:
    """Every figure the API gives for the workload equals what was sent."""
    assert summary["iterations"] > 0 and summary["metrics_sent"] > 0, summary
    expected = Expected(summary)
    wait_stored(d, summary["metrics_sent"])

    # Counters: the sum per metric, over every tag set.
    for name in (
        "workbook.views",
        "workbook.embeds",
        "workbook.errors",
        "user.logins",
        "api.requests",
    ):
        want = expected.counter_total(name)
        assert want > 0, f"the workload sent no {name}"
        assert total(d, PREFIX + name) == want, name
        assert stat_value(d, PREFIX + name, "count") == summary_lines(summary, name), name

    # One tag filter, then two (every filter applies).
    views = PREFIX + "workbook.views"
    assert total(d, views, ("tag", "workbook_id:wb-3")) == expected.counter_total(
        "workbook.views", workbook_id="wb-3"
    )
    embeds = PREFIX + "workbook.embeds"
    for success in ("true", "false"):
        want = expected.counter_total("workbook.embeds", workbook_id="wb-1", success=success)
        got = total(d, embeds, ("tag", "workbook_id:wb-1"), ("tag", f"success:{success}"))
        assert (got or 0) == want, (success, got, want)
    # A tag value holding ":" (route) and a filter on it.
    requests = PREFIX + "api.requests"
    want = expected.counter_total("api.requests", route="/api/workbooks/:id", method="PUT")
    got = total(d, requests, ("tag", "route:/api/workbooks/:id"), ("tag", "method:PUT"))
    assert got == want
    assert dict(group(d, requests, "status")) == expected.counter_by("api.requests", "status")

    # group_by workbook_id: every workbook, then a top 5 with limit.
    by_workbook = expected.counter_by("workbook.views", "workbook_id")
    everything = group(d, views, "workbook_id")
    assert dict(everything) == by_workbook
    assert [v for _, v in everything] == sorted(by_workbook.values(), reverse=True)
    top = group(d, views, "workbook_id", ("limit", "5"))
    assert [v for _, v in top] == sorted(by_workbook.values(), reverse=True)[:5]
    for workbook, value in top:
        assert by_workbook[workbook] == value
    left_out = set(by_workbook) - {w for w, _ in top}
    assert all(by_workbook[w] <= top[-1][1] for w in left_out)

    # Timers: merged over every tag set, and for one tag value.
    load_time = PREFIX + "workbook.load_time"
    assert_distribution(d, load_time, expected.timer_values("workbook.load_time"))
    assert_distribution(
        d,
        load_time,
        expected.timer_values("workbook.load_time", workbook_id="wb-3"),
        ("tag", "workbook_id:wb-3"),
    )
    # The `sql` tag comes back exactly as sent (spaces, '*', '=', '?', '(', "'", ':').
    query_time = PREFIX + "db.query_time"
    assert_distribution(d, query_time, expected.timer_values("db.query_time"))
    sent_sql = {
        t["tags"]["sql"]: len(t["values"]) for t in expected.timers if t["name"] == query_time
    }
    by_sql = group(d, query_time, "sql", ("stat", "count"))
    assert dict(by_sql) == sent_sql
    for sql, count in sent_sql.items():
        assert stat_value(d, query_time, "count", ("tag", f"sql:{sql}")) == count, sql
    with_colon = "SELECT * FROM users WHERE id = :user_id"
    assert with_colon in sent_sql
    assert_distribution(
        d,
        query_time,
        expected.timer_values("db.query_time", sql=with_colon),
        ("tag", f"sql:{with_colon}"),
    )

    # Gauges: the last value sent.
    for gauge in expected.gauges:
        assert total(d, gauge["name"]) == gauge["last"], gauge

    # The metric list: every name with its type and tag keys.
    listed = d.get("/api/v1/metrics", {"prefix": PREFIX})["metrics"]
    by_name: dict[str, dict[str, Any]] = {}
    for metric in listed:
        by_name[metric["name"]] = metric
    assert set(by_name) == set(expected.names())
    for name, type_name in expected.names().items():
        assert by_name[name]["type"] == type_name, by_name[name]
    keys = {
        PREFIX + "workbook.views": {"workbook_id", "user_id"},
        PREFIX + "workbook.embeds": {"workbook_id", "user_id", "success"},
        PREFIX + "workbook.errors": {"workbook_id", "error_type"},
        PREFIX + "workbook.load_time": {"workbook_id"},
        PREFIX + "user.logins": {"user_id"},
        PREFIX + "api.requests": {"route", "method", "status"},
        PREFIX + "db.query_time": {"sql"},
        PREFIX + "health.memory_mb": set(),
    }
    for name, tag_keys in keys.items():
        assert set(by_name[name]["tags"]) == tag_keys, by_name[name]


def summary_lines(summary: dict[str, Any], name: str) -> int:
    """How many lines of a counter were sent (each +1: count == total)."""
    return sum(c["total"] for c in summary["counters"] if c["name"] == PREFIX + name)


def test_hot_shots_workload_over_udp(start_daemon: DaemonFactory) -> None:
    d = start_daemon()
    host, port = d.addr("udp")
    summary = run_workload(
        "--protocol", "udp", "--host", host, "--port", str(port), "--seed", "11", "--count", "300"
    )
    assert summary["protocol"] == "udp" and summary["iterations"] == 300
    check_workload(d, summary)


def test_hot_shots_workload_over_tcp(start_daemon: DaemonFactory) -> None:
    d = start_daemon()
    host, port = d.addr("tcp")
    summary = run_workload(
        "--protocol", "tcp", "--host", host, "--port", str(port), "--seed", "12", "--count", "300"
    )
    assert summary["protocol"] == "tcp" and summary["iterations"] == 300
    check_workload(d, summary)


def test_hot_shots_workload_over_unix_stream(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    path = str(tmp_path / "stream.sock")
    d = start_daemon(args=("--unix-stream", path))
    assert d.addresses["unix_stream"] == path
    summary = run_workload(
        "--protocol",
        "stream",
        "--path",
        path,
        "--seed",
        "13",
        "--count",
        "200",
        "--max-buffer-size",
        "0",
    )
    check_workload(d, summary)


def test_hot_shots_workload_over_unix_datagram(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    path = str(tmp_path / "dgram.sock")
    d = start_daemon(args=("--unix", path))
    summary = run_workload("--protocol", "uds", "--path", path, "--seed", "14", "--count", "200")
    check_workload(d, summary)


def test_hot_shots_workload_feeds_the_dashboard(start_daemon: DaemonFactory) -> None:
    """SPEC §5 "The dashboard document", computed from what the workload sent."""
    d = start_daemon()
    host, port = d.addr("udp")
    summary = run_workload("--host", host, "--port", str(port), "--seed", "15", "--count", "250")
    expected = Expected(summary)
    wait_stored(d, summary["metrics_sent"])

    doc = d.get("/api/metrics/dashboard")
    views = expected.counter_total("workbook.views")
    errors = expected.counter_total("workbook.errors")
    load_times = expected.timer_values("workbook.load_time")
    users = {
        c["tags"]["user_id"]
        for c in expected.counters
        if c["name"]
        in {PREFIX + "workbook.views", PREFIX + "workbook.embeds", PREFIX + "user.logins"}
    }
    by_workbook = expected.counter_by("workbook.views", "workbook_id")
    top = sorted(by_workbook.items(), key=lambda item: (-item[1], item[0]))[:10]

    assert set(doc) >= {
        "workbookViews",
        "workbookEmbeds",
        "errorRate",
        "avgLoadTime",
        "activeUsers",
        "topWorkbooks",
    }, doc
    assert doc["workbookViews"] == views and isinstance(doc["workbookViews"], int)
    embeds = expected.counter_total("workbook.embeds")
    assert doc["workbookEmbeds"] == embeds and isinstance(doc["workbookEmbeds"], int)
    assert close_to(doc["errorRate"], 100 * errors / views), (doc["errorRate"], errors, views)
    assert close_to(doc["avgLoadTime"], sum(load_times) / len(load_times))
    assert doc["activeUsers"] == len(users) and isinstance(doc["activeUsers"], int)
    assert doc["topWorkbooks"] == [{"id": w, "views": int(v)} for w, v in top]


# ====================================================================== datadog


@pytest.fixture
def no_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients drop a sampled metric when random() > rate; make every one go out,
    so a line sent with @rate must count 1/rate."""
    import datadog.dogstatsd.base as dd_base
    import statsd.client.base as statsd_base

    class NeverDrop:
        @staticmethod
        def random() -> float:
            return 0.0

    monkeypatch.setattr(dd_base, "random", NeverDrop.random)
    monkeypatch.setattr(statsd_base, "random", NeverDrop)
    for key in list(os.environ):
        if key.startswith("DD_"):
            monkeypatch.delenv(key)


@pytest.fixture
def dogstatsd() -> Iterator[Callable[..., Any]]:
    """Make DogStatsd clients; each one's socket is closed at the end of the test."""
    from datadog.dogstatsd.base import DogStatsd

    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        # Telemetry off (it would add datadog.dogstatsd.client.* counters), no
        # origin detection (it would add a container id tag inside containers),
        # and a socket timeout: with the default 0 the client drops what a
        # full unix socket queue (net.unix.max_dgram_qlen, often 10) refuses.
        client = DogStatsd(
            disable_telemetry=True, origin_detection_enabled=False, socket_timeout=5, **kwargs
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close_socket()


def send_datadog_metrics(client: Any, ns: str) -> None:
    for value in (0.25, 0.5, 0.5, 1.0, 2.0, 8.0, 16.125):
        client.distribution(f"{ns}.dist", value, tags=["env:test"])
    for value in (42, 7, 19, 3):
        client.histogram(f"{ns}.hist", value, tags=["h:1"], sample_rate=0.5)
    for member in ("alice", "bob", "alice", "42", "carol", "bob"):
        client.set(f"{ns}.users", member, tags=["env:test"])
    client.increment(f"{ns}.hits", tags=["env:test", "route:/a"])
    client.increment(f"{ns}.hits", 3, tags=["route:/a", "env:test"])  # same series, other order
    client.increment(f"{ns}.hits", 5, tags=["env:test", "route:/b"])
    client.decrement(f"{ns}.hits", 2, tags=["env:test", "route:/b"])
    client.increment(f"{ns}.hits", 4, tags=["env:test", "route:/c"], sample_rate=0.25)
    client.gauge(f"{ns}.temp", 21.5, tags=["room:1"])
    client.gauge(f"{ns}.temp", 19.25, tags=["room:1"])
    client.timing(f"{ns}.lat", 12.5, tags=["env:test"])
    client.flush()


def check_datadog_metrics(d: Daemon, ns: str) -> None:
    assert_distribution(
        d, f"{ns}.dist", [0.25, 0.5, 0.5, 1.0, 2.0, 8.0, 16.125], ("tag", "env:test")
    )
    # Sampled at 0.5: each value weighs 2.
    assert_distribution(d, f"{ns}.hist", [42, 7, 19, 3], ("tag", "h:1"), weights=[2.0] * 4)
    assert total(d, f"{ns}.users") == 4  # alice, bob, 42, carol
    # 1 + 3 on route:/a (tags in another order are the same series), 5 - 2 on
    # /b, 4 sampled at 0.25 on /c.
    assert dict(group(d, f"{ns}.hits", "route")) == {"/a": 4, "/b": 3, "/c": 16}
    assert total(d, f"{ns}.hits", ("tag", "env:test")) == 23
    assert total(d, f"{ns}.temp", ("tag", "room:1")) == 19.25
    assert stat_value(d, f"{ns}.lat", "count") == 1
    assert stat_value(d, f"{ns}.lat", "max") == 12.5
    series = d.get("/api/v1/metrics", {"prefix": ns + "."})["metrics"]
    types = {(m["name"], m["type"]) for m in series}
    assert types == {
        (f"{ns}.dist", "distribution"),
        (f"{ns}.hist", "histogram"),
        (f"{ns}.users", "set"),
        (f"{ns}.hits", "counter"),
        (f"{ns}.temp", "gauge"),
        (f"{ns}.lat", "timer"),
    }


# 7 distribution + 4 histogram + 6 set + 5 counter + 2 gauge + 1 timer lines
DATADOG_LINES = 25


def test_datadog_client_over_udp(
    start_daemon: DaemonFactory, no_sampling: None, dogstatsd: Callable[..., Any]
) -> None:
    d = start_daemon()
    host, port = d.addr("udp")
    client = dogstatsd(host=host, port=port)
    send_datadog_metrics(client, "dd")
    wait_stored(d, DATADOG_LINES)
    check_datadog_metrics(d, "dd")


def test_datadog_client_over_unix_datagram(
    start_daemon: DaemonFactory,
    tmp_path: Path,
    no_sampling: None,
    dogstatsd: Callable[..., Any],
) -> None:
    path = str(tmp_path / "dsd.sock")
    d = start_daemon(args=("--unix", path))
    client = dogstatsd(socket_path=path)
    send_datadog_metrics(client, "uds")
    wait_stored(d, DATADOG_LINES)
    check_datadog_metrics(d, "uds")

    # Events and service checks over the same socket.
    now = int(time.time())
    client.event(
        "Deploy over UDS",
        "line one\nline two",
        alert_type="success",
        date_happened=now - 30,
        tags=["via:uds"],
    )
    client.service_check("uds.check", 1, tags=["via:uds"], message="degraded", hostname="h1")
    events = wait_for(lambda: d.get("/api/v1/events", {"from": "-1h"})["events"], 15, "events")
    assert events == [
        {
            "timestamp": now - 30,
            "title": "Deploy over UDS",
            "text": "line one\nline two",
            "host": "",
            "priority": "normal",
            "alert_type": "success",
            "aggregation_key": "",
            "source_type": "",
            "tags": {"via": "uds"},
        }
    ]
    checks = wait_for(lambda: d.get("/api/v1/checks")["checks"], 15, "checks")
    assert len(checks) == 1
    check = checks[0]
    assert abs(check.pop("timestamp") - now) <= 5
    assert check == {
        "name": "uds.check",
        "status": 1,
        "status_text": "warning",
        "host": "h1",
        "message": "degraded",
        "tags": {"via": "uds"},
    }


def test_datadog_events_and_service_checks(
    start_daemon: DaemonFactory, no_sampling: None, dogstatsd: Callable[..., Any]
) -> None:
    d = start_daemon()
    host, port = d.addr("udp")
    client = dogstatsd(host=host, port=port)
    now = int(time.time())
    before = time.time()
    client.event(
        "Deploy done",
        "v1.2.3 rolled out\nto every host",
        alert_type="error",
        aggregation_key="deploy-42",
        source_type_name="my_apps",
        date_happened=now - 120,
        priority="low",
        tags=["env:prod", "team:core", "noval"],
        hostname="web-1",
    )
    client.event("Déploy ✓", "naïve text")  # datadog counts UTF-8 bytes in _e{...}
    client.service_check(
        "db.replica",
        1,
        tags=["env:prod", "db:main"],
        timestamp=now - 60,
        hostname="db-1",
        message="replica lag 12s\nprimary ok",
    )
    client.service_check(
        "db.replica",
        2,
        tags=["env:prod", "db:main"],
        timestamp=now - 10,
        hostname="db-1",
        message="replica down",
    )
    client.service_check("cache", 0, tags=["env:prod"])
    client.service_check("queue", 3, message="no data")
    after = time.time()

    def events_in() -> list[dict[str, Any]] | None:
        found: list[dict[str, Any]] = d.get("/api/v1/events", {"from": "-1h"})["events"]
        return found if len(found) == 2 else None

    newest, oldest = wait_for(events_in, 15, "two events")
    # Newest first: the second event has no d: field, so its time is its arrival.
    assert before - 1 <= newest.pop("timestamp") <= after + 1
    assert newest == {
        "title": "Déploy ✓",
        "text": "naïve text",
        "host": "",
        "priority": "normal",
        "alert_type": "info",
        "aggregation_key": "",
        "source_type": "",
        "tags": {},
    }
    assert oldest == {
        "timestamp": now - 120,
        "title": "Deploy done",
        "text": "v1.2.3 rolled out\nto every host",
        "host": "web-1",
        "priority": "low",
        "alert_type": "error",
        "aggregation_key": "deploy-42",
        "source_type": "my_apps",
        "tags": {"env": "prod", "team": "core", "noval": ""},
    }
    # Tag filters apply to events.
    assert [
        e["title"] for e in d.get("/api/v1/events", {"from": "-1h", "tag": "team:core"})["events"]
    ] == ["Deploy done"]

    def checks_in() -> dict[str, dict[str, Any]] | None:
        found = {c["name"]: c for c in d.get("/api/v1/checks")["checks"]}
        return found if len(found) == 3 and found["db.replica"]["status"] == 2 else None

    checks = wait_for(checks_in, 15, "three checks, db.replica critical")
    assert checks["db.replica"] == {
        "name": "db.replica",
        "status": 2,
        "status_text": "critical",
        "timestamp": now - 10,
        "host": "db-1",
        "message": "replica down",
        "tags": {"env": "prod", "db": "main"},
    }
    cache = checks["cache"]
    assert before - 1 <= cache.pop("timestamp") <= after + 1
    assert cache == {
        "name": "cache",
        "status": 0,
        "status_text": "ok",
        "host": "",
        "message": "",
        "tags": {"env": "prod"},
    }
    queue = checks["queue"]
    assert before - 1 <= queue.pop("timestamp") <= after + 1
    assert queue == {
        "name": "queue",
        "status": 3,
        "status_text": "unknown",
        "host": "",
        "message": "no data",
        "tags": {},
    }
    assert [c["name"] for c in d.get("/api/v1/checks", {"tag": "db:main"})["checks"]] == [
        "db.replica"
    ]
    # The earlier status of db.replica, with its two-line message, is superseded.


def test_datadog_service_check_message_with_newline(
    start_daemon: DaemonFactory, no_sampling: None, dogstatsd: Callable[..., Any]
) -> None:
    d = start_daemon()
    host, port = d.addr("udp")
    client = dogstatsd(host=host, port=port)
    client.service_check("disk", 1, hostname="db-1", message="disk at 91%\nsee runbook")
    checks = wait_for(lambda: d.get("/api/v1/checks")["checks"], 15, "the check")
    assert [(c["name"], c["status"], c["message"]) for c in checks] == [
        ("disk", 1, "disk at 91%\nsee runbook")
    ]


# ====================================================================== statsd (pystatsd)


def send_pystatsd(client: Any) -> int:
    """The statsd client's whole API; returns how many lines it sent."""
    client.incr("hits")
    client.incr("hits", 5)
    client.incr("hits", 2, rate=0.5)  # |@0.5: counts 4
    client.decr("hits", 3)
    client.gauge("temp", 21.5)
    client.gauge("temp", 4, delta=True)  # "+4"
    client.gauge("temp", -3.25, delta=True)  # "-3.25"
    client.gauge("neg", -7)  # the set-negative-gauge idiom: "neg:0|g\nneg:-7|g"
    client.timing("lat", 12.5)
    client.timing("lat", 7.25)
    client.timing("lat", 3, rate=0.5)  # one value weighing 2
    for member in ("alice", "bob", "alice"):
        client.set("users", member)
    with client.pipeline() as pipe:
        pipe.incr("p.a")
        pipe.incr("p.a", 2)
        pipe.gauge("p.b", 1)
        pipe.timing("p.c", 2)
        pipe.set("p.d", "x")
    return 4 + 5 + 3 + 3 + 5  # counters, gauges (the idiom is 2 lines), timers, sets, pipe


def check_pystatsd(d: Daemon, prefix: str) -> None:
    assert total(d, f"{prefix}.hits") == 1 + 5 + 4 - 3
    assert total(d, f"{prefix}.temp") == 21.5 + 4 - 3.25
    assert total(d, f"{prefix}.neg") == -7
    assert_distribution(d, f"{prefix}.lat", [12.5, 7.25, 3.0], weights=[1, 1, 2])
    assert total(d, f"{prefix}.users") == 2
    assert total(d, f"{prefix}.p.a") == 3
    assert total(d, f"{prefix}.p.b") == 1
    assert_distribution(d, f"{prefix}.p.c", [2.0])
    assert total(d, f"{prefix}.p.d") == 1


def test_statsd_client_over_udp(start_daemon: DaemonFactory, no_sampling: None) -> None:
    from statsd import StatsClient

    d = start_daemon()
    host, port = d.addr("udp")
    client = StatsClient(host, port, prefix="py")
    lines = send_pystatsd(client)
    client.close()
    wait_stored(d, lines)
    check_pystatsd(d, "py")


def test_statsd_client_over_tcp(start_daemon: DaemonFactory, no_sampling: None) -> None:
    from statsd import TCPStatsClient

    d = start_daemon()
    host, port = d.addr("tcp")
    client = TCPStatsClient(host, port, prefix="pytcp", timeout=5)
    lines = send_pystatsd(client)
    client.close()
    wait_stored(d, lines)
    check_pystatsd(d, "pytcp")


def test_statsd_client_over_unix_stream(
    start_daemon: DaemonFactory, tmp_path: Path, no_sampling: None
) -> None:
    from statsd import UnixSocketStatsClient

    path = str(tmp_path / "s.sock")
    d = start_daemon(args=("--unix-stream", path))
    client = UnixSocketStatsClient(path, prefix="pyunix", timeout=5)
    lines = send_pystatsd(client)
    client.close()
    wait_stored(d, lines)
    check_pystatsd(d, "pyunix")


# ====================================================================== raw sockets


def send_in_pieces(
    sock: socket.socket, d: Daemon, pieces: list[bytes], checkpoints: dict[int, tuple[str, float]]
) -> None:
    """Send `pieces` one by one; after piece i, wait until checkpoints[i] holds,
    which proves the daemon handled that piece (and its cut line) on its own."""
    for index, piece in enumerate(pieces):
        sock.sendall(piece)
        if index in checkpoints:
            metric, value = checkpoints[index]
            d.wait_value(metric, value)


def stream_pieces(name: str) -> tuple[list[bytes], dict[int, tuple[str, float]]]:
    cafe = f"{name}.café".encode()
    pieces = [
        f"{name}.hits:1|c\n{name}.hi".encode(),  # a line cut in the middle
        f"ts:2|c\n{name}.g:".encode(),  # ...its end, and a gauge cut after the ':'
        b"5|g\n" + cafe[:-1],  # the name cut inside the two bytes of "é"
        cafe[-1:] + b":1|c\r\n" + f"{name}.t:3|ms\n{name}.t:4|ms".encode(),
        f"\n{name}.hits:10|c".encode(),  # the last line has no newline: the close ends it
    ]
    checkpoints = {0: (f"{name}.hits", 1), 1: (f"{name}.hits", 3), 2: (f"{name}.g", 5)}
    return pieces, checkpoints


def check_stream_pieces(d: Daemon, name: str) -> None:
    d.wait_value(f"{name}.hits", 13)
    assert total(d, f"{name}.café") == 1
    assert total(d, f"{name}.g") == 5
    assert_distribution(d, f"{name}.t", [3.0, 4.0])
    wait_stored(d, 7)


def test_raw_tcp_lines_split_across_sends(start_daemon: DaemonFactory) -> None:
    d = start_daemon()
    pieces, checkpoints = stream_pieces("rawtcp")
    with socket.create_connection(d.addr("tcp"), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_in_pieces(sock, d, pieces, checkpoints)
    check_stream_pieces(d, "rawtcp")


def test_raw_unix_stream_lines_split_across_sends(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    path = str(tmp_path / "raw.sock")
    d = start_daemon(args=("--unix-stream", path))
    pieces, checkpoints = stream_pieces("rawunix")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        send_in_pieces(sock, d, pieces, checkpoints)
    check_stream_pieces(d, "rawunix")


def test_raw_unix_datagrams(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    path = str(tmp_path / "raw.dgram")
    d = start_daemon(args=("--unix", path))
    d.send_unix(b"rawdg.hits:1|c\nrawdg.hits:2|c|#k:v", b"rawdg.g:7|g\n", b"rawdg.t:1:2:3|ms")
    wait_stored(d, 4)
    assert total(d, "rawdg.hits") == 3
    assert total(d, "rawdg.hits", ("tag", "k:v")) == 2
    assert total(d, "rawdg.g") == 7
    assert_distribution(d, "rawdg.t", [1.0, 2.0, 3.0])
