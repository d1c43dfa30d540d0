"""The dashboard page (`GET /`) in a real headless Chromium, against the real daemon.

The browser is Debian's /usr/bin/chromium driven by Playwright for Python;
no browser is ever downloaded. Without them the tests skip, saying why;
with the environment variable CI set they fail instead, so CI cannot pass
by skipping.

`SCREENSHOT=path` saves a screenshot of the page showing a busy quarter of
an hour (the README's picture):

    SCREENSHOT=docs/dashboard.png .venv/bin/python -m pytest tests/e2e/test_dashboard_page.py
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .harness import Daemon, config_text, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

DaemonFactory = Callable[..., Daemon]

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
P = "sigma_playground."
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
#: The page must show a flush within a second of it; the flush interval
#: here is 1 s, so data sent shows within about 2 s. The deadline leaves
#: room for a slow CI machine, and stays far below the page's 30 s polling
#: fallback, so only the live event stream can meet it.
LIVE_DEADLINE = 6.0


# ====================================================================== the browser


def _missing() -> list[str]:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright; no browser download needed)")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    return missing


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = _missing()
    if missing:
        reason = "the dashboard page test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set: not skipping)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, start_daemon: DaemonFactory) -> Iterator[Page]:
    # Depends on start_daemon so that it is torn down first, while the daemon runs.
    context = browser.new_context(viewport=DESKTOP)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == [], "uncaught JavaScript errors on the page"


# ====================================================================== helpers


def open_page(page: Page, daemon: Daemon, query: str = "range=15m") -> None:
    page.goto(f"{daemon.http}/?{query}")
    wait_for(
        lambda: page.evaluate("document.body.dataset.refreshed"), 10, "the page's first refresh"
    )


def dashboard(daemon: Daemon) -> dict[str, Any]:
    document: dict[str, Any] = daemon.get("/api/metrics/dashboard", {"from": "-15m"})
    return document


def wait_dashboard(daemon: Daemon, views: int) -> dict[str, Any]:
    seen: list[Any] = []

    def ready() -> dict[str, Any] | None:
        document = dashboard(daemon)
        seen[:] = [document["workbookViews"]]
        return document if document["workbookViews"] == views else None

    try:
        return wait_for(ready, 15, f"workbookViews == {views} in the API")
    except AssertionError as exc:
        health = daemon.get("/healthz")
        raise AssertionError(
            f"{exc}\nlast workbookViews: {seen}; lines received: {health['lines_received']}, "
            f"bad: {health['bad_lines']}, dropped: {health['dropped_samples']}"
            f"\ndaemon log:\n{''.join(daemon.log)}"
        ) from None


def cards(page: Page) -> dict[str, dict[str, Any]]:
    """Each card's number as the page holds it (data-value) and as it shows it (text)."""
    shown: dict[str, dict[str, Any]] = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('.card')].map((card) => {
            const num = card.querySelector('.num');
            return [card.dataset.name, {
              value: num.dataset.value === undefined ? null : JSON.parse(num.dataset.value),
              text: num.textContent,
            }];
        }))"""
    )
    return shown


def top_list(page: Page, name: str = "topWorkbooks") -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = page.evaluate(
        """(name) => [...document.querySelectorAll(`.toplist[data-name="${name}"] li`)]
            .map((li) => ({id: li.dataset.id, views: JSON.parse(li.dataset.value),
                           text: li.querySelector('.num').textContent}))""",
        name,
    )
    return entries


def chart_lines(page: Page, selector: str) -> list[dict[str, Any]]:
    """The SVG lines drawn under `selector`: name, points, and the path's commands."""
    lines: list[dict[str, Any]] = page.evaluate(
        """(selector) => [...document.querySelectorAll(`${selector} svg path.line`)]
            .map((path) => ({name: path.dataset.line, points: Number(path.dataset.points),
                             d: path.getAttribute('d')}))""",
        selector,
    )
    return lines


def shown_as(value: float) -> str:
    """How the page writes a number: grouped thousands, at most 2 decimals."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def assert_page_shows(page: Page, document: dict[str, Any]) -> None:
    """Every card and the top list hold exactly the API's numbers, and show them."""
    on_page = cards(page)
    scalars = {k: v for k, v in document.items() if not isinstance(v, list)}
    assert {name: card["value"] for name, card in on_page.items()} == scalars
    assert {name: card["text"] for name, card in on_page.items()} == {
        name: shown_as(value) for name, value in scalars.items()
    }
    assert [(e["id"], e["views"], e["text"]) for e in top_list(page)] == [
        (e["id"], e["views"], shown_as(e["views"])) for e in document["topWorkbooks"]
    ]


