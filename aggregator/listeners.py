"""asyncio listeners: UDP, TCP, unix datagram and unix stream sockets.

Listeners only frame bytes: datagrams are handed over whole (those read in
one wakeup together, as a list); a stream is cut after its last newline and
the complete lines are handed over. They do not parse. With ingest workers
the datagram sockets are bound here and read by the workers (worker.py). A stream line longer
than the limit is counted as a bad line and its connection closed; other
connections are unaffected.

Limits (limits.Limits, shared and updated in place on SIGHUP): a datagram
larger than ``max_datagram_size`` is dropped and counted; past
``max_connections`` open stream connections a new one is closed at once;
a stream connection that completes no line for ``idle_timeout`` seconds is
closed (a silent or trickling client cannot hold its buffer and slot
forever). Unix socket files get the mode ``listen.unix_mode`` from the
moment they exist (the socket is fchmod-ed before bind).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

from .config import split_address
from .fastpath import native
from .limits import Limits

log = logging.getLogger(__name__)

#: called with a run of complete newline-terminated stream lines
Sink = Callable[[bytes], None]
#: called with the datagrams read in one wakeup (at least one)
DatagramSink = Callable[[list[bytes]], None]
#: datagrams taken per wakeup at most, so that one busy socket cannot starve
#: the rest of the event loop (the HTTP API, the flush timer)
READ_BATCH = 256


@dataclass(slots=True)
class ListenerStats:
    """Counters owned by the listeners; read by the self-metrics at flush."""

    packets: int = 0
    bytes: int = 0
    too_long: int = 0
    connections: int = 0
    too_large: int = 0  # datagrams over limits.max_datagram_size, dropped
    refused: int = 0  # stream connections closed at once: limits.max_connections
    idle_closed: int = 0  # stream connections closed by limits.idle_timeout


class DatagramReader:
    """Reads a datagram socket straight from the event loop, in batches.

    On each wakeup it takes up to READ_BATCH datagrams (one recvmmsg call
    with the C extension, else plain ``recv`` calls) and hands them over in
    one call, so that the parser and the
    aggregator pay their per-call costs once per batch instead of once per
    datagram. (An asyncio datagram transport would call back once per
    datagram, with a freshly made address tuple the daemon does not use.)

    A datagram over ``limits.max_datagram_size`` is dropped and counted:
    reads ask for one byte more than the limit, so a bigger one shows.
    """

    def __init__(
        self,
        sock: socket.socket,
        sink: DatagramSink,
        stats: ListenerStats,
        name: str,
        limits: Limits,
    ) -> None:
        self._sock = sock
        self._sink = sink
        self._stats = stats
        self._name = name
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        if native is not None:
            self._read_batch(native)
            return
        recv = self._sock.recv
        stats = self._stats
        limit = self._limits.max_datagram_size
        batch: list[bytes] = []
        for _ in range(READ_BATCH):
            try:
                data = recv(limit + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("%s socket error: %s", self._name, exc)
                break
            stats.packets += 1
            stats.bytes += len(data)
            if len(data) > limit:
                stats.too_large += 1
            else:
                batch.append(data)
        if batch:
            self._sink(batch)

    def _read_batch(self, fast: ModuleType) -> None:
        """The same read as one recvmmsg(2) call (the C extension)."""
        try:
            batch, packets, size, too_large = fast.recv_batch(
                self._sock.fileno(), READ_BATCH, self._limits.max_datagram_size
            )
        except OSError as exc:
            log.debug("%s socket error: %s", self._name, exc)
            return
        stats = self._stats
        stats.packets += packets
        stats.bytes += size
        stats.too_large += too_large
        if batch:
            self._sink(batch)

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


class _StreamProtocol(asyncio.Protocol):
    """Newline-delimited lines over TCP or a unix stream socket."""

    def __init__(self, sink: Sink, stats: ListenerStats, max_line: int, limits: Limits) -> None:
        self._sink = sink
        self._stats = stats
        self._max_line = max_line
        self._limits = limits
        self._pending = b""
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._last_line = 0.0  # loop time of the last complete line
        self._idle: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        self._transport = transport  # type: ignore[assignment]
        if self._stats.connections >= self._limits.max_connections:
            self._stats.refused += 1
            transport.close()
            return
        self._counted = True
        self._stats.connections += 1
        self._last_line = self._loop.time()
        self._idle = self._loop.call_later(self._limits.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        """Close a connection that completed no line for idle_timeout; else look again later.

        One timer per connection per timeout, not one per chunk received.
        """
        timeout = self._limits.idle_timeout
        left = self._last_line + timeout - self._loop.time()
        if left > 0:
            self._idle = self._loop.call_later(left, self._check_idle)
            return
        self._idle = None
        self._stats.idle_closed += 1
        log.debug("closing a stream connection idle for %ss", timeout)
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return  # refused at connection_made
        if self._idle is not None:
            self._idle.cancel()
        self._stats.connections -= 1
        if self._pending:
            # A last line without its newline still counts (CONFORMANCE:
            # "no trailing newline, last in a datagram" applies to streams too).
            self._deliver(self._pending)
            self._pending = b""

    def data_received(self, data: bytes) -> None:
        self._stats.bytes += len(data)
        buffer = self._pending + data if self._pending else data
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self._pending = buffer
        else:
            self._last_line = self._loop.time()
            self._pending = buffer[cut + 1 :]
            self._deliver(buffer[: cut + 1])
        if len(self._pending) > self._max_line:
            self._stats.too_long += 1
            self._pending = b""
            if self._transport is not None:
                self._transport.close()

    def _deliver(self, chunk: bytes) -> None:
        too_long = 0
        if len(chunk) > self._max_line:
            kept = [line for line in chunk.split(b"\n") if len(line) <= self._max_line]
            too_long = chunk.count(b"\n") + 1 - len(kept)
            chunk = b"\n".join(kept)
        self._stats.packets += 1
        self._sink(chunk)
        if too_long:
            self._stats.too_long += too_long
            if self._transport is not None:
                self._transport.close()


@dataclass(slots=True)
class Listeners:
    """The bound sockets; `addresses` holds the real addresses for the ready line."""

    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    readers: list[DatagramReader] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    unix_paths: list[str] = field(default_factory=list)
    #: bound datagram sockets that others read (the ingest workers), by name
    handed_over: list[tuple[str, socket.socket]] = field(default_factory=list)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for reader in self.readers:
            reader.close()
        for _, sock in self.handed_over:
            sock.close()

    async def wait_closed(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for path in self.unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def format_address(sockname: object) -> str:
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(sockname)


def _remove_stale_socket(path: str) -> None:
    """A unix socket file left by a killed daemon would make bind() fail."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


