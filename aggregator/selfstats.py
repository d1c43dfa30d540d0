"""The daemon's own health, reported as metrics under `statsd_aggregator.`.

Counters are kept as plain integers on the hot path and turned into
samples once per flush, in the same namespace as user metrics (as Etsy
statsd does with `statsd.*`), so they are stored, queried and exported
like any other series.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .listeners import ListenerStats
from .model import BAD_TOO_LONG, COUNTER, GAUGE, Sample

PREFIX = "statsd_aggregator."


@dataclass(slots=True)
class IngestStats:
    """Counters updated per datagram by the ingest path."""

    lines: int = 0
    samples: int = 0
    events: int = 0
    checks: int = 0
    bad: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Totals:
    """Cumulative figures since start, for /healthz."""

    packets: int = 0
    lines: int = 0
    bad_lines: int = 0
    flushes: int = 0
    last_flush_seconds: float = 0.0
    #: where last_flush_seconds went: phase -> seconds (see Daemon._write)
    last_flush_phases: dict[str, float] = field(default_factory=dict)
    last_flush_at: float = 0.0
    #: /metrics and carbon, after the last flush was stored
    last_outputs_seconds: float = 0.0
    #: the compaction slice and retention, after /metrics (Storage.maintain)
    last_maintenance_seconds: float = 0.0
    flush_errors: int = 0


class SelfStats:
    """Turns the per-window counters into samples and resets them."""

    def __init__(self, ingest: IngestStats, listeners: ListenerStats) -> None:
        self.ingest = ingest
        self.listeners = listeners
        self.totals = Totals()
        self._seen_packets = 0
        self._seen_bytes = 0
        self._seen_too_long = 0

    def live_totals(self) -> dict[str, int]:
        """Totals since start, including the window still open."""
        listeners, ingest, totals = self.listeners, self.ingest, self.totals
        open_bad = sum(ingest.bad.values()) + listeners.too_long - self._seen_too_long
        return {
            "packets_received": totals.packets + listeners.packets - self._seen_packets,
            "lines_received": totals.lines + ingest.lines,
            "bad_lines": totals.bad_lines + open_bad,
        }

    def window_samples(self, series: int, last_flush_seconds: float) -> list[Sample]:
        """Samples describing the window that is about to close."""
        ingest, listeners = self.ingest, self.listeners
        packets = listeners.packets - self._seen_packets
        received = listeners.bytes - self._seen_bytes
        too_long = listeners.too_long - self._seen_too_long
        self._seen_packets, self._seen_bytes = listeners.packets, listeners.bytes
        self._seen_too_long = listeners.too_long
        bad = dict(ingest.bad)
        if too_long:
            bad[BAD_TOO_LONG] = bad.get(BAD_TOO_LONG, 0) + too_long
        bad_total = sum(bad.values())

        totals = self.totals
        totals.packets += packets
        totals.lines += ingest.lines
        totals.bad_lines += bad_total

        def counter(name: str, value: float, tags: tuple[tuple[str, str], ...] = ()) -> Sample:
            return Sample(PREFIX + name, COUNTER, tags, float(value))

        def gauge(name: str, value: float) -> Sample:
            return Sample(PREFIX + name, GAUGE, (), float(value))

        samples = [
            counter("packets_received", packets),
            counter("bytes_received", received),
            counter("lines_received", ingest.lines),
            counter("samples_received", ingest.samples),
            counter("events_received", ingest.events),
            counter("service_checks_received", ingest.checks),
            counter("bad_lines", bad_total),
            gauge("series", series),
            gauge("tcp_connections", listeners.connections),
            gauge("flush_seconds", last_flush_seconds),
        ]
        samples.extend(
            counter("bad_lines_by_reason", count, (("reason", reason),))
            for reason, count in sorted(bad.items())
        )
        ingest.lines = ingest.samples = ingest.events = ingest.checks = 0
        ingest.bad.clear()
        return samples