def page_matches(page: Page, document: dict[str, Any]) -> bool:
    try:
        assert_page_shows(page, document)
    except AssertionError:
        return False
    return True


KNOWN = [
    P + "workbook.views:1|c|#workbook_id:wb-1,user_id:u1",
    P + "workbook.views:1|c|#workbook_id:wb-1,user_id:u2",
    P + "workbook.views:1|c|#workbook_id:wb-2,user_id:u2",
    P + "workbook.views:3|c|#workbook_id:wb-3,user_id:u3",
    P + "workbook.embeds:1|c|#workbook_id:wb-1,user_id:u4,success:true",
    P + "workbook.embeds:1|c|#workbook_id:wb-2,user_id:u4,success:false",
    P + "workbook.errors:1|c|#workbook_id:wb-2,error_type:timeout",
    P + "workbook.load_time:100|ms|#workbook_id:wb-1",
    P + "workbook.load_time:300|ms|#workbook_id:wb-2",
    P + "user.logins:1|c|#user_id:u5",
]
KNOWN_DOCUMENT = {
    "workbookViews": 6,
    "workbookEmbeds": 2,
    "errorRate": 100 / 6,
    "avgLoadTime": 200.0,
    "activeUsers": 5,
    "topWorkbooks": [
        {"id": "wb-3", "views": 3},
        {"id": "wb-1", "views": 2},
        {"id": "wb-2", "views": 1},
    ],
}


def start_with_known_data(start_daemon: DaemonFactory, config: str | None = None) -> Daemon:
    daemon = start_daemon(config)
    daemon.send_udp("\n".join(KNOWN).encode())
    document = wait_dashboard(daemon, 6)
    assert document == KNOWN_DOCUMENT
    return daemon


# ====================================================================== tests


def test_cards_list_and_charts_show_what_the_api_returns(
    start_daemon: DaemonFactory, page: Page
) -> None:
    daemon = start_with_known_data(start_daemon)
    open_page(page, daemon)

    document = dashboard(daemon)
    wait_for(lambda: page_matches(page, document), 10, "the cards to show the API's numbers")
    assert_page_shows(page, document)
    assert page.inner_text("#title") == "Sigma playground"
    assert page.is_hidden("#error")

    # Every chart has drawn its data: one SVG path per line, as many points
    # as the API's chart has, drawn from a move-to command.
    answer = daemon.get("/api/v1/dashboards/sigma_playground", {"from": "-15m"})
    for chart in answer["charts"]:
        expected = [(line["name"], len(line["points"])) for line in chart["lines"]]
        assert all(points >= 1 for _, points in expected), chart

        def drawn(chart: dict[str, Any] = chart, expected: Any = expected) -> bool:
            lines = chart_lines(page, f'.chart[data-name="{chart["name"]}"]')
            return [(line["name"], line["points"]) for line in lines] == expected

        wait_for(drawn, 10, f"chart {chart['name']} drawn")
        for line in chart_lines(page, f'.chart[data-name="{chart["name"]}"]'):
            assert line["d"].startswith("M"), line


def test_new_metrics_show_without_a_reload(start_daemon: DaemonFactory, page: Page) -> None:
    daemon = start_with_known_data(start_daemon)
    open_page(page, daemon)
    wait_for(lambda: page_matches(page, dashboard(daemon)), 10, "the first numbers")
    wait_for(lambda: page.get_attribute("#live", "data-state") == "live", 10, "the live stream")
    page.evaluate("window.stillTheSamePage = true")

    daemon.send_udp(
        (P + "workbook.views:10|c|#workbook_id:wb-new,user_id:u-new").encode(),
        (P + "checkout.latency:12|ms|#region:eu").encode(),
    )
    sent = time.monotonic()
    wait_for(
        lambda: cards(page)["workbookViews"]["value"] == 16,
        LIVE_DEADLINE,
        "the new views on the page without a reload",
    )
    shown_after = time.monotonic() - sent
    wait_for(
        lambda: top_list(page)[0]["id"] == "wb-new",
        LIVE_DEADLINE,
        "the new workbook at the top",
    )
    assert cards(page)["activeUsers"]["value"] == 6
    # ... and the metric explorer offers the new metric, still without a reload
    wait_for(
        lambda: (
            page.locator(
                '#x-metric option[value="sigma_playground.checkout.latency|timer"]'
            ).count()
            == 1
        ),
        LIVE_DEADLINE,
        "the new metric in the explorer",
    )
    assert page.evaluate("window.stillTheSamePage") is True
    assert_page_shows(page, dashboard(daemon))
    print(f"new data shown {shown_after:.2f}s after it was sent (flush interval 1 s)")


