"""Aggregation semantics (SPEC section 4, CONFORMANCE gauge and sample-rate rows).

Each case is a named vector: the samples added before each swap, and the
WHOLE list of rollups that swap + snapshot must produce (every closed window,
the open one first).  Expected sketch and set states are built from the
listed raw values, so a vector also pins what went into the state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import pytest

from aggregator.aggregate import Aggregator, exact_quantiles, snapshot, timer_values
from aggregator.model import Rollup, Sample, SeriesKey, Tags
from aggregator.sketch import SetState, Sketch

INTERVAL = 10
W0 = 1000  # the first open window; later windows are W0 + 10, W0 + 20, ...
PAST = 960  # a window already flushed, reached with |T
PERCENTILES = (50.0, 90.0, 95.0, 99.0)

# --- samples, as the parser makes them ---------------------------------------------


def c(
    name: str, value: float, rate: float = 1.0, *, tags: Tags = (), ts: int | None = None
) -> Sample:
    return Sample(name, "c", tags, value, rate, ts)


def g(
    name: str, value: float, *, delta: bool = False, rate: float = 1.0, ts: int | None = None
) -> Sample:
    return Sample(name, "g", (), value, rate, ts, delta)


def t(
    name: str, value: float, rate: float = 1.0, *, kind: str = "ms", ts: int | None = None
) -> Sample:
    return Sample(name, kind, (), value, rate, ts)


def s(name: str, member: str, rate: float = 1.0, *, ts: int | None = None) -> Sample:
    return Sample(name, "s", (), member, rate, ts)


# --- expected rollups ----------------------------------------------------------------


def counter(name: str, start: int, total: float, count: float, *, tags: Tags = ()) -> Rollup:
    """A counter row: the window's value is in sum, and in min/max/last too."""
    return Rollup(name, "c", tags, start, count, total, total, total, total)


def gauge(
    name: str, start: int, last: float, low: float | None = None, high: float | None = None
) -> Rollup:
    low = last if low is None else low
    high = last if high is None else high
    return Rollup(name, "g", (), start, 1.0, last, low, high, last)


def dist(
    name: str,
    start: int,
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    count: float,
    total: float,
    low: float,
    high: float,
    last: float,
    quantiles: Sequence[float],
    kind: str = "ms",
    percentiles: Sequence[float] = PERCENTILES,
) -> Rollup:
    """A timer/histogram/distribution row; the state is the sketch of ``values``,
    which the window keeps as doubles (an int sample value becomes a float)."""
    return Rollup(
        name,
        kind,
        (),
        start,
        count,
        total,
        low,
        high,
        last,
        Sketch.from_values([float(v) for v in values], weights).to_bytes(),
        tuple(zip(percentiles, quantiles, strict=True)),
    )


def set_(name: str, start: int, members: Sequence[str]) -> Rollup:
    n = float(len(set(members)))
    return Rollup(name, "s", (), start, n, n, n, n, n, SetState.from_members(members).to_bytes())


# --- the vectors ---------------------------------------------------------------------


@dataclass
class Case:
    """Samples added before each swap, and every rollup that swap closes."""

    name: str
    steps: list[tuple[list[Sample], list[Rollup]]]
    gauge_deltas: bool = True
    percentiles: tuple[float, ...] = PERCENTILES
    restore: dict[SeriesKey, float] = field(default_factory=dict)


