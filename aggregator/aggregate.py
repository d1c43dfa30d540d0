"""Per-window aggregation: samples in, rollups out (SPEC section 4).

Two halves with one owner each:

* :class:`Aggregator` is fed by the listener side (``add``, the hot path:
  hundreds of thousands of samples a second) and swapped by the flush loop.
  It only appends raw values to per-window dicts; nothing costly (no log(),
  no sorting, no sketch) runs per sample.
* :func:`snapshot` turns one :class:`ClosedWindow` into rollups.  It is pure
  and reads only what ``swap`` handed over, so it may run in another thread
  while ``add`` fills the next window.

Semantics, with the row of ``CONFORMANCE.md`` each follows:

* counter: sum += value / rate, count += 1 / rate (``foo:1|c|@0.1`` -> +10);
  min = max = last = sum, the window's value.
* gauge: a delta (``+3`` / ``-5``, Etsy statsd) adds to the persisted value,
  even one from an earlier window; a never-seen gauge starts at 0.  With
  ``gauge_deltas=False`` the signed value is absolute.  Every persisted gauge
  is emitted in every window, unchanged ones with last = min = max = value.
  min and max cover every value the gauge held during the window, which
  includes the value it carried in from the previous window until the first
  change.  sum = last, count = 1.  Sample rates are ignored.
* timer / histogram / distribution: weight = 1 / rate; count = sum of
  weights, sum = sum(value * weight), last = last value received; exact
  weighted nearest-rank percentiles from the raw values, and the sketch.
  The raw values are kept packed (``pack_value``: a bytearray of C
  doubles), a quarter of the memory of a list of floats, and an ingest
  worker's are pickled as one block each.
* set: count = distinct members (exact for the window); sum = min = max =
  last = count; the state is a SetState.  Rates are ignored.
* ``|T`` timestamps: a sample lands in the window of its timestamp (the open
  window when it falls there).  Such a window is closed at the next swap,
  which may repeat a (series, start) that an earlier flush already wrote: the
  writer must merge those rows, not replace them (ClosedWindow.timestamped).
  A gauge in a timestamped window sets that window's value only, never the
  persisted current value; a delta there applies to the window's last value,
  else to the current persisted value.
"""

from __future__ import annotations

import math
import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from .fastpath import sketch_native
from .limits import TIMESTAMP_OUT_OF_RANGE, Budget, Drops, Limits
from .model import COUNTER, DISTRIBUTION_TYPES, GAUGE, SET, Rollup, Sample, SeriesKey
from .sketch import (
    INV_LOG_GAMMA,
    MAX_BUCKETS,
    RANK_EPSILON,
    SET_EXACT_LIMIT,
    SetState,
    Sketch,
    sketch_bytes,
)

__all__ = [
    "Aggregator",
    "ClosedWindow",
    "WorkerAggregator",
    "exact_quantiles",
    "merge_worker_windows",
    "pack_value",
    "snapshot",
    "timer_values",
]

#: a timer's raw values: 8 bytes each, C doubles in native byte order
_VALUE = struct.Struct("d")
VALUE_SIZE = _VALUE.size
pack_value = _VALUE.pack


def timer_values(packed: bytes | bytearray) -> list[float]:
    """The floats of a window's packed timer values, in arrival order."""
    return array("d", packed).tolist()


