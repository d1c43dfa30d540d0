"""The HTTP API: thin aiohttp handlers over storage queries.

Every error, whatever its cause, is one JSON shape: {"error": "..."}; a
bad parameter answers 400 and names the parameter. Queries run in a
thread pool so the event loop keeps receiving metrics meanwhile.

Besides the JSON API: the dashboard page (`/`, `/static/*`, no token
needed: it holds no data) and `/api/v1/stream`, server-sent events, one
per stored flush, which the page uses to refetch at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from . import dashboards
from .config import Config
from .model import TYPE_CODES
from .operations import QueryGuard
from .prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from .prometheus import Exposition
from .storage import MAX_POINTS, QueryError, Storage

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STORAGE = web.AppKey("storage", Storage)
CONFIG = web.AppKey("config", Config)
HEALTH: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("health")
LIMITS_REPORT: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("limits_report")


class LiveConfig:
    """The configuration in force. SIGHUP swaps in a new one: the dashboards
    are read from here at every request (the rest of Config needs a restart)."""

    __slots__ = ("current",)

    def __init__(self, config: Config) -> None:
        self.current = config


LIVE = web.AppKey("live_config", LiveConfig)
GUARD = web.AppKey("query_guard", QueryGuard)
EXECUTOR = web.AppKey("executor", concurrent.futures.Executor)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")

MAX_LIMIT = 10_000
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?|100)$")
MAX_STEP = 10 * 365 * 86400
#: an idle event stream gets a comment this often, so proxies keep it open
KEEPALIVE_SECONDS = 15.0
STREAM_PATH = "/api/v1/stream"
STATIC = Path(__file__).with_name("static")
STATIC_FILES: web.AppKey[frozenset[str]] = web.AppKey("static_files")
EXPOSITION = web.AppKey("exposition", Exposition)


class FlushFeed:
    """Tells waiting HTTP clients (server-sent events) that a flush was stored.

    `publish` runs on the event loop thread; waiters get the flush's summary.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.latest: dict[str, Any] = {}
        self.closed = False
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` at each publish, after `seq` moved, before any waiter wakes."""
        self._listeners.append(listener)

    def publish(self, summary: dict[str, Any]) -> None:
        self.seq += 1
        self.latest = {"seq": self.seq, **summary}
        for listener in self._listeners:
            listener()
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Wake every waiter for good: the HTTP server is shutting down."""
        self.closed = True
        self._changed.set()

    async def wait_after(self, seq: int, timeout: float) -> dict[str, Any] | None:
        """The first flush newer than `seq`, or None after `timeout` seconds or on close."""
        if self.seq > seq:
            return self.latest
        if self.closed:
            return None
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return None
        return self.latest if self.seq > seq else None


FEED = web.AppKey("feed", FlushFeed)


class BadParameter(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class NotFound(Exception):
    """Answers 404 with the message."""


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ------------------------------------------------------------------ parameters


def parse_time(param: str, text: str, now: float) -> int:
    """Unix seconds, ISO 8601, `now`, or relative `-30s` `-15m` `-1h` `-7d`."""
    text = text.strip()
    if text == "now":
        return int(now)
    match = _RELATIVE.match(text)
    if match:
        relative = now - float(match.group(1)) * _UNITS[match.group(2)]
        if not math.isfinite(relative):  # "-999...9s": found by the API fuzzing
            raise BadParameter(param, f"{text!r} is not a time")
        return int(relative)
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise BadParameter(param, f"{text!r} is not a time")
        return int(value)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadParameter(
            param, f"{text!r} is not a time (unix seconds, ISO 8601, now, or -30s/-15m/-1h/-7d)"
        ) from None
    if parsed.tzinfo is None:
        raise BadParameter(param, f"{text!r} has no time zone; add Z or +00:00")
    return int(parsed.timestamp())


#: the last second a time may name (9999-12-31T23:59:59Z): beyond, SQLite's
#: integers overflow (a 500), and no data can exist there anyway
MAX_TIME = 253_402_300_799


def _in_range(param: str, text: str, value: int) -> int:
    if not 0 <= value <= MAX_TIME:
        raise BadParameter(param, f"{text!r} is out of range (0 to year 9999)")
    return value


def time_range(query: Mapping[str, str], now: float, default_from: str = "-1h") -> tuple[int, int]:
    """`from` and `to` of a request's query, at the clock's `now`."""
    text_from = query.get("from", default_from)
    text_to = query.get("to", "now")
    start = _in_range("from", text_from, parse_time("from", text_from, now))
    end = _in_range("to", text_to, parse_time("to", text_to, now))
    if start >= end:
        raise BadParameter("from", "must be before to")
    return start, end


def tag_filters(request: web.Request) -> list[tuple[str, str]]:
    """`tag=k:v` (several allowed); `tag=k` means the value ""."""
    filters = []
    for raw in request.query.getall("tag", []):
        key, _, value = raw.partition(":")
        if not key:
            raise BadParameter("tag", f"{raw!r} is not key:value")
        filters.append((key, value))
    return filters


def positive_int(query: Mapping[str, str], param: str, maximum: int) -> int | None:
    raw = query.get(param)
    if raw is None:
        return None
    # isascii: "¹".isdigit() is True, and int("¹") raises (found by the API fuzzing)
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= maximum:
        raise BadParameter(param, f"{raw!r} is not a whole number from 1 to {maximum}")
    return int(raw)


def metric_type(request: web.Request) -> str | None:
    raw = request.query.get("type")
    if raw is None:
        return None
    if raw not in TYPE_CODES:
        raise BadParameter(
            "type",
            f"{raw!r} is not one of counter, gauge, timer, histogram, "
            "distribution, set (or c, g, ms, h, d, s)",
        )
    return TYPE_CODES[raw]


def stat_name(request: web.Request) -> str | None:
    raw = request.query.get("stat")
    if raw is None:
        return None
    if raw.startswith("p") and not _PERCENTILE.match(raw):
        raise BadParameter("stat", f"{raw!r} is not a percentile like p50, p99 or p99.9")
    return raw


# ------------------------------------------------------------------ handlers


async def _in_thread(request: web.Request, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[EXECUTOR], functools.partial(fn, *args, **kw))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[HEALTH]())


async def prometheus_metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition (rendered in a reader thread, once per flush).

    Like /healthz it needs no token: scrapers usually send none (SPEC 5:
    the token guards /api/*). Serve it to a network only where its metric
    names and tags may be read.
    """
    body = await _in_thread(request, request.app[EXPOSITION].render)
    return web.Response(body=body, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


async def list_metrics(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix")
    type_code = metric_type(request)
    metrics = await _in_thread(request, request.app[STORAGE].list_metrics, prefix, type_code)
    return web.json_response({"metrics": metrics})


async def series(request: web.Request) -> web.Response:
    metric = request.query.get("metric", "")
    if not metric:
        raise BadParameter("metric", "is required")
    start, end = time_range(request.query, request.app[CLOCK]())
    step = positive_int(request.query, "step", MAX_STEP)
    limit = positive_int(request.query, "limit", MAX_LIMIT)
    group_by = request.query.get("group_by") or None
    tags = tag_filters(request)
    type_code = metric_type(request)
    guard = request.app.get(GUARD)
    if guard is not None:
        problem = await _in_thread(request, guard.check, metric, start, end, step, tags, type_code)
        if problem is not None:
            raise BadParameter("from", problem)
    document = await _in_thread(
        request,
        request.app[STORAGE].query_series,
        metric=metric,
        stat=stat_name(request),
        start=start,
        end=end,
        step=step,
        tags=tags,
        group_by=group_by,
        limit=limit,
        type_code=type_code,
        now=int(request.app[CLOCK]()),
    )
    return web.json_response(document)


async def limits(request: web.Request) -> web.Response:
    """What the limits dropped, and the metrics and tag keys responsible (README "Operations")."""
    return web.json_response(request.app[LIMITS_REPORT]())


async def events(request: web.Request) -> web.Response:
    start, end = time_range(request.query, request.app[CLOCK](), default_from="-1d")
    found = await _in_thread(request, request.app[STORAGE].events, start, end, tag_filters(request))
    return web.json_response({"events": found})


async def checks(request: web.Request) -> web.Response:
    found = await _in_thread(request, request.app[STORAGE].checks, tag_filters(request))
    return web.json_response({"checks": found})


async def dashboard_document(request: web.Request) -> web.Response:
    """SPEC section 5: exactly the document of the dashboard named by http.dashboard."""
    name = request.app[LIVE].current.default_dashboard
    if not name:
        raise NotFound("no dashboard is served here (http.dashboard is empty)")
    return await request.app[DOCUMENTS].answer(_Ask(DOCUMENT, name, _range_params(request)))


async def list_dashboards(request: web.Request) -> web.Response:
    config = request.app[LIVE].current
    return web.json_response(
        {
            "default": config.default_dashboard,
            "dashboards": [d.describe() for d in config.dashboards],
        }
    )


async def dashboard(request: web.Request) -> web.Response:
    """One dashboard's values and charts over the range, with the range really covered."""
    ask = _Ask(WITH_CHARTS, request.match_info["name"], _range_params(request))
    return await request.app[DOCUMENTS].answer(ask)


def _range_params(request: web.Request) -> tuple[tuple[str, str], ...]:
    return tuple(
        (key, request.query[key]) for key in ("from", "to", "step") if key in request.query
    )


# ------------------------------------------------------------------ dashboard documents

#: what a dashboard request answers: SPEC's document, or the page's values and charts
DOCUMENT = "document"
WITH_CHARTS = "with_charts"
#: a request asked again within this time (a poller) is computed again after each
#: stored flush, until it has not been asked for this long
WARM_SECONDS = 120.0
#: at most this many requests are remembered, and this many answers kept
MAX_WARM = 8
MAX_DOCUMENTS = 64


@dataclass(frozen=True, slots=True)
class _Ask:
    """A dashboard request as sent: relative times are resolved anew each time."""

    what: str  # DOCUMENT or WITH_CHARTS
    name: str
    params: tuple[tuple[str, str], ...]  # from, to, step as given


class DashboardDocuments:
    """Dashboard answers, computed once per stored flush.

    The stored data changes only when a flush is stored, which bumps
    `FlushFeed.seq`: an answer for the same dashboard definition, aligned
    range, step and seq is the same, and is reused (the JSON bytes). A
    relative range (`-24h`) is resolved at each request, so an answer is
    never staler than the latest stored flush, nor its range than its step.
    A dashboard with a `rate` value also keys on the clock: its divisor
    ends now.

    At each stored flush the answers go, and each request that is being
    polled (asked twice, then again, at most WARM_SECONDS apart) is
    computed again at once in the reader pool, so that pollers find it
    ready; one computation per request at a time, so a slow dashboard never
    piles work up. Concurrent requests for one answer share one
    computation. Errors are not kept.
    """

    def __init__(
        self,
        storage: Storage,
        live: LiveConfig,
        feed: FlushFeed,
        executor: concurrent.futures.Executor,
        clock: Callable[[], float],
    ) -> None:
        self.storage = storage
        self.live = live
        self.feed = feed
        self.executor = executor
        self.clock = clock
        #: computations started (a reuse starts none)
        self.computations = 0
        self._answers: dict[tuple[Any, ...], asyncio.Future[bytes]] = {}
        #: when each request was last asked and whether it is polled; oldest first
        self._asked: dict[_Ask, tuple[float, bool]] = {}
        self._warming: dict[_Ask, asyncio.Future[bytes]] = {}
        feed.subscribe(self._stored)

    async def answer(self, ask: _Ask) -> web.Response:
        key, job = self._plan(ask)  # bad parameters raise here: nothing is kept
        now = self.clock()
        before = self._asked.pop(ask, None)
        self._asked[ask] = (now, before is not None and now - before[0] <= WARM_SECONDS)
        while len(self._asked) > MAX_WARM:
            del self._asked[next(iter(self._asked))]
        body = await asyncio.shield(self._start(key, job))
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    def _plan(self, ask: _Ask) -> tuple[tuple[Any, ...], Callable[[], bytes]]:
        """(the answer's key, the job that computes it) at the clock's now."""
        config = self.live.current
        found = config.dashboard(ask.name)
        if found is None:
            raise NotFound(f"no dashboard named {ask.name!r}; GET /api/v1/dashboards lists them")
        now = self.clock()
        params = dict(ask.params)
        start, end = time_range(params, now, default_from=f"-{found.range}s")
        step = positive_int(params, "step", MAX_STEP)
        if step is None:
            step = dashboards.chart_step(end - start, config.flush_interval)
        first, last = dashboards.aligned(start, end, step)
        if (last - first) // step > MAX_POINTS:
            raise BadParameter(
                "step",
                f"{(last - first) // step} points, more than {MAX_POINTS}: use a larger step",
            )
        rate_now = int(now) if dashboards.divides_by_now(found) else None
        key = (ask.what, found, first, last, step, rate_now, self.feed.seq)
        job = functools.partial(_render, ask.what, self.storage, found, first, last, step, int(now))
        return key, job

    def _start(self, key: tuple[Any, ...], job: Callable[[], bytes]) -> asyncio.Future[bytes]:
        future = self._answers.get(key)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(self.executor, job)
            self.computations += 1
            future.add_done_callback(functools.partial(self._done, key))
            self._answers[key] = future
            while len(self._answers) > MAX_DOCUMENTS:
                del self._answers[next(iter(self._answers))]
        return future

    def _done(self, key: tuple[Any, ...], future: asyncio.Future[bytes]) -> None:
        failed = future.cancelled() or future.exception() is not None
        if failed and self._answers.get(key) is future:
            del self._answers[key]  # the next request tries again, and reports

    def _stored(self) -> None:
        """FlushFeed: a flush was stored. Drop every answer; compute the warm ones anew."""
        self._answers.clear()
        if self.feed.closed:
            return
        since = self.clock() - WARM_SECONDS
        for ask, (when, polled) in list(self._asked.items()):
            if when < since:
                del self._asked[ask]
                continue
            if not polled or ask in self._warming:
                continue
            try:
                key, job = self._plan(ask)
            except (BadParameter, NotFound):  # a dashboard gone with a reload
                del self._asked[ask]
                continue
            future = self._warming[ask] = self._start(key, job)
            future.add_done_callback(functools.partial(self._warmed, ask))

    def _warmed(self, ask: _Ask, future: asyncio.Future[bytes]) -> None:
        if self._warming.get(ask) is future:
            del self._warming[ask]


def _render(
    what: str,
    storage: Storage,
    found: dashboards.Dashboard,
    first: int,
    last: int,
    step: int,
    now: int,
) -> bytes:
    """A reader thread: the answer as JSON bytes."""
    if what == DOCUMENT:
        document = dashboards.evaluate(storage, found, first, last, step, now)
    else:
        values, charts = dashboards.evaluate_all(storage, found, first, last, step, now)
        document = {
            "name": found.name,
            "title": found.title,
            "from": first,
            "to": last,
            "step": step,
            "values": values,
            "charts": charts,
        }
    return json.dumps(document).encode()


DOCUMENTS = web.AppKey("documents", DashboardDocuments)


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one `flush` event per stored flush, a comment when idle."""
    feed = request.app[FEED]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    await response.prepare(request)
    seq = feed.seq
    try:
        # retry: how long a browser waits before reconnecting after a drop
        await response.write(b"retry: 2000\n: connected\n\n")
        while not feed.closed:
            flush = await feed.wait_after(seq, KEEPALIVE_SECONDS)
            if flush is None:
                if not feed.closed:
                    await response.write(b": keep-alive\n\n")
                continue
            seq = flush["seq"]
            data = json.dumps(flush, separators=(",", ":"))
            await response.write(f"id: {seq}\nevent: flush\ndata: {data}\n\n".encode())
    except ConnectionResetError:  # the client went away; nothing to answer
        pass
    return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.FileResponse:
    """Only the files shipped in aggregator/static/, by exact name: no paths, no listing."""
    name = request.match_info["name"]
    if name not in request.app[STATIC_FILES]:
        raise NotFound(f"no file /static/{name}")
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


async def _close_streams(app: web.Application) -> None:
    """on_shutdown: end the event streams, or the server would wait for them."""
    app[FEED].close()


# ------------------------------------------------------------------ middleware


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error shape for everything: {"error": "..."}."""
    try:
        return await handler(request)
    except BadParameter as exc:
        return error_response(400, str(exc))
    except NotFound as exc:
        return error_response(404, str(exc))
    except dashboards.EvaluationError as exc:  # a definition that data contradicts
        log.warning("dashboard: %s", exc)
        return error_response(500, str(exc))
    except QueryError as exc:
        status = 404 if exc.param == "metric" and "not found" in exc.message else 400
        return error_response(status, f"{exc.param}: {exc.message}")
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason)
    except Exception:
        log.exception("error answering %s", request.path_qs)
        return error_response(500, "internal error; see the daemon's log")


def auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()
    bare = token.encode()

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            given = request.headers.get("Authorization", "").encode()
            allowed = hmac.compare_digest(given, expected)
            if not allowed and request.path == STREAM_PATH:
                # EventSource cannot send headers: the stream takes ?token= too.
                allowed = hmac.compare_digest(request.query.get("token", "").encode(), bare)
            if not allowed:
                return error_response(401, "missing or wrong token (Authorization: Bearer ...)")
        return await handler(request)

    return require_token


def create_app(
    *,
    storage: Storage,
    config: Config,
    health: Callable[[], dict[str, Any]],
    executor: concurrent.futures.Executor,
    clock: Callable[[], float],
    feed: FlushFeed,
    exposition: Exposition | None = None,
    live: LiveConfig | None = None,
    guard: QueryGuard | None = None,
    limits_report: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    middlewares = [json_errors]
    if config.token:
        middlewares.append(auth_middleware(config.token))
    app = web.Application(middlewares=middlewares)
    app[STORAGE] = storage
    app[CONFIG] = config
    app[HEALTH] = health
    app[EXECUTOR] = executor
    app[CLOCK] = clock
    app[FEED] = feed
    app[EXPOSITION] = exposition if exposition is not None else Exposition(0, clock)
    app[LIVE] = live if live is not None else LiveConfig(config)
    app[DOCUMENTS] = DashboardDocuments(storage, app[LIVE], feed, executor, clock)
    if guard is not None:
        app[GUARD] = guard
    app[LIMITS_REPORT] = limits_report if limits_report is not None else dict
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", prometheus_metrics)
    app.router.add_get("/api/v1/metrics", list_metrics)
    app.router.add_get("/api/v1/limits", limits)
    app.router.add_get("/api/v1/series", series)
    app.router.add_get("/api/v1/events", events)
    app.router.add_get("/api/v1/checks", checks)
    app.router.add_get("/api/metrics/dashboard", dashboard_document)
    app.router.add_get("/api/v1/dashboards", list_dashboards)
    app.router.add_get("/api/v1/dashboards/{name}", dashboard)
    app.router.add_get(STREAM_PATH, stream, allow_head=False)
    app.router.add_get("/", index)
    app[STATIC_FILES] = frozenset(p.name for p in STATIC.iterdir() if p.is_file())
    app.router.add_get("/static/{name}", static_file)
    app.on_shutdown.append(_close_streams)
    return app