CASES = [
    # counters --------------------------------------------------------------------
    Case("counter +1", [([c("foo", 1)], [counter("foo", W0, 1, 1)])]),
    Case("counter floats are never truncated", [([c("foo", 1.5)], [counter("foo", W0, 1.5, 1)])]),
    Case("counter negative", [([c("foo", -1)], [counter("foo", W0, -1, 1)])]),
    Case("counter @0.1 counts 10", [([c("foo", 1, 0.1)], [counter("foo", W0, 10, 10)])]),
    Case(
        "counter mixed rates",
        [([c("foo", 1), c("foo", 2, 0.5)], [counter("foo", W0, 5, 3)])],
    ),
    Case(
        "packed counter 1:2:3",
        [([c("foo", 1), c("foo", 2), c("foo", 3)], [counter("foo", W0, 6, 3)])],
    ),
    Case(
        "each tag set is its own series",
        [
            (
                [
                    c("foo", 1, tags=(("a", "2"),)),
                    c("foo", 1, tags=(("a", "1"),)),
                    c("foo", 1, tags=(("a", "2"),)),
                ],
                [
                    counter("foo", W0, 1, 1, tags=(("a", "1"),)),
                    counter("foo", W0, 2, 2, tags=(("a", "2"),)),
                ],
            )
        ],
    ),
    Case(
        "a counter and a timer of one name are two series",
        [
            (
                [t("foo", 2), c("foo", 1)],
                [
                    counter("foo", W0, 1, 1),
                    dist(
                        "foo", W0, [2], count=1, total=2, low=2, high=2, last=2, quantiles=[2] * 4
                    ),
                ],
            )
        ],
    ),
    Case(
        "counter only in the window it was sent",
        [([c("foo", 1)], [counter("foo", W0, 1, 1)]), ([], [])],
    ),
    # gauges ------------------------------------------------------------------------
    Case("gauge last value", [([g("g", 1), g("g", 3), g("g", 2)], [gauge("g", W0, 2, 1, 3)])]),
    Case(
        "gauge 10 then -5 is 5",
        [([g("g", 10), g("g", -5, delta=True)], [gauge("g", W0, 5, 5, 10)])],
    ),
    Case("gauge +3 on a gauge never seen is 3", [([g("g", 3, delta=True)], [gauge("g", W0, 3)])]),
    Case(
        "gauge -5 with deltas off is -5",
        [([g("g", 10), g("g", -5, delta=True)], [gauge("g", W0, -5, -5, 10)])],
        gauge_deltas=False,
    ),
    Case("gauge sample rate ignored", [([g("g", 1, rate=0.5)], [gauge("g", W0, 1)])]),
    Case(
        "gauge persists and deltas apply to the persisted value",
        [
            ([g("g", 10)], [gauge("g", W0, 10)]),
            ([], [gauge("g", W0 + 10, 10)]),
            ([g("g", 5, delta=True)], [gauge("g", W0 + 20, 15, 10, 15)]),
        ],
    ),
    Case(
        "gauge min/max include the value carried into the window",
        [
            ([g("g", 10)], [gauge("g", W0, 10)]),
            ([g("g", 5)], [gauge("g", W0 + 10, 5, 5, 10)]),
            ([g("g", -1, delta=True), g("g", 1, delta=True)], [gauge("g", W0 + 20, 5, 4, 5)]),
        ],
    ),
    Case(
        "gauge restored from a previous run",
        [
            ([], [gauge("g", W0, 7)]),
            ([g("g", 1, delta=True)], [gauge("g", W0 + 10, 8, 7, 8)]),
        ],
        restore={("g", "g", ()): 7.0},
    ),
    # timers, histograms, distributions ------------------------------------------------
    Case(
        "timer 3 @0.5 is one value of weight 2",
        [
            (
                [t("foo", 3, 0.5)],
                [
                    dist(
                        "foo",
                        W0,
                        [3],
                        [2],
                        count=2,
                        total=6,
                        low=3,
                        high=3,
                        last=3,
                        quantiles=[3] * 4,
                    )
                ],
            )
        ],
    ),
    Case(
        "timer nearest-rank percentiles",
        [
            (
                [t("foo", v) for v in (7, 3, 10, 1, 5, 9, 2, 8, 6, 4)],
                [
                    dist(
                        "foo",
                        W0,
                        [7, 3, 10, 1, 5, 9, 2, 8, 6, 4],
                        count=10,
                        total=55,
                        low=1,
                        high=10,
                        last=4,
                        quantiles=[5, 9, 10, 10],
                    )
                ],
            )
        ],
    ),
    Case(
        "timer weighted percentiles, weights padded after the first sampled value",
        [
            (
                [t("foo", 1), t("foo", 2, 0.5), t("foo", 3)],
                # cumulative weight 1, 3, 4: p25 -> 1, p50 -> 2, p90 -> 3
                [
                    dist(
                        "foo",
                        W0,
                        [1, 2, 3],
                        [1, 2, 1],
                        count=4,
                        total=8,
                        low=1,
                        high=3,
                        last=3,
                        quantiles=[1, 2, 3, 3],
                        percentiles=(25.0, 50.0, 90.0, 100.0),
                    )
                ],
            )
        ],
        percentiles=(25.0, 50.0, 90.0, 100.0),
    ),
    Case(
        "timer sampled first, then unsampled",
        [
            (
                [t("foo", 5, 0.25), t("foo", 1), t("foo", 1)],
                [
                    dist(
                        "foo",
                        W0,
                        [5, 1, 1],
                        [4, 1, 1],
                        count=6,
                        total=22,
                        low=1,
                        high=5,
                        last=1,
                        quantiles=[5, 5, 5, 5],
                    )
                ],
            )
        ],
    ),
    Case(
        "timer -5 is a value",
        [
            (
                [t("foo", -5)],
                [
                    dist(
                        "foo",
                        W0,
                        [-5],
                        count=1,
                        total=-5,
                        low=-5,
                        high=-5,
                        last=-5,
                        quantiles=[-5] * 4,
                    )
                ],
            )
        ],
    ),
    Case(
        "histogram and distribution keep their type",
        [
            (
                [t("foo", 1, kind="h"), t("foo", 2, kind="d")],
                [
                    dist(
                        "foo",
                        W0,
                        [2],
                        count=1,
                        total=2,
                        low=2,
                        high=2,
                        last=2,
                        quantiles=[2] * 4,
                        kind="d",
                    ),
                    dist(
                        "foo",
                        W0,
                        [1],
                        count=1,
                        total=1,
                        low=1,
                        high=1,
                        last=1,
                        quantiles=[1] * 4,
                        kind="h",
                    ),
                ],
            )
        ],
    ),
    Case(
        "no percentiles configured",
        [
            (
                [t("foo", 1)],
                [
                    dist(
                        "foo",
                        W0,
                        [1],
                        count=1,
                        total=1,
                        low=1,
                        high=1,
                        last=1,
                        quantiles=[],
                        percentiles=(),
                    )
                ],
            )
        ],
        percentiles=(),
    ),
    # sets ------------------------------------------------------------------------------
    Case(
        "set counts distinct members",
        [([s("u", "a"), s("u", "b"), s("u", "a")], [set_("u", W0, ["a", "b"])])],
    ),
    Case("set sample rate ignored", [([s("u", "a", 0.5)], [set_("u", W0, ["a"])])]),
    Case("set member with a colon", [([s("u", "a:b")], [set_("u", W0, ["a:b"])])]),
    Case(
        "set starts empty in the next window",
        [([s("u", "a")], [set_("u", W0, ["a"])]), ([s("u", "b")], [set_("u", W0 + 10, ["b"])])],
    ),
    # |T timestamps ----------------------------------------------------------------------
    Case(
        "a |T sample lands in its own window, closed after the open one",
        [
            (
                [c("foo", 1, ts=PAST + 3), c("foo", 1)],
                [counter("foo", W0, 1, 1), counter("foo", PAST, 1, 1)],
            )
        ],
    ),
    Case(
        "a |T inside the open window is the open window",
        [([c("foo", 1, ts=W0 + 9), c("foo", 2)], [counter("foo", W0, 3, 2)])],
    ),
    Case(
        "|T windows come back in start order, future ones too",
        [
            (
                [c("foo", 1, ts=W0 + 100), c("foo", 1, ts=PAST + 10), c("foo", 1, ts=PAST)],
                [
                    counter("foo", PAST, 1, 1),
                    counter("foo", PAST + 10, 1, 1),
                    counter("foo", W0 + 100, 1, 1),
                ],
            )
        ],
    ),
    Case(
        "a |T timer, set and sampled counter",
        [
            (
                [t("t", 4, 0.5, ts=PAST), s("u", "x", ts=PAST), c("c", 1, 0.5, ts=PAST)],
                [
                    counter("c", PAST, 2, 2),
                    dist(
                        "t",
                        PAST,
                        [4],
                        [2],
                        count=2,
                        total=8,
                        low=4,
                        high=4,
                        last=4,
                        quantiles=[4] * 4,
                    ),
                    set_("u", PAST, ["x"]),
                ],
            )
        ],
    ),
    Case(
        "a |T gauge sets its own window only, never the current value",
        [
            ([g("g", 10), g("g", 3, ts=PAST)], [gauge("g", W0, 10), gauge("g", PAST, 3)]),
            ([], [gauge("g", W0 + 10, 10)]),
        ],
    ),
    Case(
        "a |T gauge delta applies to the window's value, else the current one",
        [
            (
                [g("g", 10), g("g", 1, delta=True, ts=PAST), g("g", 1, delta=True, ts=PAST)],
                [gauge("g", W0, 10), gauge("g", PAST, 12, 11, 12)],
            )
        ],
    ),
    Case(
        "a |T gauge with deltas off",
        [
            (
                [g("g", 10), g("g", -1, delta=True, ts=PAST), g("g", 4, ts=PAST)],
                [gauge("g", W0, 10), gauge("g", PAST, 4, -1, 4)],
            )
        ],
        gauge_deltas=False,
    ),
    # windows ------------------------------------------------------------------------------
    Case("an empty window closes to nothing", [([], []), ([], [])]),
    Case(
        "a mixed window: one rollup per series",
        [
            (
                [
                    s("e", "m"),
                    g("d", 1),
                    t("c", 1),
                    c("b", 1),
                    c("a", 1, tags=(("k", "v"),)),
                    c("a", 1),
                ],
                [
                    counter("a", W0, 1, 1),
                    counter("a", W0, 1, 1, tags=(("k", "v"),)),
                    counter("b", W0, 1, 1),
                    dist("c", W0, [1], count=1, total=1, low=1, high=1, last=1, quantiles=[1] * 4),
                    gauge("d", W0, 1),
                    set_("e", W0, ["m"]),
                ],
            )
        ],
    ),
]


