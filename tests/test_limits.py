"""Limits: series per window (globally and per metric), tags, names, |T range,
sketch growth; every drop counted under its reason and its offender named."""

from __future__ import annotations

import math
import random

import pytest

from aggregator.aggregate import Aggregator, snapshot
from aggregator.limits import (
    MAX_KEY_VALUES,
    MAX_OFFENDERS,
    METRIC_SERIES_LIMIT,
    NAME_TOO_LONG,
    SERIES_LIMIT,
    TAG_TOO_LONG,
    TIMESTAMP_OUT_OF_RANGE,
    TOO_MANY_TAGS,
    Drops,
    Limits,
    Registrations,
)
from aggregator.model import COUNTER, GAUGE, SET, TIMER, Sample
from aggregator.sketch import MAX_BUCKETS, Sketch

START = 1_000_000


def make(**limits: int) -> Aggregator:
    aggregator = Aggregator(10, [50.0], limits=Limits(**limits), drops=Drops())
    aggregator.open(START)
    return aggregator


def counter(name: str, **tags: str) -> Sample:
    return Sample(name, COUNTER, tuple(sorted(tags.items())), 1.0)


def stored(aggregator: Aggregator) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
    return {
        (r.name, r.type, r.tags): r.sum
        for window in aggregator.swap(START + 10)
        for r in snapshot(window, [50.0])
    }


def test_the_per_metric_limit_drops_new_series_and_keeps_existing_ones() -> None:
    agg = make(max_series_per_metric=3)
    agg.add([counter("req", user=f"u{i}") for i in range(10)])
    agg.add([counter("req", user="u0"), counter("other", user="u9")])  # known, other metric
    rows = stored(agg)
    assert rows == {
        ("req", COUNTER, (("user", "u0"),)): 2.0,
        ("req", COUNTER, (("user", "u1"),)): 1.0,
        ("req", COUNTER, (("user", "u2"),)): 1.0,
        ("other", COUNTER, (("user", "u9"),)): 1.0,
    }
    assert agg.drops.take_window() == {METRIC_SERIES_LIMIT: 7}


def test_the_global_limit_counts_every_type_and_persisted_gauges() -> None:
    agg = make(max_series=4)
    agg.add([Sample("g1", GAUGE, (), 1.0), Sample("g2", GAUGE, (), 2.0)])
    agg.add([Sample("t", TIMER, (), 5.0), Sample("s", SET, (), "m"), counter("c1"), counter("c2")])
    kept = {("g1", GAUGE, ()), ("g2", GAUGE, ()), ("t", TIMER, ()), ("s", SET, ())}
    assert set(stored(agg)) == kept
    assert agg.drops.take_window() == {SERIES_LIMIT: 2}
    # Next window: both gauges are still series of it (persisted); two more fit.
    agg.add([counter(f"n{i}") for i in range(4)])
    assert len(stored(agg)) == 4
    assert agg.drops.take_window() == {SERIES_LIMIT: 2}


def test_a_window_starts_a_fresh_budget() -> None:
    agg = make(max_series=2)
    agg.add([counter("a"), counter("b"), counter("c")])
    assert len(stored(agg)) == 2
    agg.add([counter("c"), counter("d")])
    assert set(stored(agg)) == {("c", COUNTER, ()), ("d", COUNTER, ())}


def test_names_and_tags_over_their_limits_are_dropped() -> None:
    agg = make(max_name_length=10, max_tags=2, max_tag_length=8)
    agg.add(
        [
            counter("x" * 11),
            counter("ok", a="1", b="2", c="3"),
            counter("ok", k="123456"),  # "k:123456" is 8 characters: fine
            counter("ok", k="1234567"),  # 9
            counter("x" * 10),
        ]
    )
    assert set(stored(agg)) == {("ok", COUNTER, (("k", "123456"),)), ("x" * 10, COUNTER, ())}
    assert agg.drops.take_window() == {NAME_TOO_LONG: 1, TOO_MANY_TAGS: 1, TAG_TOO_LONG: 1}


def test_the_daemons_own_metrics_pass_any_limit() -> None:
    agg = make(max_series=1)
    agg.add([counter("user")])
    agg.add([counter("statsd_aggregator.x"), counter("statsd_aggregator.y")], limited=False)
    assert len(stored(agg)) == 3


def test_timestamps_far_outside_the_accepted_range_are_dropped() -> None:
    agg = make(max_timestamp_age=3600, max_timestamp_future=600)
    samples = [
        Sample("t", COUNTER, (), 1.0, timestamp=ts)
        for ts in (
            START - 3600,  # oldest accepted
            START - 3601,  # one window older
            START + 605,  # within the future allowance
            START + 620,
            999_999_999_999_999_999,  # 18 digits: the parser accepts it
            0,
        )
    ]
    agg.add(samples)
    windows = sorted(w.start for w in agg.swap(START + 10) if w.counters)
    assert windows == [START - 3600, START + 600]
    assert agg.drops.take_window() == {TIMESTAMP_OUT_OF_RANGE: 4}


