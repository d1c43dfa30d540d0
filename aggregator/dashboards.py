"""Dashboards: named values computed from stored metrics, defined in config.toml.

A dashboard is a table of named values, each one of:

- a query: a metric, a stat and tag filters -> one number;
- a top list: a query with `group_by` -> [{id, value}, ...], most first,
  ties by id, `limit` entries at most;
- a ratio of two queries times a `scale` (100 for percent), 0 when the
  denominator is 0;
- a count of the distinct values of one tag across several metrics;

plus optional time-series charts, a metric name prefix and a default range.
The shipped `sigma_playground` dashboard reproduces the document of SPEC §5
("The dashboard document").

This module is pure over the storage API: `parse_dashboards` turns the TOML
tables into frozen definitions (config.py calls it and turns its errors
into ConfigError), `evaluate` and `evaluate_charts` ask a storage object
for numbers. Nothing here knows HTTP or asyncio.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .model import DISTRIBUTION_TYPES, TYPE_CODES

Document = dict[str, Any]


class DefinitionError(ValueError):
    """A bad dashboard definition; `key` is the dotted key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key} {message}")
        self.key = key
        self.message = message


class EvaluationError(Exception):
    """A query of a dashboard failed for a reason other than missing data."""


class SeriesStore(Protocol):
    """What evaluation needs from storage.Storage."""

    def query_series(
        self,
        metric: str,
        stat: str | None,
        start: int,
        end: int,
        step: int | None,
        tags: list[tuple[str, str]],
        group_by: str | None,
        limit: int | None,
        type_code: str | None,
        now: int,
        points: bool = True,
    ) -> dict[str, Any]: ...

    def distinct_tag_values(
        self, metrics: list[str], key: str, start: int, end: int
    ) -> set[str]: ...


# ---------------------------------------------------------------- definitions


@dataclass(frozen=True, slots=True)
class Query:
    metric: str  # the full name, prefix included
    stat: str | None = None  # None: the type's default stat
    type_code: str | None = None  # None: whatever type the name has
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Ratio:
    numerator: Query
    denominator: Query
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class Distinct:
    tag: str
    metrics: tuple[str, ...]  # full names


@dataclass(frozen=True, slots=True)
class TopList:
    query: Query
    group_by: str
    limit: int
    fields: tuple[str, str]  # names of the two keys of each entry


Source = Query | Ratio | Distinct | TopList


@dataclass(frozen=True, slots=True)
class Value:
    name: str
    source: Source
    label: str
    unit: str = ""
    decimals: int | None = None  # None: as computed; 0: a JSON integer

    @property
    def kind(self) -> str:
        return _KIND_NAMES[type(self.source)]


@dataclass(frozen=True, slots=True)
class Chart:
    name: str
    title: str
    unit: str
    lines: tuple[tuple[str, Query | Ratio], ...]  # (line name, what it plots)


@dataclass(frozen=True, slots=True, repr=False)
class Dashboard:
    name: str
    title: str
    prefix: str
    range: int  # default range in seconds, ending now
    values: tuple[Value, ...]
    charts: tuple[Chart, ...] = field(default=())

    def __repr__(self) -> str:  # check-config prints the config; keep it short
        return (
            f"Dashboard({self.name!r}, prefix={self.prefix!r}, range={self.range}s, "
            f"values={[v.name for v in self.values]}, charts={[c.name for c in self.charts]})"
        )

    def describe(self) -> dict[str, Any]:
        """The definition as JSON, for `GET /api/v1/dashboards` and the page."""
        return {
            "name": self.name,
            "title": self.title,
            "prefix": self.prefix,
            "range": self.range,
            "values": [
                {
                    "name": v.name,
                    "label": v.label,
                    "unit": v.unit,
                    "kind": v.kind,
                    "decimals": v.decimals,
                    **({"fields": list(v.source.fields)} if isinstance(v.source, TopList) else {}),
                }
                for v in self.values
            ],
            "charts": [
                {
                    "name": c.name,
                    "title": c.title,
                    "unit": c.unit,
                    "lines": [name for name, _ in c.lines],
                }
                for c in self.charts
            ],
        }


_KIND_NAMES: dict[type, str] = {
    Query: "query",
    Ratio: "ratio",
    Distinct: "distinct",
    TopList: "top",
}


# ---------------------------------------------------------------- the shipped dashboard