def run(case: Case) -> list[list[Rollup]]:
    """Feed a case step by step; what each swap produced."""
    agg = Aggregator(INTERVAL, case.percentiles, gauge_deltas=case.gauge_deltas)
    agg.open(W0)
    agg.restore_gauges(case.restore)
    produced = []
    for i, (samples, _) in enumerate(case.steps):
        # split in two batches: add() must not care how samples are chunked
        agg.add(samples[: len(samples) // 2])
        agg.add(iter(samples[len(samples) // 2 :]))
        rollups = []
        for closed in agg.swap(W0 + INTERVAL * (i + 1)):
            rollups += sorted(snapshot(closed, case.percentiles))  # a window's, in key order
        produced.append(rollups)
    return produced


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_vectors(case: Case) -> None:
    assert run(case) == [expected for _, expected in case.steps]


# --- the window machinery ------------------------------------------------------------


def test_swap_hands_over_windows_and_opens_the_next() -> None:
    agg = Aggregator(INTERVAL, PERCENTILES)
    agg.open(W0)
    agg.add([c("foo", 1), c("foo", 1, ts=PAST + 1), g("g", 2)])
    closed = agg.swap(W0 + 10)
    assert [(w.start, w.timestamped) for w in closed] == [(W0, False), (PAST, True)]
    assert closed[0].persisted == {("g", "g", ()): 2.0}
    assert closed[1].persisted is None
    assert agg.start == W0 + 10
    # the intake goes on in the new window and leaves the closed ones alone
    before = [snapshot(w, PERCENTILES) for w in closed]
    agg.add([c("foo", 5), g("g", 9), c("foo", 1, ts=PAST + 2)])
    assert [snapshot(w, PERCENTILES) for w in closed] == before
    assert snapshot(agg.swap(W0 + 20)[0], PERCENTILES) == [
        counter("foo", W0 + 10, 5, 1),
        gauge("g", W0 + 10, 9, 2, 9),
    ]


def test_series_count_and_gauges() -> None:
    agg = Aggregator(INTERVAL, PERCENTILES)
    agg.open(W0)
    agg.restore_gauges({("old", "g", ()): 1.0})
    agg.add([c("a", 1), c("a", 1), t("b", 1), s("u", "x"), g("g", 1), g("g", 2)])
    assert agg.series_count == 5  # a, b, u, g and the restored gauge
    copy = agg.gauges()
    assert copy == {("old", "g", ()): 1.0, ("g", "g", ()): 2.0}
    copy.clear()  # a copy: the aggregator keeps its own
    agg.swap(W0 + 10)
    assert agg.series_count == 2  # only the persisted gauges remain
    assert agg.gauges() == {("old", "g", ()): 1.0, ("g", "g", ()): 2.0}


def test_open_sets_the_window_of_untimestamped_samples() -> None:
    agg = Aggregator(INTERVAL, PERCENTILES)
    agg.open(2000)
    agg.add([c("foo", 1), c("foo", 1, ts=2005)])
    (closed,) = agg.swap(2010)
    assert snapshot(closed, PERCENTILES) == [counter("foo", 2000, 2, 2)]


def test_timer_values_are_kept_packed_in_arrival_order() -> None:
    """8 bytes a value, the window's and a |T window's alike; weights stay a list."""
    agg = Aggregator(INTERVAL, PERCENTILES)
    agg.open(W0)
    values = [3.5, -0.0, 1e300, 0.25]
    agg.add([t("lat", v) for v in values] + [t("lat", 2.0, 0.5), t("old", 7.0, ts=PAST)])
    opened, late = agg.swap(W0 + 10)
    packed = opened.timers[("lat", "ms", ())]
    assert type(packed) is bytearray and len(packed) == 8 * 5
    assert repr(timer_values(packed)) == repr([*values, 2.0])  # -0.0 keeps its sign
    assert opened.weights[("lat", "ms", ())] == [1.0, 1.0, 1.0, 1.0, 2.0]
    assert timer_values(late.timers[("old", "ms", ())]) == [7.0]


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        Aggregator(0, PERCENTILES)


# --- exact percentiles -------------------------------------------------------------------


def naive(values: Sequence[float], weights: Sequence[float], p: float) -> float:
    """Weighted nearest rank, the slow obvious way."""
    pairs = sorted(zip(values, weights, strict=True))
    if p == 0:
        return pairs[0][0]
    target = p / 100 * sum(weights) * (1 - 1e-12)
    for (value, _), cumulative in zip(pairs, accumulate(w for _, w in pairs), strict=True):
        if cumulative >= target:
            return value
    return pairs[-1][0]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_exact_quantiles_match_the_definition(n: int, weighted: bool) -> None:
    r = random.Random(n)
    values = [round(r.gauss(0, 100), 1) for _ in range(n)]  # rounding makes ties
    weights = [r.choice((1.0, 2.0, 4.0, 10.0)) for _ in range(n)] if weighted else None
    ps = [0, 0.1, 1, 7, 25, 29, 50, 57, 75, 90, 95, 99, 99.9, 100]
    want = [naive(values, weights or [1.0] * n, p) for p in ps]
    assert exact_quantiles(values, weights, ps) == want
    assert want[0] == min(values)
    assert want[-1] == max(values)


def test_exact_quantiles_of_nothing() -> None:
    with pytest.raises(ValueError):
        exact_quantiles([], None, [50])