def test_timestamped_windows_count_towards_the_series_limit() -> None:
    agg = make(max_series=3)
    agg.add([Sample("t", COUNTER, (), 1.0, timestamp=START - 10 * i) for i in range(1, 6)])
    assert sum(len(w.counters) for w in agg.swap(START + 10)) == 3


def test_the_report_names_the_metric_and_the_tag_key_responsible() -> None:
    agg = make(max_series_per_metric=100)
    agg.add(
        [counter("api.requests", env="prod", user_id=f"u{i}", route="/a") for i in range(1000)]
        + [counter("fine", env="prod")]
    )
    report = agg.drops.report()
    assert report["dropped"][METRIC_SERIES_LIMIT] == 900
    assert report["dropped_total"] == 900
    [offender] = report["offenders"]
    assert offender["metric"] == "api.requests"
    assert offender["dropped"] == 900
    assert offender["reasons"] == {METRIC_SERIES_LIMIT: 900}
    keys = offender["tag_keys"]
    assert keys[0] == {"key": "user_id", "distinct_values": MAX_KEY_VALUES, "at_least": True}
    assert {k["key"]: k["distinct_values"] for k in keys[1:]} == {"env": 1, "route": 1}


def test_the_report_itself_is_bounded() -> None:
    drops = Drops()
    for i in range(MAX_OFFENDERS + 50):
        drops.drop(SERIES_LIMIT, f"m{i}", (("k", str(i)),))
    report = drops.report()
    assert len(report["offenders"]) == MAX_OFFENDERS
    assert report["other_metrics_dropped"] == 50
    assert report["dropped_total"] == MAX_OFFENDERS + 50
    drops.drop(NAME_TOO_LONG, "n" * 10_000, ())
    assert all(len(o["metric"]) < 200 for o in drops.report()["offenders"])


def test_limits_update_in_place_and_report_the_changes() -> None:
    limits = Limits()
    agg = Aggregator(10, [50.0], limits=limits)
    agg.open(START)
    assert limits.update(Limits(max_series=1, max_tags=3)) == ["max_series", "max_tags"]
    agg.add([counter("a"), counter("b")])
    assert len(stored(agg)) == 1


# ---------------------------------------------------------------- sketch growth


def test_hostile_values_cannot_grow_a_sketch_past_its_cap() -> None:
    rng = random.Random(7)
    # Every power of two a float can hold, both signs: ~4,000 buckets each
    # way at 1 % spacing would be ~140,000 without the cap.
    hostile = [sign * 2.0**e * rng.uniform(1, 2) for e in range(-1070, 1020) for sign in (1, -1)]
    sketch = Sketch.from_values(hostile)
    assert len(sketch.positive) <= MAX_BUCKETS and len(sketch.negative) <= MAX_BUCKETS
    assert sketch.count == len(hostile)
    assert len(sketch.to_bytes()) < 80_000
    # Merging keeps the cap too.
    other = Sketch.from_values([v * 3.7 for v in hostile])
    sketch.merge(other)
    assert len(sketch.positive) <= MAX_BUCKETS and len(sketch.negative) <= MAX_BUCKETS
    assert sketch.count == 2 * len(hostile)
    assert Sketch.from_bytes(sketch.to_bytes()).count == sketch.count


def test_the_cap_keeps_the_top_quantiles_accurate() -> None:
    rng = random.Random(3)
    latencies = [rng.lognormvariate(3, 1) for _ in range(20_000)]
    noise = [2.0**e for e in range(-1070, -200)]  # tiny values: folded
    sketch = Sketch.from_values(latencies + noise)
    assert len(sketch.positive) <= MAX_BUCKETS
    values = sorted(latencies + noise)
    for q in (0.5, 0.9, 0.99):
        exact = values[math.ceil(q * len(values)) - 1]
        assert sketch.quantile(q) == pytest.approx(exact, rel=0.01)
    assert sketch.quantile(0.0) == min(noise)


def test_registrations_stay_within_what_one_window_may_hold() -> None:
    registrations = Registrations(Limits(max_series=4, max_series_per_metric=2), START)
    keys = [("a", "c", (("k", str(i)),)) for i in range(3)] + [("b", "c", ()), ("c", "g", ())]
    keys += [("d", "c", ())]
    assert [registrations.admit(key) for key in keys] == [True, True, False, True, True, False]
    assert registrations.count == 4
