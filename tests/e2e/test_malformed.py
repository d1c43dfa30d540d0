"""Thousands of malformed inputs mixed with valid ones, over UDP and TCP.

Every valid line must count exactly, every malformed line must be counted
once in statsd_aggregator.bad_lines (SPEC §3: "A malformed line is counted
and skipped; the rest of the datagram is kept"), and the daemon must keep
serving other clients throughout.

The garbage is built so that no line of it can be valid: random bytes with
every "|" removed (a metric, event or service check needs one), so the number
of bad lines is known exactly: the non-empty lines of what was sent.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable

import pytest

from .harness import Daemon, udp_socket_stats, wait_for

DaemonFactory = Callable[..., Daemon]

pytestmark = pytest.mark.e2e

#: Lines that each must be exactly one bad line (CONFORMANCE.md).
CRAFTED_BAD = [
    b"foo",
    b"foo:|c",
    b":1|c",
    b"foo:1|x",
    b"foo:1|r",
    b"foo:1|a",
    b"foo:abc|c",
    b"foo:nan|c",
    b"foo:NaN|ms",
    b"foo:inf|g",
    b"foo:-inf|h",
    b"foo:Infinity|d",
    b"foo:1_000|c",
    b"foo:1|c|@0",
    b"foo:1|c|@-1",
    b"foo:1|c|@2",
    b"foo:1|c|@abc",
    b"foo:1|c|@nan",
    b"foo:1|ms|@0",
    b"foo:1|c|Tsoon",
    b"foo,a=b;c=d:1|c",
    b"_sc|db|7",
    b"_sc|db",
    b"_e{5,4}:tit|text",
    b"_e{x,y}:title|text",
    b"foo:1",
    b"\xff\xfe\xfd:1|c",
    b"caf\xe9:1|c",  # latin-1, not UTF-8
]


def garbage_line(rng: random.Random, size: int) -> bytes:
    """Random bytes that can never be a valid line: no "|" and no "\\n"."""
    return rng.randbytes(size).replace(b"|", b"x").replace(b"\n", b"y")


def bad_lines_in(data: bytes) -> int:
    """The non-empty lines of garbage (one trailing \\r per line is dropped)."""
    count = 0
    for line in data.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line:
            count += 1
    return count


class Tally:
    """What was sent that must be counted."""

    def __init__(self) -> None:
        self.bad = 0
        self.udp = 0
        self.mixed = 0
        self.tcp = 0
        self.timer = 0
        self.members: set[str] = set()


def udp_flood(d: Daemon, rng: random.Random, tally: Tally, datagrams: int, deadline: float) -> None:
    """`datagrams` datagrams of every kind of garbage, valid ones interleaved.

    Paced on the daemon's receive queue (/proc/net/udp), so the kernel never
    drops a datagram and the counts can be exact.
    """
    _, port = d.addr("udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        target = d.addr("udp")
        for i in range(datagrams):
            assert time.monotonic() < deadline, f"UDP flood too slow at datagram {i}"
            kind = i % 10
            if kind == 0:  # valid alone
                data = b"mal.udp:1|c"
                tally.udp += 1
            elif kind == 1:  # valid lines around garbage in one datagram
                junk = garbage_line(rng, rng.randint(1, 300))
                member = f"m{i % 97}"
                data = b"mal.mixed:1|c\n" + junk + b"\nmal.set:" + member.encode() + b"|s\n"
                data += b"mal.t:" + str(i % 50).encode() + b"|ms"
                tally.mixed += 1
                tally.members.add(member)
                tally.timer += 1
                tally.bad += bad_lines_in(junk)
            elif kind == 2:  # crafted bad lines, with a valid one in the middle
                bad = rng.sample(CRAFTED_BAD, 3)
                data = b"\n".join([bad[0], b"mal.mixed:1|c", bad[1], bad[2]])
                tally.mixed += 1
                tally.bad += 3
            elif kind == 3 and i % 200 == 3:  # a huge line of garbage, 60 KiB
                data = garbage_line(rng, 60 * 1024)
                tally.bad += 1
            else:  # random bytes, several "lines", often invalid UTF-8
                parts = [garbage_line(rng, rng.randint(0, 200)) for _ in range(rng.randint(1, 4))]
                data = b"\n".join(parts)
                tally.bad += bad_lines_in(data)
            sock.sendto(data, target)
            if i % 50 == 49:
                wait_for(lambda: udp_socket_stats(port)[0] == 0, 10, "the UDP queue to drain")


def tcp_stream(d: Daemon, rng: random.Random, tally: Tally, lines: int) -> bytes:
    """One connection's worth of interleaved valid and malformed lines."""
    out = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            out.append(b"mal.tcp:1|c")
            tally.tcp += 1
        elif kind == 1:
            line = rng.choice(CRAFTED_BAD)
            out.append(line)
            tally.bad += 1
        elif kind == 2:
            junk = garbage_line(rng, rng.randint(1, 300))
            out.append(junk)
            tally.bad += bad_lines_in(junk)
        else:
            out.append(b"mal.tcp:2|c|#k:v")
            tally.tcp += 2
    return b"\n".join(out) + b"\n"


def test_malformed_input_is_counted_and_valid_input_is_exact(start_daemon: DaemonFactory) -> None:
    d = start_daemon()
    rng = random.Random(20261126)
    tally = Tally()
    deadline = time.monotonic() + 60
    _, udp_port = d.addr("udp")

    with socket.create_connection(d.addr("tcp"), timeout=5) as good_tcp:
        # TCP: a long-lived connection, fed in random-sized pieces between UDP bursts.
        stream = tcp_stream(d, rng, tally, 2000)
        pieces = []
        at = 0
        while at < len(stream):
            size = rng.randint(1, 4096)
            pieces.append(stream[at : at + size])
            at += size

        udp_flood(d, rng, tally, 1500, deadline)
        good_tcp.sendall(b"".join(pieces[: len(pieces) // 2]))

        # An over-long line on another connection: counted once, that
        # connection closed, the other one unaffected.
        with socket.create_connection(d.addr("tcp"), timeout=5) as long_tcp:
            # The daemon may close it while we are still writing.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                long_tcp.sendall(b"mal.long:" + b"9" * (80 * 1024))
            tally.bad += 1

            def closed() -> bool:
                try:
                    return long_tcp.recv(1) == b""
                except ConnectionResetError:
                    return True

            wait_for(closed, 10, "the daemon to close the over-long connection")

        udp_flood(d, rng, tally, 1500, deadline)
        good_tcp.sendall(b"".join(pieces[len(pieces) // 2 :]))

    # Other clients are served: a fresh UDP and TCP client, and the API.
    d.send_udp(b"mal.after:1|c")
    d.send_tcp(b"mal.after:2|c\n")
    assert d.health()["status"] == "ok"

    d.wait_value("mal.after", 3, timeout=20)
    d.wait_value("mal.udp", tally.udp, timeout=20)
    d.wait_value("mal.tcp", tally.tcp, timeout=20)
    d.wait_value("mal.mixed", tally.mixed, timeout=20)
    assert d.value("mal.tcp", tag="k:v") == tally.tcp - 500  # 500 lines of +1 have no tag
    d.wait_value("mal.set", len(tally.members))
    d.wait_value("mal.t", tally.timer, stat="count")
    d.wait_value("statsd_aggregator.bad_lines", tally.bad, timeout=20)
    assert udp_socket_stats(udp_port)[1] == 0, "the kernel dropped datagrams: counts unreliable"
    assert tally.bad > 5000