class _Window:
    """The raw state of one window, owned by the Aggregator until swapped out."""

    __slots__ = ("counters", "gauges", "sets", "start", "timers", "weights")

    def __init__(self, start: int) -> None:
        self.start = start
        #: key -> [sum of value/rate, sum of 1/rate]
        self.counters: dict[SeriesKey, list[float]] = {}
        #: key -> raw values in arrival order, packed (pack_value)
        self.timers: dict[SeriesKey, bytearray] = {}
        #: key -> weights parallel to timers[key]; only for series that saw a
        #: rate below 1, and possibly shorter than the values (missing = 1.0)
        self.weights: dict[SeriesKey, list[float]] = {}
        #: key -> [last, min, max] of the gauges touched in this window
        self.gauges: dict[SeriesKey, list[float]] = {}
        #: key -> distinct members
        self.sets: dict[SeriesKey, set[str]] = {}

    def __len__(self) -> int:
        return len(self.counters) + len(self.timers) + len(self.gauges) + len(self.sets)


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    """What ``swap`` hands to :func:`snapshot`: one window's raw state.

    ``persisted`` is a shallow copy of every persisted gauge at the swap, for
    the window that was open (all of them are emitted); it is None for a
    window made of ``|T`` samples only (``timestamped`` is then True).
    """

    start: int
    counters: dict[SeriesKey, list[float]]
    timers: dict[SeriesKey, bytearray]
    weights: dict[SeriesKey, list[float]]
    gauges: dict[SeriesKey, list[float]]
    sets: dict[SeriesKey, set[str]]
    persisted: dict[SeriesKey, float] | None

    @property
    def timestamped(self) -> bool:
        """True for a window of ``|T`` samples: its rows may need merging."""
        return self.persisted is None

    @classmethod
    def _of(cls, window: _Window, persisted: dict[SeriesKey, float] | None) -> ClosedWindow:
        return cls(
            window.start,
            window.counters,
            window.timers,
            window.weights,
            window.gauges,
            window.sets,
            persisted,
        )


