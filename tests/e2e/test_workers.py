"""Ingest workers (listen.workers): processes that share the datagram sockets.

The daemon binds, the workers read; at each flush their windows are merged
into the daemon's. What a client sends must come out exactly as if one
process had read it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from aggregator import priority

from .conftest import DaemonFactory
from .harness import Daemon, config_text, nearest_rank, wait_for

WORKERS = re.compile(r"ingest workers reading the datagram sockets: pids \[(?P<pids>[\d, ]+)\]")


def with_workers(tmp_path: Path, count: int = 2, extra: str = "", **listen: str) -> str:
    return config_text(extra=extra, workers=count, unix=str(tmp_path / "dsd.sock"), **listen)


def worker_pids(daemon: Daemon) -> list[int]:
    for line in daemon.log:
        found = WORKERS.search(line)
        if found:
            return [int(pid) for pid in found["pids"].split(",")]
    raise AssertionError(f"no worker pids in the log: {daemon.log}")


def send_from_many_sockets(daemon: Daemon, datagrams: list[bytes], sockets: int = 8) -> None:
    """Round-robin over several client sockets, as many client processes would."""
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
    try:
        for n, datagram in enumerate(datagrams):
            clients[n % sockets].sendto(datagram, daemon.addr("udp"))
    finally:
        for client in clients:
            client.close()


def test_workers_read_every_type_exactly(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    d = start_daemon(config=with_workers(tmp_path))
    assert "workers=2" in d.log[-1]
    assert len(worker_pids(d)) == 2
    latencies = [float(v % 97) for v in range(600)]
    datagrams = [
        b"wk.hits:1|c\nwk.sampled:1|c|@0.5\nwk.lat:%d|ms\nwk.users:u%d|s\nwk.depth:+1|g"
        % (v, n % 23)
        for n, v in enumerate(latencies)
    ]
    send_from_many_sockets(d, datagrams)
    d.send_unix(*[b"wk.hits:2|c|#via:uds"] * 50)
    d.send_tcp(b"wk.hits:5|c|#via:tcp\n" * 10)  # the daemon reads TCP itself

    d.wait_value("wk.hits", 600 + 100 + 50)
    assert d.value("wk.hits", tag="via:uds") == 100
    assert d.value("wk.hits", tag="via:tcp") == 50
    d.wait_value("wk.sampled", 1200)
    d.wait_value("wk.lat", 600, stat="count")
    assert d.value("wk.lat", stat="sum") == sum(latencies)
    # over several windows, percentiles come from the merged sketches (0.5%)
    assert d.value("wk.lat", stat="p99") == pytest.approx(nearest_rank(latencies, 99), rel=0.01)
    d.wait_value("wk.users", 23, stat="unique")
    d.wait_value("wk.depth", 600, stat="last")
    # the workers' counters reach the daemon's own metrics and /healthz
    health = d.wait_health("lines_received", 5 * 600 + 50 + 10)
    assert health["packets_received"] >= 600 + 50
    assert health["bad_lines"] == 0
    # where the last flush's time went, phase by phase, adds up to it (a read
    # that falls between the writer's two updates is read again)
    def phases_add_up() -> dict[str, float] | None:
        health = d.health()
        phases: dict[str, float] = health["last_flush_phases"]
        total = sum(phases.values())
        return phases if abs(total - health["last_flush_seconds"]) < 1e-4 else None

    phases = wait_for(phases_add_up, what="last_flush_phases to add up to last_flush_seconds")
    assert list(phases) == ["queued", "workers", "merge", "snapshot", "store"]
    assert min(phases.values()) >= 0.0
    assert health["last_outputs_seconds"] > 0.0  # /metrics, after the store
    # then the compaction slice and retention, in a transaction of their own
    wait_for(lambda: d.health()["last_maintenance_seconds"] > 0.0, what="a flush's maintenance")


def test_a_gauge_carries_across_windows_and_workers(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """The daemon holds the value: deltas read by any worker move it, later."""
    d = start_daemon(config=with_workers(tmp_path, 3))
    send_from_many_sockets(d, [b"wk.temp:5|g"] * 30)
    d.wait_value("wk.temp", 5, stat="last")
    send_from_many_sockets(d, [b"wk.temp:+1|g"] * 10)
    d.wait_value("wk.temp", 15, stat="last")
    send_from_many_sockets(d, [b"wk.temp:7|g"], sockets=1)
    d.wait_value("wk.temp", 7, stat="last")


def test_bad_lines_and_big_datagrams_are_counted(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    d = start_daemon(
        config=with_workers(tmp_path, extra="[limits]\nmax_datagram_size = 100\n")
    )
    send_from_many_sockets(d, [b"no value here", b"wk.ok:1|c", b"wk.big:1|c|#" + b"x" * 200])
    health = d.wait_health("bad_lines", 1)
    wait_for(lambda: d.health()["datagrams_too_large"] == 1, what="the big datagram counted")
    d.wait_value("wk.ok", 1)
    assert health["bad_lines"] == 1


def test_the_series_limit_holds_across_workers(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    d = start_daemon(config=with_workers(tmp_path, extra="[limits]\nmax_series = 100\n"))
    # 400 distinct series in a burst (one window or two): alone, each
    # worker would admit 100 per window
    send_from_many_sockets(d, [b"wk.flood:1|c|#id:%d" % n for n in range(400)])

    def accounted() -> tuple[float, int] | None:
        stored = d.value("wk.flood") or 0.0
        dropped: int = d.get("/api/v1/limits")["dropped"]["series_limit"]
        return (stored, dropped) if stored + dropped == 400 else None

    stored, dropped = wait_for(accounted, what="every flood line stored or dropped")
    assert dropped > 0
    per_window: dict[int, int] = {}
    for series in d.query("wk.flood", ("group_by", "id"), ("step", "1"))["series"]:
        for ts, value in series["points"]:
            if value:
                per_window[ts] = per_window.get(ts, 0) + 1
    assert sum(per_window.values()) == stored
    assert 0 < max(per_window.values()) <= 100, per_window


def test_sigterm_stores_what_the_workers_hold(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    config = with_workers(tmp_path, extra="", http="127.0.0.1:0").replace(
        "flush_interval = 1", "flush_interval = 60"
    )
    d = start_daemon(config=config)
    pids = worker_pids(d)
    send_from_many_sockets(d, [b"wk.last:1|c"] * 200)
    # every datagram read (by some worker) before the stop: the queue is empty
    wait_for(lambda: _queue_empty(d), what="the datagrams to be read")
    assert d.stop(signal.SIGTERM) == 0
    for pid in pids:
        wait_for(lambda pid=pid: not _alive(pid), what=f"worker {pid} to exit")
    d.start()
    d.wait_value("wk.last", 200)


def test_a_dead_worker_stops_the_daemon(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    d = start_daemon(config=with_workers(tmp_path))
    victim, survivor = worker_pids(d)
    os.kill(victim, signal.SIGKILL)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    assert any(f"ingest worker {victim} exited" in line for line in d.log), d.log
    wait_for(lambda: not _alive(survivor), what="the other worker to exit")


def _queue_empty(d: Daemon) -> bool:
    from .harness import udp_socket_stats

    queued, _ = udp_socket_stats(d.addr("udp")[1])
    return queued == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: its parent has not reaped it yet
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _idle_threads(pid: int) -> int:
    """Threads of the process under SCHED_IDLE (policy: /proc/.../stat field 41)."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            count += int(fields[38]) == os.SCHED_IDLE
    return count


def test_the_writer_flushes_on_the_cpu_the_workers_leave(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """With workers, the writer thread runs each flush under SCHED_IDLE (priority.py)."""
    if not priority.can_return_to_normal():  # the daemon inherits this process' limits
        if os.environ.get("CI"):
            pytest.fail("CI runs as root, which may leave SCHED_IDLE")
        pytest.skip("this user may not come back from SCHED_IDLE (RLIMIT_NICE, CAP_SYS_NICE)")
    d = start_daemon(config=with_workers(tmp_path, 1))
    d.send_udp(b"wk.idle:1|c")
    d.wait_value("wk.idle", 1)
    assert d.proc is not None
    wait_for(lambda: _idle_threads(d.proc.pid) == 1, what="the writer thread under SCHED_IDLE")
    assert any("SCHED_IDLE" in line for line in d.log)