#: The built-in dashboards, as they appear in config.toml (a test checks
#: that the shipped file shows exactly this). Used when the file has no
#: [dashboards] table.
_VIEWS = {"metric": "workbook.views", "type": "counter", "stat": "sum"}
_ERRORS = {"metric": "workbook.errors", "type": "counter", "stat": "sum"}
_LOAD_TIME = {"metric": "workbook.load_time", "type": "timer"}

BUILTIN: dict[str, Any] = {
    "sigma_playground": {
        "title": "Sigma playground",
        "prefix": "sigma_playground.",
        "range": "24h",
        "values": {
            "workbookViews": {"label": "Workbook views", **_VIEWS, "decimals": 0},
            "workbookEmbeds": {
                "label": "Workbook embeds",
                "metric": "workbook.embeds",
                "type": "counter",
                "stat": "sum",
                "decimals": 0,
            },
            "errorRate": {
                "label": "Error rate",
                "unit": "%",
                "numerator": dict(_ERRORS),
                "denominator": dict(_VIEWS),
                "scale": 100,
            },
            "avgLoadTime": {
                "label": "Average load time",
                "unit": "ms",
                **_LOAD_TIME,
                "stat": "mean",
            },
            "activeUsers": {
                "label": "Active users",
                "distinct": "user_id",
                "metrics": ["workbook.views", "workbook.embeds", "user.logins"],
            },
            "topWorkbooks": {
                "label": "Top workbooks",
                **_VIEWS,
                "group_by": "workbook_id",
                "limit": 10,
                "fields": ["id", "views"],
                "decimals": 0,
            },
        },
        "charts": {
            "views": {
                "title": "Workbook views per interval",
                "lines": {"views": dict(_VIEWS)},
            },
            "load_time": {
                "title": "Load time",
                "unit": "ms",
                "lines": {
                    "p50": {**_LOAD_TIME, "stat": "p50"},
                    "p95": {**_LOAD_TIME, "stat": "p95"},
                    "p99": {**_LOAD_TIME, "stat": "p99"},
                },
            },
            "error_rate": {
                "title": "Error rate",
                "unit": "%",
                "lines": {
                    "errors": {
                        "numerator": dict(_ERRORS),
                        "denominator": dict(_VIEWS),
                        "scale": 100,
                    }
                },
            },
        },
    }
}

# ---------------------------------------------------------------- the keys

#: Every key of a dashboard definition: (key, default, help). The README's
#: configuration reference lists these; parsing rejects anything else.
KEYS: tuple[tuple[str, str, str], ...] = (
    ("dashboards.<name>.title", "the name", "heading of the page"),
    ("dashboards.<name>.prefix", '""', "prepended to every metric name of the dashboard"),
    ("dashboards.<name>.range", '"24h"', "range when a request gives no `from`, ending now"),
    ("dashboards.<name>.values.<value>", "(none)", "a named value of the document"),
    ("<value>.label", "the value's name", "caption on the page"),
    ("<value>.unit", '""', 'shown after the number, e.g. "ms" or "%"'),
    ("<value>.decimals", "(unrounded)", "round to this many decimals; 0 gives a JSON integer"),
    ("<value>.metric", "(none)", "a query: metric name (after the prefix)"),
    ("<value>.stat", "the type's default", "sum, rate, count, last, min, max, mean, unique, pNN"),
    ("<value>.type", "any", "counter, gauge, timer, histogram, distribution or set"),
    ("<value>.tags", "{}", 'tag filters, all must match, e.g. { env = "prod" }'),
    ("<value>.group_by", "(none)", "a top list: one entry per value of this tag"),
    ("<value>.limit", "10", "a top list's longest length"),
    ("<value>.fields", '["id", "value"]', "a top list entry's keys: the tag value, the stat"),
    ("<value>.numerator", "(none)", "a ratio: a query table { metric, stat, type, tags }"),
    ("<value>.denominator", "(none)", "a ratio: a query table; a sum of 0 gives the value 0"),
    ("<value>.scale", "1", "a ratio's factor, 100 for percent"),
    ("<value>.distinct", "(none)", "a distinct count: the tag key whose values are counted"),
    ("<value>.metrics", "(none)", "a distinct count: the metric names searched"),
    ("dashboards.<name>.charts.<chart>.title", "the chart's name", "heading of the chart"),
    ("dashboards.<name>.charts.<chart>.unit", '""', "unit of the y axis"),
    ("dashboards.<name>.charts.<chart>.lines.<line>", "(none)", "a query or ratio table"),
)

