"""Dashboards: definitions from config.toml, and what they compute over a real Storage.

Known samples go through the real aggregation (aggregate.Aggregator ->
snapshot) into a real Storage on a temporary SQLite file; every test
asserts the whole document, with exact integers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aggregator import api, config, dashboards
from aggregator.aggregate import Aggregator, snapshot
from aggregator.config import ConfigError
from aggregator.model import Sample, Tags
from aggregator.storage import Storage

INTERVAL = 10
PERCENTILES = (50.0, 90.0, 95.0, 99.0)
NOW = 1_764_180_000  # a multiple of every step used here
DAY = 86400
P = "sigma_playground."


def tags(**pairs: str) -> Tags:
    return tuple(sorted(pairs.items()))


def counter(name: str, value: float = 1, rate: float = 1.0, **t: str) -> Sample:
    return Sample(name, "c", tags(**t), float(value), rate)


def timer(name: str, value: float, **t: str) -> Sample:
    return Sample(name, "ms", tags(**t), float(value))


def gauge(name: str, value: float, **t: str) -> Sample:
    return Sample(name, "g", tags(**t), float(value))


class Writer:
    """Samples -> the daemon's aggregation -> one Storage.write per window."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def window(self, start: int, samples: list[Sample]) -> None:
        aggregator = Aggregator(INTERVAL, PERCENTILES)
        aggregator.open(start)
        aggregator.add(samples)
        for closed in aggregator.swap(start + INTERVAL):
            self.storage.write(snapshot(closed, PERCENTILES))


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    cfg = config.load(None, {"aggregation.flush_interval": INTERVAL})
    store = Storage(str(tmp_path / "metrics.db"), cfg.tiers, clock=lambda: NOW)
    yield store
    store.close()


@pytest.fixture
def write(storage: Storage) -> Writer:
    return Writer(storage)


def shipped() -> dashboards.Dashboard:
    found = config.load(None).dashboard("sigma_playground")
    assert found is not None
    return found


def evaluate(
    storage: Storage,
    dashboard: dashboards.Dashboard | None = None,
    start: int = NOW - DAY,
    end: int = NOW,
) -> dict[str, Any]:
    dashboard = dashboard or shipped()
    step = dashboards.chart_step(end - start, INTERVAL)
    document = dashboards.evaluate(storage, dashboard, start, end, step, NOW)
    json.dumps(document, allow_nan=False)  # never NaN or infinity
    return document


def assert_same(got: Any, expected: Any) -> None:
    """Equal, with the same JSON types (an int stays an int, a float a float)."""
    assert json.dumps(got) == json.dumps(expected)


# ---------------------------------------------------------------- SPEC section 5


def test_the_shipped_dashboard_is_the_document_of_spec_section_5(
    storage: Storage, write: Writer
) -> None:
    write.window(
        NOW - 3600,
        [
            counter(P + "workbook.views", workbook_id="wb-1", user_id="u1"),
            counter(P + "workbook.views", workbook_id="wb-1", user_id="u2"),
            counter(P + "workbook.views", workbook_id="wb-2", user_id="u3"),
            counter(P + "workbook.views", 1, 0.5, workbook_id="wb-3", user_id="u3"),  # 2 views
            counter(P + "workbook.embeds", workbook_id="wb-1", user_id="u4", success="true"),
            counter(P + "workbook.embeds", workbook_id="wb-2", user_id="u4", success="false"),
            counter(P + "workbook.errors", workbook_id="wb-1", error_type="timeout"),
            timer(P + "workbook.load_time", 100, workbook_id="wb-1"),
            timer(P + "workbook.load_time", 200, workbook_id="wb-2"),
            counter(P + "user.logins", user_id="u5"),
            # not the dashboard's: another prefix, another metric with a user_id
            counter("other.workbook.views", 50, workbook_id="wb-9", user_id="x1"),
            counter(P + "api.requests", 7, user_id="x2"),
        ],
    )
    write.window(
        NOW - 10,
        [
            counter(P + "workbook.views", workbook_id="wb-1", user_id="u1"),
            counter(P + "workbook.errors", workbook_id="wb-2"),
            timer(P + "workbook.load_time", 600, workbook_id="wb-1"),
        ],
    )
    # older than the 24 h range: not counted
    write.window(
        NOW - DAY - 3600,
        [
            counter(P + "workbook.views", 100, workbook_id="wb-old", user_id="u-old"),
            timer(P + "workbook.load_time", 10_000, workbook_id="wb-old"),
        ],
    )

    document = evaluate(storage)

    assert list(document) == [
        "workbookViews",
        "workbookEmbeds",
        "errorRate",
        "avgLoadTime",
        "activeUsers",
        "topWorkbooks",
    ]
    assert_same(
        document,
        {
            "workbookViews": 6,
            "workbookEmbeds": 2,
            "errorRate": 100 * 2 / 6,
            "avgLoadTime": 300.0,
            "activeUsers": 5,
            "topWorkbooks": [
                {"id": "wb-1", "views": 3},
                {"id": "wb-3", "views": 2},
                {"id": "wb-2", "views": 1},
            ],
        },
    )


