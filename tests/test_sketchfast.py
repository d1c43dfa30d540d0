"""The C flush path (aggregator/_sketchfast.c) against the Python one it stands in for.

``sketch_bytes`` and ``merge_sketches`` must return the very bytes of
``sketch._sketch_bytes`` and ``sketch._merge_small_sketches``, or None where
they leave the case to Python (then the Python path's answer, or its error,
is what the caller gets). ``window_rollups`` must make the rollups of
``aggregate.snapshot``'s Python path, and name the series it leaves to it.
Every plain case must be taken in C: a C path that always said None would
pass the byte comparison and buy nothing.
"""

from __future__ import annotations

import array
import math
import os
import random
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import aggregate, sketch, storage
from aggregator.aggregate import ClosedWindow, pack_value
from aggregator.fastpath import sketch_native
from aggregator.limits import Budget, Drops, Limits
from aggregator.model import Rollup, SeriesKey
from aggregator.sketch import MAX_BUCKETS, SET_EXACT_LIMIT, SetState, Sketch, merge_blobs

if sketch_native is None:
    if os.environ.get("CI"):
        pytest.fail("the C sketch path is not built (pip install -e . builds it)")
    pytest.skip("the C sketch path is not built (no C compiler?)", allow_module_level=True)

native = sketch_native


def c_sketch_bytes(values: object, low: object, high: object) -> bytes | None:
    return native.sketch_bytes(values, low, high, sketch.INV_LOG_GAMMA, MAX_BUCKETS)  # type: ignore[arg-type]


#: value lists whose sketch C builds: (values)
PLAIN_VALUES = {
    "one": [5.0],
    "few": [1.0, 2.0, 2.0, 250.5],
    "zeros-and-negatives": [-4.0, -0.5, 0.0, -0.0, 0.0, 7.0],
    "many-repeats": [float(i % 7) for i in range(100)],
    "seventeen": [float(i) for i in range(17)],
    "lognormal": [random.Random(3).lognormvariate(0, 2) for _ in range(500)],
    "tiny-and-huge": [5e-324, 2.2250738585072014e-308, 1e-300, 1e300, 1.7976931348623157e308],
    "bucket-edges": [sketch._GAMMA**i for i in range(-50, 50)],
    "more-than-15-buckets": [1.01**i for i in range(40)],
    "more-than-65535-ones": [1.0] * 70_000,
    "at-the-bucket-cap": [1.0101**i for i in range(MAX_BUCKETS)],
}

#: value lists C leaves to Python: (values, low, high)
PYTHON_VALUES = {
    "over-the-bucket-cap": ([1.0101**i for i in range(MAX_BUCKETS + 1)], 1.0, 1e20),
    "an-int": ([1.0, 2, 3.0], 1.0, 3.0),
    "int-bounds": ([1.0, 2.0], 1, 2),
    "nan": ([1.0, math.nan], 1.0, 1.0),
    "inf": ([1.0, math.inf], 1.0, math.inf),
    "a-tuple": ((1.0, 2.0), 1.0, 2.0),
}


@pytest.mark.parametrize("values", PLAIN_VALUES.values(), ids=PLAIN_VALUES.keys())
def test_sketch_bytes_is_the_python_bytes(values: list[float]) -> None:
    low, high = min(values), max(values)
    fast = c_sketch_bytes(values, low, high)
    assert fast is not None
    assert fast == sketch._sketch_bytes(values, low, high)
    assert fast == Sketch.from_values(values).to_bytes()


@pytest.mark.parametrize(
    ("values", "low", "high"), PYTHON_VALUES.values(), ids=PYTHON_VALUES.keys()
)
def test_sketch_bytes_leaves_the_rest_to_python(
    values: list[float], low: float, high: float
) -> None:
    assert c_sketch_bytes(values, low, high) is None


