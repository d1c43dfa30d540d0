"""Flushes that SQLite cannot take right now, kept on disk until it can.

When a flush cannot be written (disk full, the database locked by another
process, a read-only file, an I/O error), the writer thread parks it in
the spool instead of losing it: one msgpack file per flush in the folder
``<database>-spool/`` next to the database (``data/metrics.db-spool/`` by
default). At every later flush the writer first replays the spool, oldest
first, one transaction per parked flush; while anything is still parked,
new flushes queue behind it, so flushes reach SQLite in the order they
were taken. Meanwhile the daemon keeps receiving, and reports the backlog
in its self metrics and ``/healthz``.

Exactly once: the transaction that stores a parked flush also records its
sequence number (the ``spool_applied`` state row); a file whose number is
not above it was stored already (the daemon died between the commit and
the unlink) and is only removed.

A flush that fails for any other reason (a bug, not the database being
unavailable) is set aside in ``<database>-spool/rejected/`` with the error
logged, so it neither blocks the queue nor disappears.

Spool file (msgpack array, version 1)::

    [1, seq, [window starts], rollups, events, checks, {state key: bytes}]
    rollup = [name, type, [[k, v], ...], start, count, sum, min, max, last,
              state bytes or nil, [[percentile, value], ...]]
    event  = [title, text, timestamp or nil, host, priority, alert_type,
              aggregation_key, source_type, [[k, v], ...], arrival]
    check  = [name, status, timestamp or nil, host, message, [[k, v], ...], arrival]
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .model import Event, Rollup, ServiceCheck, Tags
from .storage import Storage

log = logging.getLogger(__name__)

__all__ = ["Batch", "DurableWriter", "Spool", "decode_batch", "encode_batch", "spool_path"]

_VERSION = 1
SUFFIX = ".msgpack"
#: the state row that records the last parked flush stored (exactly once)
APPLIED_KEY = "spool_applied"
#: parked flushes kept in memory when even the spool folder cannot be written
MAX_HELD = 360

# SQLite's primary result codes that mean "the database cannot be written
# now", as opposed to "this flush is wrong": retry later, keep the flush.
_UNAVAILABLE = {
    5,  # SQLITE_BUSY: locked by another connection
    6,  # SQLITE_LOCKED
    8,  # SQLITE_READONLY
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    3,  # SQLITE_PERM
    15,  # SQLITE_PROTOCOL
}


#: errors after which a fresh connection may succeed where the old one cannot
#: (a file reopened writable); a lock or a full disk is retried on the same one
_RECONNECT = {8, 10, 14}  # SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN


def _needs_reconnect(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and (code & 0xFF) in _RECONNECT


def unavailable(exc: BaseException) -> bool:
    """Does this write error mean "SQLite cannot be written now" (so: spool and retry)?"""
    if isinstance(exc, OSError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is None or (code & 0xFF) in _UNAVAILABLE
    return False


def spool_path(database: str | Path) -> Path:
    """The spool folder of a database: ``metrics.db`` -> ``metrics.db-spool``."""
    database = Path(database)
    return database.with_name(database.name + "-spool")


@dataclass(slots=True)
class Batch:
    """One flush, as the writer hands it to SQLite."""

    windows: list[int]
    rollups: list[Rollup]
    events: list[tuple[Event, int]] = field(default_factory=list)
    checks: list[tuple[ServiceCheck, int]] = field(default_factory=list)
    state: dict[str, bytes] = field(default_factory=dict)
    seq: int = 0  # set when parked


def _tags(pairs: Any) -> Tags:
    return tuple((str(k), str(v)) for k, v in pairs)


def encode_batch(batch: Batch) -> bytes:
    rollups = [
        [r.name, r.type, [list(t) for t in r.tags], r.start, r.count, r.sum, r.min, r.max,
         r.last, r.state, [list(q) for q in r.quantiles]]
        for r in batch.rollups
    ]  # fmt: skip
    events = [
        [e.title, e.text, e.timestamp, e.host, e.priority, e.alert_type, e.aggregation_key,
         e.source_type, [list(t) for t in e.tags], arrival]
        for e, arrival in batch.events
    ]  # fmt: skip
    checks = [
        [c.name, c.status, c.timestamp, c.host, c.message, [list(t) for t in c.tags], arrival]
        for c, arrival in batch.checks
    ]
    packed: bytes = msgpack.packb(
        [_VERSION, batch.seq, batch.windows, rollups, events, checks, batch.state],
        use_bin_type=True,
    )
    return packed


def decode_batch(data: bytes) -> Batch:
    """Inverse of :func:`encode_batch`; ValueError on anything else."""
    try:
        version, seq, windows, rollups, events, checks, state = msgpack.unpackb(data, raw=False)
        if version != _VERSION:
            raise ValueError(f"unknown spool version {version!r}")
        return Batch(
            windows=[int(w) for w in windows],
            rollups=[_rollup(row) for row in rollups],
            events=[
                (Event(title, text, ts, host, prio, alert, key, source, _tags(tags)), int(arr))
                for title, text, ts, host, prio, alert, key, source, tags, arr in events
            ],
            checks=[
                (ServiceCheck(name, int(status), ts, host, message, _tags(tags)), int(arr))
                for name, status, ts, host, message, tags, arr in checks
            ],
            state={str(k): bytes(v) for k, v in state.items()},
            seq=int(seq),
        )
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a spooled flush: {exc}") from exc


def _rollup(row: Any) -> Rollup:
    name, kind, tags, start, count, total, low, high, last, blob, quantiles = row
    return Rollup(
        name, kind, _tags(tags), int(start), count, total, low, high, last, blob,
        tuple((float(p), float(v)) for p, v in quantiles),
    )  # fmt: skip


class Spool:
    """One msgpack file per parked flush in ``directory``, named by sequence number."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.rejected_dir = self.directory / "rejected"
        self._last_seq = 0
        self.files = 0
        self.bytes = 0
        self._scan()

    def _scan(self) -> None:
        paths = self.paths()
        self.files = len(paths)
        self.bytes = 0
        for path in paths:
            with contextlib.suppress(OSError):
                self.bytes += path.stat().st_size
        if paths:
            self._last_seq = max(self._last_seq, int(paths[-1].stem))

    def paths(self) -> list[Path]:
        """Parked flushes, oldest first."""
        try:
            names = os.listdir(self.directory)
        except OSError:  # not made yet, or not a folder: nothing parked there
            return []
        return sorted(
            self.directory / n for n in names if n.endswith(SUFFIX) and n[: -len(SUFFIX)].isdigit()
        )

    def next_seq(self, at_least: int = 0) -> int:
        """Sequence numbers grow across restarts: nanoseconds, or one more than the last."""
        self._last_seq = max(time.time_ns(), self._last_seq + 1, at_least)
        return self._last_seq

    def append(self, batch: Batch) -> Path:
        """Write the batch durably (temp file, fsync, rename, fsync the folder)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = encode_batch(batch)
        path = self.directory / f"{batch.seq:020d}{SUFFIX}"
        temporary = path.with_suffix(".tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        _fsync_directory(self.directory)
        self.files += 1
        self.bytes += len(data)
        return path

    def read(self, path: Path) -> Batch:
        return decode_batch(path.read_bytes())

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.files -= 1
        self.bytes -= size

    def reject(self, path: Path) -> Path:
        """Move a parked flush that cannot be stored aside, for a person to look at."""
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size
        target = self.rejected_dir / path.name
        os.replace(path, target)
        self.files -= 1
        self.bytes -= size
        return target

    def reject_batch(self, batch: Batch) -> Path:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        target = self.rejected_dir / f"{batch.seq:020d}{SUFFIX}"
        target.write_bytes(encode_batch(batch))
        return target


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Store:
    """What the writer needs of storage: one flush in one transaction, and a reconnect."""

    def __init__(
        self,
        write: Callable[
            [
                Sequence[Rollup],
                Sequence[tuple[Event, int]],
                Sequence[tuple[ServiceCheck, int]],
                Mapping[str, bytes | None],
            ],
            None,
        ],
        reconnect: Callable[[], None] = lambda: None,
    ) -> None:
        self.write = write
        self.reconnect = reconnect


class DurableWriter:
    """The writer thread's front to SQLite: store each flush, or park it in order.

    Every method runs in the one writer thread, except :meth:`status`, which
    only reads counters (the HTTP thread calls it for /healthz).
    """

    def __init__(
        self,
        store: Store,
        spool: Spool,
        *,
        applied: int = 0,
        replay_seconds: float = 5.0,
        on_stored: Callable[[Batch], None] = lambda batch: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.spool = spool
        self.applied = applied
        self.replay_seconds = replay_seconds
        self.on_stored = on_stored
        self.clock = clock
        #: parked in memory because the spool folder itself could not be written
        self.held: list[Batch] = []
        self.error: str | None = None  # the last write error, while SQLite fails
        self.failing_since: float | None = None
        self.parked = 0  # flushes parked since start
        self.replayed = 0  # parked flushes stored since start
        self.rejected = 0  # flushes set aside as unstorable
        self.lost = 0  # flushes dropped: spool unwritable and MAX_HELD in memory

    # ------------------------------------------------------------ writer thread

    @property
    def backlog(self) -> int:
        return self.spool.files + len(self.held)

    def write(self, batch: Batch) -> bool:
        """Store the batch, after whatever is parked; True when it reached SQLite now."""
        self.replay()
        if self.backlog:
            self._park(batch)
            return False
        try:
            self._store(batch)
        except Exception as exc:
            if not unavailable(exc):
                batch.seq = self.spool.next_seq(self.applied + 1)
                self._reject_batch(batch, exc)
                raise
            self._failed(exc)
            self._park(batch)
            return False
        return True

    def replay(self, seconds: float | None = None) -> int:
        """Store parked flushes, oldest first, for about ``seconds``; how many were stored.

        At least two go per call when SQLite takes them, so a backlog shrinks
        by at least one per flush even when writes are slow.
        """
        budget = self.replay_seconds if seconds is None else seconds
        started = time.monotonic()
        stored = 0
        self._unhold()
        for path in self.spool.paths():
            if stored >= 2 and time.monotonic() - started > budget:
                return stored
            try:
                batch = self.spool.read(path)
            except FileNotFoundError:
                continue
            except OSError as exc:  # the folder itself is unusable now: try again later
                self._failed(exc)
                return stored
            except ValueError as exc:
                log.error("spool: %s cannot be read (%s); moved to rejected/", path, exc)
                self._reject_path(path)
                continue
            if batch.seq <= self.applied:
                self.spool.remove(path)  # stored before the daemon died, not yet removed
                continue
            try:
                self._store(batch)
            except Exception as exc:
                if unavailable(exc):
                    self._failed(exc)
                    return stored
                log.exception("spool: %s cannot be stored; moved to rejected/", path)
                self._reject_path(path)
                continue
            self.spool.remove(path)
            stored += 1
            self.replayed += 1
        if self.held and not self.spool.files:
            while self.held:
                batch = self.held[0]
                try:
                    self._store(batch)
                except Exception as exc:
                    if unavailable(exc):
                        self._failed(exc)
                        return stored
                    self._reject_batch(batch, exc)
                self.held.pop(0)
                stored += 1
                self.replayed += 1
        if stored:
            log.info("spool: stored %d parked flush(es); %d left", stored, self.backlog)
        return stored

    def _store(self, batch: Batch) -> None:
        state: dict[str, bytes | None] = dict(batch.state)
        if batch.seq:
            state[APPLIED_KEY] = msgpack.packb(batch.seq)
        self.store.write(batch.rollups, batch.events, batch.checks, state)
        if batch.seq:
            self.applied = batch.seq
        if self.error is not None:
            log.warning("storage: writing works again (after: %s)", self.error)
            self.error = None
            self.failing_since = None
        self.on_stored(batch)

    def _failed(self, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        if self.error != message:
            log.error(
                "storage: cannot write the database (%s); parking flushes in %s",
                message,
                self.spool.directory,
            )
        self.error = message
        if self.failing_since is None:
            self.failing_since = self.clock()
        # After a read-only or I/O error the next attempt opens a fresh
        # connection, which sees a file made writable again. (Not after a lock
        # or a full disk: reopening reloads the writer's caches, a cost for nothing.)
        if _needs_reconnect(exc):
            with contextlib.suppress(Exception):
                self.store.reconnect()

    def _park(self, batch: Batch) -> None:
        batch.seq = self.spool.next_seq(self.applied + 1)
        self.parked += 1
        self._unhold()
        if not self.held:
            try:
                self.spool.append(batch)
                return
            except OSError as exc:
                log.error("spool: cannot write %s (%s); holding flushes in memory",
                          self.spool.directory, exc)  # fmt: skip
        if len(self.held) >= MAX_HELD:
            self.held.pop(0)
            self.lost += 1
            log.error("spool: more than %d flushes held in memory; the oldest is lost", MAX_HELD)
        self.held.append(batch)

    def _unhold(self) -> None:
        """Move flushes held in memory to the spool folder, in order, once it can be written."""
        while self.held:
            try:
                self.spool.append(self.held[0])
            except OSError:
                return
            self.held.pop(0)

    def _reject_path(self, path: Path) -> None:
        self.rejected += 1
        with contextlib.suppress(OSError):
            self.spool.reject(path)

    def _reject_batch(self, batch: Batch, exc: BaseException) -> None:
        self.rejected += 1
        try:
            target = self.spool.reject_batch(batch)
        except OSError:
            log.error("flush failed (%s) and could not be set aside; it is lost", exc)
            self.lost += 1
            return
        log.error("flush failed (%s); set aside in %s", exc, target)

    def latest_state(self) -> dict[str, bytes]:
        """The state of the newest parked flush (newer than the database's), or {}."""
        if self.held:
            return dict(self.held[-1].state)
        for path in reversed(self.spool.paths()):
            try:
                return self.spool.read(path).state
            except (OSError, ValueError):
                continue
        return {}

    # ------------------------------------------------------------ any thread

    def status(self) -> dict[str, Any]:
        """The backlog for /healthz and the self metrics."""
        return {
            "storage_writable": self.error is None,
            "storage_error": self.error,
            "storage_failing_since": self.failing_since,
            "spool_backlog": self.backlog,
            "spool_bytes": self.spool.bytes,
            "spool_held_in_memory": len(self.held),
            "spool_parked": self.parked,
            "spool_replayed": self.replayed,
            "spool_rejected": self.rejected,
            "spool_lost": self.lost,
        }


# ---------------------------------------------------------------- the SQLite side


class TolerantStorage(Storage):
    """Storage that starts even when its file cannot be written yet.

    Opening a database that is read-only, locked or on a full disk fails in
    the schema setup (it records the tiers). Rather than refuse to start,
    and lose what clients send meanwhile, the daemon starts, parks its
    flushes, and sets the schema up before the first write that works.
    """

    setup_error: BaseException | None = None

    def _setup(self) -> None:
        try:
            super()._setup()
        except sqlite3.OperationalError as exc:
            if not unavailable(exc):
                raise
            if self.setup_error is None:
                log.warning("storage: %s cannot be set up yet (%s); will retry", self.path, exc)
            self.setup_error = exc
        else:
            self.setup_error = None


def sqlite_store(storage: Storage, busy_timeout: float) -> Store:
    """The writer's view of ``storage``, with a write lock wait of ``busy_timeout`` seconds.

    A short wait matters: while another process holds the write lock, each
    attempt blocks the writer thread that long (the storage module's own
    default suits readers, not a writer that must keep up with flushes).
    """

    def write(
        rollups: Sequence[Rollup],
        events: Sequence[tuple[Event, int]],
        checks: Sequence[tuple[ServiceCheck, int]],
        state: Mapping[str, bytes | None],
    ) -> None:
        if isinstance(storage, TolerantStorage) and storage.setup_error is not None:
            storage._setup()
            if storage.setup_error is not None:
                raise storage.setup_error
        storage.open_writer(busy_timeout).write(rollups, events, checks, state)

    return Store(write, storage.reset_writer)