def test_no_data_at_all_gives_zeros_and_an_empty_list(storage: Storage) -> None:
    assert_same(
        evaluate(storage),
        {
            "workbookViews": 0,
            "workbookEmbeds": 0,
            "errorRate": 0.0,
            "avgLoadTime": 0.0,
            "activeUsers": 0,
            "topWorkbooks": [],
        },
    )


def test_errors_without_views_give_an_error_rate_of_0(storage: Storage, write: Writer) -> None:
    write.window(NOW - 60, [counter(P + "workbook.errors", 3, workbook_id="wb-1")])
    document = evaluate(storage)
    assert_same((document["workbookViews"], document["errorRate"]), (0, 0.0))


def test_no_data_in_the_range_gives_zeros(storage: Storage, write: Writer) -> None:
    write.window(NOW - 3 * 3600, [counter(P + "workbook.views", 4, workbook_id="wb-1")])
    document = evaluate(storage, start=NOW - 3600, end=NOW)
    assert_same((document["workbookViews"], document["topWorkbooks"]), (0, []))
    assert evaluate(storage)["workbookViews"] == 4


def test_top_workbooks_are_ten_at_most_ties_by_id(storage: Storage, write: Writer) -> None:
    samples = [counter(P + "workbook.views", 5, workbook_id="wb-z", user_id="u")]
    samples += [counter(P + "workbook.views", 5, workbook_id="wb-a")]
    # twelve workbooks tied at 2 views: only the first 8 ids (as strings) fit
    samples += [counter(P + "workbook.views", 2, workbook_id=f"wb-{n}") for n in range(12)]
    samples += [counter(P + "workbook.views", 1, workbook_id="wb-0a")]
    write.window(NOW - 600, samples)

    top = evaluate(storage)["topWorkbooks"]

    tied = sorted(f"wb-{n}" for n in range(12))[:8]
    assert_same(
        top,
        [{"id": "wb-a", "views": 5}, {"id": "wb-z", "views": 5}]
        + [{"id": wb, "views": 2} for wb in tied],
    )


def test_avg_load_time_is_the_mean_of_every_sample_not_of_windows(
    storage: Storage, write: Writer
) -> None:
    write.window(NOW - 600, [timer(P + "workbook.load_time", 100)])
    write.window(NOW - 300, [timer(P + "workbook.load_time", v) for v in (200, 200, 400)])
    assert_same(evaluate(storage)["avgLoadTime"], 225.0)


def test_counts_from_sample_rates_are_rounded_to_integers(storage: Storage, write: Writer) -> None:
    write.window(NOW - 600, [counter(P + "workbook.views", 1, 0.3, workbook_id="wb-1")] * 2)
    document = evaluate(storage)
    assert_same(document["workbookViews"], 7)  # 2 / 0.3 = 6.67
    assert_same(document["topWorkbooks"], [{"id": "wb-1", "views": 7}])


