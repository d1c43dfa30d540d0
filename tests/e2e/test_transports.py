"""Every protocol vector through every transport, end to end.

The vectors of tests/vectors/protocol.toml (the CONFORMANCE rows, the
design decisions and the real client datagrams) are sent to a real daemon
over UDP, TCP, a unix datagram socket and a unix stream socket. What the
daemon stored (read from its SQLite file after SIGTERM, through the
documented schema) must equal what the vectors' expected samples give
when aggregated; the bad lines must be counted under exactly the expected
reasons; the events and checks must be stored.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from aggregator.aggregate import Aggregator, snapshot
from aggregator.model import COUNTER, DISTRIBUTION_TYPES, GAUGE, SET, Sample, SeriesKey
from aggregator.sketch import SetState, merge_blobs

from ..test_protocol import load_vectors
from .conftest import DaemonFactory
from .harness import Daemon, config_text

SELF_PREFIX = "statsd_aggregator."
TRANSPORTS = ("udp", "tcp", "unix", "unix_stream")


def transport_vectors() -> list[dict[str, Any]]:
    """Vectors meaningful over every transport with the default configuration."""
    return [
        v
        for v in load_vectors()
        if v.get("all_transports") and not v.get("transport_only") and v.get("clean_names", True)
    ]


def vector_bytes(vector: dict[str, Any]) -> bytes:
    if "input_hex" in vector:
        return bytes.fromhex(vector["input_hex"])
    data: bytes = vector["input"].encode()
    return data


def expected_samples(vectors: list[dict[str, Any]]) -> list[Sample]:
    return [
        Sample(
            s["name"],
            s["type"],
            tuple((k, v) for k, v in s["tags"]),
            s["value"],
            s["rate"],
            s.get("timestamp"),
            s["delta"],
        )
        for v in vectors
        for s in v["samples"]
    ]


Summary = dict[SeriesKey, tuple[float, ...]]


def summarise_expected(samples: list[Sample]) -> Summary:
    """Aggregate the expected samples with the pure aggregator, over one window."""
    timestamped = {s[:3] for s in samples if s.timestamp is not None}
    aggregator = Aggregator(1, [50.0])
    aggregator.open(0)
    aggregator.add(s for s in samples if s[:3] not in timestamped)
    closed = aggregator.swap(1)
    rows: dict[SeriesKey, list[tuple[float, float, float, float, float, bytes | None]]] = {}
    for window in closed:
        for r in snapshot(window, [50.0]):
            rows.setdefault((r.name, r.type, r.tags), []).append(
                (r.count, r.sum, r.min, r.max, r.last, r.state)
            )
    return {key: _summary(key[1], parts) for key, parts in rows.items()}


def _summary(
    type_code: str, parts: list[tuple[float, float, float, float, float, bytes | None]]
) -> tuple[float, ...]:
    if type_code == COUNTER:
        return (round(sum(p[1] for p in parts), 9),)
    if type_code == GAUGE:
        return (parts[-1][4],)
    if type_code == SET:
        blob = merge_blobs(SET, [p[5] for p in parts])
        return (float(SetState.from_bytes(blob).cardinality()) if blob else 0.0,)
    assert type_code in DISTRIBUTION_TYPES
    return (
        round(sum(p[0] for p in parts), 9),
        round(sum(p[1] for p in parts), 9),
        min(p[2] for p in parts),
        max(p[3] for p in parts),
    )


def summarise_stored(db: Path) -> tuple[Summary, Counter[str]]:
    """Per-series totals at the flush resolution, and the bad-line reasons counted."""
    conn = sqlite3.connect(db)
    try:
        finest = conn.execute("SELECT MIN(resolution) FROM tiers").fetchone()[0]
        rows = conn.execute(
            "SELECT s.name, s.type, s.tags, r.count, r.sum, r.min, r.max, r.last, r.state "
            "FROM rollups r JOIN series s ON s.id = r.series_id "
            "WHERE r.resolution = ? ORDER BY r.ts",
            (finest,),
        ).fetchall()
    finally:
        conn.close()
    grouped: dict[SeriesKey, list[tuple[float, float, float, float, float, bytes | None]]] = {}
    reasons: Counter[str] = Counter()
    for name, type_code, tags, count, total, low, high, last, state in rows:
        key_tags = tuple((k, v) for k, v in json.loads(tags))
        if name == SELF_PREFIX + "bad_lines_by_reason":
            reasons[dict(key_tags)["reason"]] += int(total)
            continue
        if name.startswith(SELF_PREFIX):
            continue
        grouped.setdefault((name, type_code, key_tags), []).append(
            (count, total, low, high, last, state)
        )
    return {key: _summary(key[1], parts) for key, parts in grouped.items()}, reasons


def send(daemon: Daemon, transport: str, payloads: list[bytes]) -> None:
    if transport == "udp":
        daemon.send_udp(*payloads)
    elif transport == "unix":
        daemon.send_unix(*payloads)
    else:
        stream = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in payloads)
        if transport == "tcp":
            daemon.send_tcp(stream)
        else:
            daemon.send_unix_stream(stream)


def start_on(start_daemon: DaemonFactory, tmp_path: Path, transport: str) -> Daemon:
    listen = {"udp": "", "tcp": "", "http": "127.0.0.1:0"}
    if transport in ("udp", "tcp"):
        listen[transport] = "127.0.0.1:0"
    else:
        listen[transport] = str(tmp_path / f"{transport}.sock")
    return start_daemon(config_text(flush_interval=1, **listen))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_vector_over(start_daemon: DaemonFactory, tmp_path: Path, transport: str) -> None:
    vectors = transport_vectors()
    assert len(vectors) > 200
    daemon = start_on(start_daemon, tmp_path, transport)
    send(daemon, transport, [vector_bytes(v) for v in vectors])

    lines = sum(v["lines"] for v in vectors)
    daemon.wait_health("lines_received", lines)
    assert daemon.health()["lines_received"] == lines
    assert daemon.stop() == 0

    stored, reasons = summarise_stored(daemon.db)
    expected = summarise_expected(expected_samples(vectors))
    timestamped = {s[:3] for s in expected_samples(vectors) if s.timestamp is not None}
    assert {k: v for k, v in stored.items() if k not in timestamped} == expected
    assert reasons == Counter(reason for v in vectors for reason in v["bad"])

    # Events and checks are kept for the longest retention (2 years by
    # default): those dated earlier by their d: field go at the next prune,
    # which runs at most once a minute, and on the first write after a start.
    # The stream's lines may have spanned two flushes, the later one within
    # the minute of the earlier one's prune: wait for the restarted daemon's
    # first flush.
    horizon = time.time() - 2 * 365 * 86400
    daemon.start()
    daemon.wait_health("flushes", 1)
    events = daemon.get("/api/v1/events", {"from": "0"})["events"]
    assert Counter((e["title"], e["text"]) for e in events) == Counter(
        (e["title"], e["text"])
        for v in vectors
        for e in v["events"]
        if e.get("timestamp", horizon + 1) > horizon
    )
    checks = daemon.get("/api/v1/checks")["checks"]
    latest = {  # the latest status of each (name, host, tags) is kept
        (c["name"], c["host"], str(c["tags"])): c["status"]
        for v in vectors
        for c in v["checks"]
        if c.get("timestamp", horizon + 1) > horizon
    }
    assert sorted((c["name"], c["status"]) for c in checks) == sorted(
        (name, status) for (name, _, _), status in latest.items()
    )


def full_datagram(size: int = 65507) -> tuple[bytes, int]:
    """A datagram of the largest UDP size made of valid counter lines."""
    lines: list[bytes] = []
    length = 0
    i = 0
    while True:
        line = b"big.c%d:1|c" % (i % 10)
        if length + len(line) + (1 if lines else 0) > size:
            break
        length += len(line) + (1 if lines else 0)
        lines.append(line)
        i += 1
    return b"\n".join(lines), len(lines)


@pytest.mark.parametrize("transport", ["udp", "unix"])
def test_a_64_kib_datagram_counts_every_line(
    start_daemon: DaemonFactory, tmp_path: Path, transport: str
) -> None:
    daemon = start_on(start_daemon, tmp_path, transport)
    datagram, count = full_datagram()
    assert len(datagram) > 65000
    send(daemon, transport, [datagram])
    daemon.wait_health("lines_received", count)
    for i in range(10):
        expected = len(range(i, count, 10))
        daemon.wait_value(f"big.c{i}", expected)
    assert daemon.health()["bad_lines"] == 0
