"""Senders to other servers: carbon (Graphite) and another StatsD (the relay).

Nothing here runs on the event loop for longer than a queue append or one
non-blocking ``send``:

* :class:`TcpSender` owns one thread and one outgoing TCP connection. Its
  queue is bounded in *units* (lines for carbon, bytes for the relay); while
  the peer is unreachable it keeps what fits and drops the oldest beyond,
  counting every dropped unit. Failed batches go back to the front of the
  queue and are retried with a capped backoff.
  With ``confirm=True`` (carbon) it opens one connection per batch, half-
  closes it and waits for the peer to close in turn: a plaintext receiver
  closes only after it has read every byte, so a batch counts as sent only
  once carbon has it. A batch cut short is sent again whole; carbon keeps
  one value per (path, timestamp), so a repeat changes nothing.
  With ``confirm=False`` (the relay) the connection stays open.
* :class:`UdpSender` sends each datagram at once from the caller's thread on
  a non-blocking connected socket; what the kernel refuses is counted as
  dropped.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator

from .config import split_address

log = logging.getLogger(__name__)

#: seconds to wait for a connect, a send, or the peer's close
TIMEOUT = 5.0
#: first and largest pause between attempts while the peer is down
RETRY_FIRST = 0.1
RETRY_MAX = 2.0
#: largest batch written on one connection, in bytes
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: largest datagram the UDP relay builds from stream input (Etsy/DogStatsD's
#: default UDP payload, which fits an Ethernet MTU)
MAX_DATAGRAM = 1432


def _resolve(address: str, kind: socket.SocketKind) -> tuple[socket.AddressFamily, tuple[str, int]]:
    host, port = split_address(address)
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=kind)[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


class TcpSender:
    """Byte chunks to one TCP address from a thread of its own (see the module doc)."""

    def __init__(
        self,
        name: str,
        address: str,
        capacity: int,
        *,
        confirm: bool,
        unit: str = "lines",
        timeout: float = TIMEOUT,
    ) -> None:
        self.name = name
        self.unit = unit
        self.address = address
        self.capacity = capacity
        self.confirm = confirm
        self.timeout = timeout
        self.sent = 0  # units the peer has (confirm) or the kernel took (no confirm)
        self.dropped = 0  # units dropped: queue full, or still queued at close
        self.errors = 0  # failed connections or sends
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self._queued = 0  # units in _queue
        self._cond = threading.Condition()
        self._closing = False
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"forward-{name}", daemon=True)

    @property
    def pending(self) -> int:
        """Units waiting to be sent."""
        return self._queued

    def start(self) -> None:
        self._thread.start()

    def put(self, chunk: bytes, units: int) -> None:
        """Queue one chunk worth `units`; drop the oldest past the capacity."""
        if not chunk:
            return
        with self._cond:
            self._queue.append((chunk, units))
            self._queued += units
            self._trim()
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """One last attempt to send what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            if self._queued:
                log.warning(
                    "%s: %d %s not sent to %s at shutdown",
                    self.name,
                    self._queued,
                    self.unit,
                    self.address,
                )
                self.dropped += self._queued
                self._queue.clear()
                self._queued = 0

    # ------------------------------------------------------------ the thread

    def _trim(self) -> None:
        """Called with the lock held."""
        while self._queued > self.capacity and self._queue:
            _, units = self._queue.popleft()
            self._queued -= units
            self.dropped += units

    def _take(self) -> list[tuple[bytes, int]]:
        """Called with the lock held: the oldest chunks, up to MAX_BATCH_BYTES."""
        batch: list[tuple[bytes, int]] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0][0]) <= MAX_BATCH_BYTES):
            chunk, units = self._queue.popleft()
            self._queued -= units
            size += len(chunk)
            batch.append((chunk, units))
        return batch

    def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                closing = self._closing
                batch = self._take()
            try:
                self._send(b"".join(chunk for chunk, _ in batch))
            except OSError as exc:
                self.errors += 1
                self._disconnect()
                with self._cond:
                    self._queue.extendleft(reversed(batch))
                    self._queued += sum(units for _, units in batch)
                    self._trim()
                    if closing:
                        break
                    log.debug(
                        "%s: %s unreachable (%s); retry in %.1fs",
                        self.name,
                        self.address,
                        exc,
                        delay,
                    )
                    self._cond.wait_for(lambda: self._closing, delay)
                delay = min(delay * 2, RETRY_MAX)
            else:
                self.sent += sum(units for _, units in batch)
                delay = RETRY_FIRST
        self._disconnect()

    def _send(self, data: bytes) -> None:
        if self.confirm:
            family, addr = _resolve(self.address, socket.SOCK_STREAM)
            with socket.socket(family, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout)
                conn.connect(addr)
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                # The peer closes once it has read everything; bounded by the timeout.
                deadline = time.monotonic() + self.timeout
                while conn.recv(65536):
                    if time.monotonic() > deadline:
                        raise TimeoutError("peer kept the connection open")
            return
        sock: socket.socket | None = self._sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            # A StatsD server never writes: readable means it closed (or reset).
            self._disconnect()
            sock = None
        if sock is None:
            family, addr = _resolve(self.address, socket.SOCK_STREAM)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(addr)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        sock.sendall(data)

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def split_datagrams(data: bytes, limit: int = MAX_DATAGRAM) -> Iterator[bytes]:
    """Whole lines packed into datagrams of at most `limit` bytes (a longer line alone)."""
    if len(data) <= limit:
        yield data
        return
    packet: list[bytes] = []
    size = 0
    for line in data.split(b"\n"):
        if not line:
            continue
        if packet and size + 1 + len(line) > limit:
            yield b"\n".join(packet)
            packet, size = [], 0
        size += len(line) + (1 if packet else 0)
        packet.append(line)
    if packet:
        yield b"\n".join(packet)


class UdpSender:
    """Datagrams to one address from the caller's thread, never blocking."""

    def __init__(self, address: str) -> None:
        self.address = address
        family, addr = _resolve(address, socket.SOCK_DGRAM)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.connect(addr)
        self.sent = 0  # bytes
        self.dropped = 0  # bytes

    @property
    def pending(self) -> int:
        return 0

    def send(self, data: bytes) -> None:
        for packet in split_datagrams(data):
            try:
                self._sock.send(packet)
            except OSError:  # full buffer, or the peer's port was unreachable
                self.dropped += len(packet)
            else:
                self.sent += len(packet)

    def close(self, timeout: float) -> None:
        self._sock.close()
