"""The spool: flushes SQLite cannot take (full, locked, read-only) are parked on
disk and stored later, in order, exactly once; nothing is lost."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from aggregator import storage as storage_module
from aggregator.config import Tier
from aggregator.model import COUNTER, GAUGE, Event, Rollup, ServiceCheck
from aggregator.spool import (
    APPLIED_KEY,
    Batch,
    DurableWriter,
    Spool,
    Store,
    TolerantStorage,
    decode_batch,
    encode_batch,
    spool_path,
    sqlite_store,
)

T0 = 1_800_000_000
TIERS = [Tier(10, 10**9)]


def batch(i: int) -> Batch:
    """Flush number i: counter c += i + 1, gauge g = i, one check, and one event
    with a long text (so that every flush needs new pages in the file)."""
    start = T0 + 10 * i
    return Batch(
        windows=[start],
        rollups=[
            Rollup("c", COUNTER, (("k", "v"),), start, 1.0, i + 1.0, i + 1.0, i + 1.0, i + 1.0),
            Rollup("g", GAUGE, (), start, 1.0, float(i), float(i), float(i), float(i)),
        ],
        events=[(Event(f"e{i}", "t" * 5000, None, tags=(("k", "v"),)), start)],
        checks=[(ServiceCheck("chk", i % 4, start), start)],
        state={"gauges": msgpack.packb(i)},
    )


class Harness:
    """A real Storage in tmp_path whose new connections a test can make full or read-only."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = str(tmp_path / "m.db")
        self.max_pages: int | None = None
        self.read_only = False
        connect = storage_module._connect

        def faulty_connect(path: str) -> sqlite3.Connection:
            if self.read_only:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            else:
                conn = connect(path)
            if self.max_pages is not None:
                conn.execute(f"PRAGMA max_page_count = {self.max_pages}")
            return conn

        monkeypatch.setattr(storage_module, "_connect", faulty_connect)
        self.storage = TolerantStorage(self.path, TIERS, clock=lambda: T0 + 10**6)
        self.stored: list[Batch] = []
        self.writer = self.new_writer()

    def new_writer(self, applied: int = 0) -> DurableWriter:
        return DurableWriter(
            sqlite_store(self.storage, busy_timeout=0.2),
            Spool(spool_path(self.path)),
            applied=applied,
            on_stored=self.stored.append,
        )

    def pages(self) -> int:
        with sqlite3.connect(self.path) as conn:
            return int(conn.execute("PRAGMA page_count").fetchone()[0])

    def totals(self) -> dict[str, Any]:
        conn = sqlite3.connect(self.path)
        try:
            counter = conn.execute(
                "SELECT total(r.sum), count(*) FROM rollups r JOIN series s ON s.id = r.series_id "
                "WHERE s.name = 'c'"
            ).fetchone()
            gauge = conn.execute(
                "SELECT r.last FROM rollups r JOIN series s ON s.id = r.series_id "
                "WHERE s.name = 'g' ORDER BY r.ts DESC LIMIT 1"
            ).fetchone()
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            state = dict(conn.execute("SELECT key, value FROM state"))
        finally:
            conn.close()
        return {
            "counter_sum": counter[0],
            "windows": counter[1],
            "gauge": gauge[0] if gauge else None,
            "events": events,
            "gauges_state": msgpack.unpackb(state["gauges"]) if "gauges" in state else None,
        }

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    h = Harness(tmp_path, monkeypatch)
    yield h
    h.close()


def expected(n: int) -> dict[str, Any]:
    """What n flushes store: every counter, every window, the last gauge."""
    return {
        "counter_sum": sum(i + 1.0 for i in range(n)),
        "windows": n,
        "gauge": float(n - 1),
        "events": n,
        "gauges_state": n - 1,
    }


def run_fault(harness: Harness, break_it: Callable[[], None], fix_it: Callable[[], None]) -> None:
    """3 flushes stored, 4 while the fault lasts (parked), then 2 more after the fix."""
    w = harness.writer
    for i in range(3):
        assert w.write(batch(i)) is True
    break_it()
    for i in range(3, 7):
        assert w.write(batch(i)) is False
    assert w.backlog == 4 and w.spool.files == 4
    assert w.status()["storage_writable"] is False
    assert w.error
    assert len(list(spool_path(harness.path).glob("*.msgpack"))) == 4
    fix_it()
    assert w.write(batch(7)) is True  # replays the 4, in order, then stores this one
    assert w.write(batch(8)) is True
    assert w.backlog == 0 and w.spool.bytes == 0
    assert w.status()["storage_writable"] is True and w.error is None
    assert w.replayed == 4
    assert harness.totals() == expected(9)
    assert [b.windows[0] for b in harness.stored] == [T0 + 10 * i for i in range(9)]