def test_sketch_bytes_bad_arguments() -> None:
    with pytest.raises(TypeError):
        native.sketch_bytes([1.0], 1.0, 1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        native.sketch_bytes([1.0], 1.0, 1.0, 1, MAX_BUCKETS)
    with pytest.raises(TypeError):
        native.merge_sketches((b"",), MAX_BUCKETS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_buckets"):
        native.merge_sketches([], -1)
    with pytest.raises(ValueError, match="max_buckets"):
        native.sketch_bytes([1.0], 1.0, 1.0, sketch.INV_LOG_GAMMA, 2**25)


def packed(values: list[float], weights: list[float] | None = None) -> bytes:
    return Sketch.from_values(values, weights).to_bytes()


F64 = struct.Struct(">d")


def raw_sketch(
    zero: bytes, positive: bytes, negative: bytes = b"\x80", head: bytes = b"\x96\x01"
) -> bytes:
    """A hand-made blob: head, zero weight, min 1.0, max 2.0, then the two maps as given."""
    return head + zero + b"\xcb" + F64.pack(1.0) + b"\xcb" + F64.pack(2.0) + positive + negative


#: blob lists C merges
PLAIN_MERGES = {
    "unit-weights": [packed([1.0, 2.0, 2.0]), packed([2.0, 300.0])],
    "zeros-and-negatives": [packed([0.0, -3.0]), packed([0.0, 0.0, -3.0, 4.0]), packed([-0.0])],
    "a-dozen-windows": [packed([float(i), float(i * 7 % 11)]) for i in range(1, 13)],
    "big-maps": [packed([1.01**i for i in range(300)]), packed([1.02**i for i in range(300)])],
    "negative-indices": [packed([0.001, 0.5]), packed([1e-200, 0.75])],
    "whole-weights-as-floats-in-sketch": [packed([1.0, 2.0], [2.0, 3.0]), packed([1.0])],
    "weights-just-under-2**53": [packed([1.0], [2.0**52]), packed([1.0], [2.0**52 - 1])],
    "every-int-width": [
        raw_sketch(
            b"\x05", b"\x83\x01\xcc\xc8\xd0\x80\xcd\x01\x2c\xd1\xff\x00\xce\x00\x01\x00\x00"
        ),
        raw_sketch(
            b"\xcc\xff", b"\x82\xd2\xff\xff\x00\x00\x01\xd3\xff\xff\xff\xff\x00\x00\x00\x00\x02"
        ),
        raw_sketch(
            b"\xcf\x00\x00\x00\x00\x00\x00\x00\x01", b"\x81\xe0\xcf\x00\x00\x00\x01\x00\x00\x00\x00"
        ),
    ],
    "signed-zero-extremes": [packed([0.0]), packed([-0.0]), packed([-0.0, 0.0])],
    "map16-headers": [raw_sketch(b"\x00", b"\xde\x00\x01\x01\x01"), packed([1.0])],
    "nan-min": [
        raw_sketch(b"\x00", b"\x80").replace(F64.pack(1.0), F64.pack(math.nan)),
        packed([3.0]),
    ],
}

#: blob lists C leaves to Python
PYTHON_MERGES = {
    "fractional-weights": [packed([1.0, 5.0], [0.5, 2.5]), packed([5.0], [1.0])],
    "sum-reaches-2**53": [packed([1.0], [2.0**52]), packed([1.0], [2.0**52])],
    "zero-weights-reach-2**53": [packed([0.0], [2.0**52]), packed([0.0], [2.0**52])],
    "over-the-bucket-cap": [
        packed([1.0075**i for i in range(0, 2 * MAX_BUCKETS, 2)]),
        packed([1.0075**i for i in range(1, 2 * MAX_BUCKETS, 2)]),
    ],
    "a-bucket-twice-in-one-blob": [raw_sketch(b"\x00", b"\x82\x01\x01\x01\x02"), packed([1.0])],
    "version-2": [packed([1.0]), raw_sketch(b"\x00", b"\x80", head=b"\x96\x02")],
    "array16-head": [packed([1.0]), raw_sketch(b"\x00", b"\x80", head=b"\xdc\x00\x06\x01")],
    "float32-min": [
        packed([1.0]),
        b"\x96\x01\x00\xca" + struct.pack(">f", 1.0) + b"\xcb" + F64.pack(2.0) + b"\x80\x80",
    ],
    "int-min": [packed([1.0]), b"\x96\x01\x00\x01\xcb" + F64.pack(2.0) + b"\x80\x80"],
    "negative-weight": [packed([1.0]), raw_sketch(b"\x00", b"\x81\x01\xff")],
    "uint64-key-over-int64": [
        packed([1.0]),
        raw_sketch(b"\x00", b"\x81\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
    ],
    "text-key": [packed([1.0]), raw_sketch(b"\x00", b"\x81\xa1a\x01")],
    "truncated": [packed([1.0]), packed([1.0, 2.0])[:-3]],
    "trailing-byte": [packed([1.0]), packed([2.0]) + b"\x00"],
    "empty": [packed([1.0]), b""],
    "not-bytes": [packed([1.0]), bytearray(packed([1.0]))],
    "not-a-sketch": [packed([1.0]), msgpack.packb([1, 0, ["a"]])],
}


@pytest.mark.parametrize("blobs", PLAIN_MERGES.values(), ids=PLAIN_MERGES.keys())
def test_merge_is_the_python_bytes(blobs: list[bytes]) -> None:
    for order in (blobs, blobs[::-1]):
        fast = native.merge_sketches(order, MAX_BUCKETS)
        assert fast is not None
        assert fast == sketch._merge_small_sketches(order)


@pytest.mark.parametrize("blobs", PYTHON_MERGES.values(), ids=PYTHON_MERGES.keys())
def test_merge_leaves_the_rest_to_python(blobs: list[bytes]) -> None:
    assert native.merge_sketches(blobs, MAX_BUCKETS) is None
    assert native.merge_sketches(blobs[::-1], MAX_BUCKETS) is None


def test_merge_blobs_still_decides_what_c_leaves() -> None:
    """What C declines, merge_blobs answers (or refuses) as the Python path does."""
    fractional = PYTHON_MERGES["fractional-weights"]
    assert merge_blobs("ms", fractional) == sketch._merge_small_sketches(fractional)
    with pytest.raises(ValueError):
        merge_blobs("ms", PYTHON_MERGES["version-2"])


finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(finite, st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e-9])), min_size=1, max_size=80
    )
)
def test_sketch_bytes_of_any_finite_values(values: list[float]) -> None:
    low, high = min(values), max(values)
    assert c_sketch_bytes(values, low, high) == sketch._sketch_bytes(values, low, high)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.one_of(finite, st.just(0.0)), min_size=1, max_size=30),
            st.one_of(st.none(), st.integers(1, 5)),
        ),
        min_size=2,
        max_size=14,
    )
)
def test_merge_of_any_unit_or_whole_weight_sketches(
    windows: list[tuple[list[float], int | None]],
) -> None:
    blobs = [
        packed(values, None if weight is None else [float(weight)] * len(values))
        for values, weight in windows
    ]
    fast = native.merge_sketches(blobs, MAX_BUCKETS)
    assert fast == sketch._merge_small_sketches(blobs)


