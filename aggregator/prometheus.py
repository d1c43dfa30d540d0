"""`GET /metrics`: the aggregated series in the Prometheus text format (0.0.4).

Two halves, as in prometheus/client_python's exposition.py:

* PURE: :func:`families` turns what is known of each statsd series
  (:class:`Series`, immutable) into metric families, resolving every name
  and label clash, and :func:`render` bakes them into the text.  Neither
  reads a clock nor shares state; tests/test_prometheus.py drives them with
  tables of named cases.
* :class:`Exposition` keeps that knowledge across flushes.  The writer
  thread calls :meth:`Exposition.update` with each flush's rollups; a
  scrape calls :meth:`Exposition.render` in a reader thread, which renders
  once per flush (only if someone scrapes) and otherwise returns the same
  immutable bytes.

Mapping, per statsd type:

* counter -> counter ``<name>_total``, cumulative since the daemon started
  (a restart or an expiry starts it again at 0: Prometheus sees a reset);
* gauge -> gauge, the last value;
* timer, histogram, distribution -> summary: the configured percentiles of
  the latest window that had samples (``quantile`` = p / 100), plus
  ``_sum`` and ``_count`` cumulative since start;
* set -> gauge, the distinct members of the latest window that had samples.

Names: every character outside ``[a-zA-Z0-9_]`` becomes ``_`` (SPEC 5) and
a leading digit gets a ``_`` in front.  Tags become labels the same way; a
tag without a value is left out (Prometheus treats an empty label value as
no label), and ``quantile``, ``le`` and ``__*`` get the prefix
``exported_``.  Series that would clash in the exposition (``a.b`` and
``a_b``; a gauge named like a summary's ``_count``) keep the first in sorted
order; the rest are left out and counted in ``Families.dropped``.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .model import COUNTER, DISTRIBUTION_TYPES, GAUGE, SET, TYPE_NAMES, Rollup, SeriesKey, Tags

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_INVALID = re.compile(r"[^a-zA-Z0-9_]")

#: label names the format gives a meaning (summaries, histograms): a tag of
#: that name becomes exported_quantile / exported_le
RESERVED_LABELS = frozenset({"quantile", "le"})


# ---------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class Series:
    """What the exposition knows of one statsd series.

    counter: ``value`` = cumulative sum.  gauge: ``value`` = last value.
    set: ``value`` = distinct members of the latest window with samples.
    timer/histogram/distribution: ``value`` = cumulative sum, ``count`` =
    cumulative count, ``quantiles`` = (percentile, value) of the latest
    window with samples.
    """

    name: str
    type: str  # wire code
    tags: Tags
    value: float
    count: float = 0.0
    quantiles: tuple[tuple[float, float], ...] = ()


class SeriesLike(Protocol):
    """What :func:`families` reads of a series (a Series, or the state's entries)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def tags(self) -> Tags: ...
    @property
    def value(self) -> float: ...
    @property
    def count(self) -> float: ...
    @property
    def quantiles(self) -> tuple[tuple[float, float], ...]: ...


Labels = tuple[tuple[str, str], ...]

#: bound of each memo of cleaned names and labels (they repeat every flush)
_MEMO = 1 << 17


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: ``# HELP``, ``# TYPE`` and its sample lines."""

    name: str
    type: str  # counter | gauge | summary
    help: str
    samples: tuple[tuple[str, Labels, float], ...]  # (sample name, labels, value)


@dataclass(frozen=True, slots=True)
class Families:
    families: tuple[Family, ...]
    dropped: int  # series left out because they clash with an earlier one


# ---------------------------------------------------------------- names


def metric_name(name: str) -> str:
    """A statsd name as a Prometheus metric name: ``a.b-c`` -> ``a_b_c``."""
    cleaned = _INVALID.sub("_", name)
    if not cleaned or cleaned[0].isdigit():
        cleaned = "_" + cleaned
    return cleaned


def label_name(key: str) -> str:
    """A tag key as a label name; names Prometheus reserves get ``exported_``."""
    cleaned = _INVALID.sub("_", key)
    if not cleaned or cleaned[0].isdigit():
        cleaned = "_" + cleaned
    if cleaned.startswith("__"):
        cleaned = "exported" + cleaned
    return cleaned


@functools.lru_cache(maxsize=_MEMO)
def labels_of(tags: Tags, reserved: frozenset[str] = RESERVED_LABELS) -> Labels:
    """Tags as labels: cleaned names, empty values left out, the first of equal names kept."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for key, value in tags:
        if value == "":
            continue
        name = label_name(key)
        if name in reserved:
            name = "exported_" + name
        if name in seen:
            continue
        seen.add(name)
        out.append((name, value))
    out.sort()
    return tuple(out)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Go's ParseFloat reads every form; whole numbers are written without `.0`."""
    value = float(value)
    if value.is_integer() and -1e15 < value < 1e15:
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


@functools.lru_cache(maxsize=_MEMO)
def _label_text(labels: Labels) -> str:
    """`{k="v",...}`, or "" without labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


def quantile_label(percentile: float) -> str:
    """50 -> "0.5", 99.9 -> "0.999" (the shortest decimal that reads back the same)."""
    return format_value(round(percentile / 100.0, 12))


# ---------------------------------------------------------------- pure: families


_KIND = {COUNTER: "counter", GAUGE: "gauge", SET: "gauge"}
_ORDER = {"c": 0, "g": 1, "ms": 2, "h": 3, "d": 4, "s": 5}


@functools.lru_cache(maxsize=_MEMO)
def _family_name(name: str, kind: str) -> tuple[str, str]:
    base = metric_name(name)
    if kind == COUNTER:
        return (base if base.endswith("_total") else base + "_total"), "counter"
    return base, _KIND.get(kind, "summary")


def _claims(name: str, kind: str) -> tuple[str, ...]:
    """Every sample name a family writes: a summary also writes _sum and _count."""
    return (name, name + "_sum", name + "_count") if kind == "summary" else (name,)


@functools.lru_cache(maxsize=_MEMO)
def _with_quantile(labels: Labels, percentile: float) -> Labels:
    return tuple(sorted((*labels, ("quantile", quantile_label(percentile)))))


def families(series: Iterable[SeriesLike]) -> Families:
    """Group series into families; leave out (and count) every clash.

    Deterministic: families are taken in name order and, within one, series
    in (name, type, tags) order; the first to claim a sample name or a label
    set keeps it.
    """
    grouped: dict[tuple[str, str], list[SeriesLike]] = {}
    for one in series:
        grouped.setdefault(_family_name(one.name, one.type), []).append(one)
    claimed: set[str] = set()
    out: list[Family] = []
    dropped = 0
    for (name, kind), members in sorted(grouped.items()):
        claims = _claims(name, kind)
        if any(c in claimed for c in claims):
            dropped += len(members)
            continue
        claimed.update(claims)
        members.sort(key=lambda s: (s.name, _ORDER.get(s.type, 9), s.tags))
        rows: dict[Labels, SeriesLike] = {}
        for one in members:
            labels = labels_of(one.tags)
            if labels in rows:
                dropped += 1
            else:
                rows[labels] = one
        samples: list[tuple[str, Labels, float]] = []
        for labels, one in sorted(rows.items()):
            if kind != "summary":
                samples.append((name, labels, one.value))
                continue
            for percentile, value in one.quantiles:
                samples.append((name, _with_quantile(labels, percentile), value))
            samples.append((name + "_sum", labels, one.value))
            samples.append((name + "_count", labels, one.count))
        first = members[0]
        help_text = f"statsd {TYPE_NAMES.get(first.type, first.type)} {first.name}"
        out.append(Family(name, kind, help_text, tuple(samples)))
    return Families(tuple(out), dropped)


# ---------------------------------------------------------------- pure: text


def render(families: Iterable[Family]) -> str:
    """The text exposition format, version 0.0.4."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for name, labels, value in family.samples:
            lines.append(f"{name}{_label_text(labels)} {format_value(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def exposition(series: Iterable[SeriesLike]) -> str:
    """Series straight to text (clashes left out)."""
    return render(families(series).families)


# ---------------------------------------------------------------- the state


class _Entry:
    """One series in the state: a SeriesLike, changed in place by each flush."""

    __slots__ = ("count", "name", "quantiles", "seen", "tags", "type", "value", "window")

    def __init__(self, key: SeriesKey, value: float, seen: float, window: int) -> None:
        self.name, self.type, self.tags = key
        self.value = value
        self.count = 0.0
        self.quantiles: tuple[tuple[float, float], ...] = ()
        self.seen = seen  # when it last received samples (clock seconds)
        self.window = window  # start of the latest window its quantiles / set size show


class Exposition:
    """What /metrics serves, kept up to date by the writer thread.

    ``update`` (the writer thread, once per flush) folds the rollups in;
    ``render`` (a reader thread, per scrape) bakes the text the first time
    it is asked after an update and hands out the same immutable bytes
    until the next one, so a daemon nobody scrapes never renders, and a
    busy scraper costs one render per flush. One lock keeps the two apart.
    A series that received nothing for ``expire_after`` seconds (0: never)
    leaves the exposition; persisted gauges that nobody sets expire too.
    """

    def __init__(self, expire_after: float, clock: Callable[[], float]) -> None:
        self.expire_after = expire_after
        self.clock = clock
        self._entries: dict[SeriesKey, _Entry] = {}
        self._first = True
        #: no series can expire before this clock time (see _expire)
        self._next_expiry = 0.0
        self._lock = threading.Lock()
        self._body: bytes | None = b""  # None: to be rendered
        self.series = 0  # series known (after the last update)
        self.dropped = 0  # series left out of the last render (clashes)

    def update(self, rollups: Sequence[Rollup], touched_gauges: Iterable[SeriesKey]) -> None:
        """Fold one flush into the state; the text is rendered on the next scrape.

        ``touched_gauges`` are the gauges that received samples in this
        flush; the other gauge rollups are persisted values carried over,
        which refresh a gauge's value but not its age (on the first flush
        after a start they bring restored gauges in). Runs once per series
        per flush: one loop, each rollup unpacked as the tuple it is.
        """
        with self._lock:
            now = self.clock()
            touched = set(touched_gauges)
            entries = self._entries
            get = entries.get
            first = self._first
            for name, kind, tags, start, count, total, _, _, last, _, quantiles in rollups:
                key = (name, kind, tags)
                entry = get(key)
                if kind == GAUGE:
                    fresh = first or key in touched
                    if entry is None:
                        if fresh:
                            entries[key] = _Entry(key, last, now, start)
                    elif start >= entry.window:
                        entry.value = last
                        entry.window = start
                        if fresh:
                            entry.seen = now
                    continue
                if entry is None:
                    entry = entries[key] = _Entry(key, 0.0, now, start)
                entry.seen = now
                latest = start >= entry.window
                if latest:
                    entry.window = start
                if kind == COUNTER:
                    entry.value += total
                elif kind == SET:
                    if latest:
                        entry.value = count
                elif kind in DISTRIBUTION_TYPES:
                    entry.value += total
                    entry.count += count
                    if latest:
                        entry.quantiles = quantiles
            self._first = False
            if self.expire_after > 0 and now > self._next_expiry:
                self._expire(now)
            self.series = len(entries)
            self._body = None

    def _expire(self, now: float) -> None:
        """Drop the series idle for over ``expire_after``; note when the next may go.

        A series' age only renews, so none can expire before the oldest
        left: the walk over every entry (35 ms at 100k series) runs when
        one is due, not at every flush.
        """
        entries = self._entries
        oldest = now - self.expire_after
        for key in [k for k, e in entries.items() if e.seen < oldest]:
            del entries[key]
        self._next_expiry = min((e.seen for e in entries.values()), default=now) + self.expire_after

    def render(self) -> bytes:
        """The exposition text of the state after the last update."""
        with self._lock:
            if self._body is None:
                result = families(self._entries.values())
                self.dropped = result.dropped
                self._body = render(result.families).encode()
            return self._body