_DASHBOARD_KEYS = frozenset(("title", "prefix", "range", "values", "charts"))
_QUERY_KEYS = frozenset(("metric", "stat", "type", "tags"))
_DISPLAY_KEYS = frozenset(("label", "unit", "decimals"))
_TOP_KEYS = frozenset(("group_by", "limit", "fields"))
_RATIO_KEYS = frozenset(("numerator", "denominator", "scale"))
_DISTINCT_KEYS = frozenset(("distinct", "metrics"))
_CHART_KEYS = frozenset(("title", "unit", "lines"))

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PERCENTILE_STAT = re.compile(r"^p(\d{1,2}(?:\.\d+)?|100)$")
_STATS = {
    "c": ("sum", "rate", "count"),
    "g": ("last", "min", "max", "mean"),
    "s": ("unique",),
    **dict.fromkeys(DISTRIBUTION_TYPES, ("mean", "count", "sum", "min", "max", "rate")),
}
_ALL_STATS = {stat for stats in _STATS.values() for stat in stats}
MAX_LIMIT = 1000


def parse_dashboards(raw: Any, duration: Callable[[str], int]) -> tuple[Dashboard, ...]:
    """The [dashboards] table -> definitions; DefinitionError names the bad key.

    `duration` turns "24h" into seconds (config.parse_duration).
    """
    where = "dashboards"
    table = _table(raw, where)
    return tuple(
        _dashboard(name, _table(body, f"{where}.{name}"), f"{where}.{name}", duration)
        for name, body in table.items()
    )


def _dashboard(
    name: str, raw: dict[str, Any], where: str, duration: Callable[[str], int]
) -> Dashboard:
    if not _NAME.match(name):
        raise DefinitionError(where, "is not a valid name (letters, digits, _ . - only)")
    _known(raw, _DASHBOARD_KEYS, where)
    prefix = _string(raw, "prefix", where, "")
    range_text = _string(raw, "range", where, "24h")
    try:
        range_seconds = duration(range_text)
    except ValueError as exc:
        raise DefinitionError(f"{where}.range", str(exc)) from None
    if range_seconds <= 0:
        raise DefinitionError(f"{where}.range", "must be longer than 0s")
    values_where = f"{where}.values"
    values = tuple(
        _value(key, _table(body, f"{values_where}.{key}"), f"{values_where}.{key}", prefix)
        for key, body in _table(raw.get("values", {}), values_where).items()
    )
    charts_where = f"{where}.charts"
    charts = tuple(
        _chart(key, _table(body, f"{charts_where}.{key}"), f"{charts_where}.{key}", prefix)
        for key, body in _table(raw.get("charts", {}), charts_where).items()
    )
    return Dashboard(
        name=name,
        title=_string(raw, "title", where, name),
        prefix=prefix,
        range=range_seconds,
        values=values,
        charts=charts,
    )


def _value(name: str, raw: dict[str, Any], where: str, prefix: str) -> Value:
    if not name:
        raise DefinitionError(where, "needs a non-empty name")
    source: Source
    if "metric" in raw and "group_by" in raw:
        source = _top_list(raw, where, prefix)
    elif "metric" in raw:
        source = _query(raw, where, prefix, _DISPLAY_KEYS)
    elif "numerator" in raw or "denominator" in raw:
        _known(raw, _DISPLAY_KEYS | _RATIO_KEYS, where)
        source = _ratio(raw, where, prefix)
    elif "distinct" in raw:
        _known(raw, _DISPLAY_KEYS | _DISTINCT_KEYS, where)
        source = _distinct(raw, where, prefix)
    else:
        raise DefinitionError(
            where,
            "needs metric (a query, with group_by a top list), numerator and denominator "
            "(a ratio), or distinct and metrics (a distinct tag count)",
        )
    decimals = raw.get("decimals")
    if decimals is not None and (
        isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 12
    ):
        raise DefinitionError(f"{where}.decimals", "must be a whole number from 0 to 12")
    if isinstance(source, Distinct) and decimals is None:
        decimals = 0  # a count is always a whole number
    return Value(
        name=name,
        source=source,
        label=_string(raw, "label", where, name),
        unit=_string(raw, "unit", where, ""),
        decimals=decimals,
    )


