"""The HTTP API: thin aiohttp handlers over storage queries.

Every error, whatever its cause, is one JSON shape: {"error": "..."}; a
bad parameter answers 400 and names the parameter. Queries run in a
thread pool so the event loop keeps receiving metrics meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import logging
import math
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from aiohttp import web

from .config import Config
from .model import TYPE_CODES
from .storage import QueryError, Storage

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STORAGE = web.AppKey("storage", Storage)
CONFIG = web.AppKey("config", Config)
HEALTH = web.AppKey("health", Callable[[], dict[str, Any]])
EXECUTOR = web.AppKey("executor", concurrent.futures.Executor)
CLOCK = web.AppKey("clock", Callable[[], float])

MAX_LIMIT = 10_000
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?|100)$")


class BadParameter(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


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
        return int(now - float(match.group(1)) * _UNITS[match.group(2)])
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


def time_range(request: web.Request, default_from: str = "-1h") -> tuple[int, int]:
    now = request.app[CLOCK]()
    start = parse_time("from", request.query.get("from", default_from), now)
    end = parse_time("to", request.query.get("to", "now"), now)
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


def positive_int(request: web.Request, param: str, maximum: int) -> int | None:
    raw = request.query.get(param)
    if raw is None:
        return None
    if not raw.isdigit() or not 0 < int(raw) <= maximum:
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


async def list_metrics(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix")
    type_code = metric_type(request)
    metrics = await _in_thread(request, request.app[STORAGE].list_metrics, prefix, type_code)
    return web.json_response({"metrics": metrics})


async def series(request: web.Request) -> web.Response:
    metric = request.query.get("metric", "")
    if not metric:
        raise BadParameter("metric", "is required")
    start, end = time_range(request)
    step = positive_int(request, "step", 10 * 365 * 86400)
    limit = positive_int(request, "limit", MAX_LIMIT)
    group_by = request.query.get("group_by") or None
    document = await _in_thread(
        request,
        request.app[STORAGE].query_series,
        metric=metric,
        stat=stat_name(request),
        start=start,
        end=end,
        step=step,
        tags=tag_filters(request),
        group_by=group_by,
        limit=limit,
        type_code=metric_type(request),
        now=int(request.app[CLOCK]()),
    )
    return web.json_response(document)


async def events(request: web.Request) -> web.Response:
    start, end = time_range(request, default_from="-1d")
    found = await _in_thread(request, request.app[STORAGE].events, start, end, tag_filters(request))
    return web.json_response({"events": found})


async def checks(request: web.Request) -> web.Response:
    found = await _in_thread(request, request.app[STORAGE].checks, tag_filters(request))
    return web.json_response({"checks": found})


# ------------------------------------------------------------------ middleware


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error shape for everything: {"error": "..."}."""
    try:
        return await handler(request)
    except BadParameter as exc:
        return error_response(400, str(exc))
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

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
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
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/metrics", list_metrics)
    app.router.add_get("/api/v1/series", series)
    app.router.add_get("/api/v1/events", events)
    app.router.add_get("/api/v1/checks", checks)
    return app