def sets(*members: list[str]) -> list[bytes]:
    return [SetState.from_members(m).to_bytes() for m in members]


#: exact set states C unions
PLAIN_SET_MERGES = {
    "overlapping": sets(["a", "b"], ["b", "c"], ["a"]),
    "empty-ones": sets([], ["x"], []),
    "all-empty": sets([], []),
    "prefixes-and-lengths": sets(["ab", "a", "abc"], ["", "b", "aa"]),
    "str8-str16": sets(["k" * 31, "k" * 32, "k" * 255], ["k" * 256, "k" * 70_000]),
    "more-than-15-members": sets([f"u{i}" for i in range(20)], [f"u{i}" for i in range(10, 40)]),
    "up-to-the-exact-limit": sets(
        [str(i) for i in range(SET_EXACT_LIMIT // 2)],
        [str(i) for i in range(SET_EXACT_LIMIT // 2, SET_EXACT_LIMIT)],
    ),
    "array16-of-few": [msgpack.packb([1, 0, ["b", "a"]])[:3] + b"\xdc\x00\x02\xa1b\xa1a"],
}

#: set states C leaves to Python
PYTHON_SET_MERGES = {
    "non-ascii": sets(["é"], ["e"]),
    "over-the-exact-limit": sets(
        [str(i) for i in range(SET_EXACT_LIMIT)], [str(-i) for i in range(1, 3)]
    ),
    "a-hyperloglog": sets([str(i) for i in range(SET_EXACT_LIMIT + 1)], ["a"]),
    "a-bin-member": [msgpack.packb([1, 0, [b"a"]], use_bin_type=True), *sets(["a"])],
    "an-int-member": [msgpack.packb([1, 0, [1]]), *sets(["a"])],
    "version-2": [msgpack.packb([2, 0, ["a"]]), *sets(["a"])],
    "trailing-byte": [sets(["a"])[0] + b"\x00", *sets(["b"])],
    "truncated": [sets(["abc"])[0][:-1], *sets(["b"])],
    "not-bytes": [bytearray(sets(["a"])[0]), *sets(["b"])],
}


@pytest.mark.parametrize("blobs", PLAIN_SET_MERGES.values(), ids=PLAIN_SET_MERGES.keys())
def test_set_merge_is_the_python_bytes(blobs: list[bytes]) -> None:
    for order in (blobs, blobs[::-1]):
        fast = native.merge_sets(order, SET_EXACT_LIMIT)
        assert fast is not None
        assert fast == sketch._merge_exact_sets(order)


@pytest.mark.parametrize("blobs", PYTHON_SET_MERGES.values(), ids=PYTHON_SET_MERGES.keys())
def test_set_merge_leaves_the_rest_to_python(blobs: list[bytes]) -> None:
    assert native.merge_sets(blobs, SET_EXACT_LIMIT) is None
    assert native.merge_sets(blobs[::-1], SET_EXACT_LIMIT) is None


def test_set_merge_bad_arguments() -> None:
    with pytest.raises(TypeError):
        native.merge_sets((b"",), SET_EXACT_LIMIT)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        native.merge_sets([], -1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=40)),
        min_size=2,
        max_size=12,
    )
)
def test_set_merge_of_any_ascii_members(members: list[list[str]]) -> None:
    blobs = sets(*members)
    assert native.merge_sets(blobs, SET_EXACT_LIMIT) == sketch._merge_exact_sets(blobs)


# ------------------------------------------------------------ window_rollups

START = 1_000_000
PS = (50.0, 90.0, 99.0, 100.0, 0.0)


def window(
    counters: dict | None = None,
    timers: dict | None = None,
    weights: dict | None = None,
    gauges: dict | None = None,
    sets: dict | None = None,
    persisted: dict | None = None,
) -> ClosedWindow:
    """A window as the aggregator closes it; ``timers`` as lists, packed here."""
    packed = {k: bytearray(b"".join(map(pack_value, v))) for k, v in (timers or {}).items()}
    return ClosedWindow(
        START, counters or {}, packed, weights or {}, gauges or {}, sets or {}, persisted
    )


def c_snapshot(closed: ClosedWindow) -> list[Rollup]:
    """The snapshot with the C extension, in key order (snapshot's own order is none)."""
    return sorted(aggregate.snapshot(closed, PS))


def python_snapshot(closed: ClosedWindow, monkeypatch: pytest.MonkeyPatch) -> list[Rollup]:
    with monkeypatch.context() as m:
        m.setattr(aggregate, "sketch_native", None)
        m.setattr(sketch, "sketch_native", None)
        return sorted(aggregate.snapshot(closed, PS))


def native_made(closed: ClosedWindow) -> tuple[list[Rollup], list[SeriesKey], list[SeriesKey]]:
    return native.window_rollups(  # type: ignore[no-any-return]
        Rollup, closed.start, PS, closed.counters, closed.gauges, closed.persisted,
        closed.timers, closed.weights, closed.sets, aggregate._NATIVE_CONSTANTS,
    )  # fmt: skip


def key(name: str, kind: str) -> SeriesKey:
    return (name, kind, (("env", "prod"),))


#: windows whose every rollup C makes
PLAIN_WINDOWS = {
    "counters": window(counters={key("a", "c"): [3.0, 2.0], key("b", "c"): [40.0, 10.0]}),
    "gauges-touched-and-held": window(
        gauges={key("g", "g"): [4.0, -1.0, 9.0]},
        persisted={key("g", "g"): 4.0, key("held", "g"): -0.0},
    ),
    "timers": window(
        timers={
            key("one", "ms"): [7.5],
            key("ties", "ms"): [0.0, -0.0, 3.0, -0.0, 0.0],
            key("zero-first", "ms"): [0.0, -0.0],
            key("minus-zero-first", "ms"): [-0.0, 0.0, -0.0],
            key("zeros-merged", "ms"): [0.0] * 20 + [-0.0] * 20 + [1.0],
            key("negatives", "h"): [-3.0, -1e-300, 2.0, 1e300],
            key("many", "d"): [float((i * 7919) % 1000) - 500.0 for i in range(1000)],
            key("signed-zeros-many", "ms"): [(-0.0 if i % 3 else 0.0) for i in range(100)],
        }
    ),
    "sets": window(
        sets={
            key("empty", "s"): set(),
            key("users", "s"): {f"u{i}" for i in range(40)},
            key("long", "s"): {"x" * 40, "y" * 300, "z" * 70_000},
            key("at-the-limit", "s"): {str(i) for i in range(SET_EXACT_LIMIT)},
        }
    ),
    "timestamped": window(counters={key("late", "c"): [1.0, 1.0]}),
}

#: windows C makes in part: (window, timer keys left, set keys left)
MIXED_WINDOWS = {
    "weighted-timer": (
        window(
            timers={key("w", "ms"): [1.0, 2.0], key("u", "ms"): [3.0]},
            weights={key("w", "ms"): [4.0]},
        ),
        [key("w", "ms")],
        [],
    ),
    "non-ascii-member": (window(sets={key("s", "s"): {"é", "a"}}), [], [key("s", "s")]),
    "int-member": (window(sets={key("s", "s"): {"a", 7}}), [], [key("s", "s")]),
    "over-the-exact-limit": (
        window(sets={key("big", "s"): {str(i) for i in range(SET_EXACT_LIMIT + 1)}}),
        [],
        [key("big", "s")],
    ),
    "over-the-bucket-cap": (
        window(timers={key("wide", "ms"): [1.0101**i for i in range(MAX_BUCKETS + 1)]}),
        [key("wide", "ms")],
        [],
    ),
}

#: windows C leaves whole to Python (None)
PYTHON_WINDOWS = {
    "counter-as-tuple": window(counters={key("a", "c"): (1.0, 1.0)}),
    "gauge-of-two": window(gauges={key("g", "g"): [1.0, 1.0]}),
    "key-not-a-triple": window(counters={("a", "c"): [1.0, 1.0]}),
}


def test_every_rollup_of_a_plain_window_is_made_in_c() -> None:
    for closed in PLAIN_WINDOWS.values():
        rollups, timers, sets = native_made(closed)
        assert (timers, sets) == ([], [])
        expected = len(closed.counters) + len(closed.timers) + len(closed.sets)
        expected += len(set(closed.gauges) | set(closed.persisted or ()))
        assert len(rollups) == expected


@pytest.mark.parametrize("closed", PLAIN_WINDOWS.values(), ids=PLAIN_WINDOWS.keys())
def test_window_rollups_are_the_python_rollups(
    closed: ClosedWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # repr: -0.0 and 0.0 are equal, and the sign must be Python's too
    assert repr(c_snapshot(closed)) == repr(python_snapshot(closed, monkeypatch))


@pytest.mark.parametrize(
    ("closed", "timers", "sets"), MIXED_WINDOWS.values(), ids=MIXED_WINDOWS.keys()
)
def test_window_rollups_leave_the_rest_to_python(
    closed: ClosedWindow,
    timers: list[SeriesKey],
    sets: list[SeriesKey],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = native_made(closed)
    assert (made[1], made[2]) == (timers, sets)
    assert repr(c_snapshot(closed)) == repr(python_snapshot(closed, monkeypatch))


@pytest.mark.parametrize("closed", PYTHON_WINDOWS.values(), ids=PYTHON_WINDOWS.keys())
def test_window_rollups_leave_an_odd_window_to_python(
    closed: ClosedWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert native_made(closed) is None
    assert outcome(lambda: c_snapshot(closed)) == outcome(
        lambda: python_snapshot(closed, monkeypatch)
    )


def outcome(make: Callable[[], list[Rollup]]) -> str:
    """The rollups' repr, or the error's type: what the caller gets."""
    try:
        return repr(make())
    except Exception as exc:
        return type(exc).__name__


def test_window_rollups_leave_a_value_c_cannot_sketch_to_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An infinite value (the parser lets none in) is Python's to refuse."""
    closed = window(timers={key("i", "ms"): [1.0, math.inf]})
    assert native_made(closed)[1] == [key("i", "ms")]
    refused = outcome(lambda: python_snapshot(closed, monkeypatch))
    assert refused == "OverflowError"
    assert outcome(lambda: c_snapshot(closed)) == refused


def test_window_rollups_raise_as_python_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsum's intermediate overflow is the same OverflowError either way."""
    closed = window(timers={key("huge", "ms"): [1.7e308, 1.7e308]})
    with pytest.raises(OverflowError):
        c_snapshot(closed)
    with pytest.raises(OverflowError):
        python_snapshot(closed, monkeypatch)


def test_window_rollups_bad_arguments() -> None:
    with pytest.raises(TypeError):
        native.window_rollups(Rollup, START, PS)
    with pytest.raises(TypeError, match="dicts"):
        native.window_rollups(
            Rollup, START, PS, [], {}, None, {}, {}, {}, aggregate._NATIVE_CONSTANTS
        )
    with pytest.raises(TypeError, match="percentiles"):
        native.window_rollups(
            Rollup, START, (50,), {}, {}, None, {}, {}, {}, aggregate._NATIVE_CONSTANTS
        )


finite = st.floats(
    allow_nan=False, allow_infinity=False, width=64, min_value=-1e300, max_value=1e300
)


@settings(max_examples=200, deadline=None)
@given(
    counters=st.dictionaries(st.text("abc", max_size=3), st.tuples(finite, finite), max_size=5),
    timers=st.dictionaries(
        st.text("abc", max_size=3),
        st.lists(st.one_of(finite, st.sampled_from([0.0, -0.0, 1.0])), min_size=1, max_size=80),
        max_size=5,
    ),
    weighted=st.sets(st.text("abc", max_size=3), max_size=2),
    gauges=st.dictionaries(
        st.text("abc", max_size=3), st.tuples(finite, finite, finite), max_size=4
    ),
    held=st.one_of(st.none(), st.dictionaries(st.text("abcd", max_size=3), finite, max_size=4)),
    sets=st.dictionaries(
        st.text("abc", max_size=3), st.sets(st.text(max_size=4), max_size=30), max_size=4
    ),
)
def test_snapshot_of_any_window(
    counters: dict[str, tuple[float, float]],
    timers: dict[str, list[float]],
    weighted: set[str],
    gauges: dict[str, tuple[float, float, float]],
    held: dict[str, float] | None,
    sets: dict[str, set[str]],
) -> None:
    closed = window(
        counters={key(n, "c"): list(v) for n, v in counters.items()},
        timers={key(n, "ms"): v for n, v in timers.items()},
        weights={key(n, "ms"): [0.5] for n in weighted if n in timers},
        gauges={key(n, "g"): list(v) for n, v in gauges.items()},
        sets={key(n, "s"): v for n, v in sets.items()},
        persisted=None if held is None else {key(n, "g"): v for n, v in held.items()},
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure = outcome(lambda: python_snapshot(closed, monkeypatch))
    assert outcome(lambda: c_snapshot(closed)) == pure


# ------------------------------------------------------------ fold_rows


def pending_after(windows: list[list[tuple[object, ...]]], fast: bool) -> str:
    """What storage._Pending holds after folding ``windows``, with or without C."""
    with pytest.MonkeyPatch.context() as m:
        if not fast:
            m.setattr(storage, "sketch_native", None)
        pending = storage._Pending(0)
        for n, rows in enumerate(windows):
            pending.add(10 * n, rows)
    if not pending.valid:  # never read again (compacted() is None): its columns do not matter
        return "invalid"
    columns = ("valid", "sids", "pos", "count", "sum", "min", "max", "last", "states")
    return repr([getattr(pending, name) for name in columns])


def rows_of(sids: list[int], values: list[tuple[object, ...]], ts: int) -> list[tuple[object, ...]]:
    return [
        (10, ts, 1, sid, count, total, low, high, last, state, "c")
        for sid, (count, total, low, high, last, state) in zip(sids, values, strict=True)
    ]


def native_columns(pending: storage._Pending) -> tuple[object, ...]:
    return (pending.pos, pending.count, pending.sum, pending.min, pending.max, pending.last)


def test_fold_rows_updates_the_columns_in_place() -> None:
    first = rows_of([1, 2], [(1.0, 2.0, -0.0, 3.0, 3.0, None), (1.0, 1.0, 1.0, 1.0, 1.0, b"x")], 0)
    again = rows_of([1, 2], [(1.0, 5.0, 0.0, 9.0, 9.0, None), (2.0, 2.0, 0.5, 1.0, 1.0, b"y")], 10)
    pending = storage._Pending(0)
    pending.add(0, first)
    states = native.fold_rows(again, *native_columns(pending))
    assert states == [None, b"y"]
    doubles = [array.array("d", pair) for pair in ([2.0, 3.0], [7.0, 3.0], [-0.0, 0.5], [9.0, 1.0])]
    assert repr(native_columns(pending)[1:]) == repr((*doubles, [9.0, 1.0]))


def test_fold_rows_takes_the_bucket_series_in_any_order_and_any_of_them() -> None:
    plain = (1.0, 1.0, 1.0, 1.0, 1.0, None)
    first = rows_of([1, 2, 3], [plain] * 3, 0)
    for sids in ([3, 1, 2], [2], [3, 1]):
        again = rows_of(sids, [(2.0, 2.0, 0.5, 2.0, 2.0, b"s")] * len(sids), 10)
        pending = storage._Pending(0)
        pending.add(0, first)
        states = native.fold_rows(again, *native_columns(pending))
        assert states == [b"s" if sid in sids else None for sid in (1, 2, 3)]
        assert pending.count.tolist() == [3.0 if sid in sids else 1.0 for sid in (1, 2, 3)]
        assert pending_after([first, again], fast=True) == pending_after([first, again], False)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 3, None, "1"], ids=repr)
def test_fold_rows_leaves_odd_values_to_python(value: object) -> None:
    sids = [1, 2]
    plain = (1.0, 1.0, 1.0, 1.0, 1.0, None)
    odd = (value, 1.0, value, 1.0, 1.0, None)
    first = rows_of(sids, [plain, plain], 0)
    again = rows_of(sids, [plain, odd], 10)
    pending = storage._Pending(0)
    pending.add(0, first)
    held = repr(native_columns(pending))
    assert native.fold_rows(again, *native_columns(pending)) is None
    assert repr(native_columns(pending)) == held  # declined before a column changed
    assert pending_after([first, again], fast=True) == pending_after([first, again], fast=False)


def test_fold_rows_leaves_new_or_repeated_series_to_python() -> None:
    plain = (1.0, 1.0, 1.0, 1.0, 1.0, None)
    first = rows_of([1, 2], [plain, plain], 0)
    for sids in ([1, 3], [1, 2, 3], [9], [2, 2], [1, 1, 2]):
        again = rows_of(sids, [plain] * len(sids), 10)
        pending = storage._Pending(0)
        pending.add(0, first)
        held = repr(native_columns(pending))
        assert native.fold_rows(again, *native_columns(pending)) is None
        assert repr(native_columns(pending)) == held
        assert pending_after([first, again], fast=True) == pending_after([first, again], False)


def test_a_new_series_twice_in_a_window_leaves_the_bucket_invalid() -> None:
    """Given positions, the new series must not make the window look like
    the bucket's own series in order (which Python folds without a check)."""
    plain = (1.0, 1.0, 1.0, 1.0, 1.0, None)
    first = rows_of([1], [plain], 0)
    again = rows_of([1, 2, 2], [plain] * 3, 10)
    for fast in (True, False):
        assert pending_after([first, again], fast) == "invalid"


def test_fold_rows_bad_arguments() -> None:
    pending = storage._Pending(0)
    pending.add(0, rows_of([1], [(1.0, 1.0, 1.0, 1.0, 1.0, None)], 0))
    columns = native_columns(pending)
    with pytest.raises(TypeError):
        native.fold_rows([], *columns[:-1])
    with pytest.raises(TypeError, match="array"):
        native.fold_rows([], array.array("d", [0.0, 1.0]), *columns[1:])


folded_value = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 0.1, 0.2, 1e16, -1e16, 5e-324, 1e308]),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(*[folded_value] * 5, st.sampled_from([None, b"s"])), min_size=3, max_size=3
        ),
        min_size=1,
        max_size=5,
    )
)
def test_fold_rows_of_any_windows(windows: list[list[tuple[object, ...]]]) -> None:
    rows = [rows_of([1, 2, 3], values, 10 * n) for n, values in enumerate(windows)]
    assert pending_after(rows, fast=True) == pending_after(rows, fast=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([1, 2, 3, 5, 8]), min_size=1, max_size=5, unique=True),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([1.0, 0.5, -2.0, math.nan, None]),
)
def test_fold_rows_of_any_series_in_any_order(sids: list[list[int]], value: object) -> None:
    """Windows of other series than the bucket's first, in any order, new
    ones among them, and in the fourth window a value C may decline: C and
    Python leave the same bucket behind. (A series twice in a window:
    test_fold_rows_leaves_new_or_repeated_series_to_python.)"""
    windows = [
        rows_of(ids, [(1.0, float(at), value if at == 3 else 2.0, 3.0, 4.0, b"s")] * len(ids), at)
        for at, ids in enumerate(sids)
    ]
    assert pending_after(windows, fast=True) == pending_after(windows, fast=False)