def _query(
    raw: dict[str, Any], where: str, prefix: str, extra: frozenset[str] = frozenset()
) -> Query:
    _known(raw, _QUERY_KEYS | extra, where)
    metric = _string(raw, "metric", where, None)
    if not metric:
        raise DefinitionError(f"{where}.metric", "must be a non-empty string")
    type_code: str | None = None
    if "type" in raw:
        type_name = raw["type"]
        if not isinstance(type_name, str) or type_name not in TYPE_CODES:
            raise DefinitionError(
                f"{where}.type",
                "must be one of counter, gauge, timer, histogram, distribution, set",
            )
        type_code = TYPE_CODES[type_name]
    stat: str | None = None
    if "stat" in raw:
        stat = raw["stat"]
        if not isinstance(stat, str) or not (stat in _ALL_STATS or _PERCENTILE_STAT.match(stat)):
            raise DefinitionError(
                f"{where}.stat",
                "must be one of sum, rate, count, last, min, max, mean, unique or a "
                "percentile like p99",
            )
        if type_code is not None and not _stat_fits(stat, type_code):
            raise DefinitionError(
                f"{where}.stat",
                f"{stat!r} is not a stat of a {raw['type']} "
                f"(one of {', '.join(_STATS[type_code])}"
                f"{', pNN' if type_code in DISTRIBUTION_TYPES else ''})",
            )
    tags_raw = raw.get("tags", {})
    if not isinstance(tags_raw, dict) or not all(isinstance(v, str) for v in tags_raw.values()):
        raise DefinitionError(f"{where}.tags", 'must be a table of strings, e.g. { env = "prod" }')
    return Query(
        metric=prefix + metric,
        stat=stat,
        type_code=type_code,
        tags=tuple(sorted(tags_raw.items())),
    )


def _stat_fits(stat: str, type_code: str) -> bool:
    if _PERCENTILE_STAT.match(stat):
        return type_code in DISTRIBUTION_TYPES
    return stat in _STATS[type_code]


