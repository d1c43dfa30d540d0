"""Bytes from the listeners into the open window: parse, count, aggregate.

The daemon runs one Intake for everything it reads itself; an ingest
worker (worker.py) runs its own for the datagram sockets it reads. Both
processes call :func:`quiet_gc` once they are set up.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from .aggregate import Aggregator
from .model import Event, ServiceCheck
from .protocol import Parser
from .selfstats import IngestStats

#: allocations between two runs of the cycle collector's first generation
GC_THRESHOLD = 50_000


class Intake:
    """The per-line path: parser -> aggregator, with the ingest counters."""

    def __init__(self, parser: Parser, aggregator: Aggregator, clock: Callable[[], float]) -> None:
        self.parser = parser
        self.aggregator = aggregator
        self.clock = clock
        self.stats = IngestStats()
        #: events and service checks with their arrival second, until the flush
        self.events: list[tuple[Event, int]] = []
        self.checks: list[tuple[ServiceCheck, int]] = []

    def datagrams(self, datagrams: list[bytes]) -> None:
        """The datagrams of one socket read, parsed as one text joined by newlines.

        A datagram's lines never run into the next one's, and the parser and
        the aggregator are called once for the lot.
        """
        self.lines(datagrams[0] if len(datagrams) == 1 else b"\n".join(datagrams))

    def lines(self, data: bytes) -> None:
        """A run of stream lines, or one datagram."""
        parsed = self.parser.parse(data)
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
