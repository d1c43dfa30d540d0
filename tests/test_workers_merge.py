"""Merging ingest workers' windows into the daemon's (aggregate.merge_worker_windows).

The property that matters: the samples of a window, spread over any number
of workers, flush to the rollups one aggregator would have made of them.
The gauge rules that have no single-aggregator equivalent (two workers, one
gauge, one window) are vectors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import random
import socket

import pytest

from aggregator import aggregate
from aggregator.aggregate import (
    Aggregator,
    ClosedWindow,
    WorkerAggregator,
    merge_worker_windows,
    snapshot,
    timer_values,
)
from aggregator.fastpath import sketch_native
from aggregator.limits import Budget, Drops, Limits
from aggregator.listeners import ListenerStats
from aggregator.model import Rollup, Sample, SeriesKey
from aggregator.selfstats import IngestStats
from aggregator.sketch import Sketch
from aggregator.worker import Learned, Report, _read_message, _write_report, window_slices
from aggregator.worker import _frame as worker_frame

from .test_aggregate import INTERVAL, PAST, PERCENTILES, W0, c, g, s, t


@pytest.fixture(params=["c", "python"] if sketch_native is not None else ["python"], autouse=True)
def merge_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test merges in C (when the extension is built) and in Python."""
    if request.param == "python":
        monkeypatch.setattr(aggregate, "sketch_native", None)
    return str(request.param)


def single(samples: list[Sample], gauges: dict[SeriesKey, float]) -> list[Rollup]:
    agg = Aggregator(INTERVAL, PERCENTILES)
    agg.restore_gauges(gauges)
    agg.open(W0)
    agg.add(samples)
    return [r for w in agg.swap(W0 + INTERVAL) for r in sorted(snapshot(w, PERCENTILES))]


def spread(
    samples: list[Sample],
    gauges: dict[SeriesKey, float],
    workers: int,
    seed: int,
    slice_series: int = 4096,
) -> tuple[list[Rollup], dict[SeriesKey, float]]:
    """The daemon keeps ``gauges`` and reads nothing; ``workers`` workers read the samples
    and hand their windows over in slices of ``slice_series``, as worker.py does."""
    rng = random.Random(seed)
    daemon = Aggregator(INTERVAL, PERCENTILES)
    daemon.restore_gauges(gauges)
    daemon.open(W0)
    readers = [WorkerAggregator(INTERVAL) for _ in range(workers)]
    for reader in readers:
        reader.open(W0)
    for n, sample in enumerate(samples):
        reader = rng.choice(readers)
        reader.now = float(n)
        reader.add([sample])
    closed = daemon.swap(W0 + INTERVAL)
    # what crosses the process boundary is a pickle of each slice
    parts = [
        pickle.loads(pickle.dumps(piece))
        for r in readers
        for piece in window_slices(r.swap(W0 + INTERVAL), slice_series)
    ]
    moved = merge_worker_windows(closed, parts, daemon.spent)
    return [r for w in closed for r in sorted(snapshot(w, PERCENTILES))], moved


def decoded(state: bytes) -> tuple[object, ...]:
    sketch = Sketch.from_bytes(state)
    return tuple(getattr(sketch, name) for name in Sketch.__slots__)


def comparable(rollups: list[Rollup], workers: int) -> list[Rollup]:
    """Rollups up to what a merge may reorder.

    A merged timer's ``last`` is the last value of one worker, not of the
    window; a sketch's encoding lists its buckets in the order values first
    fell in them, so sketches compare decoded. The extremes of a gauge moved
    by deltas that several workers read depend on how their reads
    interleaved, which no worker knows: they are only compared for one.
    """
    out = []
    for r in rollups:
        if r.type == "ms" and r.state is not None:
            r = r._replace(last=0.0, state=decoded(r.state))
        elif r.type == "g" and workers > 1:
            r = r._replace(min=0.0, max=0.0)
        out.append(r)
    return out


STREAM = (
    [c("hits", 1) for _ in range(40)]
    + [c("sampled", 1, 0.25) for _ in range(20)]
    + [c("tagged", 2, tags=(("host", f"h{i % 3}"),)) for i in range(30)]
    + [t("latency", float(v)) for v in range(100)]
    + [t("weighted", float(v), 0.5 if v % 3 else 1.0) for v in range(60)]
    + [s("users", f"u{i % 17}") for i in range(80)]
    + [g("queue", 1, delta=True) for _ in range(25)]
    + [g("queue", -1, delta=True) for _ in range(5)]
    + [c("late", 1, ts=PAST + 3) for _ in range(10)]
    + [t("late_timer", float(v), ts=PAST + 4) for v in range(10)]
)


@pytest.mark.parametrize("workers", [1, 2, 5])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("slice_series", [1, 2, 4096])
def test_a_window_spread_over_workers_flushes_as_one(
    workers: int, seed: int, slice_series: int
) -> None:
    samples = list(STREAM)
    random.Random(seed).shuffle(samples)
    gauges = {("queue", "g", ()): 100.0, ("idle", "g", ()): 7.0}
    merged, moved = spread(samples, gauges, workers, seed, slice_series)
    assert comparable(merged, workers) == comparable(single(samples, gauges), workers)
    assert moved == {("queue", "g", ()): 120.0}