def test_shipped_charts(storage: Storage, write: Writer) -> None:
    write.window(
        NOW - 30,
        [counter(P + "workbook.views", 4), counter(P + "workbook.errors", 1)]
        + [timer(P + "workbook.load_time", v) for v in range(1, 101)],
    )
    write.window(NOW - 10, [counter(P + "workbook.errors", 2)])  # errors without views

    charts = dashboards.evaluate_charts(storage, shipped(), NOW - 900, NOW, 10, NOW)

    # Percentiles come from the mergeable sketch: within 1% of exact (SPEC 4).
    load_time = charts[1]["lines"]
    for line, exact in zip(load_time, (50, 95, 99), strict=True):
        [[ts, value]] = line["points"]
        assert ts == NOW - 30 and value == pytest.approx(exact, rel=0.01), line
        line["points"] = "checked"
    assert_same(
        charts,
        [
            {
                "name": "views",
                "title": "Workbook views per interval",
                "unit": "",
                "lines": [{"name": "views", "points": [[NOW - 30, 4.0]]}],
            },
            {
                "name": "load_time",
                "title": "Load time",
                "unit": "ms",
                "lines": [
                    {"name": "p50", "points": "checked"},
                    {"name": "p95", "points": "checked"},
                    {"name": "p99", "points": "checked"},
                ],
            },
            {
                "name": "error_rate",
                "title": "Error rate",
                "unit": "%",
                # 1 error in 4 views; then 2 errors without views: 0, not a division by 0
                "lines": [{"name": "errors", "points": [[NOW - 30, 25.0], [NOW - 10, 0.0]]}],
            },
        ],
    )


# ---------------------------------------------------------------- configured dashboards

SHOP = """
[http]
dashboard = "shop"

[dashboards.shop]
title = "Shop"
prefix = "shop."
range = "1h"

[dashboards.shop.values.orders]
metric = "orders"
tags = { env = "prod" }
decimals = 0

[dashboards.shop.values.conversion]
label = "Conversion"
unit = "%"
numerator = { metric = "orders", type = "counter" }
denominator = { metric = "visits", type = "counter", tags = { env = "prod" } }
scale = 100
decimals = 2

[dashboards.shop.values.peakQueue]
metric = "queue.depth"
type = "gauge"
stat = "max"

[dashboards.shop.values.buyers]
distinct = "customer"
metrics = ["orders", "carts"]

[dashboards.shop.values.bestSellers]
metric = "orders"
group_by = "sku"
limit = 2
fields = ["sku", "sold"]
decimals = 0

[dashboards.shop.charts.orders]
title = "Orders"
lines.prod = { metric = "orders", tags = { env = "prod" } }
lines.all = { metric = "orders" }

[dashboards.other]
[dashboards.other.values.n]
metric = "n"
"""


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(path)


def test_a_configured_dashboard(tmp_path: Path, storage: Storage, write: Writer) -> None:
    cfg = load(tmp_path, SHOP)
    assert [d.name for d in cfg.dashboards] == ["shop", "other"]  # the built-in one is gone
    assert cfg.default_dashboard == "shop"
    shop = cfg.dashboard("shop")
    assert shop is not None and (shop.title, shop.range) == ("Shop", 3600)
    write.window(
        NOW - 600,
        [
            counter("shop.orders", 3, env="prod", sku="a", customer="c1"),
            counter("shop.orders", 1, env="prod", sku="b", customer="c2"),
            counter("shop.orders", 1, env="dev", sku="c", customer="c3"),
            counter("shop.orders", 1, env="dev", sku="b"),
            counter("shop.carts", 1, customer="c4"),
            counter("shop.visits", 30, env="prod"),
            counter("shop.visits", 99, env="dev"),
            gauge("shop.queue.depth", 7),
            counter("orders", 100, sku="z", customer="c9"),  # without the prefix
        ],
    )
    write.window(NOW - 300, [gauge("shop.queue.depth", 3)])

    document = evaluate(storage, shop, NOW - 3600, NOW)

    assert_same(
        document,
        {
            "orders": 4,
            "conversion": round(100 * 6 / 30, 2),
            "peakQueue": 7.0,
            "buyers": 4,
            "bestSellers": [{"sku": "a", "sold": 3}, {"sku": "b", "sold": 2}],
        },
    )
    charts = dashboards.evaluate_charts(storage, shop, NOW - 3600, NOW, 60, NOW)
    assert_same(
        charts,
        [
            {
                "name": "orders",
                "title": "Orders",
                "unit": "",
                "lines": [
                    {"name": "prod", "points": [[NOW - 600, 4.0]]},
                    {"name": "all", "points": [[NOW - 600, 6.0]]},
                ],
            }
        ],
    )


