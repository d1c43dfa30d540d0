"""Senders to carbon and to another StatsD: packing, the bounded retry buffer
(what it keeps, what it drops and counts), confirmation and reconnection,
against receivers on loopback sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from aggregator.forward import TcpSender, UdpSender, split_datagrams

from .e2e.harness import wait_for

SPLITS = [
    ("short data goes whole", b"a:1|c\nb:2|c", 20, [b"a:1|c\nb:2|c"]),
    ("exactly the limit goes whole", b"a:1|c\nb:2|c", 11, [b"a:1|c\nb:2|c"]),
    ("lines packed up to the limit", b"a:1|c\nb:2|c\nc:3|c\n", 12, [b"a:1|c\nb:2|c", b"c:3|c"]),
    (
        "a line longer than the limit goes alone",
        b"a:1|c\nlong:12345|c\n",
        8,
        [b"a:1|c", b"long:12345|c"],
    ),
    ("empty lines are dropped", b"a:1|c\n\n\nb:2|c\n", 6, [b"a:1|c", b"b:2|c"]),
]


@pytest.mark.parametrize(
    ("data", "limit", "packets"), [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS]
)
def test_split_datagrams(data: bytes, limit: int, packets: list[bytes]) -> None:
    assert list(split_datagrams(data, limit)) == packets


class Receiver:
    """A TCP server on a port reserved now and opened by `listen()`: until then
    connections are refused. Keeps what each connection sent; closes a
    connection at EOF, or after its first read when `close_after_read`."""

    def __init__(self, close_after_read: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.close_after_read = close_after_read
        self.connections: list[bytes] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def listen(self) -> None:
        self.sock.listen()
        self.sock.settimeout(0.1)
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            index = len(self.connections)
            self.connections.append(b"")
            self._spawn(self._read, conn, index)

    def _read(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(0.1)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                self.connections[index] += data
                if self.close_after_read:
                    return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def lines(*names: str) -> bytes:
    return b"".join(f"{n} 1 1795721840\n".encode() for n in names)


def test_carbon_down_keeps_what_fits_drops_the_oldest_then_delivers(receiver: Receiver) -> None:
    sender = TcpSender("graphite", receiver.address, capacity=10, confirm=True)
    sender.start()
    a, b, c = (
        lines("a1", "a2", "a3", "a4"),
        lines("b1", "b2", "b3", "b4"),
        lines("c1", "c2", "c3", "c4"),
    )
    try:
        for chunk in (a, b, c):
            sender.put(chunk, 4)
        # 12 lines for a buffer of 10: the oldest flush goes, and is counted
        wait_for(lambda: sender.errors >= 1 and sender.dropped == 4, 10, "a refused send")
        assert (sender.sent, sender.pending) == (0, 8)
        receiver.listen()
        wait_for(lambda: sender.sent == 8, 10, "the buffered lines delivered")
        assert b"".join(receiver.connections) == b + c
        assert (sender.dropped, sender.pending) == (4, 0)
    finally:
        sender.close(5)
    assert sender.dropped == 4


def test_lines_still_queued_at_close_are_counted_as_dropped(receiver: Receiver) -> None:
    sender = TcpSender("graphite", receiver.address, capacity=100, confirm=True)
    sender.start()
    sender.put(lines("x", "y"), 2)
    wait_for(lambda: sender.errors >= 1, 10, "a refused send")
    sender.close(5)
    assert (sender.sent, sender.dropped, sender.pending) == (0, 2, 0)


def test_the_relay_connection_reconnects_after_the_peer_closes() -> None:
    server = Receiver(close_after_read=True)
    server.listen()
    sender = TcpSender("relay", server.address, capacity=1 << 20, confirm=False, unit="bytes")
    sender.start()
    try:
        sender.put(b"a:1|c\n", 6)
        wait_for(lambda: server.connections == [b"a:1|c\n"], 10, "the first line")
        # the server closed that connection after reading: the next line
        # must go over a new one, not into the dead socket
        wait_for(lambda: server._threads[-1].is_alive() is False, 10, "the server's close")
        sender.put(b"b:2|c\n", 6)
        wait_for(lambda: server.connections == [b"a:1|c\n", b"b:2|c\n"], 10, "the second line")
        assert (sender.sent, sender.dropped) == (12, 0)
    finally:
        sender.close(5)
        server.close()


def test_udp_sender_forwards_datagrams_and_packs_stream_chunks() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(5)
        sender = UdpSender(f"127.0.0.1:{sink.getsockname()[1]}")
        try:
            sender.send(b"a:1|c")
            big = b"".join(b"metric.%04d:1|c\n" % i for i in range(200))  # 3,200 bytes
            sender.send(big)
            got = [sink.recv(65536) for _ in range(4)]
        finally:
            sender.close(1)
    assert got[0] == b"a:1|c"
    assert all(len(p) <= 1432 for p in got[1:])
    assert b"\n".join(got[1:]) + b"\n" == big
    assert (sender.sent, sender.dropped) == (sum(map(len, got)), 0)
