"""The composition root: bind, log `ready`, flush on aligned windows, stop cleanly.

Lifecycle: open storage -> restore gauges -> bind listeners and HTTP ->
log the ready line -> flush every aligned window -> on SIGTERM/SIGINT:
stop intake -> final flush of the open window -> drain the writer ->
stop HTTP -> close the database. Only this module knows every other one.

A flush that SQLite cannot take is parked in the spool and replayed in
order (spool.py); SIGHUP reloads the dashboards and the limits and logs
what else needs a restart (operations.py). With ``listen.workers``, ingest
worker processes read the datagram sockets and the writer merges their
windows into each flush (worker.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import web

from . import api, listeners, operations
from .aggregate import Aggregator, ClosedWindow, merge_worker_windows, snapshot
from .config import Config, ConfigError, split_address
from .intake import LEARNED_SECONDS, Intake, paused_gc, quiet_gc
from .limits import Budget, Drops, Registrations
from .model import Event, Rollup, SeriesKey, ServiceCheck
from .notify import Notifier
from .outputs import Outputs
from .priority import WriterPriority, can_return_to_normal
from .protocol import Parser
from .selfstats import SelfStats
from .spool import Batch, DurableWriter, Spool, TolerantStorage, spool_path, sqlite_store
from .storage import MAX_AUTO_POINTS
from .worker import Report, Settings, WorkerGone, Workers

log = logging.getLogger("statsd_aggregator")

Clock = Callable[[], float]

#: Each shutdown step gets at most this long before the next one starts.
SHUTDOWN_STEP_SECONDS = 30.0
#: longest HTTP request line (bytes); a longer one gets aiohttp's plain 400
MAX_REQUEST_LINE = 65536
#: series stored in one transaction before their flush (_register)
REGISTER_BATCH = 16384
#: how long storing new series before their flush waits for another
#: process's write lock; past it, the flush stores them
REGISTER_BUSY_SECONDS = 0.2
#: carbon and the relay get this long to take what is still queued at stop
FORWARD_CLOSE_SECONDS = 10.0


def encode_gauges(gauges: dict[SeriesKey, float]) -> bytes:
    """Persisted gauges as msgpack: [[name, type, [[k, v], ...], value], ...]."""
    return bytes(
        msgpack.packb(
            [[n, t, [list(tag) for tag in tags], v] for (n, t, tags), v in gauges.items()]
        )
    )


def decode_gauges(blob: bytes) -> dict[SeriesKey, float]:
    rows = msgpack.unpackb(blob)
    return {(n, t, tuple((k, v) for k, v in tags)): float(v) for n, t, tags, v in rows}



class Daemon:
    def __init__(
        self,
        config: Config,
        clock: Clock = time.time,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.interval = config.flush_interval
        self.parser = Parser(clean_names=config.clean_names)
        # One Limits object, shared and updated in place by SIGHUP.
        self.limits = config.limits()
        self.drops = Drops()
        self.aggregator = Aggregator(
            config.flush_interval,
            config.percentiles,
            gauge_deltas=config.gauge_deltas,
            limits=self.limits,
            drops=self.drops,
        )
        self.intake = Intake(self.parser, self.aggregator, clock)
        self.ingest_stats = self.intake.stats
        self.listener_stats = listeners.ListenerStats()
        self.selfstats = SelfStats(self.ingest_stats, self.listener_stats)
        Path(config.storage_path).parent.mkdir(parents=True, exist_ok=True)
        self.storage = TolerantStorage(config.storage_path, config.tiers)
        # Flushes SQLite cannot take wait in <db>-spool/; a lock is waited for
        # at most half an interval, so a held lock never piles flushes up.
        self.durable = DurableWriter(
            sqlite_store(self.storage, busy_timeout=min(5.0, self.interval / 2)),
            Spool(spool_path(config.storage_path)),
            replay_seconds=max(0.5, self.interval / 2),
            on_stored=self._stored,
            clock=clock,
        )
        self.ops = operations.OpsStats(self.drops, self.listener_stats, self.durable)
        self.live = api.LiveConfig(config)
        self.reload_config = reload
        #: the ingest worker processes (listen.workers), once started
        self.workers: Workers | None = None
        #: the process's exit status: 1 after an ingest worker died
        self.exit_status = 0
        # One writer thread owns every write to SQLite; reads use their own pool.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="writer")
        self._readers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="reader")
        self._pending_flush: concurrent.futures.Future[None] | None = None
        #: the writer's CPU priority against the ingest workers (priority.py)
        self._priority = WriterPriority() if config.workers and can_return_to_normal() else None
        self._stop = asyncio.Event()
        self.addresses: dict[str, str] = {}
        self.feed = api.FlushFeed()
        self.notifier = Notifier()
        # /metrics, the Graphite forwarder and the relay (outputs.py)
        self.outputs = Outputs(config, clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Series the intakes met for the first time, until the writer takes
        # them (_learned, _register); the lock is between loop and writer.
        self._learned_lock = threading.Lock()
        self._learned_keys: list[SeriesKey] = []
        self._learned_start = 0
        self._register_queued = False
        self._registrations = Registrations(self.limits, 0)

    # ------------------------------------------------------------ ingest (hot)

    def ingest(self, data: bytes) -> None:
        """Parse a run of stream lines (or one datagram) into the open window."""
        relay = self.outputs.relay
        if relay is not None:
            relay.send(data)
        self.intake.lines(data)

    def ingest_datagrams(self, datagrams: list[bytes]) -> None:
        """Parse the datagrams of one socket read into the open window.

        The relay still gets each datagram as it came.
        """
        relay = self.outputs.relay
        if relay is not None:
            for data in datagrams:
                relay.send(data)
        self.intake.datagrams(datagrams)

    def _worker_report(self, report: Report) -> None:
        """Event loop: a worker's counters join the daemon's (in the next window's self metrics)."""
        listener, ingest = self.listener_stats, self.ingest_stats
        listener.packets += report.listener.packets
        listener.bytes += report.listener.bytes
        listener.too_large += report.listener.too_large
        ingest.lines += report.ingest.lines
        ingest.samples += report.ingest.samples
        ingest.events += report.ingest.events
        ingest.checks += report.ingest.checks
        for reason, count in report.ingest.bad.items():
            ingest.bad[reason] = ingest.bad.get(reason, 0) + count
        for reason, count in report.drops.items():
            self.drops.window[reason] = self.drops.window.get(reason, 0) + count

    def _learned(self, start: int, keys: list[SeriesKey]) -> None:
        """Event loop: series an intake met for the first time in the open window.

        The writer stores them while the window is still open
        (Storage.register), so that its flush finds them there: a first
        window of 100k series spent about half its flush creating them.
        What arrives while a registration is queued joins it.
        """
        if not keys or start != self.aggregator.start:
            return
        with self._learned_lock:
            if start != self._learned_start:
                self._learned_start, self._learned_keys = start, []
            self._learned_keys.extend(keys)
            queue, self._register_queued = not self._register_queued, True
        if queue:
            self._writer.submit(self._register)

    def _register(self) -> None:
        """Writer thread: store the series learned so far, within the limits
        (Registrations); a failure leaves them to the flush, which stores them anyway.

        At most REGISTER_BATCH at a time: the rest is queued again behind
        it, after any flush that came meanwhile, which so waits for one
        batch at most.
        """
        with self._learned_lock:
            start, keys = self._learned_start, self._learned_keys[:REGISTER_BATCH]
            del self._learned_keys[:REGISTER_BATCH]
            self._register_queued = more = bool(self._learned_keys)
        try:
            self._store_learned(start, keys)
        finally:
            if more:
                self._writer.submit(self._register)

    def _store_learned(self, start: int, keys: list[SeriesKey]) -> None:
        if not keys or self.storage.setup_error is not None or self.durable.error is not None:
            return
        if self._registrations.start != start:
            self._registrations = Registrations(self.limits, start)
        try:
            created = self.storage.register(
                keys, start, self._registrations.admit, REGISTER_BUSY_SECONDS
            )
        except sqlite3.Error as exc:
            log.debug("storage: storing %d series before their flush failed: %s", len(keys), exc)
            return
        if created:
            self._checkpoint()

    def _maintain(self) -> None:
        """Writer thread: the compaction slice and retention a flush left due,
        off its clock (``last_maintenance_seconds``). A failure leaves them
        due: the next write runs them first, and fails the flush if they fail again."""
        started = self.clock()
        try:
            self.storage.maintain()
        except sqlite3.Error as exc:  # storage trouble: the next write reports it
            log.debug("storage: compaction and retention after a write failed: %s", exc)
        except Exception:  # no flush future is awaited: say it here
            log.exception("storage: compaction and retention after a flush failed")
        self.selfstats.totals.last_maintenance_seconds = self.clock() - started

    def _checkpoint(self) -> None:
        """Writer thread: the checkpoint a write left due, off the flush's clock."""
        try:
            self.storage.checkpoint()
        except sqlite3.Error as exc:  # the next write meets it again, and reports it
            log.debug("storage: checkpoint after a write failed: %s", exc)

    def _worker_exited(self, pid: int, code: int | None) -> None:
        """Event loop: a worker's channel closed. Outside shutdown, the daemon stops too."""
        if self._stop.is_set():
            return
        log.error(
            "ingest worker %d exited (status %s); stopping, so that the service manager "
            "restarts the daemon",
            pid,
            code,
        )
        self.exit_status = 1
        self.stop()

    # ------------------------------------------------------------ flushing

    def window_start(self, now: float) -> int:
        return int(now // self.interval) * self.interval

    def flush(self, next_start: int, last: bool = False) -> concurrent.futures.Future[None]:
        """Close the open window (and any |T windows), hand them to the writer.

        With ingest workers, they are asked for their windows too; the writer
        merges those in as they arrive. ``last``: the workers stop reading.
        """
        started = self.clock()
        # The daemon's own metrics are never refused by the limits.
        self.aggregator.add(
            self.selfstats.window_samples(
                self.aggregator.series_count, self.selfstats.totals.last_flush_seconds
            ),
            limited=False,
        )
        self.aggregator.add(self.outputs.window_samples(), limited=False)
        self.aggregator.add(self.ops.window_samples(), limited=False)
        closed = self.aggregator.swap(next_start)
        events, checks = self.intake.take_events()
        gauges = self.aggregator.gauges()
        merge: tuple[list[concurrent.futures.Future[Report]], Budget] | None = None
        if self.workers is not None:
            merge = self.workers.swap(next_start, self.limits, last), self.aggregator.spent
        future = self._writer.submit(self._write, closed, events, checks, gauges, started, merge)
        self._pending_flush = future
        return future

    def _write(
        self,
        closed: list[ClosedWindow],
        events: list[tuple[Event, int]],
        checks: list[tuple[ServiceCheck, int]],
        gauges: dict[SeriesKey, float],
        started: float,
        merge: tuple[Sequence[concurrent.futures.Future[Report]], Budget] | None = None,
    ) -> None:
        """Runs in the writer thread: the flush, with the cycle collector paused."""
        with paused_gc():
            self._write_flush(closed, events, checks, gauges, started, merge)
            closed.clear()  # the windows go before the collector is back (if the flush failed)
            self._maintain()
        self._registrations = Registrations(self.limits, 0)  # its counts by name, gone
        self._checkpoint()

    def _write_flush(
        self,
        closed: list[ClosedWindow],
        events: list[tuple[Event, int]],
        checks: list[tuple[ServiceCheck, int]],
        gauges: dict[SeriesKey, float],
        started: float,
        merge: tuple[Sequence[concurrent.futures.Future[Report]], Budget] | None,
    ) -> None:
        """Merge the workers' windows, snapshot, one transaction; then /metrics
        and carbon.

        The flush (``last_flush_seconds``) ends when the window is stored:
        where its time went is kept per phase (``last_flush_phases``): queued
        behind the previous flush, waiting for the workers' windows,
        unpickling and merging them, the snapshot, and the SQLite
        transaction. /metrics and carbon follow, from the same rollups
        (``last_outputs_seconds``), so that they do not hold the window
        back from SQLite.
        """
        totals = self.selfstats.totals
        phases: dict[str, float] = {}
        mark = started

        def phase(name: str) -> None:
            nonlocal mark
            now = self.clock()
            phases[name] = round(now - mark, 6)
            mark = now

        phase("queued")
        if self._priority is not None:
            self._priority.flush_starts(phases["queued"], self.interval)
        try:
            if merge is not None:
                self._merge_reports(closed, events, checks, gauges, *merge, phase)
            rollups: list[Rollup] = []
            for window in closed:
                rollups.extend(snapshot(window, self.config.percentiles))
            starts = [w.start for w in closed]
            touched = {key for window in closed for key in window.gauges}
            closed.clear()  # the raw windows go before the store makes its rows
            phase("snapshot")
            state = {"gauges": encode_gauges(gauges)}
            batch = Batch(starts, rollups, events, checks, state)
            if not self.durable.write(batch):
                totals.flush_errors += 1  # parked in the spool: stored later, in order
            phase("store")
            self.outputs.publish(touched, rollups)  # never raises
            # before the flush is counted: whoever sees it sees this figure too
            totals.last_outputs_seconds = self.clock() - mark
        except Exception:
            totals.flush_errors += 1
            log.exception("flush failed")
            raise
        finally:
            totals.flushes += 1
            totals.last_flush_at = mark
            totals.last_flush_seconds = mark - started
            totals.last_flush_phases = phases

    def _merge_reports(
        self,
        closed: list[ClosedWindow],
        events: list[tuple[Event, int]],
        checks: list[tuple[ServiceCheck, int]],
        gauges: dict[SeriesKey, float],
        reports: Sequence[concurrent.futures.Future[Report]],
        budget: Budget,
        phase: Callable[[str], None],
    ) -> None:
        """Writer thread: fold each worker's windows into the flush, under its limits.

        The reports are merged once all have arrived: merging the first
        while the others are still being pickled puts the writer on the
        cores in the very moment the workers need them (item 47 of
        bench/README.md).
        A worker that does not answer costs only its own window (logged).
        The gauges the workers moved are handed back to the event loop, which
        owns the persisted values.
        """
        answered: list[Report] = []
        for future in reports:
            try:
                report = future.result(SHUTDOWN_STEP_SECONDS)
            except (WorkerGone, TimeoutError) as exc:
                log.error("flush without an ingest worker's window: %s", exc)
                continue
            answered.append(report)
            events.extend(report.events)
            checks.extend(report.checks)
        phase("workers")
        parts = (part for report in answered for part in report.closed_windows())
        moved = merge_worker_windows(closed, parts, budget)
        if moved:
            gauges.update(moved)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.aggregator.carry_gauges, moved)
        phase("merge")

    def _stored(self, batch: Batch) -> None:
        """Writer thread: a flush (fresh or parked) reached SQLite; tell the event stream."""
        if self._loop is not None:
            summary = {"windows": batch.windows, "rollups": len(batch.rollups)}
            self._loop.call_soon_threadsafe(self.feed.publish, summary)

    def _restore(self) -> None:
        """Writer thread, at start: gauges from the newest state, then the spool's backlog."""
        try:
            state = self.storage.load_state()
        except Exception as exc:  # unreadable now: the spool may still hold the state
            log.warning("storage: cannot read the saved state (%s)", exc)
            state = {}
        applied = state.get("spool_applied")
        if applied is not None:
            self.durable.applied = int(msgpack.unpackb(applied))
        state.update(self.durable.latest_state())  # a parked flush is newer than the database
        if "gauges" in state:
            self.aggregator.restore_gauges(decode_gauges(state["gauges"]))
        if self.durable.backlog:
            log.info("spool: %d parked flush(es) to store", self.durable.backlog)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply dashboards and limits, log the rest."""
        self.notifier.reloading()
        try:
            if self.reload_config is None:
                log.warning("reload: no config file to re-read")
                return
            try:
                new = self.reload_config()
            except ConfigError as exc:
                log.error("reload: %s; keeping the running configuration", exc)
                return
            # Applied: what differs from the configuration in force; needing a
            # restart: what differs from the one the daemon started with.
            applied, _ = operations.reload_changes(self.live.current, new)
            _, restart = operations.reload_changes(self.config, new)
            self.limits.update(new.limits())
            self.live.current = new
            if applied:
                log.info("reload: applied %s", ", ".join(applied))
            if restart:
                log.warning(
                    "reload: these changes need a restart to apply: %s", ", ".join(restart)
                )
            if not applied and not restart:
                log.info("reload: no change")
        finally:
            self.notifier.ready(self._address_text())

    async def _flush_loop(self) -> None:
        """Flush at every multiple of the interval, from a fixed origin."""
        loop = asyncio.get_running_loop()
        current = self.window_start(self.clock())
        self.aggregator.open(current)
        if self.workers is not None:
            self.workers.open(current)
        while not self._stop.is_set():
            next_start = current + self.interval
            delay = max(0.0, next_start - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            if self._stop.is_set():
                break
            # A stalled loop (suspend, debugger) skips to the present window.
            next_start = max(next_start, self.window_start(self.clock()))
            self.flush(next_start)
            current = next_start
        # Final flush of the open window: nothing accepted is lost on stop.
        future = self.flush(current + self.interval, last=True)
        await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), SHUTDOWN_STEP_SECONDS)

    async def _learned_loop(self) -> None:
        """Hand the series the daemon's own intake met to the writer (_learned)."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), LEARNED_SECONDS)
            self._learned(self.aggregator.start, self.intake.take_learned())

    async def _watchdog_loop(self) -> None:
        """Ping systemd's watchdog from the event loop, so a stuck loop stops pinging."""
        seconds = self.notifier.watchdog_seconds
        if seconds is None:
            return
        while not self._stop.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds / 2)

    # ------------------------------------------------------------ lifecycle

    def health(self) -> dict[str, Any]:
        totals = self.selfstats.totals
        return {
            "status": "ok",
            "addresses": self.addresses,
            "flush_interval": self.interval,
            "flushes": totals.flushes,
            "flush_errors": totals.flush_errors,
            "last_flush_at": totals.last_flush_at,
            "last_flush_seconds": round(totals.last_flush_seconds, 6),
            "last_flush_phases": totals.last_flush_phases,
            "last_outputs_seconds": round(totals.last_outputs_seconds, 6),
            "last_maintenance_seconds": round(totals.last_maintenance_seconds, 6),
            **self.selfstats.live_totals(),
            "series": self.aggregator.series_count,
            **self.ops.health(),
        } | ({} if self.durable.error is None else {"status": "degraded"})

    def _count_series(self, metric: str, tags: Sequence[tuple[str, str]], kind: str | None) -> int:
        try:
            return self.storage.count_series(metric, tags, kind)
        except sqlite3.Error:  # no schema yet (read-only at start): nothing to read
            return 0

    def _limits_report(self) -> dict[str, Any]:
        return {
            "limits": self.limits.as_dict(),
            "window_series": self.aggregator.series_count,
            **self.ops.limits_report(),
        }

    def stop(self) -> None:
        self._stop.set()

    def _address_text(self) -> str:
        """``udp=127.0.0.1:8125 tcp=...``: the ready line and systemd's status."""
        text = " ".join(f"{k}={v}" for k, v in self.addresses.items())
        if self.workers is not None:
            text += f" workers={len(self.workers.pids)}"
        return text

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        config = self.config
        await loop.run_in_executor(self._writer, self._restore)
        self._writer.submit(self.durable.replay)  # the backlog of an earlier run, if any
        self.outputs.start()
        bound = await listeners.start(
            udp=config.udp,
            tcp=config.tcp,
            unix=config.unix,
            unix_stream=config.unix_stream,
            sink=self.ingest,
            datagram_sink=self.ingest_datagrams,
            stats=self.listener_stats,
            receive_buffer=config.udp_receive_buffer,
            max_line=config.max_line_length,
            limits=self.limits,
            unix_mode=config.unix_mode,
            hand_over_datagrams=config.workers > 0,
        )
        runner: web.AppRunner | None = None
        try:
            self.addresses = dict(bound.addresses)
            if config.workers:
                await self._start_workers(bound)
            if config.http:
                runner = await self._start_http()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            quiet_gc()
            log.info(
                "statsd-aggregator ready %s db=%s flush_interval=%ss fastpath=%s",
                self._address_text(),
                config.storage_path,
                self.interval,
                "c" if self.intake.routes is not None else "python",
            )
            self.notifier.ready(self._address_text())
            flusher = asyncio.create_task(self._flush_loop())
            watchdog = asyncio.create_task(self._watchdog_loop())
            learning = asyncio.create_task(self._learned_loop())
            await self._stop.wait()
            log.info("stopping: closing listeners, flushing the open window")
            self.notifier.stopping()
            watchdog.cancel()
            learning.cancel()
            bound.close()
            await bound.wait_closed()
            await flusher
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            bound.close()
            await bound.wait_closed()
            if self.workers is not None:
                await self.workers.close(SHUTDOWN_STEP_SECONDS)
            if runner is not None:
                await asyncio.wait_for(runner.cleanup(), SHUTDOWN_STEP_SECONDS)
            self._readers.shutdown(wait=True)
            self._writer.submit(self.storage.close).result(SHUTDOWN_STEP_SECONDS)
            self._writer.shutdown(wait=True)
            self.outputs.close(FORWARD_CLOSE_SECONDS)
            log.info("stopped")

    async def _start_workers(self, bound: listeners.Listeners) -> None:
        config = self.config
        settings = Settings(
            sockets=[(name, sock.fileno()) for name, sock in bound.handed_over],
            interval=self.interval,
            gauge_deltas=config.gauge_deltas,
            clean_names=config.clean_names,
            limits=self.limits,
        )
        self.workers = await Workers.start(config.workers, settings, self._worker_report)
        self.workers.on_exit = self._worker_exited
        self.workers.on_learned = self._learned
        log.info("ingest workers reading the datagram sockets: pids %s", self.workers.pids)
        if self._priority is None:
            log.info(
                "the writer keeps normal CPU priority during flushes: it could not return "
                "to it from SCHED_IDLE without CAP_SYS_NICE or RLIMIT_NICE >= 20 "
                "(systemd: LimitNICE=+0)"
            )

    async def _start_http(self) -> web.AppRunner:
        app = api.create_app(
            storage=self.storage,
            config=self.config,
            health=self.health,
            executor=self._readers,
            clock=self.clock,
            feed=self.feed,
            exposition=self.outputs.exposition,
            live=self.live,
            guard=operations.QueryGuard(
                self.limits,
                self._count_series,
                [tier.resolution for tier in self.config.tiers],
                MAX_AUTO_POINTS,
            ),
            limits_report=self._limits_report,
        )
        # A long query (many tag filters) must reach the API, which answers it
        # in JSON, rather than aiohttp's parser (8 KiB by default, plain text).
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, max_line_size=MAX_REQUEST_LINE
        )
        await runner.setup()
        host, port = split_address(self.config.http)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self.addresses["http"] = listeners.format_address(runner.addresses[0])
        return runner