def test_no_file_and_a_file_without_dashboards_give_the_builtin_one(tmp_path: Path) -> None:
    assert config.load(None).dashboards == load(tmp_path, "[listen]\nudp = ''\n").dashboards
    assert [d.name for d in config.load(None).dashboards] == ["sigma_playground"]


def test_no_dashboard_at_all_is_allowed(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[http]\ndashboard = ""\n[dashboards]\n')
    assert (cfg.default_dashboard, cfg.dashboards) == ("", ())


def test_describe_lists_what_the_page_needs() -> None:
    described = shipped().describe()
    assert described["range"] == DAY
    assert [v["name"] for v in described["values"]][:2] == ["workbookViews", "workbookEmbeds"]
    top = described["values"][-1]
    assert (top["kind"], top["fields"], top["label"]) == ("top", ["id", "views"], "Top workbooks")
    assert described["charts"][1] == {
        "name": "load_time",
        "title": "Load time",
        "unit": "ms",
        "lines": ["p50", "p95", "p99"],
    }


BAD_DEFINITIONS = [
    ("dashboards not a table", "dashboards = 3\n", "dashboards must be a table"),
    ("dashboard not a table", "[dashboards]\nd = 3\n", "dashboards.d must be a table"),
    ("bad name", '[dashboards."a b"]\n', "dashboards.a b is not a valid name"),
    ("unknown key", "[dashboards.d]\ncolour = 'red'\n", "dashboards.d.colour is not a known key"),
    ("title type", "[dashboards.d]\ntitle = 3\n", "dashboards.d.title must be a string"),
    ("bad range", "[dashboards.d]\nrange = '1 day'\n", "dashboards.d.range"),
    ("values not a table", "[dashboards.d]\nvalues = 1\n", "dashboards.d.values must be a table"),
    ("no kind", "[dashboards.d.values.x]\nlabel = 'X'\n", "dashboards.d.values.x needs metric"),
    ("metric type", "[dashboards.d.values.x]\nmetric = 3\n", "dashboards.d.values.x.metric"),
    ("empty metric", "[dashboards.d.values.x]\nmetric = ''\n", "dashboards.d.values.x.metric"),
    (
        "unknown stat",
        "[dashboards.d.values.x]\nmetric = 'm'\nstat = 'avg'\n",
        "dashboards.d.values.x.stat",
    ),
    (
        "stat of another type",
        "[dashboards.d.values.x]\nmetric = 'm'\ntype = 'counter'\nstat = 'p99'\n",
        "dashboards.d.values.x.stat 'p99' is not a stat of a counter",
    ),
    (
        "unknown type",
        "[dashboards.d.values.x]\nmetric = 'm'\ntype = 'meter'\n",
        "dashboards.d.values.x.type",
    ),
    (
        "tags as a list",
        "[dashboards.d.values.x]\nmetric = 'm'\ntags = ['env:prod']\n",
        "dashboards.d.values.x.tags",
    ),
    (
        "unknown value key",
        "[dashboards.d.values.x]\nmetric = 'm'\ngroup = 'k'\n",
        "dashboards.d.values.x.group is not a known key",
    ),
    (
        "limit 0",
        "[dashboards.d.values.x]\nmetric = 'm'\ngroup_by = 'k'\nlimit = 0\n",
        "dashboards.d.values.x.limit",
    ),
    (
        "one field",
        "[dashboards.d.values.x]\nmetric = 'm'\ngroup_by = 'k'\nfields = ['id']\n",
        "dashboards.d.values.x.fields",
    ),
    (
        "limit without group_by",
        "[dashboards.d.values.x]\nmetric = 'm'\nlimit = 3\n",
        "dashboards.d.values.x.limit is not a known key",
    ),
    (
        "negative decimals",
        "[dashboards.d.values.x]\nmetric = 'm'\ndecimals = -1\n",
        "dashboards.d.values.x.decimals",
    ),
    (
        "ratio without denominator",
        "[dashboards.d.values.x]\nnumerator = { metric = 'a' }\n",
        "dashboards.d.values.x.denominator is missing",
    ),
    (
        "ratio part not a table",
        "[dashboards.d.values.x]\nnumerator = 'a'\ndenominator = { metric = 'b' }\n",
        "dashboards.d.values.x.numerator must be a table",
    ),
    (
        "ratio part key",
        "[dashboards.d.values.x]\nnumerator = { metrics = 'a' }\ndenominator = { metric = 'b' }\n",
        "dashboards.d.values.x.numerator.metrics is not a known key",
    ),
    (
        "ratio scale",
        "[dashboards.d.values.x]\nnumerator = { metric = 'a' }\n"
        "denominator = { metric = 'b' }\nscale = '100'\n",
        "dashboards.d.values.x.scale",
    ),
    (
        "distinct without metrics",
        "[dashboards.d.values.x]\ndistinct = 'user_id'\n",
        "dashboards.d.values.x.metrics",
    ),
    (
        "distinct metrics empty",
        "[dashboards.d.values.x]\ndistinct = 'user_id'\nmetrics = []\n",
        "dashboards.d.values.x.metrics",
    ),
    (
        "chart without lines",
        "[dashboards.d.charts.c]\ntitle = 'C'\n",
        "dashboards.d.charts.c.lines",
    ),
    (
        "chart line without metric",
        "[dashboards.d.charts.c]\nlines.l = { stat = 'sum' }\n",
        "dashboards.d.charts.c.lines.l needs metric",
    ),
    (
        "chart line with group_by",
        "[dashboards.d.charts.c]\nlines.l = { metric = 'm', group_by = 'k' }\n",
        "dashboards.d.charts.c.lines.l.group_by is not a known key",
    ),
    (
        "served dashboard not defined",
        "[dashboards.d.values.x]\nmetric = 'm'\n",
        "http.dashboard 'sigma_playground' is not defined",
    ),
]


@pytest.mark.parametrize(
    ("text", "needle"), [c[1:] for c in BAD_DEFINITIONS], ids=[c[0] for c in BAD_DEFINITIONS]
)
def test_a_bad_definition_names_the_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    # the served dashboard is switched off unless that is what the case is about
    served = "" if "http.dashboard" in needle else '[http]\ndashboard = ""\n'
    path.write_text(text + served)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("span", "interval", "step"),
    [
        (900, 10, 10),
        (3600, 10, 30),
        (DAY, 10, 600),
        (7 * DAY, 10, 7200),
        (900, 1, 10),
        (60, 7, 7),
        (3600, 7, 28),
        (100 * DAY, 10, 86400),
        (1000 * DAY, 10, 576000),
    ],
)
def test_chart_step(span: int, interval: int, step: int) -> None:
    got = dashboards.chart_step(span, interval)
    assert got == step
    assert got % interval == 0 and span / got <= dashboards.TARGET_POINTS