def _bind_unix(sock: socket.socket, path: str, mode: int) -> None:
    """Bind a unix socket whose file never has more rights than ``mode``.

    Linux creates the file with the socket inode's mode (minus the umask),
    so fchmod before bind closes the window between bind and chmod; the
    chmod after bind then sets exactly ``mode`` whatever the umask.
    """
    os.fchmod(sock.fileno(), mode)
    sock.bind(path)
    os.chmod(path, mode)


def _datagram_socket(
    family: int,
    address: tuple[str, int] | str,
    receive_buffer: int,
    name: str,
    unix_mode: int = 0o660,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # No SO_REUSEADDR: on Linux it lets a second daemon bind the same UDP
        # port and silently take part of the traffic; bind() must fail instead.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Linux reports twice the granted size (it counts bookkeeping too).
        if granted // 2 < receive_buffer:
            log.warning(
                "%s receive buffer is %d bytes, less than the %d asked for; "
                "raise net.core.rmem_max (sysctl -w net.core.rmem_max=%d) to avoid drops",
                name,
                granted // 2,
                receive_buffer,
                receive_buffer,
            )
        if isinstance(address, str):
            _bind_unix(sock, address, unix_mode)
        else:
            sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _stream_unix_socket(path: str, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_unix(sock, path, mode)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start(
    *,
    udp: str,
    tcp: str,
    unix: str,
    unix_stream: str,
    sink: Sink,
    datagram_sink: DatagramSink,
    stats: ListenerStats,
    receive_buffer: int,
    max_line: int,
    limits: Limits | None = None,
    unix_mode: int = 0o660,
    hand_over_datagrams: bool = False,
) -> Listeners:
    """Bind every configured listener; an empty address disables one.

    ``hand_over_datagrams``: the datagram sockets are bound but not read;
    they are left in ``handed_over`` for the ingest workers.
    """
    loop = asyncio.get_running_loop()
    bound = Listeners()
    limits = limits if limits is not None else Limits()
    try:
        if udp:
            host, port = split_address(udp)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = _datagram_socket(family, (host, port), receive_buffer, "UDP")
            if hand_over_datagrams:
                bound.handed_over.append(("udp", sock))
            else:
                bound.readers.append(DatagramReader(sock, datagram_sink, stats, "udp", limits))
            bound.addresses["udp"] = format_address(sock.getsockname())
        if tcp:
            host, port = split_address(tcp)
            server = await loop.create_server(
                lambda: _StreamProtocol(sink, stats, max_line, limits),
                host,
                port,
                reuse_address=True,
            )
            bound.servers.append(server)
            bound.addresses["tcp"] = format_address(server.sockets[0].getsockname())
        if unix:
            _remove_stale_socket(unix)
            sock = _datagram_socket(
                socket.AF_UNIX, unix, receive_buffer, "unix datagram", unix_mode
            )
            if hand_over_datagrams:
                bound.handed_over.append(("unix", sock))
            else:
                bound.readers.append(DatagramReader(sock, datagram_sink, stats, "unix", limits))
            bound.unix_paths.append(unix)
            bound.addresses["unix"] = unix
        if unix_stream:
            _remove_stale_socket(unix_stream)
            server = await loop.create_unix_server(
                lambda: _StreamProtocol(sink, stats, max_line, limits),
                sock=_stream_unix_socket(unix_stream, unix_mode),
            )
            bound.servers.append(server)
            bound.unix_paths.append(unix_stream)
            bound.addresses["unix_stream"] = unix_stream
    except BaseException:
        bound.close()
        await bound.wait_closed()
        raise
    return bound
