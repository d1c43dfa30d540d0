"""Storage: real SQLite files in tmp_path, expected values computed from what was written.

The strongest checks compare a storage with coarse tiers against an
"oracle" storage holding the same rollups at the flush resolution only:
whatever tiers, totals and watermarks a query goes through, its document
must be the one the oracle gives.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from aggregator.model import Event, Rollup, ServiceCheck, Tags
from aggregator.sketch import SetState, Sketch
from aggregator.storage import (
    MAX_AUTO_POINTS,
    METRIC_SEEN_EVERY,
    QueryError,
    Storage,
    Tier,
    plan_segments,
)

T0 = 1_764_000_000  # a multiple of 3600
HOUR = 3600
DAY = 86400

TIERS = (Tier(10, 6 * HOUR), Tier(60, 2 * DAY), Tier(600, 30 * DAY))
ORACLE_TIERS = (Tier(10, 365 * DAY),)


class Clock:
    """A settable clock (unix seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 3 * HOUR)


@pytest.fixture
def open_storage(tmp_path: Path, clock: Clock) -> Iterable[Callable[..., Storage]]:
    opened: list[Storage] = []

    def make(name: str = "metrics.db", tiers: Sequence[Tier] = TIERS) -> Storage:
        storage = Storage(str(tmp_path / name), tiers, clock=clock)
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        storage.close()


# ------------------------------------------------------------------ rollups


def counter(name: str, ts: int, value: float, tags: Tags = (), count: float = 1.0) -> Rollup:
    return Rollup(name, "c", tags, ts, count, value, value, value, value)


def gauge(
    name: str, ts: int, last: float, tags: Tags = (), low: float | None = None,
    high: float | None = None,
) -> Rollup:  # fmt: skip
    low = last if low is None else low
    high = last if high is None else high
    return Rollup(name, "g", tags, ts, 1.0, last, low, high, last)


def timer(name: str, ts: int, values: Sequence[float], tags: Tags = (), kind: str = "ms") -> Rollup:
    sketch = Sketch.from_values(list(values))
    return Rollup(
        name, kind, tags, ts, float(len(values)), math.fsum(values), min(values), max(values),
        values[-1], sketch.to_bytes(),
    )  # fmt: skip


def set_rollup(name: str, ts: int, members: Iterable[str], tags: Tags = ()) -> Rollup:
    state = SetState.from_members(members)
    n = float(state.cardinality())
    return Rollup(name, "s", tags, ts, n, n, n, n, n, state.to_bytes())


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The exact weighted nearest-rank percentile (weights 1), as sketch.py defines it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered) - 1e-9)) - 1]