# ---------------------------------------------------------------- over HTTP


@pytest.fixture
async def client(storage: Storage, tmp_path: Path) -> AsyncIterator[tuple[TestClient, Any]]:
    cfg = load(tmp_path, "[aggregation]\nflush_interval = 10\n")
    feed = api.FlushFeed()
    app = api.create_app(
        storage=storage,
        config=cfg,
        health=lambda: {"status": "ok"},
        executor=None,  # type: ignore[arg-type]  # the loop's default executor
        clock=lambda: NOW,
        feed=feed,
    )
    async with TestClient(TestServer(app)) as test_client:
        yield test_client, feed


async def test_http_document_list_and_errors(client: tuple[TestClient, Any], write: Writer) -> None:
    http, _ = client
    write.window(NOW - 600, [counter(P + "workbook.views", 2, workbook_id="wb-1", user_id="u")])

    response = await http.get("/api/metrics/dashboard")
    assert response.status == 200
    assert await response.json() == {
        "workbookViews": 2,
        "workbookEmbeds": 0,
        "errorRate": 0,
        "avgLoadTime": 0,
        "activeUsers": 1,
        "topWorkbooks": [{"id": "wb-1", "views": 2}],
    }
    # a range that ends before the data
    response = await http.get("/api/metrics/dashboard", params={"to": str(NOW - 3600)})
    assert (await response.json())["workbookViews"] == 0

    listed = await (await http.get("/api/v1/dashboards")).json()
    assert listed["default"] == "sigma_playground"
    assert [d["name"] for d in listed["dashboards"]] == ["sigma_playground"]

    one = await (await http.get("/api/v1/dashboards/sigma_playground?from=-15m")).json()
    assert (one["from"], one["to"], one["step"]) == (NOW - 900, NOW, 10)
    assert one["values"]["workbookViews"] == 2
    assert one["charts"][0]["lines"][0]["points"] == [[NOW - 600, 2.0]]

    for path, status, needle in [
        ("/api/v1/dashboards/nope", 404, "no dashboard named 'nope'"),
        ("/api/metrics/dashboard?from=yesterday", 400, "from:"),
        ("/api/metrics/dashboard?to=soon", 400, "to:"),
        (f"/api/metrics/dashboard?from={NOW}&to={NOW - 5}", 400, "from:"),
        ("/api/v1/dashboards/sigma_playground?step=0", 400, "step:"),
    ]:
        response = await http.get(path)
        body = await response.json()
        assert (response.status, list(body)) == (status, ["error"]), path
        assert needle in body["error"], path