def _top_list(raw: dict[str, Any], where: str, prefix: str) -> TopList:
    query = _query(raw, where, prefix, _DISPLAY_KEYS | _TOP_KEYS)
    group_by = raw["group_by"]
    if not isinstance(group_by, str) or not group_by:
        raise DefinitionError(f"{where}.group_by", "must be a tag key (a non-empty string)")
    limit = raw.get("limit", 10)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
        raise DefinitionError(f"{where}.limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    fields = raw.get("fields", ["id", "value"])
    if (
        not isinstance(fields, list)
        or len(fields) != 2
        or not all(isinstance(f, str) and f for f in fields)
        or fields[0] == fields[1]
    ):
        raise DefinitionError(
            f"{where}.fields", 'must be two different names, e.g. ["id", "views"]'
        )
    return TopList(query=query, group_by=group_by, limit=limit, fields=(fields[0], fields[1]))


def _ratio(raw: dict[str, Any], where: str, prefix: str) -> Ratio:
    parts = []
    for part in ("numerator", "denominator"):
        if part not in raw:
            raise DefinitionError(f"{where}.{part}", "is missing (a ratio needs both parts)")
        parts.append(_query(_table(raw[part], f"{where}.{part}"), f"{where}.{part}", prefix))
    scale = raw.get("scale", 1)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise DefinitionError(f"{where}.scale", "must be a number")
    return Ratio(numerator=parts[0], denominator=parts[1], scale=float(scale))


def _distinct(raw: dict[str, Any], where: str, prefix: str) -> Distinct:
    tag = raw["distinct"]
    if not isinstance(tag, str) or not tag:
        raise DefinitionError(f"{where}.distinct", "must be a tag key (a non-empty string)")
    metrics = raw.get("metrics")
    if (
        not isinstance(metrics, list)
        or not metrics
        or not all(isinstance(m, str) and m for m in metrics)
    ):
        raise DefinitionError(f"{where}.metrics", "must be a non-empty list of metric names")
    return Distinct(tag=tag, metrics=tuple(prefix + m for m in metrics))


def _chart(name: str, raw: dict[str, Any], where: str, prefix: str) -> Chart:
    _known(raw, _CHART_KEYS, where)
    lines_where = f"{where}.lines"
    lines_raw = _table(raw.get("lines"), lines_where)
    if not lines_raw:
        raise DefinitionError(lines_where, "needs at least one line")
    lines: list[tuple[str, Query | Ratio]] = []
    for line, body in lines_raw.items():
        line_where = f"{lines_where}.{line}"
        table = _table(body, line_where)
        if "metric" in table:
            lines.append((line, _query(table, line_where, prefix)))
        elif "numerator" in table or "denominator" in table:
            _known(table, _RATIO_KEYS, line_where)
            lines.append((line, _ratio(table, line_where, prefix)))
        else:
            raise DefinitionError(line_where, "needs metric, or numerator and denominator")
    return Chart(
        name=name,
        title=_string(raw, "title", where, name),
        unit=_string(raw, "unit", where, ""),
        lines=tuple(lines),
    )


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DefinitionError(where, "must be a table")
    return value


def _known(raw: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            raise DefinitionError(
                f"{where}.{key}", f"is not a known key here (known: {', '.join(sorted(allowed))})"
            )


def _string(raw: Mapping[str, Any], key: str, where: str, default: str | None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise DefinitionError(f"{where}.{key}", "must be a string")
    return value


# ---------------------------------------------------------------- evaluation


def evaluate(
    store: SeriesStore, dashboard: Dashboard, start: int, end: int, step: int, now: int
) -> Document:
    """The dashboard's document: {value name: number or list}.

    The range is [start, end) widened to whole buckets of `step` seconds, as
    every series query is (see `aligned`); pick the step with `chart_step`.
    No NaN and no infinity ever: a value without data is 0, a list without
    data is [].
    """
    return _Evaluation(store, start, end, step, now).values(dashboard)


def evaluate_charts(
    store: SeriesStore, dashboard: Dashboard, start: int, end: int, step: int, now: int
) -> list[dict[str, Any]]:
    """Every chart's lines as points [[bucket start, value], ...] per `step` seconds."""
    return _Evaluation(store, start, end, step, now).charts(dashboard)


def evaluate_all(
    store: SeriesStore, dashboard: Dashboard, start: int, end: int, step: int, now: int
) -> tuple[Document, list[dict[str, Any]]]:
    """`evaluate` and `evaluate_charts` at once: a query both need runs once."""
    evaluation = _Evaluation(store, start, end, step, now)
    charts = evaluation.charts(dashboard)  # first: the values reuse what they queried
    return evaluation.values(dashboard), charts


def divides_by_now(dashboard: Dashboard) -> bool:
    """Whether a value is a `rate`: over a range that ends after `now`, its
    divisor is the time elapsed until `now`, so the value moves with the clock."""
    return any(
        query.stat == "rate" for value in dashboard.values for query in _queries(value.source)
    )


def _queries(source: Source) -> tuple[Query, ...]:
    if isinstance(source, Query):
        return (source,)
    if isinstance(source, Ratio):
        return (source.numerator, source.denominator)
    if isinstance(source, TopList):
        return (source.query,)
    return ()


def aligned(start: int, end: int, step: int) -> tuple[int, int]:
    """The range a query over [start, end) at `step` really covers: whole buckets."""
    return start // step * step, -(-end // step) * step


Points = list[tuple[int, float]]


class _Evaluation:
    """Queries over one range and step; each distinct query runs once.

    (The shipped dashboard asks for the views sum four times: the value,
    the error rate's denominator, and both charts.) The values need no
    points, and are queried without them: over a day, the points of a
    top list are most of the cost (1.2 s of 1.5 s at 500 series).
    """

    def __init__(self, store: SeriesStore, start: int, end: int, step: int, now: int) -> None:
        self.store = store
        self.start = start
        self.end = end
        self.step = max(1, step)
        self.now = now
        self._cache: dict[tuple[Query, str | None, bool], list[dict[str, Any]]] = {}

    def values(self, dashboard: Dashboard) -> Document:
        document: Document = {}
        for value in dashboard.values:
            where = f"dashboards.{dashboard.name}.values.{value.name}"
            source = value.source
            if isinstance(source, TopList):
                document[value.name] = self._top(source, value.decimals, where)
            else:
                document[value.name] = _rounded(self._number(source, where), value.decimals)
        return document

    def charts(self, dashboard: Dashboard) -> list[dict[str, Any]]:
        charts = []
        for chart in dashboard.charts:
            lines = []
            for name, source in chart.lines:
                where = f"dashboards.{dashboard.name}.charts.{chart.name}.lines.{name}"
                if isinstance(source, Ratio):
                    points = self._ratio_points(source, where)
                else:
                    points = self._points(source, where)
                lines.append({"name": name, "points": [[ts, v] for ts, v in points]})
            charts.append(
                {"name": chart.name, "title": chart.title, "unit": chart.unit, "lines": lines}
            )
        return charts

    def _number(self, source: Source, where: str) -> float:
        if isinstance(source, Query):
            return self._scalar(source, where)
        if isinstance(source, Ratio):
            below = self._scalar(source.denominator, where + ".denominator")
            if below == 0:
                return 0.0
            above = self._scalar(source.numerator, where + ".numerator")
            return source.scale * above / below
        if isinstance(source, Distinct):
            first, last = aligned(self.start, self.end, self.step)
            found = self.store.distinct_tag_values(list(source.metrics), source.tag, first, last)
            return float(len(found))
        raise TypeError(source)  # pragma: no cover - a TopList is not a number

    def _scalar(self, query: Query, where: str) -> float:
        found = self._series(query, None, where, points=False)
        return _finite(found[0]["value"]) if found else 0.0

    def _top(self, top: TopList, decimals: int | None, where: str) -> list[dict[str, Any]]:
        # Every group, not storage's first `limit`: ties at the cut are broken
        # here by id, which storage's order does not promise.
        found = self._series(top.query, top.group_by, where, points=False)
        ranked = sorted(
            ((str(s["tags"].get(top.group_by, "")), _finite(s["value"])) for s in found),
            key=lambda item: (-item[1], item[0]),
        )
        id_field, value_field = top.fields
        return [
            {id_field: group, value_field: _rounded(value, decimals)}
            for group, value in ranked[: top.limit]
        ]

    def _points(self, query: Query, where: str) -> Points:
        found = self._series(query, None, where, points=True)
        if not found:
            return []
        return [(int(ts), _finite(v)) for ts, v in found[0]["points"]]

    def _ratio_points(self, ratio: Ratio, where: str) -> Points:
        """Per bucket: scale * numerator / denominator, 0 where the denominator is 0."""
        above = dict(self._points(ratio.numerator, where + ".numerator"))
        below = dict(self._points(ratio.denominator, where + ".denominator"))
        return [
            (ts, ratio.scale * above.get(ts, 0.0) / below[ts] if below.get(ts) else 0.0)
            for ts in sorted(above.keys() | below.keys())
        ]

    def _series(
        self, query: Query, group_by: str | None, where: str, points: bool
    ) -> list[dict[str, Any]]:
        """The query's series, with points if asked (or if a chart already asked)."""
        with_points = self._cache.get((query, group_by, True))
        if with_points is not None:
            return with_points
        key = (query, group_by, points)
        if key not in self._cache:
            self._cache[key] = self._query(query, group_by, where, points)
        return self._cache[key]

    def _query(
        self, query: Query, group_by: str | None, where: str, points: bool
    ) -> list[dict[str, Any]]:
        from .storage import QueryError  # config imports this module; keep storage out of it

        try:
            document = self.store.query_series(
                metric=query.metric,
                stat=query.stat,
                start=self.start,
                end=self.end,
                step=self.step,
                tags=list(query.tags),
                group_by=group_by,
                limit=None,
                type_code=query.type_code,
                now=self.now,
                points=points,
            )
        except QueryError as exc:
            if exc.param == "metric" and "not found" in exc.message:
                return []  # nothing stored under that name yet: the value is 0
            raise EvaluationError(f"{where}: {exc.param}: {exc.message}") from None
        series: list[dict[str, Any]] = document["series"]
        return series


def _finite(value: Any) -> float:
    number = float(value) if value is not None else 0.0
    return number if math.isfinite(number) else 0.0


def _rounded(value: float, decimals: int | None) -> float | int:
    value = _finite(value)
    if decimals is None:
        return value
    if decimals == 0:
        return round(value)
    return round(value, decimals)


# ---------------------------------------------------------------- steps

_NICE_STEPS = (
    1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800,
    21600, 43200, 86400,
)  # fmt: skip
TARGET_POINTS = 150


def chart_step(span: int, resolution: int) -> int:
    """A round bucket width giving at most about TARGET_POINTS buckets over `span`.

    Always a multiple of `resolution` (the flush interval), since no finer
    rollups exist.
    """
    wanted = max(1, math.ceil(span / TARGET_POINTS), resolution)
    for step in _NICE_STEPS:
        if step >= wanted and step % resolution == 0:
            return step
    return math.ceil(wanted / resolution) * resolution