class Aggregator:
    """Accumulates samples into aligned windows; one owner (the intake side)."""

    def __init__(
        self,
        interval: int,
        percentiles: Sequence[float],
        gauge_deltas: bool = True,
        limits: Limits | None = None,
        drops: Drops | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.interval = interval
        self.percentiles = tuple(float(p) for p in percentiles)
        self.gauge_deltas = gauge_deltas
        #: limits.py: asked only when a sample would create a new series
        self.limits = limits if limits is not None else Limits()
        self.drops = drops if drops is not None else Drops()
        self._budget = Budget(self.limits, self.drops)
        self._open = _Window(0)
        #: windows of |T samples outside the open window, by start
        self._timestamped: dict[int, _Window] = {}
        #: the current value of every gauge ever set (SPEC 4: gauges persist)
        self._gauges: dict[SeriesKey, float] = {}
        #: the limits as the last swap left them: the ingest workers' windows
        #: are merged under them (merge_worker_windows)
        self.spent = Budget(self.limits, self.drops)
        #: swaps so far: which open window this is (``open`` only aligns its start)
        self.swaps = 0

    def open(self, start: int) -> None:
        """Set the start of the open window (the flush loop calls it once at startup)."""
        self._open.start = start

    @property
    def start(self) -> int:
        """Start of the open window."""
        return self._open.start

    @property
    def series_count(self) -> int:
        """Distinct series the open window will emit (every persisted gauge included)."""
        w = self._open
        return len(w.counters) + len(w.timers) + len(w.sets) + len(self._gauges)

    def holds(self, key: SeriesKey) -> bool:
        """Is the series in the open window (no limit refused it)?"""
        w = self._open
        return key in w.counters or key in w.timers or key in w.gauges or key in w.sets

    def gauges(self) -> dict[SeriesKey, float]:
        """A copy of the persisted gauge values (to carry across a restart)."""
        return dict(self._gauges)

    def restore_gauges(self, gauges: dict[SeriesKey, float]) -> None:
        """Load gauge values saved by a previous run; later samples override them."""
        self._gauges.update(gauges)
        self._budget.count_gauges([name for name, _, _ in self._gauges])

    def carry_gauges(self, gauges: dict[SeriesKey, float]) -> None:
        """Persist gauge values that ingest workers moved (merge_worker_windows)."""
        new = any(key not in self._gauges for key in gauges)
        self._gauges.update(gauges)
        if new:
            self._budget.count_gauges([name for name, _, _ in self._gauges])

    def window_parts(self) -> tuple[Any, ...]:
        """What the C fast path updates in place, in the order ``Routes.feed`` takes it.

        The open window's counters, timers, weights, gauges and sets, the
        persisted gauges, the limits' budget (whose ``admit`` the C path
        does in C, _admission.h), ``gauge_deltas``, whether gauges are kept
        as a worker keeps them, and the worker's ``now``.
        """
        w = self._open
        return (
            w.counters,
            w.timers,
            w.weights,
            w.gauges,
            w.sets,
            self._gauges,
            self._budget,
            self.gauge_deltas,
            False,
            0.0,
        )

    def add(self, samples: Iterable[Sample], limited: bool = True) -> None:
        """Fold samples into their windows.  The hot path: keep it lean.

        Each branch does a dict lookup and an append or two float adds;
        memory is allocated only for a series' first sample in a window, and
        only then are the limits consulted (``limited=False`` skips them: the
        daemon's own metrics).
        """
        w = self._open
        start = w.start
        interval = self.interval
        counters = w.counters
        timers = w.timers
        sets = w.sets
        persisted = self._gauges
        admit = self._budget.admit if limited else None
        value: Any
        for sample in samples:
            name, kind, tags, value, rate, ts, delta = sample
            if ts is not None and ts - ts % interval != start:
                self._add_timestamped(sample, ts - ts % interval, admit)
                continue
            if kind == COUNTER:
                key = (name, kind, tags)
                acc = counters.get(key)
                if acc is None:
                    if admit is not None and not admit(name, tags, len(persisted)):
                        continue
                    counters[key] = [value, 1.0] if rate == 1.0 else [value / rate, 1.0 / rate]
                elif rate == 1.0:
                    acc[0] += value
                    acc[1] += 1.0
                else:
                    acc[0] += value / rate
                    acc[1] += 1.0 / rate
            elif kind in DISTRIBUTION_TYPES:
                key = (name, kind, tags)
                values = timers.get(key)
                if values is None:
                    if admit is not None and not admit(name, tags, len(persisted)):
                        continue
                    timers[key] = values = bytearray(pack_value(value))
                else:
                    values += pack_value(value)
                if rate != 1.0:
                    _add_weight(w.weights, key, len(values) // VALUE_SIZE, 1.0 / rate)
            elif kind == GAUGE:
                self._add_gauge((name, kind, tags), value, delta, admit)
            elif kind == SET:
                key = (name, kind, tags)
                members = sets.get(key)
                if members is None:
                    if admit is not None and not admit(name, tags, len(persisted)):
                        continue
                    sets[key] = {value}
                else:
                    members.add(value)
            # any other code cannot come out of the parser; ignore it

    def _add_gauge(self, key: SeriesKey, value: float, delta: bool, admit: Any = None) -> None:
        """Set (or move, for a delta) a gauge in the open window."""
        persisted = self._gauges
        prior = persisted.get(key)
        if prior is None and admit is not None and not admit(key[0], key[2], len(persisted), True):
            return  # a new gauge past a limit
        if delta and self.gauge_deltas:
            value = (prior or 0.0) + value
        persisted[key] = value
        stats = self._open.gauges.get(key)
        if stats is None:
            if prior is None:
                self._open.gauges[key] = [value, value, value]
            else:
                # the carried-in value was held from the window start until now
                self._open.gauges[key] = [value, min(prior, value), max(prior, value)]
        else:
            stats[0] = value
            if value < stats[1]:
                stats[1] = value
            elif value > stats[2]:
                stats[2] = value

    def _add_timestamped(self, sample: Sample, start: int, admit: Any = None) -> None:
        """A ``|T`` sample outside the open window: rare, so simple beats fast.

        Its window must lie within ``limits.max_timestamp_age`` before the
        open window and ``limits.max_timestamp_future`` after it; beyond, the
        sample is dropped (a hostile T would otherwise open any number of
        windows, and storage could not keep them anyway).
        """
        now = self._open.start
        limits = self.limits
        if admit is not None and not (
            now - limits.max_timestamp_age <= start <= now + limits.max_timestamp_future
        ):
            self.drops.drop(TIMESTAMP_OUT_OF_RANGE, sample.name, ())
            return
        window = self._timestamped.get(start)
        if window is None:
            window = _Window(start)
        key: SeriesKey = (sample.name, sample.type, sample.tags)
        if (
            admit is not None
            and not _has(window, key)
            and not admit(sample.name, sample.tags, len(self._gauges))
        ):
            return
        self._timestamped[start] = window
        value: Any = sample.value
        kind = sample.type
        rate = sample.rate
        if kind == COUNTER:
            acc = window.counters.setdefault(key, [0.0, 0.0])
            acc[0] += value / rate
            acc[1] += 1.0 / rate
        elif kind in DISTRIBUTION_TYPES:
            values = window.timers.setdefault(key, bytearray())
            values += pack_value(value)
            if rate != 1.0:
                _add_weight(window.weights, key, len(values) // VALUE_SIZE, 1.0 / rate)
        elif kind == GAUGE:
            stats = window.gauges.get(key)
            if sample.delta and self.gauge_deltas:
                base = stats[0] if stats is not None else self._gauges.get(key, 0.0)
                value = base + value
            if stats is None:
                window.gauges[key] = [value, value, value]
            else:
                stats[0] = value
                stats[1] = min(stats[1], value)
                stats[2] = max(stats[2], value)
        elif kind == SET:
            window.sets.setdefault(key, set()).add(value)

    def swap(self, next_start: int) -> list[ClosedWindow]:
        """Close the open window and every timestamped one; open ``next_start``.

        O(number of windows) plus one C-level copy of the persisted gauge dict;
        the open window comes first, then timestamped windows by start.
        Timestamped windows that received nothing are not returned.
        """
        closed = [ClosedWindow._of(self._open, dict(self._gauges))]
        for start in sorted(self._timestamped):
            closed.append(ClosedWindow._of(self._timestamped[start], None))
        self._open = _Window(next_start)
        self._timestamped = {}
        self.swaps += 1
        self.spent = self._budget.copy()
        self._budget.reset()
        return closed


class WorkerAggregator(Aggregator):
    """The window of an ingest worker (worker.py), merged into the daemon's at flush.

    Counters, timers and sets are kept exactly as the daemon keeps them. A
    gauge cannot be: its value carries across windows and a delta moves it,
    and only the daemon holds that value. So a worker keeps, per gauge of
    the open window, ``[at, value, low, high]``: ``at`` is the arrival time
    (``now``, set per socket read) of the window's last absolute value and
    ``value`` that value plus the deltas after it; for a window of deltas
    only, ``at`` is -1.0, ``value`` their sum and low/high the extremes of
    the running sum. :func:`merge_worker_windows` applies them.
    """

    def __init__(
        self,
        interval: int,
        gauge_deltas: bool = True,
        limits: Limits | None = None,
        drops: Drops | None = None,
    ) -> None:
        super().__init__(interval, (), gauge_deltas, limits, drops)
        #: arrival time of the samples being added (time.monotonic(), per read)
        self.now = 0.0

    def window_parts(self) -> tuple[Any, ...]:
        return (*super().window_parts()[:8], True, self.now)

    def _add_gauge(self, key: SeriesKey, value: float, delta: bool, admit: Any = None) -> None:
        gauges = self._open.gauges
        entry = gauges.get(key)
        if entry is None and admit is not None and not admit(key[0], key[2], 0):
            return
        if delta and self.gauge_deltas:
            if entry is None:
                gauges[key] = [-1.0, value, min(0.0, value), max(0.0, value)]
                return
            value += entry[1]
        elif entry is None or entry[0] < 0.0:
            # the first absolute value: the deltas before it no longer matter
            gauges[key] = [self.now, value, value, value]
            return
        else:
            entry[0] = self.now
        entry[1] = value
        if value < entry[2]:
            entry[2] = value
        elif value > entry[3]:
            entry[3] = value


def merge_worker_windows(
    closed: list[ClosedWindow], parts: Iterable[ClosedWindow], budget: Budget | None = None
) -> dict[SeriesKey, float]:
    """Fold the windows that ingest workers swapped out into the daemon's ``closed``.

    ``closed`` is what the daemon's own :meth:`Aggregator.swap` returned (the
    open window first) and is changed in place; ``parts`` are the workers'
    windows, each worker's open one with ``persisted`` == {}. ``budget``
    (``Aggregator.spent``: the limits, counted on from the daemon's own
    windows) admits every series new to the flush.
    Returns the gauges whose value the workers moved, to persist.

    Counters add up, timer values and their weights are appended, set
    members joined. Gauges (see :class:`WorkerAggregator`): the latest
    absolute value by arrival wins, then every delta the other workers saw
    is added; with no absolute value, all the deltas add to the value the
    daemon holds. The order of a delta and an absolute value that two
    workers read in the same window is not known; this takes the delta as
    the later.
    """
    by_start = {w.start: w for w in closed if w.timestamped}
    opened = closed[0]
    reports: list[dict[SeriesKey, list[float]]] = []  # each worker's open-window gauges
    for part in parts:
        if part.persisted is not None and part.start == opened.start:
            target = opened
            reports.append(part.gauges)
        else:
            found = by_start.get(part.start)
            if found is None:
                found = by_start[part.start] = ClosedWindow(part.start, {}, {}, {}, {}, {}, None)
                closed.append(found)
            target = found
            _merge_window_gauges(target, part)
        _merge_series(target, part, budget, len(opened.persisted or ()))
    moved = _resolve_gauges(opened, reports, budget)
    closed[1:] = sorted(closed[1:], key=lambda w: w.start)
    return moved


def _merge_series(
    target: ClosedWindow, part: ClosedWindow, budget: Budget | None, persisted: int
) -> None:
    """Counters, timers and sets of a worker's window into the daemon's; in C
    when the extension is built (``_sketchfast.merge_series``), which asks
    ``budget.admit`` only about series that reach a limit."""
    if sketch_native is not None:
        sketch_native.merge_series(target, part, budget, persisted)
        return
    admit = None if budget is None else budget.admit
    counters = target.counters
    for key, acc in part.counters.items():
        mine = counters.get(key)
        if mine is not None:
            mine[0] += acc[0]
            mine[1] += acc[1]
        elif admit is None or admit(key[0], key[2], persisted):
            counters[key] = acc
    timers, weights = target.timers, target.weights
    for key, values in part.timers.items():
        held = timers.get(key)
        theirs = part.weights.get(key)
        if held is None:
            if admit is None or admit(key[0], key[2], persisted):
                timers[key] = values
                if theirs is not None:
                    weights[key] = theirs
            continue
        ours = weights.get(key)
        if ours is not None or theirs is not None:
            column = list(ours or ())
            column.extend([1.0] * (len(held) // VALUE_SIZE - len(column)))
            column.extend(theirs or ())
            weights[key] = column
        held += values
    sets = target.sets
    for key, members in part.sets.items():
        mine_set = sets.get(key)
        if mine_set is not None:
            mine_set |= members
        elif admit is None or admit(key[0], key[2], persisted):
            sets[key] = members


def _merge_window_gauges(target: ClosedWindow, part: ClosedWindow) -> None:
    """Gauges of a worker's ``|T`` window (``[last, min, max]``, as the daemon keeps them)."""
    gauges = target.gauges
    for key, entry in part.gauges.items():
        # [last, min, max]; a worker's open window adds its arrival time in front
        last, low, high = entry[-3:]
        mine = gauges.get(key)
        if mine is None:
            gauges[key] = [last, low, high]
        else:
            gauges[key] = [last, min(mine[1], low), max(mine[2], high)]


def _resolve_gauges(
    opened: ClosedWindow, parts: list[dict[SeriesKey, list[float]]], budget: Budget | None
) -> dict[SeriesKey, float]:
    """Apply the workers' gauge reports (``[at, value, low, high]`` per
    gauge, each worker's in a dict) to the open window (see
    merge_worker_windows); in C when the extension is built
    (``_sketchfast.resolve_gauges``: about 3 µs a gauge at 100k series
    against 6 in Python, the rest being dict operations on keys fresh from
    the workers' pickles)."""
    persisted = opened.persisted
    assert persisted is not None
    gauges = opened.gauges
    if sketch_native is not None:
        return sketch_native.resolve_gauges(gauges, persisted, parts, budget, math.fsum)  # type: ignore[no-any-return]
    admit = None if budget is None else budget.admit
    reports: dict[SeriesKey, list[list[float]]] = {}
    for part in parts:
        for key, entry in part.items():
            reports.setdefault(key, []).append(entry)
    moved: dict[SeriesKey, float] = {}
    for key, entries in reports.items():
        base = persisted.get(key)
        if base is None and admit is not None and not admit(key[0], key[2], len(persisted), True):
            continue
        deltas = math.fsum(e[1] for e in entries if e[0] < 0.0)
        absolute = [e for e in entries if e[0] >= 0.0]
        if absolute:
            latest = max(absolute, key=lambda e: e[0])
            value = latest[1] + deltas
            lows = [e[2] for e in absolute]
            highs = [e[3] for e in absolute]
        else:
            start = base if base is not None else 0.0
            value = start + deltas
            lows = [start + e[2] for e in entries]
            highs = [start + e[3] for e in entries]
        stats = gauges.get(key)
        if stats is not None:
            lows.append(stats[1])
            highs.append(stats[2])
        elif base is not None:
            lows.append(base)  # held from the window start until the first change
            highs.append(base)
        gauges[key] = [value, min(value, *lows), max(value, *highs)]
        persisted[key] = moved[key] = value
    return moved


def _has(window: _Window, key: SeriesKey) -> bool:
    """Does the window hold the series already?"""
    return any(key in part for part in (window.counters, window.timers, window.gauges, window.sets))


def _add_weight(
    weights: dict[SeriesKey, list[float]], key: SeriesKey, n: int, weight: float
) -> None:
    """Record the weight of a series' n-th value, padding earlier ones with 1.0.

    Weights exist only for series that saw a sample rate below 1, so the
    common unsampled timer pays nothing for them.
    """
    column = weights.get(key)
    if column is None:
        column = weights[key] = []
    if len(column) < n - 1:
        column.extend([1.0] * (n - 1 - len(column)))
    column.append(weight)


def exact_quantiles(
    values: Sequence[float], weights: Sequence[float] | None, percentiles: Sequence[float]
) -> list[float]:
    """Weighted nearest-rank percentiles (p in [0, 100]) of raw values.

    The definition of sketch.py: the smallest x whose cumulative weight is at
    least p/100 of the total (p = 0 gives the minimum).
    """
    if not values:
        raise ValueError("percentile of no values")
    if weights is None:
        ordered = sorted(values)
        n = len(ordered)
        return [ordered[_rank(p, n)] for p in percentiles]
    order = sorted(range(len(values)), key=values.__getitem__)
    cumulative = list(accumulate(weights[i] for i in order))
    total = cumulative[-1]
    last = len(order) - 1
    out = []
    for p in percentiles:
        if p <= 0.0:
            out.append(values[order[0]])
            continue
        position = bisect_left(cumulative, p / 100.0 * total * (1.0 - RANK_EPSILON))
        out.append(values[order[min(position, last)]])
    return out


def _rank(p: float, n: int) -> int:
    """Index of the nearest-rank p-th percentile among n sorted unit-weight values."""
    # p * n is exact for integer p and n: no 0.07 * 100 surprises
    return min(max(math.ceil(p * n / 100.0 * (1.0 - RANK_EPSILON)), 1), n) - 1


def snapshot(closed: ClosedWindow, percentiles: Sequence[float]) -> list[Rollup]:
    """The rollups of one closed window, in no particular order.

    Pure: reads the window, never changes it, so it can run off the intake
    thread. Runs once per series per flush: with the C extension
    (``_sketchfast.window_rollups``) every rollup it can make is made there,
    and the rest here; rollups are built as plain tuples (``_new_rollup``),
    and the percentile ranks are computed once per distinct number of values.
    """
    start = closed.start
    ps = tuple(float(p) for p in percentiles)
    made = None
    if sketch_native is not None:
        made = sketch_native.window_rollups(
            Rollup, start, ps, closed.counters, closed.gauges, closed.persisted,
            closed.timers, closed.weights, closed.sets, _NATIVE_CONSTANTS,
        )  # fmt: skip
    rollups: list[Rollup]
    if made is None:
        rollups = []
        _counter_rollups(closed, rollups.append)
        _gauge_rollups(closed, rollups.append)
        timers: Iterable[SeriesKey] = closed.timers
        sets: Iterable[SeriesKey] = closed.sets
    else:
        rollups, timers, sets = made
    _timer_rollups(closed, timers, ps, rollups.append)
    _set_rollups(closed, sets, rollups.append)
    return rollups


#: what window_rollups needs of sketch.py, and the same fsum
_NATIVE_CONSTANTS = (INV_LOG_GAMMA, MAX_BUCKETS, SET_EXACT_LIMIT, RANK_EPSILON, math.fsum)


def _counter_rollups(closed: ClosedWindow, append: Any) -> None:
    start = closed.start
    for key, (total, count) in closed.counters.items():
        append(_new_rollup(Rollup, (*key, start, count, total, total, total, total, None, ())))


def _timer_rollups(
    closed: ClosedWindow, keys: Iterable[SeriesKey], ps: tuple[float, ...], append: Any
) -> None:
    start = closed.start
    timers, weights = closed.timers, closed.weights
    ranks: dict[int, list[int]] = {}
    for key in keys:
        values = timer_values(timers[key])
        weighted = weights.get(key)
        if weighted is None:
            append(_timer_rollup(key, start, values, ps, ranks))
        else:
            append(_distribution_rollup(key, start, values, weighted, ps))


def _set_rollups(closed: ClosedWindow, keys: Iterable[SeriesKey], append: Any) -> None:
    start = closed.start
    for key in keys:
        members = closed.sets[key]
        n = float(len(members))
        state = SetState.from_members(
            m if isinstance(m, str) else repr(m) for m in members
        ).to_bytes()
        append(_new_rollup(Rollup, (*key, start, n, n, n, n, n, state, ())))


#: Rollup(...) goes through the NamedTuple's Python-level __new__; a flush
#: builds one per series, so build the tuple directly (as protocol.py does
#: for samples). Every field must then be given.
_new_rollup = tuple.__new__


def _gauge_rollups(closed: ClosedWindow, append: Any) -> None:
    """Touched gauges with their window stats, untouched persisted ones flat."""
    start = closed.start
    touched = closed.gauges
    for key, (last, low, high) in touched.items():
        append(_new_rollup(Rollup, (*key, start, 1.0, last, low, high, last, None, ())))
    if closed.persisted is not None:
        for key, value in closed.persisted.items():
            if key not in touched:
                flat = (*key, start, 1.0, value, value, value, value, None, ())
                append(_new_rollup(Rollup, flat))


def _timer_rollup(
    key: SeriesKey,
    start: int,
    values: list[float],
    percentiles: tuple[float, ...],
    ranks: dict[int, list[int]],
) -> Rollup:
    """The rollup of an unsampled timer (every weight 1): the common case.

    ``ranks`` caches, by number of values, where each percentile falls.
    """
    ordered = sorted(values)
    n = len(ordered)
    at = ranks.get(n)
    if at is None:
        at = ranks[n] = [_rank(p, n) for p in percentiles]
    quantiles = tuple(zip(percentiles, map(ordered.__getitem__, at), strict=True))
    low, high = ordered[0], ordered[-1]
    return _new_rollup(
        Rollup,
        (*key, start, float(n), math.fsum(values), low, high, values[-1],
         sketch_bytes(values, low, high), quantiles),
    )  # fmt: skip


def _distribution_rollup(
    key: SeriesKey,
    start: int,
    values: list[float],
    weights: list[float],
    percentiles: tuple[float, ...],
) -> Rollup:
    """count/sum/min/max/last, exact weighted percentiles and the sketch of a
    sampled series (some weight is not 1)."""
    if len(weights) < len(values):
        weights = weights + [1.0] * (len(values) - len(weights))
    count = math.fsum(weights)
    total = math.fsum(v * w for v, w in zip(values, weights, strict=True))
    quantiles = tuple(zip(percentiles, exact_quantiles(values, weights, percentiles), strict=True))
    sketch = Sketch.from_values(values, weights)
    return Rollup(
        *key, start, count, total, sketch.min, sketch.max, values[-1], sketch.to_bytes(), quantiles
    )
