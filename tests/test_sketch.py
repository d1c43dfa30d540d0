"""The mergeable states behind SPEC section 4's "percentiles mergeable, not averaged".

Quantiles: every percentile of many shapes of data, weighted or not, with
negatives, one window or many merged, within 1% relative of the exact
weighted nearest-rank value.  Sets: exact below the threshold, within 2%
above it, and merges of overlapping sets.
"""

from __future__ import annotations

import functools
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate

import msgpack
import pytest

from aggregator.sketch import (
    MAX_BUCKETS,
    SET_EXACT_LIMIT,
    SetState,
    Sketch,
    merge_blobs,
    sketch_bytes,
)

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)
QS = tuple(p / 100 for p in PERCENTILES)
TOLERANCE = 0.01  # SPEC 4: within 1% relative of exact


class Exact:
    """Weighted nearest rank, written independently of the code under test.

    The smallest x with (weight of values <= x) >= q * total; q = 0 -> min.
    The 1e-12 slack matches sketch.RANK_EPSILON (0.07 * 100 is 7.000000000000001).
    Sorts once, answers many quantiles.
    """

    def __init__(self, values: Sequence[float], weights: Sequence[float] | None) -> None:
        ws = weights if weights is not None else [1.0] * len(values)
        pairs = sorted(zip(values, ws, strict=True))
        self.values = [v for v, _ in pairs]
        self.cumulative = list(accumulate(w for _, w in pairs))

    def __call__(self, q: float) -> float:
        if q == 0:
            return self.values[0]
        i = bisect_left(self.cumulative, q * self.cumulative[-1] * (1 - 1e-12))
        return self.values[min(i, len(self.values) - 1)]


def exact(values: Sequence[float], weights: Sequence[float] | None, q: float) -> float:
    """One exact quantile (see Exact)."""
    return Exact(values, weights)(q)


def assert_close(sketch: Sketch, values: Sequence[float], weights: Sequence[float] | None) -> None:
    """Every percentile of the sketch within 1% of exact; the extremes exact."""
    want_of = Exact(values, weights)
    got = sketch.quantiles(QS)
    for q, answer in zip(QS, got, strict=True):
        want = want_of(q)
        assert abs(answer - want) <= TOLERANCE * abs(want), (q, answer, want)
    assert sketch.quantile(0) == min(values)
    assert sketch.quantile(1) == max(values)
    assert sketch.min == min(values)
    assert sketch.max == max(values)
    total = float(len(values)) if weights is None else math.fsum(weights)
    assert sketch.count == pytest.approx(total, rel=1e-12)


# --- data shapes -------------------------------------------------------------

Shape = Callable[[random.Random], float]

SHAPES: dict[str, Shape] = {
    "lognormal-sigma1": lambda r: r.lognormvariate(3.0, 1.0),
    "lognormal-sigma2": lambda r: r.lognormvariate(3.0, 2.0),
    "bimodal": lambda r: r.gauss(50.0, 5.0) if r.random() < 0.7 else r.gauss(5000.0, 500.0),
    "uniform": lambda r: r.uniform(0.0, 1000.0),
}


def draw(
    shape: str, n: int, *, seed: int, negatives: bool, weighted: bool
) -> tuple[list[float], list[float] | None]:
    """n values of a shape; with negatives, a random third flip sign; weights are 1/rate."""
    r = random.Random(seed)
    gen = SHAPES[shape]
    values = [gen(r) for _ in range(n)]
    if negatives:
        values = [-v if r.random() < 1 / 3 else v for v in values]
    weights = [1.0 / r.uniform(0.05, 1.0) for _ in range(n)] if weighted else None
    return values, weights