QUEUE: SeriesKey = ("queue", "g", ())


@pytest.mark.parametrize(
    ("name", "held", "reads", "value", "low", "high"),
    [
        # reads: per worker, (arrival time, sample) in its order
        ("deltas of two workers add to the held value", 10.0,
         [[(1, g("queue", 3, delta=True))], [(2, g("queue", -1, delta=True))]],
         12.0, 9.0, 13.0),
        ("a never-seen gauge starts at 0", None,
         [[(1, g("queue", 3, delta=True))], [(2, g("queue", 2, delta=True))]],
         5.0, 0.0, 5.0),
        ("the latest absolute value wins", 10.0,
         [[(5, g("queue", 4))], [(3, g("queue", 8))]],
         4.0, 4.0, 10.0),
        ("a worker's deltas after its absolute value stay with it", None,
         [[(5, g("queue", 4)), (6, g("queue", 1, delta=True))], [(3, g("queue", 8))]],
         5.0, 4.0, 8.0),
        ("deltas of another worker come after the absolute value", 10.0,
         [[(5, g("queue", 4))], [(3, g("queue", 2, delta=True))]],
         6.0, 4.0, 10.0),
        ("a worker's deltas before its absolute value are overridden", 10.0,
         [[(1, g("queue", 50, delta=True)), (2, g("queue", 4))]],
         4.0, 4.0, 10.0),
    ],
)  # fmt: skip
def test_gauges_of_several_workers(
    name: str,
    held: float | None,
    reads: list[list[tuple[int, Sample]]],
    value: float,
    low: float,
    high: float,
) -> None:
    daemon = Aggregator(INTERVAL, PERCENTILES)
    if held is not None:
        daemon.restore_gauges({QUEUE: held})
    daemon.open(W0)
    parts: list[ClosedWindow] = []
    for worker_reads in reads:
        worker = WorkerAggregator(INTERVAL)
        worker.open(W0)
        for at, sample in worker_reads:
            worker.now = float(at)
            worker.add([sample])
        parts.extend(worker.swap(W0 + INTERVAL))
    closed = daemon.swap(W0 + INTERVAL)
    assert merge_worker_windows(closed, parts, daemon.spent) == {QUEUE: value}
    (rollup,) = [r for r in snapshot(closed[0], PERCENTILES) if r.name == "queue"]
    assert (rollup.last, rollup.min, rollup.max) == (value, low, high)
    daemon.carry_gauges({QUEUE: value})
    assert daemon.gauges()[QUEUE] == value


def test_absolute_gauges_when_deltas_are_off() -> None:
    worker = WorkerAggregator(INTERVAL, gauge_deltas=False)
    worker.open(W0)
    worker.add([g("queue", 3, delta=True), g("queue", -2, delta=True)])
    daemon = Aggregator(INTERVAL, PERCENTILES, gauge_deltas=False)
    daemon.open(W0)
    closed = daemon.swap(W0 + INTERVAL)
    assert merge_worker_windows(closed, worker.swap(W0 + INTERVAL), daemon.spent) == {
        QUEUE: -2.0
    }


def test_the_limits_hold_across_workers() -> None:
    """Each worker admits up to max_series; the merge keeps the flush at max_series."""
    limits = Limits(max_series=30)
    drops = Drops()
    daemon = Aggregator(INTERVAL, PERCENTILES, limits=limits, drops=drops)
    daemon.open(W0)
    daemon.add([c(f"own{i}", 1) for i in range(10)])
    parts = []
    for w in range(3):
        worker = WorkerAggregator(INTERVAL, limits=limits, drops=Drops())
        worker.open(W0)
        worker.add([c(f"w{w}.{i}", 1) for i in range(25)] + [c("shared", 1)])
        parts.extend(worker.swap(W0 + INTERVAL))
    closed = daemon.swap(W0 + INTERVAL)
    merge_worker_windows(closed, parts, daemon.spent)
    assert len(closed[0].counters) == 30
    assert closed[0].counters[("own0", "c", ())] == [1.0, 1.0]
    assert drops.window["series_limit"] == 3 * 26 - 20


