"""SQLite storage: one writer thread, one transaction per flush, WAL readers.

This module owns (SPEC section 6) the schema and its migrations, the write
of one flush (rollups, events, service checks, restart state) in one
transaction, downsampling into coarser tiers, retention, and every query
the HTTP API answers (SPEC section 5).

Threads
-------
``write`` (and ``register``, which stores a window's new series before its
flush, ``maintain``, which compacts and prunes after it, and
``checkpoint``) runs in ONE writer thread (the daemon's writer executor).
Its connection is opened lazily in that thread on the first write (or by
``open_writer``) and owns the in-memory id caches;
``reset_writer`` drops it after an I/O error, and the next write reopens
it and reloads the caches. Every other thread that reads gets its own
connection (``threading.local``); in WAL mode readers never wait for the
writer, and each query runs in one read transaction, so it sees one
consistent snapshot of data and watermarks. Opening a writer connection
closes the readers (they reopen lazily): a reader opened while the file
was read-only would otherwise keep every write of the process failing.
Connections are opened with ``check_same_thread=False`` only so that
another thread can close them; a lock per reader connection keeps that
from happening mid-query.

Schema (``sqlite3 metrics.db .schema`` shows it)
-------------------------------------------------
Applied as numbered migrations with ``sqlite_utils.Migrations`` (set
``statsd_aggregator``, applied names recorded in ``_sqlite_migrations``),
each in its own transaction.

``metrics(id, name, type, first_seen, last_seen, totals_from)``
    One row per (name, wire type code c/g/ms/h/d/s). ``last_seen`` is the
    latest window start written, to within ``METRIC_SEEN_EVERY`` seconds.
    ``totals_from``: see ``totals``.
``series(id, metric_id, name, type, tags, first_seen, last_seen)``
    One row per series, UNIQUE(name, type, tags). ``tags`` is the canonical
    JSON of the sorted ``[[key, value], ...]`` list (``[]`` without tags).
    ``last_seen`` is kept to within ``SERIES_SEEN_EVERY`` seconds (so a
    flush does not rewrite every series row); it only decides when a dead
    series is forgotten.
``series_tags(series_id, key, value)``
    The tags again, one row per pair, indexed on (key, value): tag filters
    and ``group_by`` are index lookups, not JSON parsing.
``rollups(resolution, ts, metric_id, series_id, count, sum, min, max, last, state)``
    WITHOUT ROWID, PRIMARY KEY (resolution, ts, metric_id, series_id).
    Columns as ``model.Rollup`` defines them; ``state`` is the msgpack sketch
    (ms/h/d) or set state (s), else NULL. The key is TIME-major on purpose:
    a flush appends its rows in one place of the b-tree. A series-major key
    (series_id first) dirtied one page per series per flush once each series
    filled a page: 1.5 s per 100k rows, against 0.2 s time-major (measured
    with 120 flushes of 100k rows). Reads stay cheap because a query
    enumerates the buckets it needs and seeks (resolution, ts, metric_id)
    for each, and coarse tiers keep the number of buckets small.
``totals(resolution, ts, metric_id, count, sum, min, max, last, state)``
    Per metric and bucket, the merge of ALL its series (``last`` = sum of
    the series' last values), kept for metrics with more than one series,
    from ``metrics.totals_from`` on. A query without tag filters or group_by
    reads one row per bucket here instead of one per series: a day of a
    1,000-series counter is ~1,500 rows, not 1.5 million. At the flush
    resolution they are written with each flush, without ``state`` (and not
    for sets): merging every sketch on every flush would cost more Python
    than all the rest of the write.
``tiers(resolution, retention, complete_from, complete_until, pruned_before)``
    Watermarks. Tier 0 (the flush interval): ``complete_until`` = end of
    the latest window written. Coarser tier i: its buckets in
    ``[complete_from, complete_until)`` are compacted from tier i-1.
``events(id, timestamp, title, text, host, priority, alert_type,
aggregation_key, source_type, tags)``
    ``timestamp`` = the event's ``d:`` field, else its arrival time.
``service_checks(name, host, tags, status, timestamp, message)``
    The latest status per (name, host, tags): a check is a state, not a log.
``state(key, value)``
    msgpack blobs carried across restarts (the persisted gauges).

Writing
-------
Rows are upserted at the finest resolution with one ``executemany``. A row
that already exists (a restart inside the same window, or a ``|T``
timestamp into an earlier window) is MERGED by ``ON CONFLICT DO UPDATE``:
count and sum add, min/max combine, last replaces, and the sketch or set
state is merged by the Python function ``merge_state`` (Python runs only on
conflict); a set's count becomes the cardinality of the merged state.

Downsampling
------------
In the transaction that follows each write's (``maintain``; the write's
own recomputes only what its late rows change), every coarser tier
compacts each COMPLETE bucket it has not compacted yet (bucket end <= the
finer tier's ``complete_until``) with ``INSERT OR REPLACE ... SELECT ...
GROUP BY bucket, series``: SQL sums, min and max; ``last`` is the last of
the finer row with the latest ts (a join on the primary key); sketches and
sets are merged by the Python aggregate ``merge_states``. Many series are
compacted a slice of metric ids per write (``_Compaction``), over as many
writes as it takes to finish before the tier's next bucket completes; the
watermark moves with the last slice, so queries read the finer tier until
then.
Tier 1 usually skips that query: the writer folds each window of tier 1's
current bucket into one running row per series as it writes the window
(``_Pending``), merges each window's sketch and set blobs into the
bucket's after the window is stored, and from the flush that completes
the bucket on, writes those rows, the very ones the query would write. A
bucket whose tier-0
rows the writer has not all seen written once (a restart in the middle of
it, a window written again, values SQLite stores as NULL) goes through the
query. The metric totals of the buckets then follow from the fresh coarse
rows. Late data (rows written into a bucket already compacted) recomputes
exactly those (bucket, series) pairs and, in cascade, the coarser buckets
above them. A late row whose compacted coarse bucket can no longer be
recomputed, because the finer tier has been pruned there, would wipe that
bucket's history: it is dropped and counted in ``Storage.late_dropped``.
Finer rows written into a range still being compacted start that range
over. After a downtime, compaction jumps over the empty stretch; a tier
added to an existing file catches up at most ``MAX_COMPACT_WINDOWS`` finer
windows per range.

Each write deletes the rollups and totals that their tier's retention has
passed, by primary key range, and never finer rows that the next tier has
not compacted yet. The rest of retention (events, checks, dropped tiers,
dead series) runs at most once a minute (``PRUNE_EVERY``).

Querying
--------
``from`` is rounded down and ``to`` up to a multiple of ``step``; buckets
are ``[t, t + step)``. Without a step, the finest tier resolution giving at
most ``MAX_AUTO_POINTS`` points is chosen (a multiple of the coarsest one
when none does); a step that is not a multiple of the flush resolution is
rounded up to one. The range is then planned over the tiers
(``plan_segments``): the coarsest usable tier covers the aligned interior
of the range that it has compacted, finer tiers cover the edges,
recursively down to the flush resolution, which covers whatever is newer
than every watermark. So fresh data shows at once and long ranges stay
cheap. For the points a tier is usable when its resolution divides the
step; for the range ``value`` every tier is, so the value of a day costs
about 24 hourly rows (per metric from ``totals``, or per series).

Merging tag sets (no group_by, or several series in one group): counts and
sums add, min/max combine, sketches and sets merge (never averaged); a
gauge's ``last`` is the sum over the series of each series' latest value
(``memory.used`` over hosts is the total). A series carrying the group_by
key twice (``#k:a,k:b``) counts in both groups.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import compress, groupby, repeat
from operator import add, itemgetter, le
from typing import Any, Protocol

import sqlite_utils
from sqlite_utils.migrations import Migrations

from .fastpath import sketch_native, sqlite_native
from .model import (
    CHECK_STATUS_TEXT,
    COUNTER,
    DISTRIBUTION_TYPES,
    GAUGE,
    SET,
    TYPE_NAMES,
    Event,
    Rollup,
    ServiceCheck,
    Tags,
)
from .sketch import SetState, Sketch, merge_blobs

__all__ = [
    "MAX_AUTO_POINTS",
    "MAX_POINTS",
    "PRUNE_EVERY",
    "QueryError",
    "Storage",
    "Tier",
    "plan_segments",
]

#: an automatic step gives at most about this many points
MAX_AUTO_POINTS = 1500
#: a query asking for more points than this is refused (param "step")
MAX_POINTS = 100_000
#: retention is enforced at most this often (seconds of the clock)
PRUNE_EVERY = 60
#: series.last_seen / metrics.last_seen are rewritten when they move this much
SERIES_SEEN_EVERY = 3600
METRIC_SEEN_EVERY = 60
#: one write compacts at most this many finer windows per tier (catching up)
MAX_COMPACT_WINDOWS = 360
#: tier 1 is compacted from the writer's memory when its buckets span at most
#: this many flush windows (their sketch and set blobs wait in memory)
PENDING_MAX_WINDOWS = 12
#: a write compacts about this many series of a tier-1 bucket held in memory,
COMPACT_SLICE_SERIES = 10_000
#: or series with about this many finer rows by SQL (see _Compaction)
COMPACT_SLICE_ROWS = 40_000
#: SQLite's page cache per connection, in KiB. Reads come through the memory
#: map; the cache holds the pages a transaction changes (9.3 MiB for a flush
#: of 100k series) and those read back from the WAL. 16 MiB writes a flush
#: and compacts an hour as fast as 64 MiB did, and holds about 48 MiB less.
PAGE_CACHE_KIB = 16384
#: events returned at most by default
EVENTS_LIMIT = 1000


class QueryError(Exception):
    """A query that cannot be answered; ``param`` names the culprit parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True, slots=True)
class Tier:
    """Rollups of ``resolution`` seconds, kept ``retention`` seconds."""

    resolution: int
    retention: int


class TierLike(Protocol):
    """Anything with a resolution and a retention (``config.Tier`` too)."""

    @property
    def resolution(self) -> int: ...

    @property
    def retention(self) -> int: ...


# --------------------------------------------------------------------- schema

MIGRATIONS = Migrations("statsd_aggregator")