@pytest.mark.parametrize("n", [10, 1000, 100_000])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("negatives", [False, True], ids=["positive", "with-negatives"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_window_within_one_percent(shape: str, negatives: bool, weighted: bool, n: int) -> None:
    values, weights = draw(shape, n, seed=n, negatives=negatives, weighted=weighted)
    assert_close(Sketch.from_values(values, weights), values, weights)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_merge_of_differently_shaped_windows(weighted: bool) -> None:
    a_values, a_weights = draw("lognormal-sigma2", 5000, seed=1, negatives=False, weighted=weighted)
    b_values, b_weights = draw("bimodal", 3000, seed=2, negatives=True, weighted=weighted)
    sketch = Sketch.from_values(a_values, a_weights)
    sketch.merge(Sketch.from_values(b_values, b_weights))
    weights = None if a_weights is None or b_weights is None else a_weights + b_weights
    assert_close(sketch, a_values + b_values, weights)


def _hundred_windows() -> list[tuple[list[float], list[float]]]:
    """100 windows cycling through every shape, sign and size."""
    windows = []
    shapes = list(SHAPES)
    for i in range(100):
        values, weights = draw(
            shapes[i % len(shapes)],
            10 + (i * 37) % 1000,
            seed=100 + i,
            negatives=i % 3 == 0,
            weighted=True,
        )
        assert weights is not None
        windows.append((values, weights))
    return windows


def test_hundred_windows_merged_one_by_one() -> None:
    all_values: list[float] = []
    all_weights: list[float] = []
    merged = Sketch()
    for i, (values, weights) in enumerate(_hundred_windows()):
        merged.merge(Sketch.from_values(values, weights))
        all_values += values
        all_weights += weights
        if i in (0, 9, 49, 99):
            assert_close(merged, all_values, all_weights)


def test_merge_after_a_bytes_round_trip() -> None:
    windows = _hundred_windows()
    blobs = [Sketch.from_values(v, w).to_bytes() for v, w in windows]
    merged = Sketch.from_bytes(blobs[0])
    for blob in blobs[1:]:
        merged.merge(Sketch.from_bytes(blob))
    all_values = [x for v, _ in windows for x in v]
    all_weights = [x for _, w in windows for x in w]
    assert_close(merged, all_values, all_weights)
    # merge_blobs (what storage uses) gives the very same state, skipping Nones
    via_blobs = merge_blobs("d", [None, *blobs, None])
    assert via_blobs is not None
    assert Sketch.from_bytes(via_blobs).to_bytes() == merged.to_bytes()


def test_merge_order_does_not_matter() -> None:
    windows = _hundred_windows()[:10]
    forward, backward = Sketch(), Sketch()
    for values, weights in windows:
        forward.merge(Sketch.from_values(values, weights))
    for values, weights in reversed(windows):
        backward.merge(Sketch.from_values(values, weights))
    assert forward.quantiles(QS) == backward.quantiles(QS)
    assert forward.positive.keys() == backward.positive.keys()


# --- small cases, as named vectors ---------------------------------------------

SMALL_CASES = [
    # name, values, weights, {q: expected exact answer}
    ("single value", [42.0], None, {0: 42.0, 0.5: 42.0, 1: 42.0}),
    ("all zeros", [0.0, 0.0, 0.0], None, {0: 0.0, 0.5: 0.0, 1: 0.0}),
    ("negative timer", [-5.0], None, {0: -5.0, 0.99: -5.0, 1: -5.0}),
    ("weight moves the median", [1.0, 100.0], [1.0, 3.0], {0.25: 1.0, 0.26: 100.0, 0.5: 100.0}),
    ("zero between signs", [-10.0, 0.0, 10.0], None, {0.34: 0.0, 0.66: 0.0, 0.67: 10.0}),
    # 0.07 * 100 = 7.000000000000001: still the 7th value, not the 8th
    ("rank rounding", [float(i) for i in range(1, 101)], None, {0.07: 7.0, 0.29: 29.0}),
]


@pytest.mark.parametrize(
    ("values", "weights", "expected"),
    [pytest.param(v, w, e, id=name) for name, v, w, e in SMALL_CASES],
)
def test_small_cases(
    values: list[float], weights: list[float] | None, expected: dict[float, float]
) -> None:
    sketch = Sketch.from_values(values, weights)
    for q, want in expected.items():
        assert exact(values, weights, q) == want  # the vector itself is right
        got = sketch.quantile(q)
        assert abs(got - want) <= TOLERANCE * abs(want), (q, got, want)


def test_extreme_magnitudes_stay_finite_and_close() -> None:
    values = [5e-324, 1e-300, 1e-9, 1.0, 1e300, 1.7976931348623157e308]
    sketch = Sketch.from_values(values)
    for q in (0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0):
        want = exact(values, None, q)
        got = sketch.quantile(q)
        assert math.isfinite(got)
        if want >= 1e-300:  # subnormals carry too few bits for a relative bound
            assert abs(got - want) <= TOLERANCE * want, (q, got, want)
    assert sketch.quantile(1.0) == 1.7976931348623157e308


def test_serialized_form_is_the_documented_one() -> None:
    # index of 1.0 is ceil(log(1) / log(gamma)) = 0; whole weights are ints
    blob = Sketch.from_values([0.0, 1.0, -1.0, 1.0], [1.0, 2.0, 1.5, 1.0]).to_bytes()
    assert msgpack.unpackb(blob, strict_map_key=False) == [1, 1, -1.0, 1.0, {0: 3}, {0: 1.5}]


#: value lists for the flush's fast path: few and many, repeats, zeros, both
#: signs, and a span wider than MAX_BUCKETS buckets (falls back to Sketch)
FAST_PATH_CASES = {
    "one": [3.0],
    "few": [1.0, 2.0, 2.0, 250.5],
    "zeros-and-negatives": [-4.0, -0.5, 0.0, 0.0, 7.0],
    "many-repeats": [float(i % 7) for i in range(100)],
    "lognormal": [random.Random(3).lognormvariate(0, 2) for _ in range(500)],
    "wider-than-the-bucket-cap": [1.0075 ** i for i in range(2 * MAX_BUCKETS)],
}


@pytest.mark.parametrize("values", FAST_PATH_CASES.values(), ids=FAST_PATH_CASES.keys())
def test_sketch_bytes_is_the_sketch_of_unit_weights(values: list[float]) -> None:
    fast = sketch_bytes(values, min(values), max(values))
    assert fast == Sketch.from_values(values).to_bytes()


def slow_merge(type_code: str, blobs: list[bytes]) -> bytes:
    """The object path of merge_blobs, for comparison with its fast paths."""
    if type_code == "s":
        state = SetState.from_bytes(blobs[0])
        for blob in blobs[1:]:
            state.merge(SetState.from_bytes(blob))
        return state.to_bytes()
    sketch = Sketch.from_bytes(blobs[0])
    for blob in blobs[1:]:
        sketch.merge(Sketch.from_bytes(blob))
    return sketch.to_bytes()


#: (type, blobs) pairs: unit weights, fractional weights, zeros and negatives,
#: sums that pass 2**53, more buckets than MAX_BUCKETS, sets that stay exact
#: and sets that outgrow the exact limit
MERGE_CASES = {
    "unit-weights": ("ms", [Sketch.from_values([1.0, 2.0, 2.0]).to_bytes(),
                            Sketch.from_values([2.0, 300.0]).to_bytes()]),
    "fractional-weights": ("h", [Sketch.from_values([1.0, 5.0], [0.5, 2.5]).to_bytes(),
                                 Sketch.from_values([5.0, -1.0], [1.5, 1.0]).to_bytes()]),
    "zeros-and-negatives": ("d", [Sketch.from_values([0.0, -3.0]).to_bytes(),
                                  Sketch.from_values([0.0, 0.0, -3.0, 4.0]).to_bytes()]),
    "huge-weights": ("ms", [Sketch.from_values([1.0], [2.0**52 + 2]).to_bytes(),
                            Sketch.from_values([1.0], [2.0**52]).to_bytes()]),
    "over-the-bucket-cap": ("ms", [
        Sketch.from_values([1.0075 ** i for i in range(0, 2 * MAX_BUCKETS, 2)]).to_bytes(),
        Sketch.from_values([1.0075 ** i for i in range(1, 2 * MAX_BUCKETS, 2)]).to_bytes()]),
    "sets-exact": ("s", [SetState.from_members(["a", "b"]).to_bytes(),
                         SetState.from_members(["b", "c", "é"]).to_bytes()]),
    "sets-outgrow-exact": ("s", [
        SetState.from_members(str(i) for i in range(SET_EXACT_LIMIT)).to_bytes(),
        SetState.from_members(str(-i) for i in range(1, 10)).to_bytes()]),
}  # fmt: skip


@pytest.mark.parametrize(("type_code", "blobs"), MERGE_CASES.values(), ids=MERGE_CASES.keys())
def test_merge_blobs_matches_the_object_path(type_code: str, blobs: list[bytes]) -> None:
    assert merge_blobs(type_code, blobs) == slow_merge(type_code, blobs)
    assert merge_blobs(type_code, blobs[::-1]) == slow_merge(type_code, blobs[::-1])


def test_merge_blobs_of_many_random_windows_matches_the_object_path() -> None:
    rng = random.Random(11)
    blobs = []
    for _ in range(40):
        values = [round(rng.lognormvariate(3, 1), 1) for _ in range(rng.randint(1, 30))]
        weights = [rng.choice([1.0, 2.0, 0.5]) for _ in values] if rng.random() < 0.3 else None
        blobs.append(Sketch.from_values(values, weights).to_bytes())
    assert merge_blobs("ms", blobs) == slow_merge("ms", blobs)


def test_bytes_round_trip_keeps_everything() -> None:
    values, weights = draw("bimodal", 1000, seed=7, negatives=True, weighted=True)
    sketch = Sketch.from_values([*values, 0.0], [*(weights or []), 2.0])
    again = Sketch.from_bytes(sketch.to_bytes())
    assert again.count == pytest.approx(sketch.count, rel=1e-12)
    assert (again.min, again.max, again.zero) == (sketch.min, sketch.max, sketch.zero)
    assert again.positive == sketch.positive
    assert again.negative == sketch.negative
    assert again.to_bytes() == sketch.to_bytes()


def test_empty_sketch() -> None:
    empty = Sketch.from_values([])
    assert (empty.count, empty.min, empty.max) == (0.0, math.inf, -math.inf)
    with pytest.raises(ValueError, match="empty"):
        empty.quantile(0.5)
    again = Sketch.from_bytes(empty.to_bytes())
    assert again.count == 0.0
    full = Sketch.from_values([1.0, 2.0])
    full.merge(empty)
    empty.merge(Sketch.from_values([1.0, 2.0]))
    assert full.to_bytes() == empty.to_bytes()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: Sketch.from_values([1.0]).quantile(1.5), "quantile", id="q>1"),
        pytest.param(lambda: Sketch.from_values([1.0]).quantile(-0.1), "quantile", id="q<0"),
        pytest.param(lambda: Sketch.from_values([1.0, 2.0], [1.0]), "length", id="weights-length"),
        pytest.param(lambda: Sketch.from_values([1.0], [0.0]), "positive", id="zero-weight"),
        pytest.param(lambda: Sketch.from_bytes(b"\xc1"), "not a sketch", id="garbage"),
        pytest.param(lambda: Sketch.from_bytes(msgpack.packb([1, 2])), "not a sketch", id="short"),
        pytest.param(
            lambda: Sketch.from_bytes(msgpack.packb([9, 0, 1.0, 1.0, {}, {}])),
            "version",
            id="version",
        ),
    ],
)
def test_bad_input_is_a_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- sets ------------------------------------------------------------------------