def test_the_metric_explorer(start_daemon: DaemonFactory, page: Page) -> None:
    daemon = start_with_known_data(start_daemon)
    open_page(page, daemon)
    metric = P + "workbook.load_time"
    wait_for(
        lambda: page.locator(f'#x-metric option[value="{metric}|timer"]').count() == 1,
        10,
        "the metric list",
    )

    # a stat grouped by a tag: one line and one row per workbook
    page.select_option("#x-metric", f"{metric}|timer")
    assert page.locator("#x-stat option").all_inner_texts()[:2] == ["mean", "p50"]
    page.select_option("#x-stat", "max")
    assert "workbook_id" in page.locator("#x-group option").all_inner_texts()
    page.select_option("#x-group", "workbook_id")
    page.click("#x-show")
    wait_for(lambda: len(chart_lines(page, "#x-result")) == 2, 10, "two explorer lines")
    lines = chart_lines(page, "#x-result")
    assert sorted(line["name"] for line in lines) == ["wb-1", "wb-2"]
    assert all(line["points"] >= 1 and line["d"].startswith("M") for line in lines)
    rows = page.evaluate(
        """() => [...document.querySelectorAll('#x-result tbody tr')].map((tr) =>
            [tr.cells[0].textContent, JSON.parse(tr.cells[1].dataset.value)])"""
    )
    api = daemon.query(metric, ("stat", "max"), ("group_by", "workbook_id"), ("from", "-15m"))
    assert rows == [[s["tags"]["workbook_id"], s["value"]] for s in api["series"]]
    assert rows == [["wb-2", 300.0], ["wb-1", 100.0]]

    # a tag filter, no grouping: one line
    page.select_option("#x-group", "")
    page.select_option("#x-stat", "count")
    page.fill("#x-tag", "workbook_id:wb-1")
    page.click("#x-show")

    def one_row() -> Any:
        return (
            page.evaluate(
                """() => [...document.querySelectorAll('#x-result tbody tr')].map((tr) =>
                JSON.parse(tr.cells[1].dataset.value))"""
            )
            == [1.0]
            and len(chart_lines(page, "#x-result")) == 1
        )

    wait_for(one_row, 10, "the filtered explorer result")
    assert "count" in page.inner_text("#x-result h2")


def test_the_range_picker(start_daemon: DaemonFactory, page: Page) -> None:
    daemon = start_with_known_data(start_daemon)
    open_page(page, daemon, "")
    assert page.get_attribute('#ranges [data-range="24h"]', "aria-pressed") == "true"
    wait_for(lambda: page_matches(page, dashboard(daemon)), 10, "the numbers over 24 h")
    for range_ in ("1h", "7d", "15m"):
        page.click(f'#ranges [data-range="{range_}"]')
        assert page.get_attribute(f'#ranges [data-range="{range_}"]', "aria-pressed") == "true"
        wait_for(lambda r=range_: f"range={r}" in page.url, 5, "the range in the URL")
        wait_for(lambda: page_matches(page, dashboard(daemon)), 10, f"the numbers over {range_}")


def test_a_phone_sized_screen(start_daemon: DaemonFactory, browser: Browser) -> None:
    daemon = start_with_known_data(start_daemon)
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        phone = context.new_page()
        open_page(phone, daemon)
        wait_for(lambda: page_matches(phone, dashboard(daemon)), 10, "the numbers")
        # nothing wider than the screen: no sideways scrolling
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        widths = phone.evaluate(
            """[...document.querySelectorAll('.card, .panel')]
                .map((e) => e.getBoundingClientRect().right)"""
        )
        assert widths and max(widths) <= PHONE["width"]
        assert len(chart_lines(phone, ".chart")) == 5  # views, p50/p95/p99, error rate
    finally:
        context.close()


