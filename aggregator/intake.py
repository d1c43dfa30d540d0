"""Bytes from the listeners into the open window: parse, count, aggregate.

The daemon runs one Intake for everything it reads itself; an ingest
worker (worker.py) runs its own for the datagram sockets it reads. Both
processes call :func:`quiet_gc` once they are set up.

Two paths with one result. The pure one parses a whole read
(protocol.Parser) and adds its samples (Aggregator.add). The fast one, when
the C extension is built (fastpath.py), reads every line whose shape the
parser has seen (``Parser.route``) straight into the window, and hands the
others, one at a time and in order, to the pure one; after each such line
it learns the line's shape. tests/test_fastpath.py holds both to the same
windows and counts.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

from .aggregate import Aggregator
from .fastpath import native
from .model import (
    COUNTER,
    DISTRIBUTION,
    GAUGE,
    HISTOGRAM,
    SET,
    TIMER,
    Event,
    Parsed,
    SeriesKey,
    ServiceCheck,
)
from .protocol import Parser
from .selfstats import IngestStats

#: line shapes the fast path remembers (as many as the parser caches names)
ROUTES = 1 << 17
#: type code -> the fast path's kind
_KINDS = {COUNTER: 0, TIMER: 1, HISTOGRAM: 1, DISTRIBUTION: 1, GAUGE: 2, SET: 3}

#: seconds between two hand-overs of the series learned (take_learned)
LEARNED_SECONDS = 1.0

#: allocations between two runs of the cycle collector's first generation
GC_THRESHOLD = 50_000


class Intake:
    """The per-line path: parser -> aggregator, with the ingest counters."""

    def __init__(
        self,
        parser: Parser,
        aggregator: Aggregator,
        clock: Callable[[], float],
        fast: bool = True,
    ) -> None:
        self.parser = parser
        self.aggregator = aggregator
        self.clock = clock
        self.stats = IngestStats()
        #: events and service checks with their arrival second, until the flush
        self.events: list[tuple[Event, int]] = []
        self.checks: list[tuple[ServiceCheck, int]] = []
        #: the C fast path's line shapes; None: the pure path only
        self.routes = native.Routes(ROUTES) if fast and native is not None else None
        #: series whose first line here taught the fast path a new shape and
        #: entered the open window (take_learned), and which window that is
        self.learned: list[SeriesKey] = []
        self.learned_window = 0  # Aggregator.swaps
        #: the shape table's size after the last shape learned, and the
        #: window (Aggregator.swaps) from which series are kept again
        self.routes_known = 0
        self.learned_quiet_until = 0

    def datagrams(self, datagrams: list[bytes]) -> None:
        """The datagrams of one socket read.

        On the pure path they are parsed as one text joined by newlines: a
        datagram's lines never run into the next one's, and the parser and
        the aggregator are called once for the lot.
        """
        if self.routes is not None:
            self._feed(datagrams)
        else:
            data = datagrams[0] if len(datagrams) == 1 else b"\n".join(datagrams)
            self._fold(self.parser.parse(data))

    def lines(self, data: bytes) -> None:
        """A run of stream lines, or one datagram."""
        if self.routes is not None:
            self._feed([data])
        else:
            self._fold(self.parser.parse(data))

    def _feed(self, chunks: list[bytes]) -> None:
        assert self.routes is not None
        handled = self.routes.feed(chunks, *self.aggregator.window_parts(), self._slow_line)
        stats = self.stats
        stats.lines += handled
        stats.samples += handled  # one sample per line there

    def _slow_line(self, line: bytes) -> None:
        """A line the fast path does not know the shape of: the pure path, then learn it."""
        parsed = self.parser.parse(line)
        self._fold(parsed)
        if len(parsed.samples) == 1 and parsed.samples[0].timestamp is None:
            route = self.parser.route(line.decode())
            if route is not None and self.routes is not None:
                head, tail, key, rate = route
                if self.routes.learn(head.encode(), tail.encode(), key, _KINDS[key[1]], rate):
                    self.parser.forget(head)
                    self._note_learned(key, len(self.routes))

    def _note_learned(self, key: SeriesKey, routes: int) -> None:
        """Keep a series new to this process, unless a limit kept it out of the window.

        Only the open window's: the flush of a closed one registers its
        series itself. At most ROUTES are kept between two takes.

        A shape table that was just emptied (more shapes than it holds)
        learns again shapes it knew, whose series are stored already: then
        nothing is kept for the rest of this window and the next one, and
        their flushes store what is new. So a deployment with more active
        shapes than the table holds does not hand every series over again.
        """
        aggregator = self.aggregator
        emptied = routes <= self.routes_known
        self.routes_known = routes
        if emptied:
            self.learned_quiet_until = aggregator.swaps + 2
        if aggregator.swaps < self.learned_quiet_until or not aggregator.holds(key):
            return
        if self.learned_window != aggregator.swaps:
            self.learned = []
            self.learned_window = aggregator.swaps
        if len(self.learned) < ROUTES:
            self.learned.append(key)

    def _fold(self, parsed: Parsed) -> None:
        """Count what the parser made of a read and add its samples to the window."""
        stats = self.stats
        stats.lines += parsed.lines
        if parsed.samples:
            stats.samples += len(parsed.samples)
            self.aggregator.add(parsed.samples)
        if parsed.bad:
            bad = stats.bad
            for reason in parsed.bad:
                bad[reason] = bad.get(reason, 0) + 1
        if parsed.events or parsed.checks:
            arrival = int(self.clock())
            stats.events += len(parsed.events)
            stats.checks += len(parsed.checks)
            self.events.extend((event, arrival) for event in parsed.events)
            self.checks.extend((check, arrival) for check in parsed.checks)

    def take_learned(self) -> list[SeriesKey]:
        """The series learned in the open window since the last call (storage
        registers them before the window's flush: Storage.register)."""
        learned, self.learned = self.learned, []
        if self.learned_window != self.aggregator.swaps:
            return []  # learned in a window that is closed now
        return learned

    def take_events(self) -> tuple[list[tuple[Event, int]], list[tuple[ServiceCheck, int]]]:
        """The events and service checks since the last call."""
        events, self.events = self.events, []
        checks, self.checks = self.checks, []
        return events, checks


def quiet_gc() -> None:
    """Keep the cycle collector off the hot paths.

    A window of 100k series holds several hundred thousand tracked objects
    (the per-series lists), and the caches of the parser and the writer hold
    more. With CPython's default thresholds the collector runs every 700 net
    allocations and, every hundred runs, walks the whole heap: that was a
    large share of a 100k-series flush. Everything alive at start (imports,
    restored caches) is frozen out of the walk, and the first generation is
    collected every GC_THRESHOLD allocations instead. The daemon makes few
    reference cycles, so the collector still runs, only less often.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 10)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cycle collection while the block runs (a flush, in the writer thread).

    A flush makes and drops about a million tracked objects (the merged
    window, the rollups, the rows). They outlive many first-generation
    runs, so the second generation walked them too: 50-90 ms, in one
    100k-series flush in three. What the block frees is off the
    collector's count again, so only what it keeps comes due afterwards.
    Nothing is missed: a cycle made meanwhile waits for the next run.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