@functools.cache
def _all_members() -> list[str]:
    """One million distinct members, built once and only if a set test runs."""
    return [f"user-{i:07d}" for i in range(1_000_000)]


def members(start: int, stop: int) -> list[str]:
    return _all_members()[start:stop]


@pytest.mark.parametrize("n", [0, 1, 100, SET_EXACT_LIMIT])
def test_set_exact_up_to_the_threshold(n: int) -> None:
    state = SetState.from_members(members(0, n) * 2)  # duplicates count once
    assert state.cardinality() == n
    assert state.members is not None
    assert SetState.from_bytes(state.to_bytes()).cardinality() == n


@pytest.mark.parametrize("n", [SET_EXACT_LIMIT + 1, 20_000, 100_000, 1_000_000])
def test_set_within_two_percent_above_the_threshold(n: int) -> None:
    state = SetState.from_members(members(0, n))
    assert state.members is None  # a HyperLogLog now
    assert abs(state.cardinality() - n) <= 0.02 * n
    assert SetState.from_bytes(state.to_bytes()).cardinality() == state.cardinality()


def test_set_hash_is_stable_across_processes() -> None:
    # blake2b, not hash(): this exact estimate must never change between runs
    assert SetState.from_members(members(0, 10_000)).cardinality() == 9_828


