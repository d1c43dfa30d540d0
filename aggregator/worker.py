"""Ingest workers: processes that read the datagram sockets (``listen.workers``).

One Python process parses and aggregates on one core, and shares it with
the flush (snapshot, SQLite, /metrics), whose GIL time stalls the reading.
With ``workers = N``, N processes read the UDP (and unix datagram) socket
the daemon bound, each with its own parser and window; at each flush the
daemon asks every worker to swap its window and merges the windows before
the snapshot (aggregate.merge_worker_windows). The daemon keeps TCP, unix
streams, the HTTP API and the writes.

The workers share the daemon's socket rather than binding their own with
SO_REUSEPORT: the kernel spreads a SO_REUSEPORT group by the sender's
address, so one busy client would land on a single worker; from one shared
socket, whichever worker is free takes the next datagrams.

At a swap a worker hands its closed window over in slices of at most
``SLICE_SERIES`` series, each pickled on its own, and reads its sockets
between two slices: pickling a 100k-series window in one piece held the
socket unread for about 0.1 s, longer than a 32 MiB receive buffer lasts
at 400k one-line datagrams a second (the kernel charges each datagram
about 1 KiB of buffer). So every worker swaps at the same time, and the
daemon merges the slices as it would whole windows.

Daemon and worker talk over a socketpair in frames: an 8-byte length, then
a pickle. Both ends are this program, and the pair is reachable by no one
else. The daemon sends ``("init", settings)``, then ``("open", start)`` and
``("swap", next_start, limits, last)``; the worker answers ``("ready",
pid)`` to the first and a :class:`Report` to every swap, followed by its
pickled slices, each a frame of its own as it is (not pickled again), and
sends, every second, a :class:`Learned` with the series it met for the
first time. A worker ignores SIGINT and SIGTERM (systemd signals the whole
control group): it stops reading on the last swap, and exits when the
daemon's end closes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .aggregate import ClosedWindow, WorkerAggregator
from .intake import LEARNED_SECONDS, Intake, quiet_gc
from .limits import Drops, Limits
from .listeners import DatagramReader, ListenerStats
from .model import Event, SeriesKey, ServiceCheck
from .protocol import Parser
from .selfstats import IngestStats

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">Q")
_K = TypeVar("_K")
_V = TypeVar("_V")
#: a worker that has not said "ready" by then is taken as failed
START_SECONDS = 30.0
#: how long a worker whose channel closed gets to exit before it is reported
SHUTDOWN_WAIT = 10.0
#: series per slice of a window handed over (about 4 ms of pickling)
SLICE_SERIES = 4096


@dataclasses.dataclass(slots=True)
class Settings:
    """What a worker needs from the configuration."""

    sockets: list[tuple[str, int]]  # (name, fd) of each datagram socket to read
    interval: int
    gauge_deltas: bool
    clean_names: bool
    limits: Limits


@dataclasses.dataclass(slots=True)
class Report:
    """A worker's answer to a swap: its windows, and its counters since the last one."""

    #: pickled slices (window_slices), unpickled by the daemon's writer; on
    #: the channel they follow the report's frame, ``slices`` frames of raw bytes
    windows: list[bytes]
    listener: ListenerStats
    ingest: IngestStats
    drops: dict[str, int]
    events: list[tuple[Event, int]] = dataclasses.field(default_factory=list)
    checks: list[tuple[ServiceCheck, int]] = dataclasses.field(default_factory=list)
    slices: int = 0

    def closed_windows(self) -> Iterator[ClosedWindow]:
        """The slices, unpickled one at a time and let go of: each is merged
        while its objects are still in the CPU's caches (0.12 against
        0.13-0.15 s at 100k series), and its pickle is not held for the rest
        of the flush (5-10 MB a worker at 100k series)."""
        pieces, self.windows = self.windows, []
        pieces.reverse()
        while pieces:
            yield pickle.loads(pieces.pop())


@dataclasses.dataclass(slots=True)
class Learned:
    """Series a worker met for the first time, in its window that starts at
    ``start`` (Intake.take_learned): the daemon stores them before that
    window's flush."""

    start: int
    keys: list[SeriesKey]


def window_slices(windows: list[ClosedWindow], size: int) -> Iterator[ClosedWindow]:
    """The windows cut into windows of at most ``size`` series of one kind each.

    Each keeps its window's start and ``persisted``, so
    ``merge_worker_windows`` folds the slices as it would the whole windows
    (a series is in exactly one slice; a timer's weights go with it).
    """
    for window in windows:
        start, persisted = window.start, window.persisted
        for counters in _pieces(window.counters, size):
            yield ClosedWindow(start, counters, {}, {}, {}, {}, persisted)
        for gauges in _pieces(window.gauges, size):
            yield ClosedWindow(start, {}, {}, {}, gauges, {}, persisted)
        for sets in _pieces(window.sets, size):
            yield ClosedWindow(start, {}, {}, {}, {}, sets, persisted)
        weights = window.weights
        for timers in _pieces(window.timers, size):
            theirs = {key: weights[key] for key in timers if key in weights} if weights else {}
            yield ClosedWindow(start, {}, timers, theirs, {}, {}, persisted)


