"""asyncio listeners: UDP, TCP, unix datagram and unix stream sockets.

Listeners only frame bytes: a datagram is handed over whole; a stream is
cut after its last newline and the complete lines are handed over. They do
not parse. A stream line longer than the limit is counted as a bad line and
its connection closed; other connections are unaffected.
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

from .config import split_address

log = logging.getLogger(__name__)

#: called with one datagram, or with a run of complete newline-terminated lines
Sink = Callable[[bytes], None]


@dataclass(slots=True)
class ListenerStats:
    """Counters owned by the listeners; read by the self-metrics at flush."""

    packets: int = 0
    bytes: int = 0
    too_long: int = 0
    connections: int = 0


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, sink: Sink, stats: ListenerStats, transport_name: str) -> None:
        self._sink = sink
        self._stats = stats
        self._name = transport_name

    def datagram_received(self, data: bytes, addr: object) -> None:
        stats = self._stats
        stats.packets += 1
        stats.bytes += len(data)
        self._sink(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s socket error: %s", self._name, exc)


class _StreamProtocol(asyncio.Protocol):
    """Newline-delimited lines over TCP or a unix stream socket."""

    def __init__(self, sink: Sink, stats: ListenerStats, max_line: int) -> None:
        self._sink = sink
        self._stats = stats
        self._max_line = max_line
        self._pending = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        self._transport = transport  # type: ignore[assignment]
        self._stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
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
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    unix_paths: list[str] = field(default_factory=list)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for transport in self.transports:
            transport.close()

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


def _datagram_socket(
    family: int, address: tuple[str, int] | str, receive_buffer: int, name: str
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        sock.bind(address)
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
    stats: ListenerStats,
    receive_buffer: int,
    max_line: int,
) -> Listeners:
    """Bind every configured listener; an empty address disables one."""
    loop = asyncio.get_running_loop()
    bound = Listeners()
    try:
        if udp:
            host, port = split_address(udp)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = _datagram_socket(family, (host, port), receive_buffer, "UDP")
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _DatagramProtocol(sink, stats, "udp"), sock=sock
            )
            bound.transports.append(transport)
            bound.addresses["udp"] = format_address(transport.get_extra_info("sockname"))
        if tcp:
            host, port = split_address(tcp)
            server = await loop.create_server(
                lambda: _StreamProtocol(sink, stats, max_line), host, port, reuse_address=True
            )
            bound.servers.append(server)
            bound.addresses["tcp"] = format_address(server.sockets[0].getsockname())
        if unix:
            _remove_stale_socket(unix)
            sock = _datagram_socket(socket.AF_UNIX, unix, receive_buffer, "unix datagram")
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _DatagramProtocol(sink, stats, "unix"), sock=sock
            )
            bound.transports.append(transport)
            bound.unix_paths.append(unix)
            bound.addresses["unix"] = unix
        if unix_stream:
            _remove_stale_socket(unix_stream)
            server = await loop.create_unix_server(
                lambda: _StreamProtocol(sink, stats, max_line), unix_stream
            )
            bound.servers.append(server)
            bound.unix_paths.append(unix_stream)
            bound.addresses["unix_stream"] = unix_stream
    except BaseException:
        bound.close()
        await bound.wait_closed()
        raise
    return bound