SET_MERGES = [
    # name, (first range), (second range): members(a, b) of the precomputed list
    ("exact + exact", (0, 3), (1, 4)),
    ("exact + exact crossing the threshold", (0, 3000), (2000, 5000)),
    ("exact into hll", (0, 60_000), (59_000, 60_100)),
    ("hll into exact", (59_000, 60_100), (0, 60_000)),
    ("hll + hll overlapping", (0, 60_000), (40_000, 100_000)),
    ("hll + hll identical", (0, 50_000), (0, 50_000)),
]


@pytest.mark.parametrize(
    ("first", "second"), [pytest.param(a, b, id=name) for name, a, b in SET_MERGES]
)
def test_set_merges(first: tuple[int, int], second: tuple[int, int]) -> None:
    union = len(set(members(*first)) | set(members(*second)))
    a = SetState.from_members(members(*first))
    b = SetState.from_members(members(*second))
    blob = merge_blobs("s", [a.to_bytes(), None, b.to_bytes()])
    a.merge(b)
    if union <= SET_EXACT_LIMIT:
        assert a.cardinality() == union
    else:
        assert abs(a.cardinality() - union) <= 0.02 * union
        # the same registers whichever way the union was made
        assert a.to_bytes() == SetState.from_members(members(*first) + members(*second)).to_bytes()
    assert blob is not None
    assert SetState.from_bytes(blob).cardinality() == a.cardinality()


def test_set_serialized_form_is_the_documented_one() -> None:
    assert msgpack.unpackb(SetState.from_members(["b", "a", "b"]).to_bytes()) == [1, 0, ["a", "b"]]
    version, kind, registers = msgpack.unpackb(SetState.from_members(members(0, 5000)).to_bytes())
    assert (version, kind, len(registers)) == (1, 1, 16384)
    assert max(registers) <= 51


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(b"\xc1", id="garbage"),
        pytest.param(msgpack.packb([2, 0, []]), id="version"),
        pytest.param(msgpack.packb([1, 1, b"short"]), id="short-registers"),
        pytest.param(msgpack.packb([1, 7, []]), id="kind"),
    ],
)
def test_set_bad_bytes_are_a_value_error(blob: bytes) -> None:
    with pytest.raises(ValueError):
        SetState.from_bytes(blob)


def test_merge_blobs_edges() -> None:
    assert merge_blobs("ms", []) is None
    assert merge_blobs("s", [None, None]) is None
    one = Sketch.from_values([1.0]).to_bytes()
    assert merge_blobs("h", [None, one]) == one
    with pytest.raises(ValueError, match="no mergeable state"):
        merge_blobs("c", [one, one])