def test_a_full_database_parks_flushes_and_replays_them_in_order(harness: Harness) -> None:
    def full() -> None:
        harness.max_pages = harness.pages()  # PRAGMA max_page_count: no page more
        harness.writer.store.reconnect()

    def room() -> None:
        # Space again, for the writer's own connection too (as a freed disk is).
        harness.max_pages = None
        writer = harness.storage._writer
        assert writer is not None
        writer.conn.execute("PRAGMA max_page_count = 1073741823")

    run_fault(harness, full, room)


def test_a_write_lock_held_by_another_connection_parks_flushes(harness: Harness) -> None:
    locker = sqlite3.connect(harness.path, isolation_level=None)

    def lock() -> None:
        locker.execute("BEGIN IMMEDIATE")  # holds the write lock, as another process would

    def unlock() -> None:
        locker.execute("ROLLBACK")

    try:
        run_fault(harness, lock, unlock)
    finally:
        locker.close()


def test_a_read_only_database_parks_flushes(harness: Harness) -> None:
    def read_only() -> None:
        # What SQLite does with a file it cannot open for writing: it opens
        # it read-only, and every write fails with SQLITE_READONLY.
        harness.read_only = True
        harness.writer.store.reconnect()

    def writable() -> None:
        harness.read_only = False

    run_fault(harness, read_only, writable)


def test_a_daemon_started_on_an_unwritable_database_parks_until_it_can_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Harness(tmp_path, monkeypatch)
    first.writer.write(batch(0))
    first.close()
    first.read_only = True
    # The same database, opened read-only from the start: the setup cannot
    # record its tiers, yet the storage opens, reads, and parks writes.
    storage = TolerantStorage(first.path, [Tier(10, 10**9), Tier(60, 10**9)])
    assert storage.setup_error is not None
    writer = DurableWriter(sqlite_store(storage, 0.2), Spool(spool_path(first.path)))
    assert storage.load_state()["gauges"] == msgpack.packb(0)
    assert writer.write(batch(1)) is False
    first.read_only = False
    assert writer.write(batch(2)) is True
    storage.close()
    assert first.totals()["counter_sum"] == 1 + 2 + 3
    with sqlite3.connect(first.path) as conn:
        assert conn.execute("SELECT count(*) FROM tiers").fetchone()[0] == 2


def test_a_restart_replays_the_spool_exactly_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = harness.writer
    harness.read_only = True
    w.store.reconnect()
    for i in range(3):
        assert w.write(batch(i)) is False
    harness.read_only = False
    # The daemon dies after storing the first parked flush, before its file
    # is removed: the commit recorded its number in the same transaction.
    removed: list[Path] = []

    def die_after_commit(path: Path) -> None:
        removed.append(path)
        raise SystemExit("killed")

    monkeypatch.setattr(w.spool, "remove", die_after_commit)
    with pytest.raises(SystemExit):
        w.replay()
    assert len(removed) == 1 and removed[0].exists()
    state = harness.storage.load_state()
    applied = msgpack.unpackb(state[APPLIED_KEY])
    restarted = harness.new_writer(applied=applied)
    assert restarted.backlog == 3
    assert restarted.latest_state() == {"gauges": msgpack.packb(2)}
    assert restarted.replay() == 2  # the first file is only removed
    assert restarted.backlog == 0
    assert harness.totals() == expected(3)


def test_an_unwritable_spool_holds_flushes_in_memory(
    harness: Harness, tmp_path: Path
) -> None:
    w = harness.writer
    harness.read_only = True
    w.store.reconnect()
    blocker = spool_path(harness.path)
    blocker.write_text("not a folder")  # the spool folder cannot be made
    for i in range(3):
        assert w.write(batch(i)) is False
    assert w.status()["spool_held_in_memory"] == 3 and w.backlog == 3
    blocker.unlink()
    assert w.write(batch(3)) is False  # held flushes go to disk first, in order
    assert w.spool.files == 4 and not w.held
    harness.read_only = False
    assert w.write(batch(4)) is True
    assert harness.totals() == expected(5)


def test_a_flush_that_fails_for_another_reason_is_set_aside(harness: Harness) -> None:
    def broken(*args: Any) -> None:
        raise TypeError("a bug, not the database")

    w = DurableWriter(Store(broken), Spool(spool_path(harness.path)))
    with pytest.raises(TypeError):
        w.write(batch(0))
    assert w.rejected == 1 and w.backlog == 0
    [kept] = (spool_path(harness.path) / "rejected").iterdir()
    assert decode_batch(kept.read_bytes()).rollups == batch(0).rollups


def test_the_spool_file_round_trips_every_field() -> None:
    original = batch(5)
    original.seq = 123
    original.rollups.append(
        Rollup("t", "ms", (("a", "é"),), T0, 2.0, 3.0, 1.0, 2.0, 2.0, b"\x01sk", ((50.0, 1.5),))
    )
    copy = decode_batch(encode_batch(original))
    assert copy == original
    with pytest.raises(ValueError):
        decode_batch(b"\x93\x01\x02\x03")