def test_with_a_token(start_daemon: DaemonFactory, page: Page) -> None:
    config = config_text(extra='[http]\ntoken = "s3cret"\n')
    daemon = start_daemon(config)
    daemon.token = "s3cret"
    daemon.send_udp("\n".join(KNOWN).encode())
    wait_dashboard(daemon, 6)

    # without the token the page says why it shows nothing
    page.goto(f"{daemon.http}/?range=15m")
    wait_for(lambda: page.is_visible("#error"), 10, "the error banner")
    assert "401" in page.inner_text("#error")

    # with ?token= the API calls carry it as a Bearer header, the stream as a parameter
    open_page(page, daemon, "range=15m&token=s3cret")
    wait_for(lambda: page_matches(page, dashboard(daemon)), 10, "the numbers")
    wait_for(lambda: page.get_attribute("#live", "data-state") == "live", 10, "the live stream")
    assert page.is_hidden("#error")
    daemon.send_udp((P + "workbook.views:4|c|#workbook_id:wb-1,user_id:u1").encode())
    wait_for(lambda: cards(page)["workbookViews"]["value"] == 10, LIVE_DEADLINE, "live update")


# ====================================================================== a busy quarter hour


def backfill(seconds: int, seed: int = 7) -> tuple[list[str], int]:
    """A quarter hour of the dashboard's workload, timestamped into the past with |T."""
    rng = random.Random(seed)
    now = int(time.time())
    lines: list[str] = []
    views = 0
    for ts in range(now - seconds, now - 1, 5):
        for _ in range(rng.randint(4, 12)):
            workbook = f"wb-{min(14, int(rng.expovariate(0.3)) + 1)}"
            user = f"u{rng.randint(1, 40)}"
            views += 1
            lines.append(f"{P}workbook.views:1|c|#workbook_id:{workbook},user_id:{user}|T{ts}")
            load = 40 + 900 * rng.random() ** 2.5
            lines.append(f"{P}workbook.load_time:{load:.2f}|ms|#workbook_id:{workbook}|T{ts}")
            if rng.random() < 0.2:
                lines.append(
                    f"{P}workbook.embeds:1|c|#workbook_id:{workbook},user_id:{user},"
                    f"success:{'true' if rng.random() < 0.9 else 'false'}|T{ts}"
                )
            if rng.random() < 0.04:
                lines.append(f"{P}workbook.errors:1|c|#workbook_id:{workbook}|T{ts}")
            if rng.random() < 0.1:
                lines.append(f"{P}user.logins:1|c|#user_id:u{rng.randint(1, 60)}|T{ts}")
    return lines, views


def datagrams(lines: list[str], size: int = 1400) -> list[bytes]:
    """Lines packed into datagrams of at most `size` bytes, as StatsD clients do."""
    packed: list[bytes] = []
    chunk = b""
    for line in lines:
        data = line.encode()
        if chunk and len(chunk) + 1 + len(data) > size:
            packed.append(chunk)
            chunk = b""
        chunk = chunk + b"\n" + data if chunk else data
    return [*packed, chunk] if chunk else packed


def test_a_busy_quarter_hour(start_daemon: DaemonFactory, page: Page) -> None:
    daemon = start_daemon()
    lines, views = backfill(14 * 60)
    daemon.send_udp(*datagrams(lines))
    document = wait_dashboard(daemon, views)
    assert len(document["topWorkbooks"]) == 10

    open_page(page, daemon)
    wait_for(lambda: page_matches(page, dashboard(daemon)), 10, "the numbers")
    views_line = chart_lines(page, '.chart[data-name="views"]')
    assert len(views_line) == 1 and views_line[0]["points"] >= 60  # 10 s buckets over 14 min
    assert views_line[0]["d"].count("L") >= 50  # a line, not scattered dots

    # the explorer draws the six slowest workbooks' p95 over the same buckets
    page.select_option("#x-metric", P + "workbook.load_time|timer")
    page.select_option("#x-stat", "p95")
    page.select_option("#x-group", "workbook_id")
    page.click("#x-show")
    wait_for(lambda: len(chart_lines(page, "#x-result")) == 6, 10, "six explorer lines")
    assert max(line["points"] for line in chart_lines(page, "#x-result")) >= 30

    path = os.environ.get("SCREENSHOT")
    if path:
        # the whole page in the viewport, then the hover read-out on the views chart
        height = page.evaluate("document.documentElement.scrollHeight")
        page.set_viewport_size({"width": DESKTOP["width"], "height": height})
        box = page.locator('.chart[data-name="views"] svg').bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] / 2)
        wait_for(lambda: page.is_visible('.chart[data-name="views"] .tip'), 5, "the read-out")
        page.screenshot(path=path)
        print(f"screenshot saved to {path}")