# ------------------------------------------------------------ window_rows


def test_window_rows_sorts_by_ids_and_keeps_the_order_of_equal_ones() -> None:
    def rollup(name: str, tags: tuple[tuple[str, str], ...], last: float) -> Rollup:
        return Rollup(name, "c", tags, START, 1.0, 2.0, 3.0, 4.0, last, None)

    ab, ba = (("a", "1"), ("b", "2")), (("b", "2"), ("a", "1"))
    cache = {("x", "c", ab): (7, 2), ("x", "c", ba): (7, 2), ("y", "c", ()): (3, 1)}
    window = [rollup("x", ab, 1.0), rollup("y", (), 2.0), rollup("x", ba, 3.0)]
    rows, missing = native.window_rows(window, cache, 10, START)
    assert missing is None
    assert rows == [
        (10, START, 1, 3, 1.0, 2.0, 3.0, 4.0, 2.0, None, "c"),
        (10, START, 2, 7, 1.0, 2.0, 3.0, 4.0, 1.0, None, "c"),  # the same series twice:
        (10, START, 2, 7, 1.0, 2.0, 3.0, 4.0, 3.0, None, "c"),  # in the window's order
    ]


def test_window_rows_names_the_series_the_cache_lacks() -> None:
    window = [
        Rollup(name, "c", (), START, 1.0, 1.0, 1.0, 1.0, 1.0, None) for name in ("b", "a", "c")
    ]
    assert native.window_rows(window, {("a", "c", ()): (1, 1)}, 10, START) == (
        None,
        [("b", "c", ()), ("c", "c", ())],
    )
    with pytest.raises(TypeError):
        native.window_rows(window, {("a", "c", ()): 1, ("b", "c", ()): 1, ("c", "c", ()): 1}, 10, 0)
    with pytest.raises(TypeError):
        native.window_rows([("a",)], {}, 10, 0)