def _pieces(entries: dict[_K, _V], size: int) -> Iterator[dict[_K, _V]]:
    items = iter(entries.items())
    while piece := dict(itertools.islice(items, size)):
        yield piece


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def _read_raw(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return await reader.readexactly(size)


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    return pickle.loads(await _read_raw(reader))


async def _read_message(reader: asyncio.StreamReader) -> Report | Learned:
    """A worker's next message: a Learned, or a Report with its slices."""
    message = await _read_frame(reader)
    if isinstance(message, Report):
        message.windows = [await _read_raw(reader) for _ in range(message.slices)]
    return message  # type: ignore[no-any-return]


def _write_report(writer: asyncio.StreamWriter, report: Report) -> None:
    """The report's frame without its slices, then each slice as a raw frame.

    Pickled with the report, a window's slices (5-10 MB a worker at 100k
    series) were copied twice more in the worker (the pickle, then the
    length in front) and two or three times in the daemon (the stream's
    buffer, the frame, the slices unpickled from it), all at the flush's peak.
    """
    windows = report.windows
    writer.write(_frame(dataclasses.replace(report, windows=[], slices=len(windows))))
    for piece in windows:
        writer.write(_LENGTH.pack(len(piece)))
        writer.write(piece)


# ------------------------------------------------------------ the daemon's side


class WorkerGone(Exception):
    """A worker exited, or its channel broke, before it answered."""


class _Channel:
    """One worker process and the daemon's end of its socketpair."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        #: swaps sent and not answered yet, oldest first
        self.pending: collections.deque[concurrent.futures.Future[Report]] = collections.deque()
        self.task: asyncio.Task[None] | None = None


class Workers:
    """The running ingest workers, seen from the daemon (its event loop only)."""

    def __init__(self, channels: list[_Channel], on_report: Callable[[Report], None]) -> None:
        self._channels = channels
        self._on_report = on_report
        #: called with a worker's pid and exit status (None: still running)
        self.on_exit: Callable[[int, int | None], None] = lambda pid, code: None
        #: called with the start and the keys of each Learned a worker sends
        self.on_learned: Callable[[int, list[SeriesKey]], None] = lambda start, keys: None

    @classmethod
    async def start(
        cls, count: int, settings: Settings, on_report: Callable[[Report], None]
    ) -> Workers:
        """Start ``count`` workers and wait until each reads its sockets."""
        channels: list[_Channel] = []
        try:
            for _ in range(count):
                channels.append(await _spawn(settings))
        except BaseException:
            for channel in channels:
                channel.proc.kill()
                channel.writer.close()
            raise
        workers = cls(channels, on_report)
        for channel in channels:
            channel.task = asyncio.create_task(workers._read_reports(channel))
        return workers

    @property
    def pids(self) -> list[int]:
        return [channel.proc.pid for channel in self._channels]

    def open(self, start: int) -> None:
        """Align every worker's open window with the daemon's."""
        for channel in self._channels:
            channel.writer.write(_frame(("open", start)))

    def swap(
        self, next_start: int, limits: Limits, last: bool = False
    ) -> list[concurrent.futures.Future[Report]]:
        """Ask every worker for its windows; the futures resolve as reports arrive.

        ``last``: each worker stops reading, and exits after answering.
        """
        frame = _frame(("swap", next_start, limits, last))
        futures = []
        for channel in self._channels:
            future: concurrent.futures.Future[Report] = concurrent.futures.Future()
            if channel.task is None or channel.task.done():
                future.set_exception(WorkerGone(f"worker {channel.proc.pid} is gone"))
            else:
                channel.pending.append(future)
                channel.writer.write(frame)
            futures.append(future)
        return futures

    async def _read_reports(self, channel: _Channel) -> None:
        try:
            while True:
                report = await _read_message(channel.reader)
                if isinstance(report, Learned):
                    self.on_learned(report.start, report.keys)
                    continue
                self._on_report(report)
                if channel.pending:
                    channel.pending.popleft().set_result(report)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            gone = WorkerGone(f"worker {channel.proc.pid} is gone ({exc.__class__.__name__})")
        except Exception as exc:  # an unreadable report: the channel cannot be trusted
            log.exception("ingest worker %d sent an unreadable report", channel.proc.pid)
            gone = WorkerGone(f"worker {channel.proc.pid} sent an unreadable report ({exc})")
            channel.proc.kill()
        while channel.pending:
            channel.pending.popleft().set_exception(gone)
        channel.writer.close()
        code = await asyncio.get_running_loop().run_in_executor(None, _reap, channel.proc)
        self.on_exit(channel.proc.pid, code)

    async def close(self, timeout: float) -> None:
        """Close every channel (a worker exits on it) and wait for the processes."""
        for channel in self._channels:
            channel.writer.close()
        tasks = [channel.task for channel in self._channels if channel.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for channel in self._channels:
                if channel.proc.poll() is None:
                    log.warning("ingest worker %d did not exit; killing it", channel.proc.pid)
                    channel.proc.kill()
            if late:
                await asyncio.wait(late, timeout=timeout)


def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    """The exit code of a worker whose channel closed (it exits right after)."""
    try:
        return proc.wait(timeout=SHUTDOWN_WAIT)
    except subprocess.TimeoutExpired:
        return None


#: the worker's command; not ``-m aggregator.worker``, which would make this
#: module ``__main__`` there, and its pickles name classes the daemon lacks
_WORKER_MAIN = "import sys; from aggregator.worker import main; sys.exit(main(sys.argv[1:]))"


async def _spawn(settings: Settings) -> _Channel:
    ours, theirs = socket.socketpair()
    fds = [theirs.fileno(), *(fd for _, fd in settings.sockets)]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, str(theirs.fileno())],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    channel = _Channel(proc, reader, writer)
    writer.write(_frame(("init", settings)))
    try:
        answer = await asyncio.wait_for(_read_frame(reader), START_SECONDS)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
        proc.kill()
        writer.close()
        raise OSError(f"ingest worker {proc.pid} did not start ({exc.__class__.__name__})") from exc
    if answer != ("ready", proc.pid):
        proc.kill()
        writer.close()
        raise OSError(f"ingest worker {proc.pid} answered {answer!r} instead of ready")
    return channel


# ------------------------------------------------------------ the worker's side


class _Worker:
    """Reads the shared datagram sockets into its own window."""

    def __init__(self, settings: Settings) -> None:
        self.limits = settings.limits
        self.drops = Drops()
        self.aggregator = WorkerAggregator(
            settings.interval, settings.gauge_deltas, self.limits, self.drops
        )
        self.intake = Intake(Parser(clean_names=settings.clean_names), self.aggregator, time.time)
        self.listener = ListenerStats()
        self.readers = [
            DatagramReader(
                socket.socket(fileno=fd), self._read, self.listener, name, self.limits
            )
            for name, fd in settings.sockets
        ]

    def _read(self, datagrams: list[bytes]) -> None:
        self.aggregator.now = time.monotonic()
        self.intake.datagrams(datagrams)

    async def swap(self, next_start: int, limits: Limits, last: bool) -> Report:
        """Swap the window, then pickle it a slice at a time, reading in between."""
        if last:
            self.stop_reading()
        self.limits.update(limits)
        windows = self.aggregator.swap(next_start)
        events, checks = self.intake.take_events()
        listener = dataclasses.replace(self.listener)
        ingest = self.intake.stats
        drops = self.drops.take_window()
        # the counters restart from zero: a report carries what is new since the last
        for name in ("packets", "bytes", "too_large"):
            setattr(self.listener, name, 0)
        self.intake.stats = IngestStats()
        pieces = []
        for piece in window_slices(windows, SLICE_SERIES):
            pieces.append(pickle.dumps(piece, protocol=pickle.HIGHEST_PROTOCOL))
            await asyncio.sleep(0)  # the event loop reads the sockets meanwhile
        return Report(pieces, listener, ingest, drops, events, checks)

    def stop_reading(self) -> None:
        for reader in self.readers:
            reader.close()


async def _serve(control: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=control)
    kind, settings = await _read_frame(reader)
    if kind != "init":
        raise ValueError(f"expected init, got {kind!r}")
    worker = _Worker(settings)
    writer.write(_frame(("ready", os.getpid())))
    quiet_gc()
    learning = asyncio.create_task(_send_learned(worker, writer))
    while True:
        try:
            message = await _read_frame(reader)
        except asyncio.IncompleteReadError:
            break  # the daemon closed its end: stop
        if message[0] == "open":
            worker.aggregator.open(message[1])
        elif message[0] == "swap":
            _, next_start, limits, last = message
            _write_report(writer, await worker.swap(next_start, limits, last))
            await writer.drain()
    learning.cancel()
    worker.stop_reading()
    writer.close()


async def _send_learned(worker: _Worker, writer: asyncio.StreamWriter) -> None:
    """Every LEARNED_SECONDS, the series new to this worker, in slices (Learned)."""
    while True:
        await asyncio.sleep(LEARNED_SECONDS)
        keys = worker.intake.take_learned()
        start = worker.aggregator.start
        for at in range(0, len(keys), SLICE_SERIES):
            writer.write(_frame(Learned(start, keys[at : at + SLICE_SERIES])))
            await asyncio.sleep(0)  # the event loop reads the sockets meanwhile


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s ingest worker {os.getpid()}: %(message)s",
        stream=sys.stderr,
    )
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[0]))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(control))
        return 0
    with contextlib.suppress(ConnectionError), asyncio.Runner(
        loop_factory=uvloop.new_event_loop
    ) as runner:
        runner.run(_serve(control))
    return 0