async def test_the_page_and_its_files_are_served(client: tuple[TestClient, Any]) -> None:
    http, _ = client
    for path, kind in [
        ("/", "text/html"),
        ("/static/app.js", "javascript"),
        ("/static/style.css", "text/css"),
    ]:
        response = await http.get(path)
        assert response.status == 200, path
        assert kind in response.headers["Content-Type"], path
    response = await http.get("/static/nope.js")
    assert (response.status, await response.json()) == (404, {"error": "no file /static/nope.js"})
    assert (await http.get("/static/../api.py")).status == 404


async def read_event(response: Any) -> list[str]:
    """The lines of the next server-sent event (up to its blank line)."""
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode().rstrip("\n")
        if not line:
            if lines:
                return lines
            continue
        lines.append(line)


async def test_the_stream_sends_one_event_per_flush(client: tuple[TestClient, Any]) -> None:
    http, feed = client
    response = await http.get("/api/v1/stream")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert await read_event(response) == ["retry: 2000", ": connected"]
    feed.publish({"windows": [NOW], "rollups": 3})
    assert await read_event(response) == [
        "id: 1",
        "event: flush",
        'data: {"seq":1,"windows":[1764180000],"rollups":3}',
    ]
    feed.publish({"windows": [NOW + 10], "rollups": 0})
    assert (await read_event(response))[0] == "id: 2"
    response.close()


async def test_the_stream_ends_when_the_server_stops(storage: Storage, tmp_path: Path) -> None:
    feed = api.FlushFeed()
    app = api.create_app(
        storage=storage,
        config=config.load(None),
        health=lambda: {},
        executor=None,  # type: ignore[arg-type]
        clock=lambda: NOW,
        feed=feed,
    )
    http = TestClient(TestServer(app))
    await http.start_server()
    response = await http.get("/api/v1/stream")
    await read_event(response)
    # without the on_shutdown hook this would wait for the stream to end
    await asyncio.wait_for(http.close(), 5)
    assert feed.closed


async def test_a_token_is_needed_and_the_stream_takes_it_as_a_parameter(
    storage: Storage, tmp_path: Path
) -> None:
    cfg = load(tmp_path, "[http]\ntoken = 's3cret'\n")
    app = api.create_app(
        storage=storage,
        config=cfg,
        health=lambda: {},
        executor=None,  # type: ignore[arg-type]
        clock=lambda: NOW,
        feed=api.FlushFeed(),
    )
    async with TestClient(TestServer(app)) as http:
        for path in ("/api/metrics/dashboard", "/api/v1/dashboards", "/api/v1/stream"):
            assert (await http.get(path)).status == 401, path
        assert (await http.get("/api/metrics/dashboard?token=s3cret")).status == 401
        assert (await http.get("/api/v1/stream?token=wrong")).status == 401
        bearer = {"Authorization": "Bearer s3cret"}
        assert (await http.get("/api/metrics/dashboard", headers=bearer)).status == 200
        stream = await http.get("/api/v1/stream?token=s3cret")
        assert stream.status == 200
        stream.close()
        assert (await http.get("/")).status == 200  # the page itself holds no data