# ------------------------------------------------------------ gauge reports

GAUGE_VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -2.5, math.inf, -math.inf, math.nan, 1e308, -1e308]),
    st.floats(-1e6, 1e6),
)
#: a report's arrival: < 0 for deltas only (-1.0 as workers send it), NaN as a stray
ARRIVALS = st.sampled_from([-1.0, -0.5, 0.0, 1.0, 2.0, 2.0, 3.5, math.nan])
GAUGE_KEYS = [(f"g{i % 3}", "g", (("host", f"h{i}"),) if i > 2 else ()) for i in range(6)]


def resolved(
    held: dict[SeriesKey, float],
    stats: dict[SeriesKey, list[float]],
    parts: list[dict[SeriesKey, list[float]]],
    limits: Limits,
    in_c: bool,
) -> object:
    """What _resolve_gauges leaves, or the error it raises, with the C path or without."""
    opened = ClosedWindow(0, {}, {k: list(v) for k, v in stats.items()}, {}, {}, {}, dict(held))
    drops = Drops()
    budget = Budget(limits, drops)
    with pytest.MonkeyPatch.context() as patch:
        if not in_c:
            patch.setattr(aggregate, "sketch_native", None)
        try:
            moved = aggregate._resolve_gauges(opened, [dict(p) for p in parts], budget)
        except (OverflowError, ValueError) as exc:
            return type(exc)
    # bit patterns, so that NaN equals NaN and -0.0 differs from 0.0
    bits = struct.Struct("<d").pack

    def exact(d: dict[SeriesKey, Any]) -> list[tuple[SeriesKey, object]]:
        return [(k, [bits(x) for x in v] if isinstance(v, list) else bits(v)) for k, v in d.items()]

    return (
        exact(moved), exact(opened.gauges), exact(opened.persisted or {}),
        drops.window, budget.gauges_per_metric, budget.created,
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    held=st.dictionaries(st.sampled_from(GAUGE_KEYS), GAUGE_VALUES, max_size=4),
    stats=st.dictionaries(
        st.sampled_from(GAUGE_KEYS), st.lists(GAUGE_VALUES, min_size=3, max_size=3), max_size=3
    ),
    parts=st.lists(
        st.dictionaries(
            st.sampled_from(GAUGE_KEYS),
            st.tuples(ARRIVALS, GAUGE_VALUES, GAUGE_VALUES, GAUGE_VALUES).map(list),
            max_size=6,
        ),
        min_size=1,
        max_size=4,
    ),
    max_series=st.sampled_from([2, 4, 100]),
)
def test_resolve_gauges_is_the_python_resolution(
    held: dict[SeriesKey, float],
    stats: dict[SeriesKey, list[float]],
    parts: list[dict[SeriesKey, list[float]]],
    max_series: int,
) -> None:
    """Any reports of one to four workers, held gauges or none, limits that
    refuse some: C leaves what Python leaves, bit for bit, or raises as it does."""
    limits = Limits(max_series=max_series, max_series_per_metric=max(max_series // 2, 1))
    assert resolved(held, stats, parts, limits, True) == resolved(held, stats, parts, limits, False)


def test_resolve_gauges_bad_arguments() -> None:
    with pytest.raises(TypeError):
        native.resolve_gauges({}, {}, [{("q", "g", ()): [1.0, 2.0]}], None, math.fsum)
    with pytest.raises(TypeError):
        native.resolve_gauges({}, {}, [{("q", "g", ()): [1.0, "x", 2.0, 3.0]}], None, math.fsum)
    with pytest.raises(TypeError):
        native.resolve_gauges({}, {}, ({},), None, math.fsum)
    assert native.resolve_gauges({}, {}, [], None, math.fsum) == {}