@MIGRATIONS(name="0001_schema")
def _m0001_schema(db: sqlite_utils.Database) -> None:
    """The first schema; the module docstring says what each table means."""
    for statement in (
        """CREATE TABLE metrics (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            totals_from INTEGER,
            UNIQUE (name, type))""",
        """CREATE TABLE series (
            id INTEGER PRIMARY KEY,
            metric_id INTEGER NOT NULL REFERENCES metrics (id),
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            tags TEXT NOT NULL,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            UNIQUE (name, type, tags))""",
        "CREATE INDEX series_metric ON series (metric_id)",
        "CREATE INDEX series_last_seen ON series (last_seen)",
        """CREATE TABLE series_tags (
            series_id INTEGER NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (series_id, key, value)) WITHOUT ROWID""",
        "CREATE INDEX series_tags_key_value ON series_tags (key, value)",
        """CREATE TABLE rollups (
            resolution INTEGER NOT NULL,
            ts INTEGER NOT NULL,
            metric_id INTEGER NOT NULL,
            series_id INTEGER NOT NULL,
            count REAL, sum REAL, min REAL, max REAL, last REAL,
            state BLOB,
            PRIMARY KEY (resolution, ts, metric_id, series_id)) WITHOUT ROWID""",
        """CREATE TABLE totals (
            resolution INTEGER NOT NULL,
            ts INTEGER NOT NULL,
            metric_id INTEGER NOT NULL,
            count REAL, sum REAL, min REAL, max REAL, last REAL,
            state BLOB,
            PRIMARY KEY (resolution, ts, metric_id)) WITHOUT ROWID""",
        """CREATE TABLE tiers (
            resolution INTEGER PRIMARY KEY,
            retention INTEGER NOT NULL,
            complete_from INTEGER,
            complete_until INTEGER,
            pruned_before INTEGER)""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            timestamp INTEGER NOT NULL,
            title TEXT NOT NULL,
            text TEXT NOT NULL,
            host TEXT NOT NULL,
            priority TEXT NOT NULL,
            alert_type TEXT NOT NULL,
            aggregation_key TEXT NOT NULL,
            source_type TEXT NOT NULL,
            tags TEXT NOT NULL)""",
        "CREATE INDEX events_timestamp ON events (timestamp)",
        """CREATE TABLE service_checks (
            name TEXT NOT NULL,
            host TEXT NOT NULL,
            tags TEXT NOT NULL,
            status INTEGER NOT NULL,
            timestamp INTEGER NOT NULL,
            message TEXT NOT NULL,
            PRIMARY KEY (name, host, tags)) WITHOUT ROWID""",
        "CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ):
        db.execute(statement)


# ----------------------------------------------------------------- helpers


def canonical_tags(tags: Iterable[tuple[str, str]]) -> Tags:
    """Sorted, without duplicate pairs: the identity of a tag set."""
    return tuple(sorted(set(tags)))


def tags_json(tags: Tags) -> str:
    """The stored form of a canonical tag set: compact JSON ``[[k, v], ...]``."""
    if not tags:
        return "[]"  # most series: skip the encoder
    return json.dumps([list(pair) for pair in tags], ensure_ascii=False, separators=(",", ":"))


def _tags_dict(text: str) -> dict[str, str]:
    return {key: value for key, value in json.loads(text)}


def _floor(t: int, r: int) -> int:
    return t // r * r


def _ceil(t: int, r: int) -> int:
    return -(-t // r) * r


def _ids(values: Iterable[int]) -> str:
    """An SQL list of integer ids, inlined (ints cannot inject anything)."""
    return ",".join(str(int(v)) for v in values) or "NULL"


def _executemany(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """``conn.executemany`` for the writer's bulk rows: in C when it is built
    (fastpath.py), which takes about 30% less a row, inside the transaction
    the write opened (outside one, sqlite3's own)."""
    if sqlite_native is not None and conn.in_transaction:
        sqlite_native.executemany(conn, sql, rows)
    else:
        conn.executemany(sql, rows)


def _merge_state(type_code: str, old: bytes | None, new: bytes | None) -> bytes | None:
    """SQL ``merge_state(type, a, b)``: the upsert's state merge (conflicts only)."""
    return merge_blobs(type_code, (old, new))


def _set_cardinality(blob: bytes | None) -> float | None:
    """SQL ``set_cardinality(state)``: a set's count after a merge."""
    return None if blob is None else float(SetState.from_bytes(blob).cardinality())


class _MergeStates:
    """SQL aggregate ``merge_states(type, state)``: one merged blob per group."""

    def __init__(self) -> None:
        self.type_code = ""
        self.blobs: list[bytes] = []

    def step(self, type_code: str, blob: bytes | None) -> None:
        if blob is not None:
            self.type_code = type_code
            self.blobs.append(blob)

    def finalize(self) -> bytes | None:
        return merge_blobs(self.type_code, self.blobs) if self.blobs else None


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    conn.execute("PRAGMA mmap_size = 268435456")
    return conn


def _check_tiers(tiers: Sequence[Tier]) -> None:
    """Finest first, each resolution a multiple of the previous, retention >= resolution."""
    if not tiers:
        raise ValueError("at least one storage tier is needed")
    for i, tier in enumerate(tiers):
        if tier.resolution <= 0 or tier.retention < tier.resolution:
            raise ValueError(f"{tier}: resolution must be > 0 and retention >= resolution")
        finer = tiers[i - 1] if i else None
        if finer is not None and (
            tier.resolution <= finer.resolution or tier.resolution % finer.resolution
        ):
            raise ValueError(
                f"{tier}: each resolution must be a multiple of the one before "
                f"({finer.resolution}s)"
            )


def _json_tag_filter(tags: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
    """SQL requiring each (key, value) pair in the JSON ``tags`` column."""
    where = ""
    params: list[str] = []
    for key, value in tags:
        where += (
            " AND EXISTS (SELECT 1 FROM json_each(tags) j WHERE "
            "json_extract(j.value, '$[0]') = ? AND json_extract(j.value, '$[1]') = ?)"
        )
        params += [key, value]
    return where, params


# ------------------------------------------------------------------- planning


def plan_segments(
    start: int,
    end: int,
    resolutions: Sequence[int],
    complete: Sequence[tuple[int | None, int | None]],
) -> list[tuple[int, int, int]]:
    """Cover ``[start, end)`` with ``(resolution, seg_start, seg_end)`` pieces.

    ``resolutions`` finest first, each a multiple of the previous;
    ``complete[i]`` is tier i's compacted interval ``(from, until)`` (ignored
    for tier 0, which holds everything written). The coarsest tier takes the
    aligned interior of the range that it has compacted; the edges recurse
    into finer tiers.
    """
    segments: list[tuple[int, int, int]] = []

    def cover(a: int, b: int, i: int) -> None:
        if a >= b:
            return
        if i == 0:
            segments.append((resolutions[0], a, b))
            return
        lo, hi = complete[i]
        r = resolutions[i]
        inner_a = inner_b = 0
        if lo is not None and hi is not None:
            inner_a, inner_b = max(_ceil(a, r), lo), min(_floor(b, r), hi)
        if inner_a >= inner_b:
            cover(a, b, i - 1)
            return
        cover(a, inner_a, i - 1)
        segments.append((r, inner_a, inner_b))
        cover(inner_b, b, i - 1)

    cover(start, end, len(resolutions) - 1)
    return segments


class Storage:
    """Rollups, events, checks and restart state in one SQLite file.

    ``write`` and ``close`` belong to the writer thread; every other method
    may be called from any thread (each has its own read connection).
    ``clock`` (unix seconds) drives retention and keeps a window stamped in
    the future from marking coarse buckets complete.
    """

    def __init__(
        self,
        path: str,
        tiers: Sequence[TierLike],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.tiers = tuple(Tier(int(t.resolution), int(t.retention)) for t in tiers)
        _check_tiers(self.tiers)
        self.resolutions = tuple(t.resolution for t in self.tiers)
        self.clock = clock
        #: rollups refused because retention had passed their coarse buckets
        self.late_dropped = 0
        self._closed = False
        self._local = threading.local()
        self._readers: list[_Reader] = []
        self._readers_lock = threading.Lock()
        self._writer: _Writer | None = None
        self._writer_thread: int | None = None
        self._setup()

    def _setup(self) -> None:
        """Create or migrate the schema; record the configured tiers.

        Writes nothing when the file is up to date, so that a read-only file
        still opens (and answers queries).
        """
        db = sqlite_utils.Database(_connect(self.path))
        try:
            db.enable_wal()
            MIGRATIONS.apply(db)
            known = dict(db.execute("SELECT resolution, retention FROM tiers").fetchall())
            changed = [
                (t.resolution, t.retention)
                for t in self.tiers
                if known.get(t.resolution) != t.retention
            ]
            if changed:
                with db.atomic():
                    db.conn.executemany(
                        "INSERT INTO tiers (resolution, retention) VALUES (?, ?) ON CONFLICT "
                        "(resolution) DO UPDATE SET retention = excluded.retention",
                        changed,
                    )
        finally:
            db.close()

    # ------------------------------------------------------------ write side

    def write(
        self,
        rollups: Sequence[Rollup],
        events: Sequence[tuple[Event, int]] = (),
        checks: Sequence[tuple[ServiceCheck, int]] = (),
        state: Mapping[str, bytes | None] | None = None,
    ) -> None:
        """Store one flush in ONE transaction, then downsample and prune in a
        second (``maintain``).

        ``events``/``checks`` come with their arrival time, used when they
        carry no timestamp. ``state`` entries replace the stored ones (None
        deletes one).
        """
        writer = self.open_writer()
        writer.write(rollups, events, checks, state or {})
        writer.maintain()

    def open_writer(self, busy_timeout: float | None = None) -> _Writer:
        """The writer connection, opened now in the calling thread (which becomes
        the writer thread) if it is not open yet; ``busy_timeout`` (seconds) sets
        how long a write waits for a lock another process holds (default 30 s)."""
        if self._closed:
            raise RuntimeError("storage is closed")
        ident = threading.get_ident()
        if self._writer is None:
            self._writer = _Writer(self)
            self._writer_thread = ident
        elif self._writer_thread != ident:
            raise RuntimeError("Storage.write must always be called from the same thread")
        if busy_timeout is not None:
            self._writer.conn.execute(f"PRAGMA busy_timeout = {max(1, int(busy_timeout * 1000))}")
        return self._writer

    def register(
        self,
        keys: Iterable[tuple[str, str, Tags]],
        ts: int,
        admit: Callable[[tuple[str, str, Tags]], bool],
        busy_timeout: float | None = None,
    ) -> int:
        """Create the series of ``keys`` that are not stored yet, before the
        flush of their window (which starts at ``ts``); writer thread only.

        A first window of 100k series spent about half its flush creating
        their rows (0.4-0.5 s of SQLite inserts, 0.25 s of Python); the
        daemon calls this while the window is still open, with the series
        its intakes have just met, and the flush finds them stored. It
        changes nothing the flush would not: the rows are the ones the flush
        would create, with ``ts`` as first and last seen. ``admit`` is asked
        about each series not stored yet (the daemon bounds them by its
        limits); a window already written is not registered into: its flush
        created what it kept. The number of series created.
        """
        return self.open_writer(busy_timeout).register(keys, ts, admit)

    def checkpoint(self) -> None:
        """Run the checkpoint the last write left due, if any; writer thread only.

        SQLite would run it inside the commit of whichever write filled the
        WAL past 1,000 pages, so on the flush's clock: after a write of 100k
        series, copying its 2,400 pages (9 MiB) and syncing the file took
        0.07 s, 0.15 s after a first window. The writer turns that off and
        runs it here instead, after the flush is stored (the daemon calls
        this once the flush is done). A write that finds it still due runs
        it first: the WAL holds one write, unless readers hold checkpoints back.
        """
        writer = self._writer
        if writer is not None and writer.checkpoint_due:
            self.open_writer().checkpoint()

    def maintain(self) -> None:
        """Run the downsampling and retention the last write left due, if any;
        writer thread only.

        A flush's transaction holds the window (its rows, the series'
        bookkeeping, the rows that arrived late and the coarser buckets they
        change); the next slice of the last minute's compaction into the
        coarser tiers and the retention deletes follow in a transaction of
        their own, which the daemon runs once the flush is stored and
        /metrics updated: at 100k series a slice is 0.10-0.14 s, which no
        longer holds the window back from readers. A write that finds it
        still due runs it first, so the order of the work is as it was.
        Before them, the minute being folded merges the window's sketch and
        set blobs into its own (``_Pending.merge_states``).
        """
        writer = self._writer
        if writer is not None and writer.maintenance_due:
            self.open_writer().maintain()

    def reset_writer(self) -> None:
        """Close the writer connection (after an I/O error, say); the next write,
        from any thread, opens a fresh one and reloads the caches from the file."""
        writer, self._writer, self._writer_thread = self._writer, None, None
        if writer is not None:
            writer.close()

    def close(self) -> None:
        """Close every connection: the writer's and all the readers'."""
        self._closed = True
        self.reset_writer()
        self.reset_readers()

    def reset_readers(self) -> None:
        """Close every reader connection, waiting for a query in progress to end;
        each thread opens a fresh one at its next query.

        A new writer connection calls this: a connection opened while the file
        was read-only (or replaced) keeps SQLite's shared state for that file
        stale in the whole process, and writes would keep failing
        ("attempt to write a readonly database") while it stays open.
        """
        with self._readers_lock:
            readers = list(self._readers)
        for reader in readers:
            with reader.lock:
                if reader.conn is not None:
                    reader.conn.close()
                    reader.conn = None

    # ------------------------------------------------------------- read side

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction on this thread's connection: one consistent view."""
        if self._closed:
            raise RuntimeError("storage is closed")
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _Reader()
            with self._readers_lock:
                self._readers.append(reader)
        with reader.lock:  # only reset_readers() contends, from another thread
            conn = reader.conn
            if conn is None:
                conn = reader.conn = _connect(self.path)
                conn.execute("PRAGMA query_only = ON")
                conn.isolation_level = None  # read transactions are BEGIN/COMMIT by hand
            conn.execute("BEGIN")
            try:
                yield conn
            except BaseException:
                # A cursor left mid-way by the error stays alive with its
                # traceback, and an unfinished statement pins the snapshot
                # of its connection past COMMIT: later queries here would
                # read old data (a metric created since would be "not
                # found"). Give the connection up; the next query opens one.
                reader.conn = None
                conn.close()
                raise
            else:
                conn.execute("COMMIT")

    def load_state(self) -> dict[str, bytes]:
        """Every blob stored with ``write(state=...)``."""
        with self._snapshot() as conn:
            rows = conn.execute("SELECT key, value FROM state").fetchall()
        return {key: bytes(value) for key, value in rows}

    def list_metrics(
        self, prefix: str | None = None, type_code: str | None = None
    ) -> list[dict[str, Any]]:
        """Every metric: name, API type name, tag keys, series count, last_seen."""
        sql = "SELECT id, name, type, last_seen FROM metrics WHERE 1"
        params: list[Any] = []
        if prefix:
            sql += " AND substr(name, 1, ?) = ?"
            params += [len(prefix), prefix]
        if type_code:
            sql += " AND type = ?"
            params.append(type_code)
        with self._snapshot() as conn:
            metrics = conn.execute(sql + " ORDER BY name, type", params).fetchall()
            ids = _ids(row[0] for row in metrics)
            counts = dict(
                conn.execute(
                    f"SELECT metric_id, count(*) FROM series WHERE metric_id IN ({ids}) GROUP BY 1"
                )
            )
            keys: dict[int, list[str]] = {}
            for metric_id, key in conn.execute(
                "SELECT DISTINCT s.metric_id, t.key FROM series s CROSS JOIN series_tags t "
                f"WHERE s.metric_id IN ({ids}) AND t.series_id = s.id ORDER BY 1, 2"
            ):
                keys.setdefault(metric_id, []).append(key)
        return [
            {
                "name": name,
                "type": TYPE_NAMES.get(code, code),
                "tags": keys.get(metric_id, []),
                "series": counts.get(metric_id, 0),
                "last_seen": last_seen,
            }
            for metric_id, name, code, last_seen in metrics
        ]

    def count_series(
        self,
        metric: str,
        tags: Sequence[tuple[str, str]] = (),
        type_code: str | None = None,
    ) -> int:
        """How many series of ``metric`` match every tag filter (the API's query cost)."""
        sql = "SELECT count(*) FROM series s WHERE s.name = ?"
        params: list[Any] = [metric]
        if type_code is not None:
            sql += " AND s.type = ?"
            params.append(type_code)
        for key, value in tags:
            sql += (
                " AND EXISTS (SELECT 1 FROM series_tags t WHERE t.series_id = s.id"
                " AND t.key = ? AND t.value = ?)"
            )
            params += [key, value]
        with self._snapshot() as conn:
            return int(conn.execute(sql, params).fetchone()[0])

    def query_series(
        self,
        metric: str,
        stat: str | None = None,
        start: int | None = None,
        end: int | None = None,
        step: int | None = None,
        tags: Sequence[tuple[str, str]] = (),
        group_by: str | None = None,
        limit: int | None = None,
        type_code: str | None = None,
        now: int | None = None,
        points: bool = True,
    ) -> dict[str, Any]:
        """The SPEC section 5 series document (see the module docstring).

        ``points=False``: every series with its ``value`` and no points (a
        dashboard's numbers), without the cost of the buckets.
        """
        now = int(self.clock()) if now is None else int(now)
        end = now if end is None else int(end)
        start = end - 3600 if start is None else int(start)
        if start >= end:
            raise QueryError("from", "must be before to")
        with self._snapshot() as conn:
            query = _Query(self, conn, metric, type_code, now)
            return query.run(stat, start, end, step, list(tags), group_by, limit, points)

    def top_tag_values(
        self,
        metric: str,
        stat: str | None,
        key: str,
        start: int,
        end: int,
        limit: int | None,
        type_code: str | None = None,
    ) -> list[tuple[str, float | None]]:
        """(value of tag ``key``, stat over the range), best first: the values of a
        group_by query, without computing its points."""
        if start >= end:
            raise QueryError("from", "must be before to")
        with self._snapshot() as conn:
            query = _Query(self, conn, metric, type_code, int(end))
            document = query.run(stat, int(start), int(end), None, [], key, limit, False)
        return [(s["tags"][key], s["value"]) for s in document["series"]]

    def distinct_tag_values(
        self, metrics: Sequence[str], key: str, start: int, end: int
    ) -> set[str]:
        """Values of tag ``key`` on series of these metrics with data in the range."""
        if not metrics:
            return set()
        r0 = self.resolutions[0]
        with self._snapshot() as conn:
            marks = ",".join("?" * len(metrics))
            found = conn.execute(
                f"SELECT id, first_seen, last_seen FROM metrics WHERE name IN ({marks})",
                list(metrics),
            ).fetchall()
            ids = [row[0] for row in found]
            if not ids:
                return set()
            # Only where these metrics have rows: every bucket of the plan is a
            # seek, and a range like from=0 would otherwise enumerate decades.
            start = max(start, min(row[1] for row in found))
            end = min(end, max(row[2] for row in found) + METRIC_SEEN_EVERY)
            plan = plan_segments(
                _floor(start, r0), _ceil(end, r0), self.resolutions, _watermarks(self, conn)
            )
            if not ids or not plan:
                return set()
            buckets, params = _buckets_cte([(r, a, b, 0) for r, a, b in plan])
            # Per series carrying the key, one seek per bucket until a row is
            # found (usually the first), rather than reading every row of the
            # range. A series last seen over SERIES_SEEN_EVERY before the range
            # has no row in it: skipped without seeking.
            sql = (
                f"{buckets} SELECT DISTINCT st.value FROM series_tags st CROSS JOIN series s "
                f"WHERE st.key = ? AND s.id = st.series_id AND s.metric_id IN ({_ids(ids)}) "
                "AND s.last_seen > ? AND EXISTS (SELECT 1 FROM t CROSS JOIN rollups r "
                "WHERE r.resolution = t.res AND r.ts = t.ts AND r.metric_id = s.metric_id "
                "AND r.series_id = s.id)"
            )
            params += [key, _floor(start, r0) - SERIES_SEEN_EVERY]
            return {value for (value,) in conn.execute(sql, params)}

    def events(
        self,
        start: int,
        end: int,
        tags: Sequence[tuple[str, str]] = (),
        limit: int = EVENTS_LIMIT,
    ) -> list[dict[str, Any]]:
        """Events with ``start <= timestamp <= end`` carrying every tag given, newest first."""
        where, params = _json_tag_filter(tags)
        sql = (
            "SELECT timestamp, title, text, host, priority, alert_type, aggregation_key, "
            f"source_type, tags FROM events WHERE timestamp >= ? AND timestamp <= ?{where} "
            "ORDER BY timestamp DESC, id DESC LIMIT ?"
        )
        with self._snapshot() as conn:
            rows = conn.execute(sql, [int(start), int(end), *params, int(limit)]).fetchall()
        names = (
            "timestamp", "title", "text", "host", "priority", "alert_type",
            "aggregation_key", "source_type",
        )  # fmt: skip
        return [
            {**dict(zip(names, row[:-1], strict=True)), "tags": _tags_dict(row[-1])} for row in rows
        ]

    def checks(self, tags: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
        """The latest status of every service check carrying every tag given."""
        where, params = _json_tag_filter(tags)
        sql = (
            "SELECT name, status, timestamp, host, message, tags FROM service_checks "
            f"WHERE 1{where} ORDER BY name, host, tags"
        )
        with self._snapshot() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            {
                "name": name,
                "status": status,
                "status_text": CHECK_STATUS_TEXT[status] if 0 <= status < 4 else "unknown",
                "timestamp": timestamp,
                "host": host,
                "message": message,
                "tags": _tags_dict(tags_text),
            }
            for name, status, timestamp, host, message, tags_text in rows
        ]


class _Reader:
    """One thread's read connection, and the lock that guards it against reset_readers()."""

    __slots__ = ("conn", "lock")

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.lock = threading.Lock()


def _watermarks(storage: Storage, conn: sqlite3.Connection) -> list[tuple[int | None, int | None]]:
    """Each configured tier's compacted interval, as this snapshot sees it."""
    rows = {
        resolution: (lo, hi)
        for resolution, lo, hi in conn.execute(
            "SELECT resolution, complete_from, complete_until FROM tiers"
        )
    }
    return [rows.get(r, (None, None)) for r in storage.resolutions]


def _buckets_cte(segments: Sequence[tuple[int, int, int, int]]) -> tuple[str, list[Any]]:
    """``WITH RECURSIVE t(res, ts, b, src)``: every bucket start of every segment.

    Queries join t to the rollups so that each bucket is one primary-key
    seek on (resolution, ts, metric_id); ``src`` says which table serves it.
    """
    values = ", ".join("(?, ?, ?, ?)" for _ in segments)
    params: list[Any] = [v for r, a, b, src in segments for v in (r, a, b, src)]
    sql = (
        f"WITH RECURSIVE t(res, ts, b, src) AS (VALUES {values} "
        "UNION ALL SELECT res, ts + res, b, src FROM t WHERE ts + res < b)"
    )
    return sql, params


# ------------------------------------------------------------------ the writer

_UPSERT = """
INSERT INTO rollups (resolution, ts, metric_id, series_id, count, sum, min, max, last, state)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (resolution, ts, metric_id, series_id) DO UPDATE SET
    count = CASE WHEN ?11 = 's' AND state IS NOT NULL AND excluded.state IS NOT NULL
                 THEN set_cardinality(merge_state(?11, state, excluded.state))
                 ELSE count + excluded.count END,
    sum = sum + excluded.sum,
    min = min(min, excluded.min),
    max = max(max, excluded.max),
    last = excluded.last,
    state = merge_state(?11, state, excluded.state)
"""

# Buckets [lo, hi) of tier :r from tier :src. `last` comes from the finer row
# with the latest ts, joined back on the primary key (SQLite's bare column
# of max() does not apply with several min()/max() in one query).
_COMPACT = """
INSERT OR REPLACE INTO rollups
    (resolution, ts, metric_id, series_id, count, sum, min, max, last, state)
SELECT :r, g.b, g.mid, g.sid, g.c, g.s, g.mn, g.mx, l.last, g.st
FROM (
    SELECT r.ts / :r * :r AS b, r.metric_id AS mid, r.series_id AS sid, max(r.ts) AS mts,
           CASE WHEN m.type = 's'
                THEN set_cardinality(merge_states(m.type, r.state) FILTER (WHERE r.state NOTNULL))
                ELSE sum(r.count) END AS c,
           sum(r.sum) AS s, min(r.min) AS mn, max(r.max) AS mx,
           merge_states(m.type, r.state) FILTER (WHERE r.state NOTNULL) AS st
    FROM rollups r CROSS JOIN metrics m
    WHERE r.resolution = :src AND {span} AND m.id = r.metric_id {where}
    GROUP BY b, r.metric_id, r.series_id
) g
CROSS JOIN rollups l
WHERE l.resolution = :src AND l.ts = g.mts AND l.metric_id = g.mid AND l.series_id = g.sid
"""

# The totals of the windows just written, without their sketches or sets:
# merging those on every flush would cost as much Python as the tier-1
# compaction does per minute, for queries that mostly read coarse tiers.
# Sets are left out: their only stat needs the merged state.
_FLUSH_TOTALS = """
INSERT OR REPLACE INTO totals (resolution, ts, metric_id, count, sum, min, max, last, state)
SELECT r.resolution, r.ts, r.metric_id, sum(r.count), sum(r.sum), min(r.min), max(r.max),
       sum(r.last), NULL
FROM rollups r
WHERE r.resolution = ?1 AND r.ts = ?2
  AND r.metric_id IN (SELECT id FROM metrics WHERE totals_from NOTNULL AND type != 's')
GROUP BY r.metric_id
"""

# The totals of buckets [lo, hi) of tier :r, from that tier's fresh rows.
_TOTALS = """
INSERT OR REPLACE INTO totals (resolution, ts, metric_id, count, sum, min, max, last, state)
SELECT :r, r.ts, r.metric_id,
       CASE WHEN m.type = 's'
            THEN set_cardinality(merge_states(m.type, r.state) FILTER (WHERE r.state NOTNULL))
            ELSE sum(r.count) END,
       sum(r.sum), min(r.min), max(r.max), sum(r.last),
       merge_states(m.type, r.state) FILTER (WHERE r.state NOTNULL)
FROM rollups r CROSS JOIN metrics m
WHERE r.resolution = :r AND {span} AND m.id = r.metric_id
  AND m.totals_from NOTNULL {where}
GROUP BY r.ts, r.metric_id
"""


# Rows of tier 1 compacted in the writer's memory (_Pending), as _COMPACT writes them.
_INSERT_COMPACTED = """
INSERT OR REPLACE INTO rollups
    (resolution, ts, metric_id, series_id, count, sum, min, max, last, state)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


@dataclass(slots=True)
class _TierState:
    resolution: int
    retention: int
    complete_from: int | None
    complete_until: int | None
    pruned_before: int | None


@dataclass(slots=True, eq=False)
class _MetricInfo:
    id: int
    name: str
    type: str
    series: int  # how many series it has
    first_seen: int
    last_seen: int  # as stored
    totals_from: int | None


def _seen_phase(ident: int, every: int, step: int) -> int:
    """How much earlier than ``every`` after it was written a last_seen is
    first rewritten: 0, step, 2 step ... below ``every``, by id.

    The series and metrics that a flush creates together would otherwise
    come due together, and one flush in every ``every`` seconds would
    rewrite all of their rows (100k metrics: about 0.25 s). Spread, each
    flush rewrites a share; a row is still rewritten at least every
    ``every`` seconds, and exactly that often after its first time.
    """
    return ident % max(every // step, 1) * step


#: a rollup's series key, its window start, and the fields of _UPSERT's ?5..?11
_SERIES_KEY = itemgetter(0, 1, 2)
_START = itemgetter(3)
_ROLLUP_COLUMNS = (4, 5, 6, 7, 8, 9, 1)  # count, sum, min, max, last, state, type
#: the two halves of a cached series id pair
_ID_SERIES = itemgetter(0)
_ID_METRIC = itemgetter(1)
#: columns of a row of _UPSERT
_TS = itemgetter(1)
_METRIC_ID = itemgetter(2)
_SERIES_ID = itemgetter(3)

#: the rows of _COMPACT's or _TOTALS' buckets [lo, hi) ...
_SPAN = "r.ts >= :lo AND r.ts < :hi"
#: ... and of one slice of metric ids of them: one primary-key seek per (ts,
#: metric range), where a range of ts would scan every metric at each ts
_SLICE_SPAN = "r.ts IN ({ts}) AND r.metric_id >= :mlo AND r.metric_id < :mhi"
#: past every metric id (SQLite's largest integer)
_NO_METRIC = 2**63 - 1

#: late rows of one tier: {(bucket start, metric id, series id)}
_Late = dict[int, set[tuple[int, int, int]]]

#: columns of a row of _UPSERT that _Pending folds
_COUNT = itemgetter(4)
_SUM = itemgetter(5)
_MIN = itemgetter(6)
_MAX = itemgetter(7)
_LAST = itemgetter(8)
_STATE = itemgetter(9)
_TYPE = itemgetter(10)
_STATEFUL = DISTRIBUTION_TYPES | {SET}


def _plain(values: Sequence[Any]) -> bool:
    """No None, NaN or text among ``values`` (SQLite would store None and NaN
    as NULL, which its aggregates skip). An inf and a -inf together also
    answer False: that only sends the bucket to the SQL path."""
    try:
        total = sum(values, 0.0)
    except TypeError:
        return False
    return bool(total == total)


class _Pending:
    """The tier-1 bucket being filled, folded as the writer writes its windows.

    Compacting a bucket with ``_COMPACT`` sorts every finer row of it: at
    100k series and 5 s windows, 1.2M rows and 420k steps of the Python
    aggregate ``merge_states``, ~2.5 s of the flush that completed each
    minute. The writer holds each window's rows as it writes them, so it
    folds them here into one running row per series, at the series'
    position in the columns (``pos``), in C when the extension is built
    (``_sketchfast.fold_rows``, in place, whatever series a window holds):
    count and sum added in window order starting from 0.0, as
    SQLite's sum() does; min and max keeping the first of equal values, as
    SQLite's do; last from the latest window. The sketch and set blobs are
    kept by position, one list per window, until the writer merges them
    into one after each window is stored (``merge_states``). The rows come
    out as ``_COMPACT`` writes them.

    ``valid`` turns False as soon as the bucket's tier-0 rows might not be
    exactly the windows folded here: a window written again (the upsert
    merged it), None or NaN among min/max (SQLite stores NULL and skips it),
    one series twice in a window (two orders of its tags). Such a bucket is
    compacted by ``_COMPACT``, as always.
    """

    __slots__ = (
        "bucket", "count", "last", "last_ts", "max", "mids", "min", "ordered", "pos",
        "sids", "states", "sum", "types", "valid",
    )  # fmt: skip

    def __init__(self, bucket: int, valid: bool = True) -> None:
        self.bucket = bucket
        self.last_ts = bucket - 1
        self.valid = valid
        #: [series id] -> its position in the columns + 1, 0 for none (8 bytes
        #: a series id, where a set of the ids held about 17 MB at 100k series)
        self.pos = array("q")
        self.sids: list[int] = []
        self.mids: list[int] = []
        self.types: list[str] = []
        #: count, sum, min and max as doubles (no float object per series and
        #: window to outlive the flush's temporaries), last as the rows hold it
        self.count = array("d")
        self.sum = array("d")
        self.min = array("d")
        self.max = array("d")
        self.last: list[Any] = []
        #: lists of blobs (or None) by position: the windows' merged so far
        #: (``merge_states``), and the latest window's until it is merged too
        self.states: list[list[bytes | None]] = []
        #: the positions follow (metric id, series id), the rollups' key order
        self.ordered = True

    def add(self, ts: int, window: Sequence[tuple[Any, ...]]) -> None:
        """Fold one window written into tier 0 (rows of _UPSERT, in key order)."""
        if not self.valid:
            return
        if ts <= self.last_ts:  # written again: merged with what is there
            self.valid = False
            return
        self.last_ts = ts
        if not self.sids and not self._start(window):
            return
        if sketch_native is not None:  # the common case in C: plain values
            states = self._fold_native(window)
            if states is not None:
                self.states.append(states)
                return
        sids = list(map(_SERIES_ID, window))
        mins = list(map(_MIN, window))
        maxs = list(map(_MAX, window))
        if not (_plain(mins) and _plain(maxs)):
            self.valid = False
            return
        counts = list(map(_COUNT, window))
        sums = list(map(_SUM, window))
        lasts = list(map(_LAST, window))
        states = list(map(_STATE, window))
        n = len(sids)
        where: dict[int, int] = {}
        if sids != self.sids:
            where = dict(zip(sids, range(n), strict=True))
            if len(where) != n:  # a series twice: the upsert merged them
                self.valid = False
                return
            self._grow(window)
        try:
            if sids == self.sids:  # the same series as the columns, in order
                self.count = array("d", map(add, self.count, counts))
                self.sum = array("d", map(add, self.sum, sums))
                self.min = array("d", map(min, self.min, mins))
                self.max = array("d", map(max, self.max, maxs))
                self.last = lasts
                self.states.append(states)
                return
            # some series are not in this window: gather its columns by position,
            # with the neutral value where a series is missing (0.0 is neutral:
            # a running sum that starts from 0.0 is never -0.0)
            m = len(self.sids)
            at = list(map(where.get, self.sids, repeat(n)))
            counts.append(0.0)
            sums.append(0.0)
            mins.append(math.inf)
            maxs.append(-math.inf)
            states.append(None)
            self.count = array("d", map(add, self.count, map(counts.__getitem__, at)))
            self.sum = array("d", map(add, self.sum, map(sums.__getitem__, at)))
            self.min = array("d", map(min, self.min, map(mins.__getitem__, at)))
            self.max = array("d", map(max, self.max, map(maxs.__getitem__, at)))
            keep = list(map(where.get, self.sids, range(n, n + m)))  # else the last one's
            lasts += self.last
            self.last = list(map(lasts.__getitem__, keep))
            self.states.append(list(map(states.__getitem__, at)))
        except TypeError:  # count or sum None, or text: SQLite's sum() decides
            self.valid = False

    def merge_states(self) -> None:
        """Merge the windows' sketch and set blobs held so far into one column.

        Kept a column per window until the bucket completed, they were the
        largest part of the bucket; merged after each window is stored
        (``_Writer.maintain``), the bucket holds one column and the next
        window's (at 100k series of which 35k timers and sets, 5 s windows
        and 300k lines/s, the daemon's peak fell by about 22 MiB: item 49
        of bench/README.md). The merge is the one ``merge_states`` and
        ``rows`` make, window by window: the blobs come out the same, bit
        for bit. A blob where none belongs (a counter's or a gauge's) or a
        malformed one leaves the bucket to SQL's compaction, as ``rows``
        would.
        """
        if not self.valid or len(self.states) < 2:
            return
        types = self.types
        columns = self.states
        stateful = [j for j, code in enumerate(types) if code in _STATEFUL]
        if len(stateful) < len(types):
            plain = [j for j, code in enumerate(types) if code not in _STATEFUL]
            for column in columns:
                if list(map(column.__getitem__, plain)).count(None) != len(plain):
                    self.valid = False
                    return
        merged: list[bytes | None] = [None] * len(types)
        blobs = zip(*(list(map(column.__getitem__, stateful)) for column in columns), strict=True)
        try:
            for j, blob in zip(
                stateful, map(merge_blobs, map(types.__getitem__, stateful), blobs), strict=True
            ):
                merged[j] = blob
        except ValueError:  # a malformed blob
            self.valid = False
            return
        self.states = [merged]

    def _fold_native(self, window: Sequence[tuple[Any, ...]]) -> list[bytes | None] | None:
        """The window folded in C, its new series given positions first; None
        (nothing changed but those positions) when Python must fold it."""
        assert sketch_native is not None
        columns = (self.pos, self.count, self.sum, self.min, self.max, self.last)
        states: list[bytes | None] | None = sketch_native.fold_rows(window, *columns)
        if states is None and self._grow(window):
            states = sketch_native.fold_rows(window, *columns)
        return states

    def _start(self, window: Sequence[tuple[Any, ...]]) -> bool:
        """Columns for the first window of a bucket: its series, in its order,
        with neutral values so far, so that it folds as any later window of
        the same series does. False (and the bucket invalid) if a series
        comes twice."""
        sids = list(map(_SERIES_ID, window))
        n = len(sids)
        if len(set(sids)) != n:  # a series twice: the upsert merged them
            self.valid = False
            return False
        self.sids = sids
        self.pos = array("q", bytes(8 * (max(sids, default=0) + 1)))
        for at, series_id in enumerate(sids, 1):
            self.pos[series_id] = at
        self.mids = list(map(_METRIC_ID, window))
        self.types = list(map(_TYPE, window))
        self.count = array("d", bytes(8 * n))  # 0.0s
        self.sum = array("d", bytes(8 * n))
        self.min = array("d", [math.inf]) * n
        self.max = array("d", [-math.inf]) * n
        self.last = [None] * n
        return True

    def _grow(self, window: Sequence[tuple[Any, ...]]) -> bool:
        """Give the window's new series positions, with neutral values so far;
        False if it has none. A series twice in it gets one (``add`` then
        finds it twice in the window: the bucket is invalid)."""
        pos = self.pos
        rows = [row for row in window if row[3] >= len(pos) or not pos[row[3]]]
        if not rows:
            return False
        if len(set(map(_SERIES_ID, rows))) != len(rows):  # each new series once
            rows = list({row[3]: row for row in rows}.values())  # (same metric and type)
        grow = len(rows)
        first = len(self.sids)
        self.ordered = not first  # appended after the known series: out of key order
        sids = list(map(_SERIES_ID, rows))
        pos.frombytes(bytes(8 * max(0, max(sids) + 1 - len(pos))))
        for at, series_id in enumerate(sids, first + 1):
            pos[series_id] = at
        self.sids += sids
        self.mids += map(_METRIC_ID, rows)
        self.types += map(_TYPE, rows)
        self.count.frombytes(bytes(8 * grow))
        self.sum.frombytes(bytes(8 * grow))
        self.min.extend(repeat(math.inf, grow))
        self.max.extend(repeat(-math.inf, grow))
        self.last += repeat(None, grow)
        for column in self.states:
            column += repeat(None, grow)
        return True

    def compacted(self, resolution: int) -> _PendingRows | None:
        """The bucket's rows of ``_INSERT_COMPACTED``, to be taken in slices;
        None when SQL must compact it."""
        if not self.valid or not self.sids or not (_plain(self.count) and _plain(self.sum)):
            return None
        return _PendingRows(self, resolution)


class _PendingRows:
    """A completed ``_Pending`` bucket in (metric id, series id) order, whose
    rows are made a slice of metrics at a time: the blobs of a slice's
    sketches and sets are merged only when the slice is written."""

    __slots__ = ("bucket", "mids", "order", "pending", "resolution")

    def __init__(self, pending: _Pending, resolution: int) -> None:
        self.pending = pending
        self.resolution = resolution
        self.bucket = pending.bucket
        n = len(pending.sids)
        if pending.ordered:
            self.order: Sequence[int] = range(n)
            self.mids = pending.mids
        else:
            key = list(zip(pending.mids, pending.sids, strict=True))
            self.order = sorted(range(n), key=key.__getitem__)
            self.mids = list(map(pending.mids.__getitem__, self.order))

    def cuts(self, per_slice: int) -> list[int]:
        """Metric-id bounds of slices of about ``per_slice`` series each, whole
        metrics (a metric's totals are computed from all of its series)."""
        mids = self.mids
        inner = {mids[at] for at in range(per_slice, len(mids), per_slice)} - {mids[0]}
        cuts = [0, *sorted(inner)]  # no empty first slice when one metric fills it
        cuts.append(_NO_METRIC)
        return cuts

    def rows(self, metric_lo: int, metric_hi: int) -> list[tuple[Any, ...]] | None:
        """The rows of metric ids ``[metric_lo, metric_hi)``; None when SQL
        must compact them: a malformed blob, or a blob on a counter or a
        gauge (``merge_states`` fails on either, and so does the write)."""
        a = bisect_left(self.mids, metric_lo)
        b = bisect_left(self.mids, metric_hi, a)
        p = self.pending
        at = self.order[a:b]
        types = list(map(p.types.__getitem__, at))
        count: list[float | None] = list(map(p.count.__getitem__, at))
        state: list[bytes | None] = [None] * len(at)
        stateful = [j for j, code in enumerate(types) if code in _STATEFUL]
        if len(stateful) < len(at):
            plain = [at[j] for j, code in enumerate(types) if code not in _STATEFUL]
            for column in p.states:
                if list(map(column.__getitem__, plain)).count(None) != len(plain):
                    return None
        if stateful:
            where = list(map(at.__getitem__, stateful))
            blobs = [list(map(column.__getitem__, where)) for column in p.states]
            merged = map(merge_blobs, map(types.__getitem__, stateful), zip(*blobs, strict=True))
            try:
                for j, blob in zip(stateful, merged, strict=True):
                    state[j] = blob
                    if types[j] == SET:
                        count[j] = _set_cardinality(blob)
            except ValueError:  # a malformed blob
                return None
        return list(
            zip(
                repeat(self.resolution), repeat(self.bucket), self.mids[a:b],
                map(p.sids.__getitem__, at), count, map(p.sum.__getitem__, at),
                map(p.min.__getitem__, at), map(p.max.__getitem__, at),
                map(p.last.__getitem__, at), state,
            )
        )  # fmt: skip


@dataclass(slots=True, eq=False)
class _Compaction:
    """Buckets ``[lo, hi)`` of one coarse tier being compacted, a slice of
    metrics per write: slice k holds metric ids ``[cuts[k], cuts[k + 1])``.

    At 100k series, compacting a minute bucket in one write added 0.5 s to
    that flush, and an hour bucket (6M finer rows through ``_COMPACT``)
    about 9 s. Sliced, each write does a bounded share
    (``COMPACT_SLICE_SERIES`` from memory, ``COMPACT_SLICE_ROWS`` finer rows
    by SQL), but never fewer series than finish the range before the next
    bucket of the tier completes. The tier's watermark moves only when the
    last slice is written, so until then queries read the finer tier and
    the rows of the slices already written are not seen.
    """

    lo: int
    hi: int
    cuts: list[int]
    #: tier 1's bucket from the writer's memory, else None: ``_COMPACT``
    source: _PendingRows | None
    written: int = 0  # slices

    def finished(self) -> bool:
        return self.written >= len(self.cuts) - 1


def _slice_cuts(counts: Sequence[tuple[int, int]], per_slice: int) -> list[int]:
    """Metric-id bounds of slices of about ``per_slice`` series each, whole
    metrics (a metric's totals are computed from all of its series), from
    (metric id, series) in id order. The last bound is past every id."""
    cuts = [0]
    filled = 0
    for metric_id, series in counts:
        if filled >= per_slice:
            cuts.append(metric_id)
            filled = 0
        filled += series
    cuts.append(_NO_METRIC)
    return cuts


class _Writer:
    """The writer thread's connection, id caches and tier watermarks."""

    def __init__(self, storage: Storage) -> None:
        storage.reset_readers()  # a fresh start for every connection (see reset_readers)
        self.storage = storage
        self.tiers = storage.tiers
        self.clock = storage.clock
        self.db = sqlite_utils.Database(_connect(storage.path))
        self.conn = self.db.conn
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA journal_size_limit = 67108864")
        # checkpoints run after a write (checkpoint), not inside its commit
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        #: a write committed pages to the WAL that no checkpoint has copied yet
        self.checkpoint_due = False
        #: a write was stored and its compaction slice and retention are not yet
        self.maintenance_due = False
        self.conn.create_function("merge_state", 3, _merge_state, deterministic=True)
        self.conn.create_function("set_cardinality", 1, _set_cardinality, deterministic=True)
        self.conn.create_aggregate("merge_states", 2, _MergeStates)  # type: ignore[arg-type]
        #: (name, type, tags as sent) -> (series id, metric id)
        self.series: dict[tuple[str, str, Tags], tuple[int, int]] = {}
        # Ids are dense (handed out in order, from 1), so what is kept per id is
        # held by position: an 8-byte slot per series instead of a dict entry
        # and an int object (about 110 bytes a series at 100k series).
        #: [series id] -> last_seen as stored, less its _seen_phase until first rewritten
        self.series_seen = array("q")
        self.metrics: dict[tuple[str, str], _MetricInfo] = {}
        #: [metric id] -> the metric, None for an id that is gone
        self.metric_by_id: list[_MetricInfo | None] = []
        #: [metric id] -> its last_seen is rewritten by the first window from then on
        self.metric_due = array("q")
        #: no metric's first_seen is later than this (a window before it may move one)
        self.latest_first_seen = 0
        #: ids handed to the next new series and metric (one writer: no race)
        self.next_series_id = 1
        self.next_metric_id = 1
        self.state: list[_TierState] = []
        #: tier 1's bucket being filled, when its buckets are few flush windows
        self.pending: _Pending | None = None
        #: tier index -> the range of it being compacted, a slice per write
        self.compacting: dict[int, _Compaction] = {}
        self.fold = (
            len(self.tiers) > 1
            and self.tiers[1].resolution // self.tiers[0].resolution <= PENDING_MAX_WINDOWS
        )
        self.next_prune = 0.0
        self.stale = False  # a write rolled back: the caches may know rows that are gone
        self._load()

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA optimize")
        finally:
            self.db.close()

    def _load(self) -> None:
        """Warm the caches, so that a restart's first flush is a pure executemany too."""
        conn = self.conn
        self.pending = None  # the file may hold rows it never saw
        self.compacting.clear()  # restarted from the watermarks (OR REPLACE)
        self.series.clear()
        self.metrics.clear()
        self.latest_first_seen = 0
        counts = dict(conn.execute("SELECT metric_id, count(*) FROM series GROUP BY 1"))
        r0 = self.tiers[0].resolution
        ((self.next_series_id,),) = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM series")
        ((self.next_metric_id,),) = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM metrics")
        # one slot per id below the next one: _add_series appends the new ids' slots
        self.series_seen = array("q", bytes(8 * self.next_series_id))
        self.metric_due = array("q", bytes(8 * self.next_metric_id))
        self.metric_by_id = [None] * self.next_metric_id
        for metric_id, name, type_code, first, last, totals_from in conn.execute(
            "SELECT id, name, type, first_seen, last_seen, totals_from FROM metrics"
        ):
            info = _MetricInfo(
                metric_id, name, type_code, counts.get(metric_id, 0), first, last, totals_from
            )
            phase = _seen_phase(metric_id, METRIC_SEEN_EVERY, r0)
            self.metric_due[metric_id] = last + METRIC_SEEN_EVERY - phase
            self.latest_first_seen = max(self.latest_first_seen, first)
            self.metrics[(name, type_code)] = info
            self.metric_by_id[metric_id] = info
        for series_id, metric_id, name, type_code, tags, last in conn.execute(
            "SELECT id, metric_id, name, type, tags, last_seen FROM series"
        ):
            key = (name, type_code, tuple((k, v) for k, v in json.loads(tags)))
            self.series[key] = (series_id, metric_id)
            self.series_seen[series_id] = last - _seen_phase(series_id, SERIES_SEEN_EVERY, r0)
        rows = {
            row[0]: row
            for row in conn.execute(
                "SELECT resolution, retention, complete_from, complete_until, pruned_before "
                "FROM tiers"
            )
        }
        self.state = [_TierState(*rows[t.resolution]) for t in self.tiers]

    # -------------------------------------------------------------- write

    def write(
        self,
        rollups: Sequence[Rollup],
        events: Sequence[tuple[Event, int]],
        checks: Sequence[tuple[ServiceCheck, int]],
        state: Mapping[str, bytes | None],
    ) -> None:
        if self.stale:
            self._load()
            self.stale = False
        if self.checkpoint_due:  # the caller did not run it after the last write
            self.checkpoint()
        if self.maintenance_due:  # nor this
            self.maintain()
        try:
            with self.db.atomic():
                late = self._write_rollups(rollups)
                self._write_events(events)
                self._write_checks(checks)
                self._write_state(state)
                for i in range(1, len(self.tiers)):
                    self._recompute_late(i, late)
                self._save_tiers()
        except BaseException:
            self.stale = True
            raise
        self.checkpoint_due = self.maintenance_due = True

    def maintain(self) -> None:
        """The minute's blobs merged, then the next compaction slice of each
        coarser tier and retention, in a transaction of their own after the
        window's (see Storage.maintain)."""
        if self.stale:
            self._load()
            self.stale = False
        if self.pending is not None:
            self.pending.merge_states()
        try:
            with self.db.atomic():
                for i in range(1, len(self.tiers)):
                    self._compact(i)
                now = self.clock()
                self._expire(int(now))
                if now >= self.next_prune:
                    self._prune(int(now))
                    self.next_prune = now + PRUNE_EVERY
                self._save_tiers()
        except BaseException:
            self.stale = True
            raise
        self.maintenance_due = False
        self.checkpoint_due = True

    def register(
        self,
        keys: Iterable[tuple[str, str, Tags]],
        ts: int,
        admit: Callable[[tuple[str, str, Tags]], bool],
    ) -> int:
        if self.stale:
            self._load()
            self.stale = False
        ts = _floor(ts, self.tiers[0].resolution)  # as the flush will write it
        written = self.state[0].complete_until
        if written is not None and ts < written:
            return 0
        known = self.series
        new = [key for key in dict.fromkeys(keys) if key not in known and admit(key)]
        if not new:
            return 0
        if self.checkpoint_due:
            self.checkpoint()
        first = self.next_series_id
        try:
            with self.db.atomic():
                self._add_series(new, ts)
        except BaseException:
            self.stale = True
            raise
        self.checkpoint_due = True
        return self.next_series_id - first

    def checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database file (PASSIVE: it
        waits for no reader, and a page a reader still needs is left for the
        next one)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.checkpoint_due = False

    def _write_rollups(self, rollups: Sequence[Rollup]) -> _Late:
        """Upsert the rows of one flush; return those that arrived late."""
        r0 = self.tiers[0].resolution
        # Windows from before tier 1's watermark are late: check each one.
        late_before = self.state[1].complete_until if len(self.state) > 1 else None
        rows: list[tuple[Any, ...]] = []
        windows = 0
        for start, group in groupby(rollups, key=_START):  # one group per window
            ts = start - start % r0
            window = list(group)
            if late_before is not None and ts < late_before and not self._recomputable(ts):
                self.storage.late_dropped += len(window)
                continue
            rows.extend(self._window_rows(window, r0, ts))
            windows += 1
            if self.compacting:
                self._touched(1, ts)
        if not rows:
            return {}
        if windows > 1:  # each window's rows come sorted; the windows, newest first
            rows.sort(key=_TS)
        if self.fold:
            self._fold(rows)
        _executemany(self.conn, _UPSERT, rows)
        self.conn.executemany(_FLUSH_TOTALS, [(r0, ts) for ts in sorted(set(map(_TS, rows)))])
        self._note_seen(rows)
        self._advance_written(rows[-1][1] + r0)
        return self._late_rows(rows)

    def _fold(self, rows: list[tuple[Any, ...]]) -> None:
        """Fold the windows about to be written into tier 1's pending bucket.

        Runs before the upsert: a bucket starts pending only if tier 0 holds
        nothing of it yet, so that its rows are exactly the windows folded.
        """
        tier1 = self.state[1]
        r1 = tier1.resolution
        if rows[0][1] == rows[-1][1]:
            windows: Iterable[tuple[int, Any]] = ((rows[0][1], rows),)
        else:
            windows = groupby(rows, key=_TS)
        for ts, group in windows:
            bucket = _floor(ts, r1)
            pending = self.pending
            if pending is not None and bucket <= pending.bucket:
                if bucket == pending.bucket:
                    pending.add(ts, group if group is rows else list(group))
                continue  # an older bucket's rows leave this one as it is
            if tier1.complete_until is not None and bucket < tier1.complete_until:
                continue  # late rows: _recompute_late's
            (held,) = self.conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM rollups WHERE resolution = ? "
                "AND ts >= ? AND ts < ? LIMIT 1)",
                (self.tiers[0].resolution, bucket, bucket + r1),
            ).fetchone()
            self.pending = _Pending(bucket, valid=not held)
            self.pending.add(ts, group if group is rows else list(group))

    def _window_rows(self, window: list[Rollup], r0: int, ts: int) -> list[tuple[Any, ...]]:
        """The _UPSERT rows of one window, in key order, which is the b-tree's
        (the inserts become appends, pages stay full); in C when it is built."""
        if sketch_native is not None:
            rows, missing = sketch_native.window_rows(window, self.series, r0, ts)
            if missing:
                self._add_series(missing, ts)
                rows, missing = sketch_native.window_rows(window, self.series, r0, ts)
            return rows  # type: ignore[no-any-return]
        ids = self._window_ids(window, ts)
        rows = list(
            zip(
                repeat(r0), repeat(ts), map(_ID_METRIC, ids), map(_ID_SERIES, ids),
                *(map(itemgetter(i), window) for i in _ROLLUP_COLUMNS),
            )
        )  # fmt: skip
        rows.sort(key=itemgetter(2, 3))
        return rows

    def _window_ids(self, window: list[Rollup], ts: int) -> list[tuple[int, int]]:
        """(series id, metric id) of each rollup; only cache misses cost Python."""
        keys = list(map(_SERIES_KEY, window))
        ids: list[Any] = list(map(self.series.get, keys))
        if None in ids:
            missing = [key for key, found in zip(keys, ids, strict=True) if found is None]
            self._add_series(missing, ts)
            ids = list(map(self.series.__getitem__, keys))
        return ids

    def _recomputable(self, ts: int) -> bool:
        """Can a late row at ts be merged into the tiers above? Every coarse bucket
        already compacted that it falls in must still be whole in the finer tier
        (not pruned yet), since it is recomputed from there."""
        for finer, tier in zip(self.state, self.state[1:], strict=False):
            lo, hi = tier.complete_from, tier.complete_until
            if lo is None or hi is None:
                continue
            bucket = _floor(ts, tier.resolution)
            if (
                lo <= bucket < hi
                and finer.pruned_before is not None
                and bucket < finer.pruned_before
            ):
                return False
        return True

    def _add_series(self, keys: list[tuple[str, str, Tags]], ts: int) -> None:
        """Create the series (and metrics) of keys the cache does not know, in bulk.

        The cache holds every stored series (``_load``), so a miss is a new
        series, or a known one whose tags came in another order.  Ids are
        handed out here (this is the only writer), so each table takes one
        ``executemany``. They go in key order, whatever order the window came
        in: a metric's series get neighbouring ids (its rows sit together in
        the rollups' b-tree) and the inserts into the series' unique index
        are appends for names that sort after the ones stored.
        """
        first_new_metric = next_metric = self.next_metric_id
        next_series = self.next_series_id
        r0 = self.tiers[0].resolution
        series, metrics, metric_by_id = self.series, self.metrics, self.metric_by_id
        series_seen, metric_due = self.series_seen, self.metric_due
        # _seen_phase, inlined (its slot count once): this loop runs per new series
        series_slots = max(SERIES_SEEN_EVERY // r0, 1)
        metric_slots = max(METRIC_SEEN_EVERY // r0, 1)
        metric_due_at = ts + METRIC_SEEN_EVERY
        new_metrics: list[_MetricInfo] = []
        totals_moved: list[_MetricInfo] = []
        series_rows: list[tuple[Any, ...]] = []
        tag_rows: list[tuple[int, str, str]] = []
        for key in sorted(keys):
            name, type_code, raw = key
            tags = canonical_tags(raw) if raw else raw
            ids = series.get((name, type_code, tags))
            if ids is not None:  # a known series, its tags in another order
                series[key] = ids
                continue
            metric = metrics.get((name, type_code))
            if metric is None:  # its first series: no totals to start (_count_series)
                metric = _MetricInfo(next_metric, name, type_code, 1, ts, ts, None)
                metrics[(name, type_code)] = metric
                metric_by_id.append(metric)  # at next_metric: the ids are the positions
                metric_due.append(metric_due_at - next_metric % metric_slots * r0)
                new_metrics.append(metric)
                next_metric += 1
            elif self._count_series(metric) and metric.id < first_new_metric:
                totals_moved.append(metric)
            series_id = next_series
            next_series += 1
            series_rows.append((series_id, metric.id, name, type_code, tags_json(tags), ts, ts))
            ids = series[key] = (series_id, metric.id)
            if tags:
                tag_rows.extend((series_id, k, v) for k, v in tags)
                series[(name, type_code, tags)] = ids
            series_seen.append(ts - series_id % series_slots * r0)  # at series_id
        self.next_series_id = next_series
        self.next_metric_id = next_metric
        if new_metrics:
            self.latest_first_seen = max(self.latest_first_seen, ts)
        conn = self.conn
        _executemany(
            conn,
            "INSERT INTO metrics (id, name, type, first_seen, last_seen, totals_from) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(m.id, m.name, m.type, m.first_seen, m.last_seen, m.totals_from) for m in new_metrics],
        )
        conn.executemany(
            "UPDATE metrics SET totals_from = ? WHERE id = ?",
            [(m.totals_from, m.id) for m in totals_moved],
        )
        _executemany(
            conn,
            "INSERT INTO series (id, metric_id, name, type, tags, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            series_rows,
        )
        _executemany(
            conn,
            "INSERT OR IGNORE INTO series_tags (series_id, key, value) VALUES (?, ?, ?)",
            tag_rows,
        )

    def _count_series(self, metric: _MetricInfo) -> bool:
        """A metric's second series starts its totals at the next coarsest bucket
        that no tier has written or compacted yet: every tier has them from there.
        True when that set ``totals_from`` (the caller stores it)."""
        metric.series += 1
        if metric.series < 2 or metric.totals_from is not None:
            return False
        done = [t.complete_until for t in self.state if t.complete_until is not None]
        metric.totals_from = _ceil(max(done, default=0), self.tiers[-1].resolution)
        return True

    def _note_seen(self, rows: list[tuple[Any, ...]]) -> None:
        """Move first_seen/last_seen, last_seen coarsely: rewriting every series
        row on every flush would cost as much as writing the rollups.  Runs per
        window written (usually one): the per-series check in C, one
        comparison per metric, and Python work only for the few series and
        metrics whose stored values move."""
        seen = self.series_seen
        due = self.metric_due
        series_rows: list[tuple[int, int]] = []
        windows: list[tuple[int, set[int]]] = []
        moving: set[int] = set()
        for ts, group in groupby(rows, key=_TS):  # sorted by ts
            window = rows if rows[0][1] == rows[-1][1] else list(group)
            sids = list(map(_SERIES_ID, window))
            stale = list(
                compress(sids, map(le, map(seen.__getitem__, sids), repeat(ts - SERIES_SEEN_EVERY)))
            )
            for series_id in stale:
                seen[series_id] = ts
            series_rows.extend(zip(repeat(ts), stale))
            mids = set(map(_METRIC_ID, window))
            windows.append((ts, mids))
            if ts < self.latest_first_seen:  # a late window may move first_seen back
                moving.update(m for m in mids if ts >= due[m] or ts < self._metric(m).first_seen)
            else:
                moving.update(compress(mids, map(le, map(due.__getitem__, mids), repeat(ts))))
        if series_rows:
            _executemany(
                self.conn,
                "UPDATE series SET last_seen = max(last_seen, ?) WHERE id = ?",
                series_rows,
            )
        if not moving:
            return
        metric_span: dict[int, list[int]] = {}
        for ts, mids in windows:
            for metric_id in moving & mids:
                span = metric_span.get(metric_id)
                if span is None:
                    metric_span[metric_id] = [ts, ts]
                else:
                    span[1] = ts
        metric_rows = []
        for metric_id, (first, last) in metric_span.items():
            info = self._metric(metric_id)
            info.first_seen = min(info.first_seen, first)
            if last >= due[metric_id]:
                info.last_seen = last
                due[metric_id] = last + METRIC_SEEN_EVERY
            metric_rows.append((info.first_seen, info.last_seen, metric_id))
        _executemany(
            self.conn, "UPDATE metrics SET first_seen = ?, last_seen = ? WHERE id = ?", metric_rows
        )

    def _metric(self, metric_id: int) -> _MetricInfo:
        info = self.metric_by_id[metric_id]
        assert info is not None, metric_id  # a row names a stored metric
        return info

    def _advance_written(self, end: int) -> None:
        """Tier 0's watermark: the end of the latest window written, never in the future."""
        r0 = self.tiers[0].resolution
        tier0 = self.state[0]
        end = min(end, _floor(int(self.clock()), r0) + r0)
        tier0.complete_until = max(tier0.complete_until or end, end)

    def _late_rows(self, rows: list[tuple[Any, ...]]) -> _Late:
        """Rows written into tier-1 buckets that are already compacted."""
        if len(self.tiers) < 2:
            return {}
        tier1 = self.state[1]
        lo, hi = tier1.complete_from, tier1.complete_until
        if lo is None or hi is None or rows[0][1] >= hi:
            return {}
        r1 = tier1.resolution
        late = {(_floor(row[1], r1), row[2], row[3]) for row in rows if lo <= row[1] < hi}
        return {1: late} if late else {}

    def _write_events(self, events: Sequence[tuple[Event, int]]) -> None:
        if events:
            self.conn.executemany(
                "INSERT INTO events (timestamp, title, text, host, priority, alert_type, "
                "aggregation_key, source_type, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (e.timestamp if e.timestamp is not None else arrival, e.title, e.text,
                     e.host, e.priority, e.alert_type, e.aggregation_key, e.source_type,
                     tags_json(canonical_tags(e.tags)))
                    for e, arrival in events
                ],
            )  # fmt: skip

    def _write_checks(self, checks: Sequence[tuple[ServiceCheck, int]]) -> None:
        if checks:
            self.conn.executemany(
                "INSERT INTO service_checks (name, host, tags, status, timestamp, message) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name, host, tags) DO UPDATE SET "
                "status = excluded.status, timestamp = excluded.timestamp, "
                "message = excluded.message WHERE excluded.timestamp >= service_checks.timestamp",
                [
                    (c.name, c.host, tags_json(canonical_tags(c.tags)), c.status,
                     c.timestamp if c.timestamp is not None else arrival, c.message)
                    for c, arrival in checks
                ],
            )  # fmt: skip

    def _write_state(self, state: Mapping[str, bytes | None]) -> None:
        for key, value in state.items():
            if value is None:
                self.conn.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                self.conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))

    # --------------------------------------------------------- compaction

    def _recompute_late(self, i: int, late: _Late) -> None:
        """Recompute the (bucket, series) pairs of tier i hit by late rows; cascade up."""
        pairs = late.get(i)
        if not pairs:
            return
        r = self.state[i].resolution
        by_bucket: dict[int, set[tuple[int, int]]] = {}
        for bucket, metric_id, series_id in pairs:
            by_bucket.setdefault(bucket, set()).add((metric_id, series_id))
        coarser = self.state[i + 1] if i + 1 < len(self.state) else None
        for bucket, members in sorted(by_bucket.items()):
            metric_ids = _ids({m for m, _ in members})
            where = f"AND r.metric_id IN ({metric_ids})"
            params = {"r": r, "src": self.state[i - 1].resolution, "lo": bucket, "hi": bucket + r}
            sql = _COMPACT.format(
                span=_SPAN, where=f"{where} AND r.series_id IN ({_ids(s for _, s in members)})"
            )
            self.conn.execute(sql, params)
            self.conn.execute(_TOTALS.format(span=_SPAN, where=where), params)
            if coarser is None:
                continue
            parent = _floor(bucket, coarser.resolution)
            if (
                coarser.complete_from is not None
                and coarser.complete_until is not None
                and coarser.complete_from <= parent < coarser.complete_until
            ):
                late.setdefault(i + 1, set()).update((parent, m, s) for m, s in members)
            else:
                self._touched(i + 1, parent)

    def _touched(self, i: int, ts: int) -> None:
        """Finer rows at ts changed: a range of tier i being compacted that
        holds ts starts over (its slices written so far may be stale)."""
        job = self.compacting.get(i)
        if job is not None and job.lo <= ts < job.hi:
            del self.compacting[i]

    def _compact(self, i: int) -> None:
        """Compact the next slice of tier i's buckets that tier i-1 has completed.

        A range whose last slice is written moves the watermark, and the
        next range may start in the same write: at most one by SQL per
        write (as before compaction was sliced), but tier 1's bucket from
        memory always, before the next window replaces it.
        """
        by_sql = False
        while True:
            job = self.compacting.get(i) or self._next_compaction(i, sql=not by_sql)
            if job is None:
                return
            self.compacting[i] = job
            self._compact_slice(i, job)
            by_sql = by_sql or job.source is None
            if not job.finished():
                return
            del self.compacting[i]
            self.state[i].complete_until = job.hi

    def _next_compaction(self, i: int, sql: bool = True) -> _Compaction | None:
        """The range of tier i to compact next, cut into slices; None when
        tier i-1 has completed none of its buckets since the watermark, or
        when only SQL could compact it and ``sql`` is False."""
        tier, finer = self.state[i], self.state[i - 1]
        if finer.complete_until is None:
            return None
        if tier.complete_until is None:
            start = self._first_bucket(i)
            if start is None:
                return None
            tier.complete_from = tier.complete_until = start
        assert tier.complete_until is not None
        r, src = tier.resolution, finer.resolution
        lo, hi = tier.complete_until, _floor(finer.complete_until, r)
        if hi <= lo:
            return None
        pending = self.pending if i == 1 else None
        if pending is not None and pending.bucket <= lo:
            self.pending = None
            source = pending.compacted(r) if pending.bucket == lo else None
            if source is not None:
                writes = self._writes_before_next(i, lo + r)
                per_slice = max(COMPACT_SLICE_SERIES, -(-len(source.mids) // writes))
                return _Compaction(lo, lo + r, source.cuts(per_slice), source)
        if not sql:
            return None
        (first,) = self.conn.execute(
            "SELECT min(ts) FROM rollups WHERE resolution = ? AND ts >= ? AND ts < ?", (src, lo, hi)
        ).fetchone()
        if first is None:  # an empty stretch (downtime): nothing to compact
            tier.complete_until = hi
            return None
        # bound one range's work (a tier added to an old file catches up over several)
        lo = _floor(first, r)
        hi = min(hi, max(lo + r, _floor(lo + MAX_COMPACT_WINDOWS * src, r)))
        if i == 1 and self.pending is not None and self.pending.bucket < hi:
            self.pending = None  # compacted by SQL
        counts = [(m.id, m.series) for m in self.metric_by_id if m is not None]
        series = sum(n for _, n in counts)
        writes = self._writes_before_next(i, hi)
        per_slice = max(COMPACT_SLICE_ROWS * src // (hi - lo), -(-series // writes), 1)
        return _Compaction(lo, hi, _slice_cuts(counts, per_slice), None)

    def _writes_before_next(self, i: int, hi: int) -> int:
        """The writes left before tier i-1 completes the bucket of tier i that
        follows ``hi``: a range compacted in that many slices is done in time
        for it, even one that started late (after a restart, or behind a range
        by SQL), so compaction catches up instead of falling behind."""
        due = hi + self.state[i].resolution - (self.state[i - 1].complete_until or hi)
        return max(1, due // self.state[0].resolution)

    def _compact_slice(self, i: int, job: _Compaction) -> None:
        """Write the next slice of a range, and its metric totals."""
        r, src = self.state[i].resolution, self.state[i - 1].resolution
        k = job.written
        params = {"r": r, "src": src, "lo": job.lo, "hi": job.hi}
        if len(job.cuts) == 2:  # the whole range at once
            span = _SPAN
        else:
            params.update(mlo=job.cuts[k], mhi=job.cuts[k + 1])
            span = _SLICE_SPAN.format(ts=_ids(range(job.lo, job.hi, src)))
        rows = job.source.rows(job.cuts[k], job.cuts[k + 1]) if job.source else None
        if rows is None:
            job.source = None  # SQL from here on
            self.conn.execute(_COMPACT.format(span=span, where=""), params)
        else:
            _executemany(self.conn, _INSERT_COMPACTED, rows)
        if span is not _SPAN:
            span = _SLICE_SPAN.format(ts=_ids(range(job.lo, job.hi, r)))
        self.conn.execute(_TOTALS.format(span=span, where=""), params)
        job.written += 1

    def _first_bucket(self, i: int) -> int | None:
        """Where a new tier starts: the first of its buckets the finer tier holds whole."""
        finer, r = self.state[i - 1], self.state[i].resolution
        (first,) = self.conn.execute(
            "SELECT min(ts) FROM rollups WHERE resolution = ?", (finer.resolution,)
        ).fetchone()
        if first is None:
            return None
        whole_from = [v for v in (finer.pruned_before, finer.complete_from) if v is not None]
        start = _floor(first, r)
        if whole_from and start < max(whole_from):
            start = _ceil(max(whole_from), r)
        return start

    def _save_tiers(self) -> None:
        self.conn.executemany(
            "UPDATE tiers SET complete_from = ?, complete_until = ?, pruned_before = ? "
            "WHERE resolution = ?",
            [
                (t.complete_from, t.complete_until, t.pruned_before, t.resolution)
                for t in self.state
            ],
        )

    # ------------------------------------------------------------ retention

    def _expire(self, now: int) -> None:
        """Delete the rows that each tier's retention has passed, after every
        write: a share per write, where once a minute at 100k series and 5 s
        windows took 1.2M rows (0.37 s) out of one flush."""
        for i, tier in enumerate(self.state):
            cutoff = now - tier.retention
            if i + 1 < len(self.state):
                coarser = self.state[i + 1]
                if coarser.complete_until is not None:
                    # never delete what the next tier has not compacted yet
                    cutoff = min(cutoff, coarser.complete_until)
            for table in ("rollups", "totals"):
                self.conn.execute(
                    f"DELETE FROM {table} WHERE resolution = ? AND ts < ?",
                    (tier.resolution, cutoff),
                )
            tier.pruned_before = max(tier.pruned_before or cutoff, cutoff)

    def _prune(self, now: int) -> None:
        """Delete the dropped tiers', events' and checks' rows past the longest
        retention; forget dead series."""
        horizon = now - max(t.retention for t in self.tiers)
        # resolutions dropped from the configuration: kept up to the longest retention
        configured = _ids(self.storage.resolutions)
        for (resolution,) in self.conn.execute(
            f"SELECT resolution FROM tiers WHERE resolution NOT IN ({configured})"
        ).fetchall():
            for table in ("rollups", "totals"):
                self.conn.execute(
                    f"DELETE FROM {table} WHERE resolution = ? AND ts < ?", (resolution, horizon)
                )
        self.conn.execute("DELETE FROM events WHERE timestamp < ?", (horizon,))
        self.conn.execute("DELETE FROM service_checks WHERE timestamp < ?", (horizon,))
        self._forget_dead_series(horizon - max(self.storage.resolutions) - SERIES_SEEN_EVERY)

    def _forget_dead_series(self, before: int) -> None:
        """A series whose every row is past retention goes, with its tags (and metric)."""
        conn = self.conn
        dead = [
            row[0] for row in conn.execute("SELECT id FROM series WHERE last_seen < ?", (before,))
        ]
        if not dead:
            return
        ids = _ids(dead)
        conn.execute(f"DELETE FROM rollups WHERE series_id IN ({ids})")
        conn.execute(f"DELETE FROM series_tags WHERE series_id IN ({ids})")
        conn.execute(f"DELETE FROM series WHERE id IN ({ids})")
        gone = "SELECT id FROM metrics WHERE id NOT IN (SELECT metric_id FROM series)"
        conn.execute(f"DELETE FROM totals WHERE metric_id IN ({gone})")
        conn.execute(f"DELETE FROM metrics WHERE id IN ({gone})")
        tiers = self.state
        self._load()
        self.state = tiers


# -------------------------------------------------------------------- queries


@dataclass(frozen=True, slots=True)
class _Stat:
    name: str
    kind: str  # sum count rate min max mean last quantile unique
    q: float = 0.0


_STATS: dict[str, tuple[str, ...]] = {
    COUNTER: ("sum", "rate", "count"),
    GAUGE: ("last", "min", "max", "mean"),
    SET: ("unique",),
}
_DISTRIBUTION_STATS = ("mean", "count", "sum", "min", "max", "rate")
_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")


def _parse_stat(type_code: str, stat: str | None) -> _Stat:
    """The stat asked for, or the type's default; QueryError when the type has no such stat."""
    allowed = _STATS.get(type_code, _DISTRIBUTION_STATS)
    if not stat:
        return _Stat(allowed[0], allowed[0])
    if stat in allowed:
        return _Stat(stat, stat)
    match = _PERCENTILE.match(stat)
    if type_code in DISTRIBUTION_TYPES and match and float(match.group(1)) <= 100.0:
        return _Stat(stat, "quantile", float(match.group(1)) / 100.0)
    names = ", ".join(allowed) + (
        ", p50, p99, p99.9, ..." if type_code in DISTRIBUTION_TYPES else ""
    )
    raise QueryError("stat", f"{stat!r} is not a stat of a {TYPE_NAMES[type_code]} ({names})")


@dataclass(slots=True)
class _Acc:
    """A bucket's (or a range's) count, sum, min and max."""

    count: float
    sum: float
    min: float | None
    max: float | None


#: a group's accumulators by bucket number; then by group value
_Buckets = dict[int, Any]


class _Query:
    """One series query inside one read snapshot."""

    def __init__(
        self,
        storage: Storage,
        conn: sqlite3.Connection,
        metric: str,
        type_code: str | None,
        now: int,
    ) -> None:
        self.storage = storage
        self.conn = conn
        self.now = now
        self.metric = metric
        rows = conn.execute(
            "SELECT id, type, totals_from, first_seen, last_seen FROM metrics WHERE name = ? "
            "ORDER BY type",
            (metric,),
        ).fetchall()
        if type_code is not None:
            rows = [row for row in rows if row[1] == type_code]
            if not rows:
                kind = TYPE_NAMES.get(type_code, type_code)
                raise QueryError("metric", f"{metric!r} not found as a {kind}")
        if not rows:
            raise QueryError("metric", f"{metric!r} not found")
        if len(rows) > 1:
            types = ", ".join(TYPE_NAMES[row[1]] for row in rows)
            raise QueryError("type", f"{metric!r} exists as several types ({types}): pick one")
        self.metric_id: int = rows[0][0]
        self.type_code: str = rows[0][1]
        self.totals_from: int | None = rows[0][2]
        # rows exist from first_seen's bucket to before last_seen + METRIC_SEEN_EVERY
        self.first_seen: int = rows[0][3]
        self.last_seen: int = rows[0][4]
        self.complete = _watermarks(storage, conn)

    def run(
        self,
        stat_name: str | None,
        start: int,
        end: int,
        step: int | None,
        tags: list[tuple[str, str]],
        group_by: str | None,
        limit: int | None,
        with_points: bool = True,
    ) -> dict[str, Any]:
        stat = _parse_stat(self.type_code, stat_name)
        step = self._step(start, end, step)
        first, last = _floor(start, step), _ceil(end, step)
        if (last - first) // step > MAX_POINTS:
            raise QueryError(
                "step",
                f"{(last - first) // step} points, more than {MAX_POINTS}: use a larger step",
            )
        members = self._members(tags, group_by)
        # totals merge every series: fine without filters, and for every stat
        # but a gauge's last (the sum of each series' own latest value)
        use_totals = members is None and stat.kind != "last"
        duration = min(last, self.now) - first
        if duration <= 0:
            duration = last - first
        resolutions = self.storage.resolutions

        # 1. every group's value over the range, from the cheapest plan
        plan = plan_segments(first, last, resolutions, self.complete)
        whole = self._aggregate(plan, members, stat, first, last - first, use_totals)
        values = {g: self._value(stat, buckets[0], duration) for g, buckets in whole.items()}
        groups = _ranked(values, limit) if group_by is not None else [""]

        # 2. the points of the groups shown, from the tiers whose resolution divides the step
        usable = [r for r in resolutions if step % r == 0]
        plan = plan_segments(first, last, usable, self.complete[: len(usable)])
        if members is not None and group_by is not None:
            shown = set(groups)
            members = [(sid, g) for sid, g in members if g in shown]
        by_bucket = {}
        if with_points:
            by_bucket = self._aggregate(plan, members, stat, first, step, use_totals)

        series = []
        for g in groups:
            points = []
            for k, acc in sorted(by_bucket.get(g, {}).items()):
                value = self._value(stat, acc, step)
                if value is not None:
                    points.append([first + k * step, value])
            series.append(
                {
                    "tags": dict(tags) if group_by is None else {**dict(tags), group_by: g},
                    "value": values[g] if g in values else self._empty(stat),
                    "points": points,
                }
            )
        return {
            "metric": self.metric,
            "type": TYPE_NAMES[self.type_code],
            "stat": stat.name,
            "from": first,
            "to": last,
            "step": step,
            "series": series,
        }

    def _step(self, start: int, end: int, step: int | None) -> int:
        """The step asked (rounded up to the flush resolution), or an automatic one."""
        resolutions = self.storage.resolutions
        if step is not None:
            if step <= 0:
                raise QueryError("step", "must be a positive number of seconds")
            return _ceil(step, resolutions[0])
        span = end - start
        for r in resolutions:
            if span <= r * MAX_AUTO_POINTS:
                return r
        return _ceil(-(-span // MAX_AUTO_POINTS), resolutions[-1])

    def _members(
        self, tags: list[tuple[str, str]], group_by: str | None
    ) -> list[tuple[int, str]] | None:
        """(series id, group value) of the series asked for; None means every series."""
        if not tags and group_by is None:
            return None
        sql = "SELECT s.id, {g} FROM series s {join} WHERE s.metric_id = ?"
        params: list[Any] = []
        if group_by is None:
            sql = sql.format(g="''", join="")
        else:
            sql = sql.format(
                g="coalesce(gt.value, '')",
                join="LEFT JOIN series_tags gt ON gt.series_id = s.id AND gt.key = ?",
            )
            params.append(group_by)
        params.append(self.metric_id)
        for key, value in tags:
            sql += " AND s.id IN (SELECT series_id FROM series_tags WHERE key = ? AND value = ?)"
            params += [key, value]
        return self.conn.execute(sql, params).fetchall()

    # ---------------------------------------------------------- aggregation

    def _aggregate(
        self,
        plan: list[tuple[int, int, int]],
        members: list[tuple[int, str]] | None,
        stat: _Stat,
        first: int,
        width: int,
        use_totals: bool,
    ) -> dict[str, _Buckets]:
        """{group: {bucket number: accumulator}} for the buckets ``first + k * width``."""
        if not plan or members == []:
            return {}
        segments = self._clip(self._sources(plan, use_totals, stat))
        if not segments:
            return {}
        with_sql, with_params, rows, rows_params = self._rows(segments, members)
        params = [*with_params, first, width, *rows_params]
        result: dict[str, _Buckets] = {}
        if stat.kind in ("quantile", "unique"):
            load: Callable[[bytes], Any]
            load = Sketch.from_bytes if stat.kind == "quantile" else SetState.from_bytes
            sql = f"{with_sql} SELECT g, (ts - ?) / ? AS k, state FROM ({rows}) WHERE state NOTNULL"
            for g, k, blob in self.conn.execute(sql, params):
                buckets = result.setdefault(g, {})
                known = buckets.get(k)
                if known is None:
                    buckets[k] = load(blob)
                else:
                    known.merge(load(blob))
            return result
        if stat.kind == "last":
            # each series' latest value in the bucket (bare column of max()), summed
            sql = (
                f"{with_sql} SELECT g, k, sum(last) FROM (SELECT g, sid, (ts - ?) / ? AS k, "
                f"max(ts), last FROM ({rows}) GROUP BY g, sid, k) GROUP BY g, k"
            )
            for g, k, total in self.conn.execute(sql, params):
                result.setdefault(g, {})[k] = total
            return result
        sql = (
            f"{with_sql} SELECT g, (ts - ?) / ? AS k, {self._columns(stat)} "
            f"FROM ({rows}) GROUP BY g, k"
        )
        for g, k, count, total, low, high in self.conn.execute(sql, params):
            result.setdefault(g, {})[k] = _Acc(count or 0.0, total or 0.0, low, high)
        return result

    def _columns(self, stat: _Stat) -> str:
        """count, sum, min, max: the aggregates ``stat`` reads, constants for the others.

        Each aggregate costs per row: a day of a 500-series group_by is ~45k
        rows, and summing one column instead of four halves its time.
        """
        kind = stat.kind
        counter = self.type_code == COUNTER
        counts = kind in ("count", "mean") or (kind == "rate" and not counter)
        sums = kind in ("sum", "mean") or (kind == "rate" and counter)
        return ", ".join(
            (
                "sum(count)" if counts else "0",
                "sum(sum)" if sums else "0",
                "min(min)" if kind == "min" else "NULL",
                "max(max)" if kind == "max" else "NULL",
            )
        )

    def _sources(
        self, plan: list[tuple[int, int, int]], use_totals: bool, stat: _Stat
    ) -> list[tuple[int, int, int, int]]:
        """(resolution, start, end, source): source 1 = the totals table, 0 = the series rows.

        Totals exist from the metric's ``totals_from`` on; at the flush
        resolution they have no sketches or sets.
        """
        r0 = self.storage.resolutions[0]
        since = self.totals_from
        if not use_totals or since is None:
            return [(r, a, b, 0) for r, a, b in plan]
        stateless = stat.kind not in ("quantile", "unique")
        segments = []
        for r, a, b in plan:
            if (r == r0 and not stateless) or b <= since:
                segments.append((r, a, b, 0))
            elif a >= since:
                segments.append((r, a, b, 1))
            else:
                segments += [(r, a, since, 0), (r, since, b, 1)]
        return segments

    def _clip(self, segments: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        """Drop the buckets before the metric's first row or after its last: each
        bucket is a seek (or one per series), with or without data."""
        clipped = []
        for r, a, b, src in segments:
            a, b = max(a, _floor(self.first_seen, r)), min(b, self.last_seen + METRIC_SEEN_EVERY)
            if a < b:
                clipped.append((r, a, b, src))
        return clipped

    def _rows(
        self, segments: list[tuple[int, int, int, int]], members: list[tuple[int, str]] | None
    ) -> tuple[str, list[Any], str, list[Any]]:
        """The WITH clause and the row query (g, sid, ts, count, sum, min, max, last,
        state) of every bucket of every segment, each with its parameters."""
        with_sql, with_params = _buckets_cte(segments)
        columns = (
            "r.ts AS ts, r.count AS count, r.sum AS sum, r.min AS min, r.max AS max, "
            "r.last AS last, r.state AS state"
        )
        seek = "r.resolution = t.res AND r.ts = t.ts AND r.metric_id = ?"
        if members is None:
            rows = (
                f"SELECT '' AS g, r.series_id AS sid, {columns} FROM t CROSS JOIN rollups r "
                f"WHERE t.src = 0 AND {seek}"
            )
        else:
            with_sql += (
                # CAST gives sid an integer affinity: without it SQLite does not
                # index the CTE for the join and scans it once per row
                ", grp(sid, g) AS MATERIALIZED (SELECT CAST(json_extract(value, '$[0]') "
                "AS INTEGER), json_extract(value, '$[1]') FROM json_each(?))"
            )
            with_params.append(json.dumps(members))
            # A few series of a big metric: one seek per (bucket, series);
            # most of them: scan the metric's rows of each bucket instead.
            (size,) = self.conn.execute(
                "SELECT count(*) FROM series WHERE metric_id = ?", (self.metric_id,)
            ).fetchone()
            few = len(members) * 10 < size
            order = "grp CROSS JOIN rollups r" if few else "rollups r CROSS JOIN grp"
            rows = (
                f"SELECT grp.g AS g, r.series_id AS sid, {columns} FROM t CROSS JOIN {order} "
                f"WHERE t.src = 0 AND {seek} AND r.series_id = grp.sid"
            )
        rows_params: list[Any] = [self.metric_id]
        if any(src for *_, src in segments):
            rows += (
                " UNION ALL SELECT '' AS g, 0 AS sid, x.ts, x.count, x.sum, x.min, x.max, "
                "x.last, x.state FROM t CROSS JOIN totals x WHERE t.src = 1 "
                "AND x.resolution = t.res AND x.ts = t.ts AND x.metric_id = ?"
            )
            rows_params.append(self.metric_id)
        return with_sql, with_params, rows, rows_params

    def _value(self, stat: _Stat, acc: Any, duration: int) -> float | None:
        """The stat of one accumulator (a bucket or the whole range)."""
        kind = stat.kind
        if kind == "last":
            return None if acc is None else float(acc)
        if kind == "quantile":
            return float(acc.quantile(stat.q)) if acc.count > 0 else None
        if kind == "unique":
            return float(acc.cardinality())
        if kind in ("sum", "count"):
            return float(acc.sum if kind == "sum" else acc.count)
        if kind == "rate":
            return float(acc.sum if self.type_code == COUNTER else acc.count) / duration
        if kind in ("min", "max"):
            value = acc.min if kind == "min" else acc.max
            return None if value is None else float(value)
        return float(acc.sum) / acc.count if acc.count else None  # mean

    @staticmethod
    def _empty(stat: _Stat) -> float | None:
        """The value of a range without data: 0 for the additive stats, else null."""
        return 0.0 if stat.kind in ("sum", "count", "rate") else None


def _ranked(values: dict[str, float | None], limit: int | None) -> list[str]:
    """Groups by value descending (no value last), ties by tag value ascending."""
    order = sorted(values, key=lambda g: (values[g] is None, -(values[g] or 0.0), g))
    return order[:limit] if limit else order