def query(storage: Storage, metric: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("start", T0)
    kw.setdefault("end", T0 + HOUR)
    kw.setdefault("now", T0 + 3 * HOUR)
    return storage.query_series(metric, **kw)


def only(document: dict[str, Any]) -> dict[str, Any]:
    (series,) = document["series"]
    return series


# ------------------------------------------------------------- write, merge


def test_counter_points_value_rate_count(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([counter("hits", T0, 3.0, count=2.0)])
    storage.write([counter("hits", T0 + 10, 1.0)])
    storage.write([counter("hits", T0 + 30, 6.0, count=3.0)])
    doc = query(storage, "hits", end=T0 + 60, step=10)
    assert doc == {
        "metric": "hits",
        "type": "counter",
        "stat": "sum",
        "from": T0,
        "to": T0 + 60,
        "step": 10,
        "series": [
            {"tags": {}, "value": 10.0, "points": [[T0, 3.0], [T0 + 10, 1.0], [T0 + 30, 6.0]]}
        ],
    }
    rate = only(query(storage, "hits", stat="rate", end=T0 + 60, step=10))
    assert rate["value"] == pytest.approx(10.0 / 60)
    assert rate["points"] == [[T0, 0.3], [T0 + 10, 0.1], [T0 + 30, 0.6]]
    count = only(query(storage, "hits", stat="count", end=T0 + 60, step=30))
    assert count == {"tags": {}, "value": 6.0, "points": [[T0, 3.0], [T0 + 30, 3.0]]}


def test_conflicting_rows_merge(open_storage: Callable[..., Storage]) -> None:
    """The same (series, window) written twice: a restart inside a window, or |T."""
    storage = open_storage()
    first = [
        counter("c", T0, 2.0, count=2.0),
        gauge("g", T0, 5.0, low=1.0, high=5.0),
        timer("t", T0, [1.0, 2.0, 3.0]),
        set_rollup("s", T0, ["a", "b"]),
    ]
    second = [
        counter("c", T0, 3.0, count=1.0),
        gauge("g", T0, 4.0, low=4.0, high=9.0),
        timer("t", T0, [10.0, 20.0]),
        set_rollup("s", T0, ["b", "c", "d"]),
    ]
    storage.write(first)
    storage.write(second)
    window = {"end": T0 + 10, "step": 10}
    assert only(query(storage, "c", **window))["points"] == [[T0, 5.0]]
    assert only(query(storage, "c", stat="count", **window))["value"] == 3.0
    assert only(query(storage, "g", **window))["value"] == 4.0  # last replaces
    assert only(query(storage, "g", stat="min", **window))["value"] == 1.0
    assert only(query(storage, "g", stat="max", **window))["value"] == 9.0
    assert only(query(storage, "t", stat="count", **window))["value"] == 5.0
    assert only(query(storage, "t", stat="sum", **window))["value"] == 36.0
    assert only(query(storage, "t", stat="min", **window))["value"] == 1.0
    assert only(query(storage, "t", stat="max", **window))["value"] == 20.0
    assert only(query(storage, "t", stat="p100", **window))["value"] == 20.0
    assert only(query(storage, "t", stat="p50", **window))["value"] == pytest.approx(3.0, rel=0.01)
    assert only(query(storage, "s", **window))["value"] == 4.0
    # the stored count of a merged set row is the cardinality of the union
    with sqlite3.connect(storage.path) as conn:
        (count,) = conn.execute(
            "SELECT r.count FROM rollups r JOIN series s ON s.id = r.series_id WHERE s.name = 's'"
        ).fetchone()
    assert count == 4.0


def test_restart_keeps_everything(
    open_storage: Callable[..., Storage], tmp_path: Path, clock: Clock
) -> None:
    storage = open_storage()
    rows = [counter("c", T0 + 10 * i, float(i), (("k", "v"),)) for i in range(400)]
    for i in range(0, 400, 50):
        storage.write(rows[i : i + 50], state={"gauges": b"\x81\xa1g\x01"})
    before = query(storage, "c", step=60)
    storage.close()

    again = Storage(str(tmp_path / "metrics.db"), TIERS, clock=clock)
    try:
        assert again.load_state() == {"gauges": b"\x81\xa1g\x01"}
        assert query(again, "c", step=60) == before
        assert only(before)["value"] == float(sum(range(360)))
        # the same series again: merged, no second series
        again.write([counter("c", T0 + 3990, 1000.0, (("k", "v"),))])
        (metric,) = again.list_metrics()
        assert metric["series"] == 1
        total = only(query(again, "c", end=T0 + 2 * HOUR, step=600))["value"]
        assert total == float(sum(range(400)) + 1000)
    finally:
        again.close()


def test_state_blobs_replace_and_delete(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([], state={"a": b"1", "b": b"2"})
    storage.write([], state={"a": b"3", "b": None})
    assert storage.load_state() == {"a": b"3"}


def test_schema_is_migrated_and_wal(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    with sqlite3.connect(storage.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        applied = conn.execute("SELECT migration_set, name FROM _sqlite_migrations").fetchall()
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert applied == [("statsd_aggregator", "0001_schema")]
    assert {"metrics", "series", "series_tags", "rollups", "totals", "tiers", "events",
            "service_checks", "state"} <= tables  # fmt: skip


def test_bad_tiers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        Storage(str(tmp_path / "x.db"), [Tier(10, 100), Tier(25, 1000)])
    with pytest.raises(ValueError, match="retention"):
        Storage(str(tmp_path / "x.db"), [Tier(10, 5)])


def test_writes_from_a_second_thread_are_refused(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    errors: list[Exception] = []

    def other() -> None:
        try:
            storage.write([counter("c", T0, 1.0)])
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1


def rows_in_database_file(path: str, ts: int) -> int:
    """Tier-0 rollups at ts in the database file alone, without its WAL: what
    checkpoints have copied there."""
    copy = Path(path).with_name("file-only.db")
    copy.write_bytes(Path(path).read_bytes())
    try:
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM rollups WHERE resolution = 10 AND ts = ?", (ts,)
            ).fetchone()
    finally:
        for leftover in copy.parent.glob("file-only.db*"):
            leftover.unlink()
    return int(count)


def test_writes_leave_the_checkpoint_to_checkpoint_or_the_next_write(
    open_storage: Callable[..., Storage],
) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    assert rows_in_database_file(storage.path, T0) == 0  # not inside the commit
    storage.checkpoint()
    assert rows_in_database_file(storage.path, T0) == 1
    storage.write([counter("c", T0 + 10, 1.0)])
    storage.write([counter("c", T0 + 20, 1.0)])  # runs the checkpoint left due first
    assert rows_in_database_file(storage.path, T0 + 10) == 1
    assert rows_in_database_file(storage.path, T0 + 20) == 0
    assert only(query(storage, "c", end=T0 + 30, step=10))["points"] == [
        [T0, 1.0], [T0 + 10, 1.0], [T0 + 20, 1.0]
    ]  # fmt: skip


def test_reset_writer_lets_another_thread_take_over(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    storage.reset_writer()

    def other() -> None:
        storage.open_writer(busy_timeout=0.5)
        storage.write([counter("c", T0, 2.0)])

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert only(query(storage, "c", step=10))["points"] == [[T0, 3.0]]
    with pytest.raises(RuntimeError):
        storage.write([counter("c", T0, 1.0)])


def test_reset_readers_reopens_each_threads_connection(
    open_storage: Callable[..., Storage],
) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    assert only(query(storage, "c", step=10))["value"] == 1.0
    storage.reset_readers()
    storage.write([counter("c", T0, 1.0)])
    assert only(query(storage, "c", step=10))["value"] == 2.0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_writes_work_again_once_a_read_only_file_is_writable(
    open_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    """A reader opened while the file was read-only must not keep writes failing."""
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    storage.close()
    for path in tmp_path.glob("metrics.db*"):
        path.chmod(0o444)
    again = open_storage()  # opens, and reads, a read-only file
    try:
        assert only(query(again, "c", step=10))["value"] == 1.0
        with pytest.raises(sqlite3.OperationalError):
            again.write([counter("c", T0, 1.0)])
    finally:
        for path in tmp_path.glob("metrics.db*"):  # -wal, -shm: created read-only too
            path.chmod(0o644)
    again.reset_writer()
    again.write([counter("c", T0, 1.0)])
    assert only(query(again, "c", step=10))["value"] == 2.0


def test_readers_in_threads_see_committed_flushes(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    results: list[float] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            results.append(only(query(storage, "c", step=10))["value"])

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for i in range(1, 50):
        storage.write([counter("c", T0 + 10 * i, 1.0)])
    stop.set()
    for thread in readers:
        thread.join()
    assert results and all(1.0 <= value <= 50.0 for value in results)
    assert only(query(storage, "c", step=10))["value"] == 50.0


# ------------------------------------------------------------------ stats


def test_gauge_stats(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([gauge("g", T0, 5.0, low=2.0, high=7.0)])
    storage.write([gauge("g", T0 + 10, 1.0, low=1.0, high=5.0)])
    storage.write([gauge("g", T0 + 20, 4.0)])
    kw = {"end": T0 + 30, "step": 10}
    assert only(query(storage, "g", **kw)) == {
        "tags": {},
        "value": 4.0,
        "points": [[T0, 5.0], [T0 + 10, 1.0], [T0 + 20, 4.0]],
    }
    assert only(query(storage, "g", stat="min", **kw))["value"] == 1.0
    assert only(query(storage, "g", stat="max", **kw))["points"][0] == [T0, 7.0]
    assert only(query(storage, "g", stat="mean", **kw))["value"] == pytest.approx(10.0 / 3)
    # a bucket's last is the latest window's value
    assert only(query(storage, "g", end=T0 + 30, step=30))["points"] == [[T0, 4.0]]


def test_gauge_last_over_tag_sets_sums_each_series_latest(
    open_storage: Callable[..., Storage],
) -> None:
    storage = open_storage()
    storage.write(
        [gauge("mem", T0, 10.0, (("host", "a"),)), gauge("mem", T0, 1.0, (("host", "b"),))]
    )
    storage.write([gauge("mem", T0 + 10, 20.0, (("host", "a"),))])
    merged = only(query(storage, "mem", end=T0 + 20, step=20))
    assert merged["value"] == 21.0
    assert merged["points"] == [[T0, 21.0]]


@pytest.mark.parametrize("kind", ["ms", "h", "d"])
def test_distribution_stats(open_storage: Callable[..., Storage], kind: str) -> None:
    storage = open_storage()
    first, second = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0]
    storage.write([timer("lat", T0, first, kind=kind)])
    storage.write([timer("lat", T0 + 10, second, kind=kind)])
    everything = first + second
    kw = {"end": T0 + 20, "step": 10}
    doc = query(storage, "lat", **kw)
    assert doc["type"] == {"ms": "timer", "h": "histogram", "d": "distribution"}[kind]
    assert doc["stat"] == "mean"
    assert only(doc) == {"tags": {}, "value": 40.0 / 6, "points": [[T0, 2.5], [T0 + 10, 15.0]]}
    assert only(query(storage, "lat", stat="count", **kw))["value"] == 6.0
    assert only(query(storage, "lat", stat="sum", **kw))["value"] == 40.0
    assert only(query(storage, "lat", stat="min", **kw))["value"] == 1.0
    assert only(query(storage, "lat", stat="max", **kw))["value"] == 20.0
    rate = only(query(storage, "lat", stat="rate", **kw))
    assert rate["value"] == pytest.approx(6 / 20)
    assert rate["points"] == [[T0, 0.4], [T0 + 10, 0.2]]
    for stat, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("p0", 0.0)):
        value = only(query(storage, "lat", stat=stat, **kw))["value"]
        assert value == pytest.approx(nearest_rank(everything, q), rel=0.01), stat


def test_set_unique_merges_members_across_windows(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([set_rollup("users", T0, ["a", "b", "c"])])
    storage.write([set_rollup("users", T0 + 10, ["c", "d"])])
    storage.write([set_rollup("users", T0 + 20, ["a"])])
    assert only(query(storage, "users", end=T0 + 30, step=10)) == {
        "tags": {},
        "value": 4.0,
        "points": [[T0, 3.0], [T0 + 10, 2.0], [T0 + 20, 1.0]],
    }
    assert only(query(storage, "users", end=T0 + 30, step=30))["points"] == [[T0, 4.0]]


def test_large_sets_over_a_range_within_two_percent(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    members = [f"user-{i}" for i in range(20_000)]
    for w in range(10):  # overlapping windows: 5,000 members each, shifted by 1,500
        storage.write([set_rollup("u", T0 + 10 * w, members[1500 * w : 1500 * w + 5000])])
    exact = len(set(members[: 1500 * 9 + 5000]))
    value = only(query(storage, "u", end=T0 + 100, step=100))["value"]
    assert value == pytest.approx(exact, rel=0.02)


def test_percentiles_over_a_range_and_tag_sets_within_one_percent(
    open_storage: Callable[..., Storage], clock: Clock
) -> None:
    """Hours of windows from several series, merged through every tier."""
    rng = random.Random(7)
    storage = open_storage()
    everything: list[float] = []
    by_host: dict[str, list[float]] = {"a": [], "b": []}
    for w in range(2 * HOUR // 10):
        batch = []
        for host, scale in (("a", 100.0), ("b", 1000.0)):
            values = [rng.lognormvariate(0, 1) * scale for _ in range(5)]
            everything += values
            by_host[host] += values
            batch.append(timer("load", T0 + 10 * w, values, (("host", host),)))
        storage.write(batch)
    kw = {"end": T0 + 2 * HOUR, "step": HOUR}
    for stat, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("p99.9", 0.999)):
        value = only(query(storage, "load", stat=stat, **kw))["value"]
        assert value == pytest.approx(nearest_rank(everything, q), rel=0.01), stat
        grouped = query(storage, "load", stat=stat, group_by="host", **kw)["series"]
        for series in grouped:
            expected = nearest_rank(by_host[series["tags"]["host"]], q)
            assert series["value"] == pytest.approx(expected, rel=0.01), (stat, series["tags"])


# --------------------------------------------------------- filters, groups


def test_tag_filters_all_apply_and_keep_odd_values(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write(
        [
            counter("req", T0, 1.0, (("path", "/a:b"), ("region", "eu"))),
            counter("req", T0, 2.0, (("path", "/a:b"), ("region", "us"))),
            counter("req", T0, 4.0, (("canary", ""), ("path", "/a:b"), ("region", "eu"))),
            counter("req", T0, 8.0, (("path", "/c"), ("region", "eu"))),
        ]
    )
    kw = {"end": T0 + 10, "step": 10}
    assert only(query(storage, "req", **kw))["value"] == 15.0
    one = only(query(storage, "req", tags=[("path", "/a:b")], **kw))
    assert one == {"tags": {"path": "/a:b"}, "value": 7.0, "points": [[T0, 7.0]]}
    both = only(query(storage, "req", tags=[("path", "/a:b"), ("region", "eu")], **kw))
    assert both["value"] == 5.0
    assert both["tags"] == {"path": "/a:b", "region": "eu"}
    assert only(query(storage, "req", tags=[("canary", "")], **kw))["value"] == 4.0
    none = only(query(storage, "req", tags=[("region", "mars")], **kw))
    assert none == {"tags": {"region": "mars"}, "value": 0.0, "points": []}


def test_group_by_orders_by_value_then_tag_and_limits(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    rows = [
        counter("views", T0, 5.0, (("wb", "wb-2"),)),
        counter("views", T0, 9.0, (("wb", "wb-1"),)),
        counter("views", T0 + 10, 4.0, (("wb", "wb-1"),)),
        counter("views", T0, 5.0, (("wb", "wb-0"),)),
        counter("views", T0, 13.0, (("wb", "wb-3"), ("x", "1"))),
        counter("views", T0, 1.0, (("other", "z"),)),  # no wb tag: the "" group
    ]
    storage.write(rows)
    kw = {"end": T0 + 20, "step": 10, "group_by": "wb"}
    doc = query(storage, "views", **kw)
    assert [(s["tags"]["wb"], s["value"]) for s in doc["series"]] == [
        ("wb-1", 13.0),
        ("wb-3", 13.0),
        ("wb-0", 5.0),
        ("wb-2", 5.0),
        ("", 1.0),
    ]
    assert doc["series"][0]["points"] == [[T0, 9.0], [T0 + 10, 4.0]]
    top = query(storage, "views", limit=3, **kw)["series"]
    assert [s["tags"] for s in top] == [{"wb": "wb-1"}, {"wb": "wb-3"}, {"wb": "wb-0"}]
    filtered = query(storage, "views", tags=[("x", "1")], **kw)["series"]
    assert filtered == [{"tags": {"x": "1", "wb": "wb-3"}, "value": 13.0, "points": [[T0, 13.0]]}]
    assert storage.top_tag_values("views", None, "wb", T0, T0 + 20, 2) == [
        ("wb-1", 13.0),
        ("wb-3", 13.0),
    ]


def test_group_by_with_few_series_of_a_big_metric(open_storage: Callable[..., Storage]) -> None:
    """The per-series seek plan (few members) and the scan plan agree."""
    storage = open_storage()
    rows = [counter("big", T0, float(i), (("id", str(i)),)) for i in range(100)]
    rows.append(counter("big", T0, 7.0, (("id", "x"), ("rare", "1"))))
    storage.write(rows)
    kw = {"end": T0 + 10, "step": 10}
    few = query(storage, "big", tags=[("rare", "1")], group_by="id", **kw)["series"]
    assert few == [{"tags": {"rare": "1", "id": "x"}, "value": 7.0, "points": [[T0, 7.0]]}]
    many = query(storage, "big", group_by="id", limit=2, **kw)["series"]
    assert [(s["tags"]["id"], s["value"]) for s in many] == [("99", 99.0), ("98", 98.0)]


def test_distinct_tag_values_with_data_in_the_range(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write(
        [
            counter("views", T0, 1.0, (("user_id", "u1"),)),
            counter("logins", T0, 1.0, (("user_id", "u2"),)),
            counter("other", T0, 1.0, (("user_id", "u3"),)),
        ]
    )
    storage.write([counter("views", T0 + 600, 1.0, (("user_id", "u4"),))])
    metrics = ["views", "logins", "nothing"]
    assert storage.distinct_tag_values(metrics, "user_id", T0, T0 + HOUR) == {"u1", "u2", "u4"}
    assert storage.distinct_tag_values(metrics, "user_id", T0 + 300, T0 + HOUR) == {"u4"}
    assert storage.distinct_tag_values([], "user_id", T0, T0 + HOUR) == set()


def test_distinct_tag_values_of_series_seen_long_ago_or_lately(
    open_storage: Callable[..., Storage],
) -> None:
    """series.last_seen moves only every SERIES_SEEN_EVERY (an hour): a series
    whose stored last_seen is older than the range may still have rows in it."""
    storage = open_storage()
    storage.write([counter("views", T0, 1.0, (("user_id", "old"),))])
    storage.write([counter("views", T0 + 10, 1.0, (("user_id", "late"),))])
    # "late" (series 2, first rewritten 20 s early: _seen_phase) again before
    # T0 + 10 + HOUR - 20: its last_seen stays T0 + 10
    for ts in (T0 + 600, T0 + 1800, T0 + HOUR - 30):
        storage.write([counter("views", ts, 1.0, (("user_id", "late"),))])
    storage.write([counter("views", T0 + 2 * HOUR, 1.0, (("user_id", "new"),))])
    with sqlite3.connect(storage.path) as conn:
        seen = dict(conn.execute("SELECT tags, last_seen FROM series"))
    assert seen == {'[["user_id","old"]]': T0, '[["user_id","late"]]': T0 + 10,
                    '[["user_id","new"]]': T0 + 2 * HOUR}  # fmt: skip
    distinct = storage.distinct_tag_values
    assert distinct(["views"], "user_id", T0 + HOUR - 60, T0 + 3 * HOUR) == {"late", "new"}
    assert distinct(["views"], "user_id", T0 + HOUR, T0 + 3 * HOUR) == {"new"}
    assert distinct(["views"], "user_id", T0, T0 + 3 * HOUR) == {"old", "late", "new"}


def test_last_seen_rewrites_of_series_made_together_are_spread_over_the_flushes(
    open_storage: Callable[..., Storage],
) -> None:
    """Twelve metrics (one series each) written every 10 s for five minutes:
    each flush rewrites the last_seen of at most two, and no stored
    last_seen ever falls METRIC_SEEN_EVERY behind the rows written."""
    storage = open_storage()
    names = [f"m{i:02}" for i in range(12)]
    rewritten = []
    before: dict[str, int] = {}
    for ts in range(T0, T0 + 300, 10):
        storage.write([counter(name, ts, 1.0) for name in names])
        with sqlite3.connect(storage.path) as conn:
            seen = dict(conn.execute("SELECT name, last_seen FROM metrics"))
        assert min(seen.values()) > ts - METRIC_SEEN_EVERY
        if before:
            rewritten.append(sum(seen[n] != before[n] for n in names))
        before = seen
    assert max(rewritten) <= 2
    assert sum(rewritten) >= 12 * (300 - METRIC_SEEN_EVERY) // METRIC_SEEN_EVERY


def test_list_metrics(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write(
        [
            counter("app.views", T0, 1.0, (("b", "1"), ("a", "2"))),
            counter("app.views", T0, 1.0, (("a", "3"),)),
            gauge("app.queue", T0, 1.0),
            timer("db.query", T0, [1.0]),
        ]
    )
    assert storage.list_metrics() == [
        {"name": "app.queue", "type": "gauge", "tags": [], "series": 1, "last_seen": T0},
        {"name": "app.views", "type": "counter", "tags": ["a", "b"], "series": 2, "last_seen": T0},
        {"name": "db.query", "type": "timer", "tags": [], "series": 1, "last_seen": T0},
    ]
    assert [m["name"] for m in storage.list_metrics("app.")] == ["app.queue", "app.views"]
    assert [m["name"] for m in storage.list_metrics(None, "ms")] == ["db.query"]
    assert storage.list_metrics("nope") == []


def test_tag_order_does_not_make_another_series(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0, (("b", "2"), ("a", "1")))])
    storage.write([counter("c", T0, 2.0, (("a", "1"), ("b", "2")))])
    assert storage.list_metrics()[0]["series"] == 1
    assert only(query(storage, "c", step=10))["points"] == [[T0, 3.0]]


def stored_by_name(path: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every series, metric, tag and row, named rather than numbered: two files
    that hand out ids in another order compare equal when they hold the same."""
    queries = {
        "metrics": "SELECT name, type, first_seen, last_seen, totals_from FROM metrics",
        "series": "SELECT s.name, s.type, s.tags, s.first_seen, s.last_seen, m.name, m.type "
        "FROM series s JOIN metrics m ON m.id = s.metric_id",
        "tags": "SELECT s.name, s.tags, t.key, t.value FROM series_tags t "
        "JOIN series s ON s.id = t.series_id",
        "rollups": "SELECT r.resolution, r.ts, s.name, s.type, s.tags, r.count, r.sum, r.min, "
        "r.max, r.last, r.state FROM rollups r JOIN series s ON s.id = r.series_id",
        "totals": "SELECT t.resolution, t.ts, m.name, m.type, t.count, t.sum, t.min, t.max, "
        "t.last, t.state FROM totals t JOIN metrics m ON m.id = t.metric_id",
    }
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {table: sorted(conn.execute(sql), key=repr) for table, sql in queries.items()}


def test_series_stored_before_their_flush_are_the_ones_the_flush_would_store(
    open_storage: Callable[..., Storage],
) -> None:
    window = [
        counter("req", T0 + 10, 1.0, (("b", "2"), ("a", "1"))),
        counter("req", T0 + 10, 2.0, (("a", "9"),)),
        counter("other", T0 + 10, 3.0),
        timer("lat", T0 + 10, [1.0, 2.0]),
        gauge("depth", T0 + 10, 4.0),
    ]
    keys = [(r.name, r.type, r.tags) for r in window]
    ahead, plain = open_storage("ahead.db"), open_storage("plain.db")
    for storage in (ahead, plain):
        storage.write([counter("req", T0, 1.0, (("a", "1"), ("b", "2")))])
    # in two goes, one key twice, one known (its tags in another order)
    assert ahead.register(keys[3:] + keys[1:2], T0 + 10, lambda key: True) == 3
    assert ahead.register(keys[:3], T0 + 10, lambda key: True) == 1
    assert len(stored_by_name(ahead.path)["series"]) == 5  # before the flush
    for storage in (ahead, plain):
        storage.write(window)
        storage.write([counter("req", T0 + 20, 1.0, (("a", "9"),))])
    assert stored_by_name(ahead.path) == stored_by_name(plain.path)


def test_storing_series_early_skips_a_written_window_and_what_admit_refuses(
    open_storage: Callable[..., Storage],
) -> None:
    storage = open_storage()
    storage.write([counter("a", T0 + 10, 1.0)])
    assert storage.register([("late", "c", ())], T0 + 10, lambda key: True) == 0
    assert storage.register([("late", "c", ())], T0, lambda key: True) == 0
    keys = [("b", "c", ()), ("refused", "c", ())]
    assert storage.register(keys, T0 + 20, lambda key: key[0] != "refused") == 1
    assert [m["name"] for m in storage.list_metrics()] == ["a", "b"]
    storage.write([counter("b", T0 + 20, 1.0), counter("refused", T0 + 20, 2.0)])
    assert only(query(storage, "refused", step=10))["points"] == [[T0 + 20, 2.0]]
    assert only(query(storage, "b", step=10))["points"] == [[T0 + 20, 1.0]]


# ----------------------------------------------------------------- errors


def test_query_errors_name_the_parameter(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0), counter("both", T0, 1.0), gauge("both", T0, 1.0)])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"metric": "missing"}, "metric"),
        ({"metric": "c", "type_code": "g"}, "metric"),
        ({"metric": "c", "stat": "p99"}, "stat"),
        ({"metric": "c", "stat": "last"}, "stat"),
        ({"metric": "both"}, "type"),
        ({"metric": "c", "step": 0}, "step"),
        ({"metric": "c", "step": 10, "start": T0 - 100 * DAY}, "step"),
        ({"metric": "c", "start": T0 + 10, "end": T0}, "from"),
    ]
    for kw, param in cases:
        metric = kw.pop("metric")
        with pytest.raises(QueryError) as caught:
            query(storage, metric, **kw)
        assert caught.value.param == param, kw
    with pytest.raises(QueryError, match="not found"):
        query(storage, "missing")
    assert query(storage, "both", type_code="g")["type"] == "gauge"


@pytest.mark.parametrize(
    ("type_code", "stats"),
    [
        ("c", ["sum", "rate", "count"]),
        ("g", ["last", "min", "max", "mean"]),
        ("ms", ["mean", "count", "sum", "min", "max", "rate", "p50", "p99.9"]),
        ("s", ["unique"]),
    ],
)
def test_stats_of_each_type_and_defaults(
    open_storage: Callable[..., Storage], type_code: str, stats: list[str]
) -> None:
    storage = open_storage()
    rollup = {
        "c": counter("m", T0, 1.0),
        "g": gauge("m", T0, 1.0),
        "ms": timer("m", T0, [1.0]),
        "s": set_rollup("m", T0, ["x"]),
    }[type_code]
    storage.write([rollup])
    assert query(storage, "m")["stat"] == stats[0]
    for stat in stats:
        assert only(query(storage, "m", stat=stat))["value"] is not None
    wrong = {"c": "mean", "g": "sum", "ms": "unique", "s": "sum"}[type_code]
    with pytest.raises(QueryError):
        query(storage, "m", stat=wrong)


# ---------------------------------------------------------- step, planning


def test_automatic_step_and_aligned_bounds(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    doc = query(storage, "c", start=T0 + 5, end=T0 + HOUR - 5)
    assert (doc["from"], doc["to"], doc["step"]) == (T0, T0 + HOUR, 10)
    doc = query(storage, "c", start=T0 - DAY, end=T0 + 5)
    assert doc["step"] == 60  # 1441 minutes fit in MAX_AUTO_POINTS
    assert (doc["from"], doc["to"]) == (T0 - DAY, T0 + 60)
    doc = query(storage, "c", start=T0 - 7 * DAY, end=T0)
    assert doc["step"] == 600
    doc = query(storage, "c", start=T0 - 365 * DAY, end=T0)
    assert doc["step"] % 600 == 0
    assert 365 * DAY / doc["step"] <= MAX_AUTO_POINTS
    assert query(storage, "c", step=15)["step"] == 20  # rounded up to the flush resolution


def test_plan_segments_prefers_coarse_complete_tiers() -> None:
    resolutions = [10, 60, 600]
    complete: list[tuple[int | None, int | None]] = [(None, None), (0, 3000), (0, 2400)]
    assert plan_segments(0, 3000, resolutions, complete) == [(600, 0, 2400), (60, 2400, 3000)]
    assert plan_segments(30, 3010, resolutions, complete) == [
        (10, 30, 60),
        (60, 60, 600),
        (600, 600, 2400),
        (60, 2400, 3000),
        (10, 3000, 3010),
    ]
    # nothing compacted yet: all from the flush resolution
    assert plan_segments(0, 100, resolutions, [(None, None)] * 3) == [(10, 0, 100)]
    # a tier that starts late (added later) covers only what it holds
    assert plan_segments(0, 1200, resolutions, [(None, None), (None, None), (600, 1200)]) == [
        (10, 0, 600),
        (600, 600, 1200),
    ]


# ------------------------------------------------ compaction against oracle


def random_flushes(seed: int, windows: int, start: int = T0) -> list[list[Rollup]]:
    """Flushes of every type over several tag sets, values from a seeded generator."""
    rng = random.Random(seed)
    flushes = []
    for w in range(windows):
        ts = start + 10 * w
        batch: list[Rollup] = []
        for host in ("a", "b", "c"):
            tags: Tags = (("host", host), ("path", "/x:y"))
            if rng.random() < 0.8:
                batch.append(counter("hits", ts, float(rng.randint(0, 9)), tags))
            low, high = float(rng.randint(-5, 0)), float(rng.randint(50, 60))
            batch.append(gauge("depth", ts, float(rng.randint(0, 50)), tags, low, high))
            if rng.random() < 0.7:
                values = [rng.expovariate(0.01) for _ in range(rng.randint(1, 6))]
                batch.append(timer("lat", ts, values, tags))
            members = [f"u{rng.randint(0, 300)}" for _ in range(rng.randint(1, 4))]
            batch.append(set_rollup("users", ts, members, tags))
        flushes.append(batch)
    return flushes


QUERIES: list[dict[str, Any]] = [
    {"metric": "hits"},
    {"metric": "hits", "stat": "rate"},
    {"metric": "hits", "stat": "count", "group_by": "host"},
    {"metric": "hits", "tags": [("host", "b")]},
    {"metric": "depth"},
    {"metric": "depth", "stat": "min"},
    {"metric": "depth", "stat": "max", "group_by": "host"},
    {"metric": "depth", "stat": "mean"},
    {"metric": "depth", "group_by": "host", "limit": 2},
    {"metric": "lat"},
    {"metric": "lat", "stat": "p90"},
    {"metric": "lat", "stat": "p99", "group_by": "host"},
    {"metric": "lat", "stat": "max", "tags": [("path", "/x:y")]},
    {"metric": "lat", "stat": "rate"},
    {"metric": "users"},
    {"metric": "users", "group_by": "host"},
]


def raw_answer(oracle: Storage, metric: str, **kw: Any) -> dict[str, Any]:
    """The oracle's answer from the series rows themselves: a tag filter that
    every series of random_flushes matches keeps it away from the totals."""
    everyone = ("path", "/x:y")
    tags = list(kw.pop("tags", []))
    document = oracle.query_series(metric, tags=[*tags, everyone], **kw)
    if everyone not in tags:
        for series in document["series"]:
            del series["tags"]["path"]
    return document


def assert_same_documents(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal, up to float rounding (sums added in another order)."""
    assert {k: v for k, v in actual.items() if k != "series"} == {
        k: v for k, v in expected.items() if k != "series"
    }
    assert len(actual["series"]) == len(expected["series"])
    for got, want in zip(actual["series"], expected["series"], strict=True):
        assert got["tags"] == want["tags"]
        assert got["value"] == pytest.approx(want["value"], rel=1e-9)
        assert [p[0] for p in got["points"]] == [p[0] for p in want["points"]]
        assert [p[1] for p in got["points"]] == pytest.approx([p[1] for p in want["points"]])


@pytest.mark.parametrize("step", [10, 60, 600, 1800, None])
def test_downsampled_tiers_answer_like_the_raw_data(
    open_storage: Callable[..., Storage], clock: Clock, step: int | None
) -> None:
    storage = open_storage()
    oracle = open_storage("oracle.db", ORACLE_TIERS)
    for batch in random_flushes(1, 2 * HOUR // 10 + 37):  # ends mid-way through a 10-minute bucket
        storage.write(batch)
        oracle.write(batch)
    with sqlite3.connect(storage.path) as conn:
        tiers = dict(conn.execute("SELECT resolution, complete_until FROM tiers"))
    assert tiers == {10: T0 + 2 * HOUR + 370, 60: T0 + 2 * HOUR + 360, 600: T0 + 2 * HOUR}
    for start, end in ((T0, T0 + 2 * HOUR + 400), (T0 + 130, T0 + 5000), (T0 + 600, T0 + 1200)):
        for q in QUERIES:
            kw = {**q, "start": start, "end": end, "step": step, "now": T0 + 3 * HOUR}
            metric = kw.pop("metric")
            document = storage.query_series(metric, **kw)
            assert_same_documents(document, raw_answer(oracle, metric, **kw))
            # without points: the same series and values (what dashboards ask)
            for series in document["series"]:
                series["points"] = []
            assert storage.query_series(metric, points=False, **kw) == document


def test_late_rows_recompute_compacted_buckets(
    open_storage: Callable[..., Storage], clock: Clock
) -> None:
    storage = open_storage()
    oracle = open_storage("oracle.db", ORACLE_TIERS)
    for batch in random_flushes(2, 2 * HOUR // 10):
        storage.write(batch)
        oracle.write(batch)
    # |T rows into windows compacted long ago (each in another minute and
    # another 10 minutes), the first mixed with a fresh window
    late = [
        random_flushes(seed, 1, start=T0 + start)[0]
        for seed, start in ((3, 1200), (5, 30), (6, 4260))
    ]
    fresh = random_flushes(4, 1, start=T0 + 2 * HOUR)
    for batch in ([*late[0], *fresh[0]], late[1], late[2]):
        storage.write(batch)
        oracle.write(batch)
    for q in QUERIES:
        for step in (60, 600, 3600):
            kw = {**q, "start": T0, "end": T0 + 2 * HOUR + 10, "step": step}
            metric = kw.pop("metric")
            kw["now"] = T0 + 3 * HOUR
            assert_same_documents(
                storage.query_series(metric, **kw), raw_answer(oracle, metric, **kw)
            )


def test_sliced_compaction_answers_like_the_raw_data_at_every_step(
    open_storage: Callable[..., Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compacted a metric per write, a bucket stays unseen by queries until
    its last slice is written; late rows into a range still being compacted
    (tier 1's, and in cascade tier 2's) start that range over."""
    from aggregator import storage as storage_module

    monkeypatch.setattr(storage_module, "COMPACT_SLICE_SERIES", 1)
    monkeypatch.setattr(storage_module, "COMPACT_SLICE_ROWS", 1)
    storage = open_storage()
    oracle = open_storage("oracle.db", ORACLE_TIERS)
    writer = storage.open_writer()
    seen_in_progress: set[int] = set()
    restarted: list[int] = []
    flushes = random_flushes(12, 2 * HOUR // 10 + 30)
    for n, batch in enumerate(flushes):
        ts = T0 + 10 * n
        for tier, job in writer.compacting.items():
            seen_in_progress.add(tier)
            if n % 9 == 4 and job.written:  # a late window into the range being compacted
                late = random_flushes(100 + n, 1, start=job.lo)[0]
                batch = [*batch, *late]
                restarted.append(tier)
        storage.write(batch)
        oracle.write(batch)
        if n % 11 == 0 or n > len(flushes) - 8:
            for q in QUERIES[::3]:
                kw = {**q, "start": T0, "end": ts + 10, "step": 60, "now": ts + 10}
                metric = kw.pop("metric")
                assert_same_documents(
                    storage.query_series(metric, **kw), raw_answer(oracle, metric, **kw)
                )
    assert seen_in_progress == {1, 2}
    assert set(restarted) == {1, 2}
    for _ in range(100):
        if not writer.compacting:
            break
        storage.write([])
    with sqlite3.connect(storage.path) as conn:
        tiers = dict(conn.execute("SELECT resolution, complete_until FROM tiers"))
    assert tiers == {10: T0 + 2 * HOUR + 300, 60: T0 + 2 * HOUR + 300, 600: T0 + 2 * HOUR}
    for q in QUERIES:
        kw = {**q, "start": T0, "end": T0 + 2 * HOUR, "step": 600, "now": T0 + 3 * HOUR}
        metric = kw.pop("metric")
        assert_same_documents(storage.query_series(metric, **kw), raw_answer(oracle, metric, **kw))


def test_a_flush_leaves_compaction_and_retention_to_maintain(
    open_storage: Callable[..., Storage],
) -> None:
    """The window's transaction stores its rows and no more; the minute it
    completes is compacted by maintain (the daemon runs it after /metrics),
    or else by the next write, before that write's own rows."""
    storage = open_storage()
    writer = storage.open_writer()

    def stored() -> dict[int, list[tuple[int, float]]]:
        with sqlite3.connect(storage.path) as conn:
            rows = conn.execute("SELECT resolution, ts, sum FROM rollups ORDER BY 1, 2")
            by_resolution: dict[int, list[tuple[int, float]]] = {}
            for resolution, ts, total in rows:
                by_resolution.setdefault(resolution, []).append((ts, total))
            return by_resolution

    for w in range(6):  # a whole minute of 10 s windows
        writer.write([counter("m", T0 + 10 * w, float(w))], [], [], {})
    assert writer.maintenance_due
    assert stored() == {10: [(T0 + 10 * w, float(w)) for w in range(6)]}
    storage.maintain()
    assert not writer.maintenance_due
    assert stored()[60] == [(T0, 15.0)]

    for w in range(6, 12):  # the next minute, never maintained by the caller
        writer.write([counter("m", T0 + 10 * w, 1.0)], [], [], {})
    assert stored()[60] == [(T0, 15.0)]
    writer.write([counter("m", T0 + 120, 1.0)], [], [], {})  # runs it first
    assert stored()[60] == [(T0, 15.0), (T0 + 60, 6.0)]
    storage.maintain()
    assert stored()[60] == [(T0, 15.0), (T0 + 60, 6.0)]  # nothing more to compact


def test_metric_gaining_series_later_uses_totals_only_where_they_exist(
    open_storage: Callable[..., Storage],
) -> None:
    storage = open_storage()
    per_window = {}
    for w in range(2 * HOUR // 10):
        batch = [counter("c", T0 + 10 * w, 1.0, (("k", "a"),))]
        per_window[T0 + 10 * w] = 1.0
        if w >= 500:  # a second series arrives after an hour and a bit
            batch.append(counter("c", T0 + 10 * w, 2.0, (("k", "b"),)))
            per_window[T0 + 10 * w] += 2.0
        storage.write(batch)
    with sqlite3.connect(storage.path) as conn:
        (totals_from,) = conn.execute("SELECT totals_from FROM metrics").fetchone()
    assert totals_from == T0 + 5400  # the next 10-minute bucket no tier had written
    for step in (10, 60, 600, 1800):
        expected: dict[int, float] = {}
        for ts, value in per_window.items():
            expected[ts - ts % step] = expected.get(ts - ts % step, 0.0) + value
        for start in (T0, T0 + 5000, T0 + 5410):
            doc = query(storage, "c", start=start, end=T0 + 2 * HOUR, step=step)
            first = start - start % step
            want = sorted((t, v) for t, v in expected.items() if t >= first)
            assert only(doc)["points"] == [list(p) for p in want], (step, start)
            assert only(doc)["value"] == sum(v for _, v in want)
    assert only(query(storage, "c", end=T0 + 2 * HOUR))["value"] == 720.0 + 2 * 220.0


def test_a_tier_added_to_an_old_file_catches_up(
    open_storage: Callable[..., Storage], tmp_path: Path, clock: Clock
) -> None:
    old = open_storage("grow.db", (Tier(10, DAY),))
    oracle = open_storage("oracle.db", ORACLE_TIERS)
    flushes = random_flushes(8, 3 * HOUR // 10)
    for batch in flushes:
        old.write(batch)
        oracle.write(batch)
    old.close()
    grown = open_storage("grow.db", (Tier(10, DAY), Tier(600, 30 * DAY)))
    late_start = T0 + 3 * HOUR
    done = []
    for w, batch in enumerate(random_flushes(9, 4, start=late_start)):
        clock.now = late_start + 10 * w + 10
        grown.write(batch)
        oracle.write(batch)
        with sqlite3.connect(grown.path) as conn:
            done.append(
                conn.execute("SELECT complete_until FROM tiers WHERE resolution = 600").fetchone()[
                    0
                ]
            )
    # one hour of 10 s windows (MAX_COMPACT_WINDOWS) per write
    assert done == [T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR, T0 + 3 * HOUR]
    for q in QUERIES:
        kw = {**q, "start": T0, "end": T0 + 3 * HOUR + 40, "step": 600, "now": T0 + DAY}
        metric = kw.pop("metric")
        assert_same_documents(grown.query_series(metric, **kw), raw_answer(oracle, metric, **kw))


def tricky_minutes(seed: int) -> list[list[Rollup]]:
    """Twelve minutes of flushes (6 windows each), each minute with its own twist
    for the tier-1 bucket that the writer folds in memory (see the comments)."""
    rng = random.Random(seed)
    awkward = [0.1, 0.2, 0.7, 1e16, 1.0, -1e16, -0.0, 0.0, 3.3, -2.5e-300]
    flushes: list[list[Rollup]] = []
    for minute in range(12):
        for w in range(6):
            ts = T0 + 60 * minute + 10 * w
            batch: list[Rollup] = []
            for host in ("a", "b"):
                tags: Tags = (("host", host),)
                total = rng.choice(awkward)  # sums whose value depends on the order added
                batch.append(counter("hits", ts, total, tags, count=rng.choice(awkward)))
                low = rng.choice([0.0, -0.0, -1.5])  # equal min values of either sign
                batch.append(gauge("depth", ts, rng.choice(awkward), tags, low, 7.0))
                values = [rng.expovariate(0.01) for _ in range(rng.randint(1, 4))]
                batch.append(timer("lat", ts, values, tags))
                sampled = Sketch.from_values([1.0, 2.0], [2.5, 0.5])  # fractional weights
                batch.append(
                    Rollup("dist", "d", tags, ts, 3.0, 3.5, 1.0, 2.0, 2.0, sampled.to_bytes())
                )
                members = [f"u{rng.randint(0, 9)}" for _ in range(rng.randint(1, 3))]
                batch.append(set_rollup("users", ts, members, tags))
            if minute == 1 and w >= 3:  # a series arriving mid-minute...
                batch.append(counter("late.joiner", ts, 0.1 * w))
                batch.append(timer("lat", ts, [5.0], (("host", "new"),)))
            if minute == 1 and w in (1, 4):  # ...and one seen in two windows only
                batch.append(gauge("sparse", ts, 0.3 * w, low=-0.0))
            if minute == 2 and w == 2:  # NaN is stored as NULL: SQL's business
                batch.append(gauge("depth", ts, 1.0, (("host", "c"),), math.nan))
            if minute == 3 and w == 4:  # the same series twice, tags in two orders
                batch.append(counter("hits", ts, 1.0, (("host", "a"), ("z", "1"))))
                batch.append(counter("hits", ts, 2.0, (("z", "1"), ("host", "a"))))
            if minute == 10 and w == 0:  # ...and in the first window of a minute
                batch.append(counter("hits", ts, 1.0, (("host", "b"), ("z", "1"))))
                batch.append(counter("hits", ts, 2.0, (("z", "1"), ("host", "b"))))
            if minute == 5 and w == 1:  # NULLs
                batch.append(Rollup("nulls", "g", (), ts, 1.0, 2.0, 2.0, 2.0, None))
            if minute == 6 and w == 5:  # a whole number, as an int
                batch.append(Rollup("ints", "c", (), ts, 3, 7, 7, 7, 7))
            flushes.append(batch)
    return flushes


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("fold_in_c", [True, False], ids=["fold-in-c", "fold-in-python"])
def test_minutes_compacted_in_memory_are_the_rows_sql_compacts(
    open_storage: Callable[..., Storage],
    monkeypatch: pytest.MonkeyPatch,
    fold_in_c: bool,
    sliced: bool,
) -> None:
    """The writer folds tier 1's bucket as it writes the windows; what it stores
    must be exactly what _COMPACT stores, bit for bit: sums added in the same
    order, the same of two equal min values, NULLs, merged blobs, totals. With
    the C extension, _Pending.add folds the common windows there
    (``fold_rows``); without it, all in Python. Sliced: each bucket is
    compacted a metric or two per write, over the writes that follow (the
    restart at minute 7 drops a range half done)."""
    from aggregator import storage as storage_module

    if not fold_in_c:
        monkeypatch.setattr(storage_module, "sketch_native", None)
        monkeypatch.setattr(storage_module, "sqlite_native", None)
    if sliced:
        monkeypatch.setattr(storage_module, "COMPACT_SLICE_SERIES", 1)
        monkeypatch.setattr(storage_module, "COMPACT_SLICE_ROWS", 1)

    folded = []
    compacted = storage_module._Pending.compacted

    def counting_compacted(self: Any, resolution: int) -> Any:
        result = compacted(self, resolution)
        folded.append(result is not None)
        return result

    monkeypatch.setattr(storage_module._Pending, "compacted", counting_compacted)

    def pair() -> tuple[Storage, Storage]:
        memory, sql = open_storage("memory.db"), open_storage("sql.db")
        sql.open_writer().fold = False
        return memory, sql

    memory, sql = pair()
    flushes = tricky_minutes(11)
    for n, batch in enumerate(flushes):
        if n == 4 * 6 + 2:  # minute 4: a window written twice (a restart, say)
            batch = [*batch, *flushes[n - 1]]
        if n == 7 * 6 + 3:  # minute 7: restart mid-minute; the file has rows it never saw
            memory.close()
            sql.close()
            memory, sql = pair()
        if n == 8 * 6 + 2:  # minute 8: a late row into minute 0, with a fresh window
            batch = [*batch, counter("hits", T0 + 20, 0.1, (("host", "a"),))]
        if n == 9 * 6 + 1:  # minute 9: two windows in one write
            continue
        if n == 9 * 6 + 2:
            batch = [*flushes[n - 1], *batch]
        memory.write(batch)
        sql.write(batch)
    for storage in (memory, sql):  # the slices still to write
        writer = storage.open_writer()
        for _ in range(100):
            if not writer.compacting:
                break
            storage.write([])
        assert not writer.compacting

    def dump(storage: Storage) -> str:
        with sqlite3.connect(storage.path) as conn:
            return repr(
                [
                    conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4").fetchall()
                    for table in ("rollups", "totals", "tiers", "metrics")
                ]
            )

    assert dump(memory) == dump(sql)
    # minutes 2, 3, 4, 7 and 10 by SQL, the others from memory
    assert folded == [True, True, False, False, False, True, True, False, True, True, False, True]


def test_the_c_rows_are_the_python_rows(
    open_storage: Callable[..., Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the C extensions the writer builds each window's rows and folds the
    minute in C (``window_rows``, ``fold_rows``) and binds its bulk rows in C
    (``_sqlitefast.executemany``); the file must be the one the Python path
    writes, byte for byte, series ids and tag orders included."""
    from aggregator import storage as storage_module

    if storage_module.sketch_native is None:
        pytest.skip("the C extension is not built")
    with_c, without_c = open_storage("c.db"), open_storage("python.db")
    flushes = tricky_minutes(5)
    for n, batch in enumerate(flushes):
        if n % 7 == 3:  # two windows in one write: their rows are merged by ts
            batch = [*batch, *flushes[n - 1]]
        with_c.write(batch)
        with monkeypatch.context() as m:
            m.setattr(storage_module, "sketch_native", None)
            m.setattr(storage_module, "sqlite_native", None)
            without_c.write(batch)

    def dump(storage: Storage) -> str:
        with sqlite3.connect(storage.path) as conn:
            return repr(
                [
                    conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
                    for table in ("rollups", "totals", "series", "series_tags", "metrics", "tiers")
                ]
            )

    assert dump(with_c) == dump(without_c)


def test_a_malformed_sketch_fails_the_minute_as_sql_does(
    open_storage: Callable[..., Storage],
) -> None:
    memory, sql = open_storage("memory.db"), open_storage("sql.db")
    sql.open_writer().fold = False
    for storage in (memory, sql):
        for w in range(5):
            storage.write([timer("lat", T0 + 10 * w, [1.0])])
        broken = Rollup("lat", "ms", (), T0 + 50, 1.0, 1.0, 1.0, 1.0, 1.0, b"\x93\x01")
        with pytest.raises(sqlite3.OperationalError, match="finalize"):
            storage.write([broken])


def test_a_blob_on_a_counter_compacts_as_sql_does(open_storage: Callable[..., Storage]) -> None:
    """A state blob belongs to sketches and sets only: the minute folded in
    memory, whose blobs are merged window by window, leaves a bucket with
    one on a counter to SQL, and the file is the one SQL alone writes."""
    memory, sql = open_storage("memory.db"), open_storage("sql.db")
    sql.open_writer().fold = False
    blob = Sketch.from_values([1.0], [1.0]).to_bytes()
    for storage in (memory, sql):
        for w in range(7):
            state = blob if w == 2 else None
            storage.write([Rollup("hits", "c", (), T0 + 10 * w, 1.0, 1.0, 1.0, 1.0, 1.0, state)])

    def dump(storage: Storage) -> list[Any]:
        with sqlite3.connect(storage.path) as conn:
            return conn.execute("SELECT * FROM rollups ORDER BY 1, 2, 3, 4").fetchall()

    assert dump(memory) == dump(sql)
    assert [row for row in dump(sql) if row[0] == 60] != []


def test_compaction_skips_a_downtime(open_storage: Callable[..., Storage], clock: Clock) -> None:
    storage = open_storage()
    storage.write([counter("c", T0, 1.0)])
    clock.now = T0 + DAY + 20
    storage.write([counter("c", T0 + DAY, 2.0), counter("c", T0 + DAY + 10, 3.0)])

    def watermarks() -> dict[int, int]:
        with sqlite3.connect(storage.path) as conn:
            return dict(conn.execute("SELECT resolution, complete_until FROM tiers"))

    # the hour that holds data first (MAX_COMPACT_WINDOWS), then straight over the gap
    assert watermarks() == {10: T0 + DAY + 20, 60: T0 + HOUR, 600: T0 + HOUR}
    clock.now = T0 + DAY + 30
    storage.write([])
    assert watermarks() == {10: T0 + DAY + 20, 60: T0 + DAY, 600: T0 + DAY}
    doc = query(storage, "c", end=T0 + DAY + 600, step=600)
    assert only(doc)["points"] == [[T0, 1.0], [T0 + DAY, 5.0]]


def test_a_failed_write_rolls_back_everything(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write([timer("t", T0, [1.0])], state={"k": b"1"})
    broken = Rollup("t", "ms", (), T0, 1.0, 1.0, 1.0, 1.0, 1.0, b"not a sketch")
    with pytest.raises(sqlite3.Error):
        storage.write([counter("new", T0, 1.0), broken], state={"k": b"2"})
    assert [m["name"] for m in storage.list_metrics()] == ["t"]
    assert storage.load_state() == {"k": b"1"}
    storage.write([counter("new", T0 + 10, 4.0)])
    assert only(query(storage, "new", step=10))["points"] == [[T0 + 10, 4.0]]
    assert only(query(storage, "t", stat="count", step=10))["value"] == 1.0


# ---------------------------------------------------------------- retention


def test_retention_prunes_each_tier_and_forgets_dead_series(
    open_storage: Callable[..., Storage], clock: Clock
) -> None:
    tiers = (Tier(10, 600), Tier(60, 1800), Tier(600, 2 * HOUR))
    storage = open_storage("short.db", tiers)
    clock.now = T0
    for w in range(HOUR // 10):
        clock.now = T0 + 10 * w + 10
        storage.write([counter("old", T0 + 10 * w, 1.0), counter("new", T0 + 10 * w, 1.0)])

    def counts() -> dict[int, tuple[int, int]]:
        with sqlite3.connect(storage.path) as conn:
            return {
                r: conn.execute(
                    "SELECT min(ts), count(*) FROM rollups WHERE resolution = ? "
                    "AND metric_id = (SELECT id FROM metrics WHERE name = 'new')",
                    (r,),
                ).fetchone()
                for r in (10, 60, 600)
            }

    # every write deleted what retention had passed: exactly the retention is left
    oldest = counts()
    assert oldest[10] == (T0 + HOUR - 600, 60)
    assert oldest[60] == (T0 + HOUR - 1800, 30)
    assert oldest[600] == (T0, 6)
    # the coarse tier still answers for the whole hour
    assert only(query(storage, "new", end=T0 + HOUR, step=600))["value"] == 360.0
    # "old" stops; much later only "new" writes: old's rows and series go
    for w in range(4 * HOUR // 10, 4 * HOUR // 10 + 10):
        clock.now = T0 + 10 * w + 10
        storage.write([counter("new", T0 + 10 * w, 1.0)])
    clock.now = T0 + 12 * HOUR
    storage.write([counter("new", T0 + 12 * HOUR - 10, 1.0)])
    assert [m["name"] for m in storage.list_metrics()] == ["new"]
    with sqlite3.connect(storage.path) as conn:
        assert conn.execute(
            "SELECT count(*) FROM rollups WHERE ts < ?", (T0 + HOUR,)
        ).fetchone() == (0,)


def test_late_rows_whose_finer_data_is_pruned_are_dropped(
    open_storage: Callable[..., Storage], clock: Clock
) -> None:
    """A coarse bucket is recomputed from the finer tier: once that is pruned, a
    late row would wipe the bucket's history, so it is refused and counted."""
    storage = open_storage("short.db", (Tier(10, 600), Tier(60, DAY)))
    for w in range(HOUR // 10):
        clock.now = T0 + 10 * w + 10
        storage.write([counter("c", T0 + 10 * w, 1.0)])
    storage.write([counter("c", T0 + 20, 100.0), counter("c", T0 + HOUR - 300, 10.0)])
    assert storage.late_dropped == 1
    kw = {"end": T0 + HOUR, "step": 60, "now": T0 + HOUR}
    assert only(query(storage, "c", **kw))["value"] == 360.0 + 10.0
    assert only(query(storage, "c", **kw))["points"][0] == [T0, 6.0]


def test_short_finer_retention_keeps_rows_until_compacted(
    open_storage: Callable[..., Storage], clock: Clock
) -> None:
    storage = open_storage("short.db", (Tier(10, 60), Tier(600, DAY)))
    for w in range(HOUR // 10 + 30):
        clock.now = T0 + 10 * w + 10
        storage.write([counter("c", T0 + 10 * w, 1.0)])
    assert storage.late_dropped == 0
    doc = query(storage, "c", end=T0 + HOUR + 300, step=600, now=T0 + DAY)
    assert only(doc)["points"] == [[T0 + 600 * i, 60.0] for i in range(6)] + [[T0 + HOUR, 30.0]]


def test_a_late_row_moves_its_metrics_first_seen(open_storage: Callable[..., Storage]) -> None:
    """Queries skip buckets before a metric's first_seen: a late row must move it,
    even when another metric has the earliest row of that flush."""
    storage = open_storage()
    storage.write([counter("y", T0 + 100, 1.0), counter("x", T0 + HOUR, 1.0)])
    storage.write([counter("y", T0 + 110, 1.0), counter("x", T0 + 600, 5.0)])
    doc = query(storage, "x", end=T0 + 2 * HOUR, step=600)
    assert only(doc)["points"] == [[T0 + 600, 5.0], [T0 + HOUR, 1.0]]


def test_a_window_stamped_in_the_future_does_not_complete_buckets(
    open_storage: Callable[..., Storage], clock: Clock
) -> None:
    storage = open_storage()
    clock.now = T0 + 5
    storage.write([counter("c", T0, 1.0), counter("c", T0 + 3 * HOUR, 5.0)])
    with sqlite3.connect(storage.path) as conn:
        assert conn.execute(
            "SELECT complete_until FROM tiers WHERE resolution = 10"
        ).fetchone() == (T0 + 10,)
    clock.now = T0 + 3 * HOUR + 20
    storage.write([counter("c", T0 + 3 * HOUR + 10, 1.0)])
    doc = query(storage, "c", end=T0 + 4 * HOUR, step=600)
    assert only(doc)["points"] == [[T0, 1.0], [T0 + 3 * HOUR, 6.0]]


# --------------------------------------------------------- events, checks


def test_events_newest_first_with_filters(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    storage.write(
        [],
        events=[
            (Event("deploy", "v1", T0 + 5, tags=(("env", "prod"), ("app", "x:y"))), T0 + 9),
            (Event("oops", "text", host="h1", priority="low", alert_type="error"), T0 + 20),
            (Event("other", "t", tags=(("env", "dev"),), aggregation_key="k"), T0 + 30),
        ],
    )
    found = storage.events(T0, T0 + 60)
    assert [e["title"] for e in found] == ["other", "oops", "deploy"]
    assert found[1] == {
        "timestamp": T0 + 20,
        "title": "oops",
        "text": "text",
        "host": "h1",
        "priority": "low",
        "alert_type": "error",
        "aggregation_key": "",
        "source_type": "",
        "tags": {},
    }
    assert found[2]["timestamp"] == T0 + 5  # the d: field wins over arrival
    assert found[2]["tags"] == {"app": "x:y", "env": "prod"}
    assert [e["title"] for e in storage.events(T0, T0 + 60, [("env", "prod")])] == ["deploy"]
    assert storage.events(T0, T0 + 60, [("env", "prod"), ("app", "nope")]) == []
    assert [e["title"] for e in storage.events(T0 + 10, T0 + 25)] == ["oops"]
    assert len(storage.events(T0, T0 + 60, limit=2)) == 2


def test_checks_keep_the_latest_status(open_storage: Callable[..., Storage]) -> None:
    storage = open_storage()
    web = (("service", "web"),)
    storage.write([], checks=[(ServiceCheck("db.up", 0, tags=web), T0)])
    storage.write(
        [],
        checks=[
            (ServiceCheck("db.up", 2, message="down", tags=web), T0 + 10),
            (ServiceCheck("db.up", 1, timestamp=T0 - 100, tags=web), T0 + 11),  # older: ignored
            (ServiceCheck("disk", 3, host="h1"), T0 + 12),
        ],
    )
    assert storage.checks() == [
        {
            "name": "db.up",
            "status": 2,
            "status_text": "critical",
            "timestamp": T0 + 10,
            "host": "",
            "message": "down",
            "tags": {"service": "web"},
        },
        {
            "name": "disk",
            "status": 3,
            "status_text": "unknown",
            "timestamp": T0 + 12,
            "host": "h1",
            "message": "",
            "tags": {},
        },
    ]
    assert [c["name"] for c in storage.checks([("service", "web")])] == ["db.up"]


def test_a_read_that_fails_mid_cursor_does_not_pin_old_data(
    open_storage: Callable[..., Storage],
) -> None:
    """An unfinished statement keeps its connection's snapshot past COMMIT; a
    read that fails while one is alive (its traceback holds the cursor) must
    not leave later queries of that thread reading the old data."""
    storage = open_storage()
    storage.write([counter("early.a", T0, 1.0), counter("early.b", T0, 2.0)])
    kept: list[sqlite3.Cursor] = []
    with pytest.raises(RuntimeError), storage._snapshot() as conn:
        cursor = conn.execute("SELECT name FROM metrics")
        cursor.fetchone()  # one of two rows: the statement is still running
        kept.append(cursor)
        raise RuntimeError("a query failing half-way through")
    storage.write([counter("late", T0 + 10, 3.0)])
    assert query(storage, "late", stat="sum")["series"][0]["value"] == 3.0
    assert kept  # the cursor is still alive, as a traceback would keep it
