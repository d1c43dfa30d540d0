"""Random query strings at every endpoint of a real daemon: never a 5xx, and
every error is the one JSON shape {"error": "..."} (README "HTTP API").

The daemon holds data of every type, events and checks, so the queries reach
the storage and dashboard code, not only the parameter checks.
"""

from __future__ import annotations

import http.client
import json
import string
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import Daemon, config_text, wait_for

pytestmark = pytest.mark.e2e

ENDPOINTS = [
    "/healthz",
    "/api/v1/metrics",
    "/api/v1/series",
    "/api/v1/events",
    "/api/v1/checks",
    "/api/v1/limits",
    "/api/metrics/dashboard",
    "/api/v1/dashboards",
    "/api/v1/dashboards/sigma_playground",
    "/api/v1/dashboards/no_such_dashboard",
    "/metrics",
    "/",
    "/static/app.js",
    "/static/nope.js",
    "/no/such/path",
]
# /api/v1/stream is left out: it takes no parameter and streams until the
# client leaves (tests/e2e/test_dashboard_page.py covers it).

PARAMS = ["metric", "stat", "from", "to", "step", "tag", "group_by", "limit", "type", "prefix"]
TRICKY = [
    "", "now", "-1h", "-30s", "-7d", "-0s", "-1e9d", "-99999999999999999999s", "0", "-1",
    "1e309", "nan", "inf", "-inf", "1.5", "9" * 40, "1e15", "-1000000000d", "2026-11-26T21:00:00Z",
    "2026-11-26T21:00:00", "2026-13-45T99:99:99+00:00", "9999-12-31T23:59:59+14:00",
    "p50", "p99.9", "p100", "p0", "p101", "p-1", "pNaN", "sum", "rate", "unique", "last",
    "counter", "timer", "ms", "set", "gauge", "x", "k:v", ":v", "k:", "k", "env:prod",
    "workbook_id", "user_id", "ops.hits", "ops.lat", "ops.users", "ops.level",
    "statsd_aggregator.lines_received", "\x00", "é", "\ud7ff", "a" * 5000, "%", "%zz",
]  # fmt: skip

values = st.one_of(st.sampled_from(TRICKY), st.text(max_size=40))
keys = st.one_of(st.sampled_from(PARAMS), st.text(max_size=10))
pairs = st.lists(st.tuples(keys, values), max_size=6)
# Raw query strings, percent signs and all: what a careless client might send.
raw = st.text(alphabet=string.ascii_letters + string.digits + "%&=+;,:-._~!*'()/?@$", max_size=80)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    d = Daemon(workdir, config_text(flush_interval=1)).start()
    d.send_udp(
        b"ops.hits:1|c|#env:prod,route:/a",
        b"ops.hits:2|c|@0.5|#env:dev",
        b"ops.lat:12|ms|#env:prod",
        b"ops.lat:30|ms|#env:dev",
        b"ops.users:ann|s",
        b"ops.level:4|g",
        b"ops.level:4|d",  # the same name as two types
        b"sigma_playground.workbook.views:1|c|#workbook_id:wb-1,user_id:u-1",
        b"sigma_playground.workbook.load_time:250|ms|#workbook_id:wb-1",
        b"_e{5,4}:title|text|#env:prod",
        b"_sc|check|1|#env:prod|m:meh",
    )
    wait_for(lambda: d.value("ops.hits") == 5, 15, "the fixture's data")
    yield d
    d.kill()


#: seconds an answer may take: a query that runs longer ties up a reader thread
TIMEOUT = 10


class Client:
    """One keep-alive HTTP connection, reopened if the server closes it."""

    def __init__(self, daemon: Daemon) -> None:
        self.host, self.port = daemon.addr("http")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)

    def get(self, target: str) -> tuple[int, str, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("GET", target)
                response = self.conn.getresponse()
                return response.status, response.getheader("Content-Type", ""), response.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[Client]:
    c = Client(daemon)
    yield c
    c.conn.close()


def check(client: Client, target: str) -> None:
    status, content_type, body = client.get(target)
    assert status < 500, (target, status, body[:300])
    if status >= 400:
        assert content_type.startswith("application/json"), (target, status, body[:300])
        document = json.loads(body)
        assert list(document) == ["error"] and isinstance(document["error"], str), target
        assert document["error"], target
    elif content_type.startswith("application/json"):
        json.loads(body)


SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@pytest.mark.parametrize("path", ENDPOINTS)
@SETTINGS
@given(query=pairs)
def test_random_parameters_never_answer_5xx(
    client: Client, path: str, query: list[tuple[str, str]]
) -> None:
    encoded = "&".join(
        f"{urllib.parse.quote(k, safe='', errors='surrogatepass')}="
        f"{urllib.parse.quote(v, safe='', errors='surrogatepass')}"
        for k, v in query
    )
    check(client, f"{path}?{encoded}" if encoded else path)


@pytest.mark.parametrize("path", ["/api/v1/series", "/api/v1/events", "/api/metrics/dashboard"])
@SETTINGS
@given(query=raw)
def test_raw_query_strings_never_answer_5xx(client: Client, path: str, query: str) -> None:
    check(client, f"{path}?{query}")


def test_a_request_line_over_64_kib_is_refused_without_a_5xx(client: Client) -> None:
    # Past MAX_REQUEST_LINE the HTTP parser answers before the API can: a
    # plain-text 400, still never a 5xx.
    status, _, _ = client.get("/api/v1/series?metric=" + "a" * 70_000)
    assert status == 400


# Found by the tests above (each was a 5xx, or a reader thread busy for
# minutes): a huge range, a step giving billions of points, times past what
# SQLite's integers hold.
FOUND = [
    ("/api/v1/dashboards/sigma_playground?from=0", 200),
    ("/api/metrics/dashboard?from=0&to=9999999999", 200),
    ("/api/v1/dashboards/sigma_playground?from=0&step=1", 400),
    ("/api/v1/series?metric=ops.hits&from=0&to=99999999999999999999", 400),
    ("/api/v1/series?metric=ops.hits&from=-1000000000d", 400),
    ("/api/v1/events?from=0&to=1e15", 400),
    ("/api/v1/dashboards/sigma_playground?step=%C2%B9", 400),  # "¹".isdigit()
    ("/api/v1/series?metric=ops.hits&limit=%C2%B2", 400),
    ("/api/v1/series?metric=ops.hits&from=-" + "9" * 400 + "s", 400),
]


@pytest.mark.parametrize(("target", "status"), FOUND)
def test_queries_the_fuzzing_found_answer_fast(client: Client, target: str, status: int) -> None:
    started = time.monotonic()
    got, _, body = client.get(target)
    assert (got, time.monotonic() - started < 2.0) == (status, True), body[:300]
    check(client, target)


def test_a_known_good_query_still_answers(client: Client) -> None:
    status, _, body = client.get("/api/v1/series?metric=ops.hits&from=-1h")
    assert status == 200 and json.loads(body)["series"][0]["value"] == 5