async def test_a_definition_the_data_contradicts_answers_500_naming_the_key(
    storage: Storage, write: Writer, tmp_path: Path
) -> None:
    # No type in the definition, so `p99` cannot be checked at start; the
    # data makes "hits" a counter, which has no percentiles.
    cfg = load(
        tmp_path,
        '[http]\ndashboard = "d"\n[dashboards.d.values.slow]\nmetric = "hits"\nstat = "p99"\n',
    )
    write.window(NOW - 60, [counter("hits", 3)])
    app = api.create_app(
        storage=storage,
        config=cfg,
        health=lambda: {},
        executor=None,  # type: ignore[arg-type]
        clock=lambda: NOW,
        feed=api.FlushFeed(),
    )
    async with TestClient(TestServer(app)) as http:
        response = await http.get("/api/metrics/dashboard")
        body = await response.json()
    assert response.status == 500
    assert list(body) == ["error"]
    assert body["error"].startswith("dashboards.d.values.slow: stat: 'p99' is not a stat")


# ---------------------------------------------------------------- answers per stored flush


class Clock:
    """A settable clock (unix seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Served:
    """The API over the real storage, with its feed, its documents and a settable clock."""

    def __init__(self, http: TestClient, feed: api.FlushFeed, clock: Clock) -> None:
        self.http = http
        self.feed = feed
        self.clock = clock
        self.documents = http.app[api.DOCUMENTS]

    async def get(self, path: str, **params: str) -> Any:
        response = await self.http.get(path, params=params)
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        return await response.json()

    def stored(self) -> None:
        """What the daemon does once a flush is in SQLite (Daemon._stored)."""
        self.feed.publish({"windows": [], "rollups": 0})

    @property
    def computations(self) -> int:
        """Computations started so far (a reused answer starts none)."""
        return self.documents.computations


async def serve(storage: Storage, cfg: config.Config) -> AsyncIterator[Served]:
    feed = api.FlushFeed()
    clock = Clock(NOW)
    app = api.create_app(
        storage=storage,
        config=cfg,
        health=dict,
        executor=None,  # type: ignore[arg-type]  # the loop's default executor
        clock=clock,
        feed=feed,
    )
    async with TestClient(TestServer(app)) as http:
        yield Served(http, feed, clock)


@pytest.fixture
async def served(storage: Storage) -> AsyncIterator[Served]:
    async for one in serve(storage, config.load(None, {"aggregation.flush_interval": INTERVAL})):
        yield one


async def test_an_answer_is_reused_until_the_next_flush_is_stored(
    served: Served, storage: Storage, write: Writer
) -> None:
    views = P + "workbook.views"
    write.window(NOW - 600, [counter(views, 2, workbook_id="wb-1", user_id="u")])
    document = await served.get("/api/metrics/dashboard")
    assert_same(document, evaluate(storage))  # what a fresh evaluation gives
    assert document["workbookViews"] == 2
    page = await served.get("/api/v1/dashboards/sigma_playground", **{"from": "-1h"})
    values, charts = dashboards.evaluate_all(storage, shipped(), NOW - 3600, NOW, 30, NOW)
    assert_same(page, {"name": "sigma_playground", "title": "Sigma playground",
                       "from": NOW - 3600, "to": NOW, "step": 30,
                       "values": values, "charts": charts})  # fmt: skip
    assert served.computations == 2

    # Stored, but not yet announced: the answers stay those of the last flush.
    write.window(NOW - 300, [counter(views, 3, workbook_id="wb-2", user_id="u")])
    assert await served.get("/api/metrics/dashboard") == document
    assert await served.get("/api/v1/dashboards/sigma_playground", **{"from": "-1h"}) == page
    assert served.computations == 2

    served.stored()
    fresh = await served.get("/api/metrics/dashboard")
    assert_same(fresh, evaluate(storage))
    assert fresh["workbookViews"] == 5
    assert fresh["topWorkbooks"] == [{"id": "wb-2", "views": 3}, {"id": "wb-1", "views": 2}]
    page = await served.get("/api/v1/dashboards/sigma_playground", **{"from": "-1h"})
    assert page["values"] == fresh


async def test_after_a_stored_flush_polled_answers_are_computed_before_anyone_asks(
    served: Served, write: Writer
) -> None:
    views = P + "workbook.views"
    day: dict[str, str] = {}
    quarter = {"from": "-15m"}
    hour = {"from": "-1h"}
    for params in (day, quarter, day, quarter):  # polled: asked again
        await served.get("/api/metrics/dashboard", **params)
    await served.get("/api/v1/dashboards/sigma_playground", **hour)  # asked once
    assert served.computations == 3

    write.window(NOW - 60, [counter(views, 4, workbook_id="wb-1", user_id="u")])
    served.clock.now = NOW + 0.5  # the flush is stored a moment after the window ends
    served.stored()
    assert served.computations == 5  # the polled ones, before anyone asks
    assert (await served.get("/api/metrics/dashboard", **day))["workbookViews"] == 4
    assert (await served.get("/api/metrics/dashboard", **quarter))["workbookViews"] == 4
    assert served.computations == 5
    page = await served.get("/api/v1/dashboards/sigma_playground", **hour)
    assert page["charts"][0]["lines"][0]["points"] == [[NOW - 60, 4.0]]
    assert served.computations == 6  # asked again: polled from now on

    served.clock.now = NOW + 60
    served.stored()
    assert served.computations == 9
    for params in (day, quarter):
        await served.get("/api/metrics/dashboard", **params)
    await served.get("/api/v1/dashboards/sigma_playground", **hour)
    assert served.computations == 9  # each was ready, or on its way

    # Not asked for WARM_SECONDS: no longer computed ahead.
    served.clock.now = NOW + 60 + api.WARM_SECONDS + 1
    served.stored()
    assert served.computations == 9


async def test_a_relative_range_is_resolved_at_each_request(served: Served) -> None:
    """The key is the range really covered (whole steps), not the text of `from`."""

    async def covered() -> tuple[int, int]:
        page = await served.get("/api/v1/dashboards/sigma_playground", **{"from": "-15m"})
        return page["from"], page["to"]

    assert await covered() == (NOW - 900, NOW)
    served.clock.now = NOW + 1
    assert await covered() == (NOW - 900, NOW + 10)
    served.clock.now = NOW + 9.9
    assert await covered() == (NOW - 900, NOW + 10)
    assert served.computations == 2
    served.clock.now = NOW + 10
    assert await covered() == (NOW - 890, NOW + 10)
    assert served.computations == 3


async def test_concurrent_requests_share_one_computation(served: Served, write: Writer) -> None:
    write.window(NOW - 60, [counter(P + "workbook.views", 1, workbook_id="wb-1", user_id="u")])
    answers = await asyncio.gather(*(served.get("/api/metrics/dashboard") for _ in range(5)))
    assert [a["workbookViews"] for a in answers] == [1] * 5
    assert served.computations == 1


async def test_a_rate_moves_with_the_clock_between_flushes(
    storage: Storage, write: Writer, tmp_path: Path
) -> None:
    """A rate over a range ending after now divides by the time elapsed until now."""
    cfg = load(
        tmp_path,
        '[http]\ndashboard = "d"\n[dashboards.d]\nrange = "1h"\n'
        '[dashboards.d.values.hits]\nmetric = "hits"\nstat = "rate"\n',
    )
    write.window(NOW - 1800, [counter("hits", 36)])
    async for served in serve(storage, cfg):
        served.clock.now = NOW - 5  # the range covered ends at NOW, 5 s from now
        early = await served.get("/api/metrics/dashboard")
        served.clock.now = NOW - 4
        later = await served.get("/api/metrics/dashboard")
        assert served.computations == 2
    # the range covered: whole 30 s steps, from NOW - 3630 to NOW
    assert early == {"hits": 36 / (3630 - 5)}
    assert later == {"hits": 36 / (3630 - 4)}


def test_config_toml_explains_every_dashboard_key() -> None:
    text = (Path(__file__).resolve().parents[1] / "config.toml").read_text()
    section = text[
        text.index(
            "# ---------------------------------------------------------------- dashboards"
        ) :
    ]
    for key, _, _ in dashboards.KEYS:
        leaf = key.rsplit(".", 1)[-1]
        if not leaf.startswith("<"):
            assert leaf in section, key