def test_each_limit_refuses_at_the_merge_what_the_workers_let_through() -> None:
    """Workers without limits, a daemon with tight ones: the series each limit
    refuses, the drops by reason and the budget's counts after the merge."""
    limits = Limits(
        max_series=12, max_series_per_metric=3, max_name_length=8, max_tags=2, max_tag_length=6
    )
    drops = Drops()
    daemon = Aggregator(INTERVAL, PERCENTILES, limits=limits, drops=drops)
    daemon.open(W0)
    daemon.add([c("own", 1), c("per", 1), t("lat", 1.0), s("users", "b")])
    worker = WorkerAggregator(INTERVAL)
    worker.open(W0)
    worker.add(
        [c("per", 1, tags=(("i", str(i)),)) for i in range(4)]  # per has 1: two more enter
        + [c("longname.x", 1), t("longname.t", 1.0), s("longname.s", "m")]
        + [c("tags", 1, tags=(("a", "1"), ("b", "2"), ("c", "3")))]
        + [c("tagged", 1, tags=(("key", "val"),)), c("tagged", 1, tags=(("k", "vvvv"),))]
        + [c("own", 2), t("lat", 2.0), t("lat", 3.0), s("users", "a")]
        + [c(f"fill{i}", 1) for i in range(9)]  # up to max_series, then refused
    )
    closed = daemon.swap(W0 + INTERVAL)
    merge_worker_windows(closed, worker.swap(W0 + INTERVAL), daemon.spent)
    window = closed[0]
    keys = sorted(k for part in (window.counters, window.timers, window.sets) for k in part)
    assert keys == sorted(
        [("own", "c", ()), ("per", "c", ()), ("per", "c", (("i", "0"),)),
         ("per", "c", (("i", "1"),)), ("tagged", "c", (("k", "vvvv"),)), ("lat", "ms", ()),
         ("users", "s", ())] + [(f"fill{i}", "c", ()) for i in range(5)]
    )  # fmt: skip
    assert window.counters[("own", "c", ())] == [3.0, 2.0]
    assert timer_values(window.timers[("lat", "ms", ())]) == [1.0, 2.0, 3.0]
    assert window.sets[("users", "s", ())] == {"a", "b"}
    assert drops.window == {
        "metric_series_limit": 2, "name_too_long": 1, "too_many_tags": 1, "tag_too_long": 1,
        "series_limit": 6,  # the counts come first: longname.t and .s are past the limit
    }  # fmt: skip
    spent: Budget = daemon.spent
    assert spent.created == 12
    assert spent.per_metric["per"] == 3


def test_a_worker_window_the_daemon_did_not_open_is_kept() -> None:
    """A ``|T`` window only a worker saw joins the flush, in start order."""
    worker = WorkerAggregator(INTERVAL)
    worker.open(W0)
    worker.add([c("late", 1, ts=PAST + 1), c("later", 1, ts=PAST + 11)])
    daemon = Aggregator(INTERVAL, PERCENTILES)
    daemon.open(W0)
    daemon.add([c("late", 2, ts=PAST + 12)])
    closed = daemon.swap(W0 + INTERVAL)
    merge_worker_windows(closed, worker.swap(W0 + INTERVAL), daemon.spent)
    assert [(w.start, dict(w.counters)) for w in closed] == [
        (W0, {}),
        (PAST, {("late", "c", ()): [1.0, 1.0]}),
        (PAST + 10, {("late", "c", ()): [2.0, 1.0], ("later", "c", ()): [1.0, 1.0]}),
    ]


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_window_slices_hold_every_series_once(size: int) -> None:
    worker = WorkerAggregator(INTERVAL)
    worker.open(W0)
    worker.add(STREAM)
    windows = worker.swap(W0 + INTERVAL)
    pieces = list(window_slices(windows, size))
    kinds = ("counters", "timers", "gauges", "sets")
    for piece in pieces:
        held = [kind for kind in kinds if getattr(piece, kind)]
        assert len(held) == 1
        assert len(getattr(piece, held[0])) <= size
        assert set(piece.weights) <= set(piece.timers)
        assert piece.persisted == next(w.persisted for w in windows if w.start == piece.start)
    for window in windows:
        mine = [p for p in pieces if p.start == window.start]
        for kind in (*kinds, "weights"):
            together = [key for p in mine for key in getattr(p, kind)]
            assert len(together) == len(set(together))
            assert {k: getattr(p, kind)[k] for p in mine for k in getattr(p, kind)} == getattr(
                window, kind
            )
    assert len(windows) == 2  # the open window and a |T window, both sliced


def test_a_report_crosses_the_channel_with_its_slices_as_raw_frames() -> None:
    """The slices follow the report's frame, as the worker pickled them, and
    the messages around them arrive whole and in order."""
    worker = WorkerAggregator(INTERVAL)
    worker.open(W0)
    worker.add(STREAM)
    windows = worker.swap(W0 + INTERVAL)
    pieces = [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in window_slices(windows, 2)]
    report = Report(pieces, ListenerStats(packets=7), IngestStats(), {"parse": 1})
    before = Learned(W0, [("a", "c", ())])
    after = Learned(W0 + INTERVAL, [("b", "ms", (("env", "prod"),))])

    async def cross() -> list[Report | Learned]:
        ours, theirs = socket.socketpair()
        reader, daemon_end = await asyncio.open_unix_connection(sock=ours)
        _, writer = await asyncio.open_unix_connection(sock=theirs)
        writer.write(worker_frame(before))
        _write_report(writer, report)
        writer.write(worker_frame(after))
        await writer.drain()
        got = [await asyncio.wait_for(_read_message(reader), 5) for _ in range(3)]
        writer.close()
        daemon_end.close()
        return got

    first, answer, last = asyncio.run(cross())
    assert (first, last) == (before, after)
    assert len(pieces) > 1
    assert answer == dataclasses.replace(report, slices=len(pieces))
    assert isinstance(answer, Report)
    assert list(answer.closed_windows()) == list(window_slices(windows, 2))
    assert answer.windows == []  # each pickle let go of once unpickled
