"""Where aggregated data goes besides SQLite: /metrics, carbon, another StatsD.

The daemon holds one :class:`Outputs` and calls it at three points:

* ``relay`` (None unless ``[forward.relay]`` is configured) gets every raw
  datagram or stream chunk at ingest, before parsing;
* ``publish`` runs in the writer thread with each flush's rollups: it
  updates the Prometheus exposition and queues the Graphite lines;
* ``window_samples`` gives the self metrics of these outputs, added to each
  window like the daemon's other health figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .config import Config
from .forward import TcpSender, UdpSender
from .graphite import Naming, graphite_lines
from .model import COUNTER, GAUGE, Rollup, Sample, SeriesKey
from .prometheus import Exposition
from .selfstats import PREFIX

log = logging.getLogger(__name__)


class Relay:
    """Repeats raw received lines to another StatsD/DogStatsD server."""

    def __init__(self, address: str, protocol: str, buffer: int) -> None:
        self.protocol = protocol
        self._udp: UdpSender | None = None
        self._tcp: TcpSender | None = None
        if protocol == "udp":
            self._udp = UdpSender(address)
        else:
            self._tcp = TcpSender("relay", address, buffer, confirm=False, unit="bytes")

    def start(self) -> None:
        if self._tcp is not None:
            self._tcp.start()

    def send(self, data: bytes) -> None:
        """On the event loop: never blocks (a UDP send, or a queue append)."""
        if self._udp is not None:
            self._udp.send(data)
        elif self._tcp is not None:
            self._tcp.put(data if data.endswith(b"\n") else data + b"\n", len(data))

    def counts(self) -> tuple[int, int]:
        """(bytes sent, bytes dropped) since start."""
        sender: UdpSender | TcpSender | None = self._udp or self._tcp
        return (sender.sent, sender.dropped) if sender is not None else (0, 0)

    def close(self, timeout: float) -> None:
        if self._udp is not None:
            self._udp.close(timeout)
        if self._tcp is not None:
            self._tcp.close(timeout)


class Outputs:
    def __init__(self, config: Config, clock: Callable[[], float]) -> None:
        self.exposition = Exposition(config.prometheus_expire_after, clock)
        self.naming = Naming(config.flush_interval, config.graphite_prefix, config.graphite_tags)
        self.graphite: TcpSender | None = None
        if config.graphite_enabled:
            self.graphite = TcpSender(
                "graphite", config.graphite_address, config.graphite_buffer, confirm=True
            )
        self.relay: Relay | None = None
        if config.relay_enabled:
            self.relay = Relay(config.relay_address, config.relay_protocol, config.relay_buffer)
        self._seen: dict[str, int] = {}

    def start(self) -> None:
        if self.graphite is not None:
            self.graphite.start()
        if self.relay is not None:
            self.relay.start()

    def publish(self, touched: set[SeriesKey], rollups: Sequence[Rollup]) -> None:
        """Writer thread, once per flush, with the gauges that received samples
        in it. Never raises: storage must still happen."""
        try:
            self.exposition.update(rollups, touched)
        except Exception:
            log.exception("updating /metrics failed")
        if self.graphite is not None:
            try:
                lines = graphite_lines(rollups, self.naming)
                if lines:
                    self.graphite.put(("\n".join(lines) + "\n").encode(), len(lines))
            except Exception:
                log.exception("formatting the Graphite lines failed")

    def _delta(self, name: str, total: int) -> Sample:
        """A counter sample: how much `total` grew since the last window."""
        grown = total - self._seen.get(name, 0)
        self._seen[name] = total
        return Sample(PREFIX + name, COUNTER, (), float(grown))

    def window_samples(self) -> list[Sample]:
        """Self metrics of the outputs for the window about to close (event loop)."""
        exposition = self.exposition
        samples = [
            Sample(PREFIX + "prometheus_series", GAUGE, (), float(exposition.series)),
            Sample(PREFIX + "prometheus_dropped_series", GAUGE, (), float(exposition.dropped)),
        ]
        graphite = self.graphite
        if graphite is not None:
            samples += [
                self._delta("graphite_lines_sent", graphite.sent),
                self._delta("graphite_lines_dropped", graphite.dropped),
                self._delta("graphite_errors", graphite.errors),
                Sample(PREFIX + "graphite_lines_queued", GAUGE, (), float(graphite.pending)),
            ]
        if self.relay is not None:
            sent, dropped = self.relay.counts()
            samples += [
                self._delta("relay_bytes_sent", sent),
                self._delta("relay_bytes_dropped", dropped),
            ]
        return samples

    def close(self, timeout: float) -> None:
        """After the final flush: give carbon and the relay one last chance."""
        if self.graphite is not None:
            self.graphite.close(timeout)
        if self.relay is not None:
            self.relay.close(timeout)
