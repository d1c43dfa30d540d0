"""Operations, end to end on the real daemon: systemd notifications, SIGHUP,
SIGKILL and restart, SQLite failures (locked, read-only) with the spool,
limits under abuse, idle and surplus connections, socket modes, security.

The figures these tests establish are quoted in the README ("Operations").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator import config as config_module
from aggregator.config import split_address
from aggregator.notify import Notifier

from .harness import Daemon, config_text, run_cli, wait_for

pytestmark = pytest.mark.e2e

Make = Callable[..., Daemon]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """Daemons that are configured here and started by the test (env, prefix)."""
    made: list[Daemon] = []

    def new(config: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Daemon:
        workdir = tmp_path / f"d{len(made)}"
        workdir.mkdir()
        daemon = Daemon(workdir, config, args)
        daemon.env = dict(env or {})
        made.append(daemon)
        return daemon

    yield new
    for daemon in made:
        daemon.kill()


def log_has(d: Daemon, text: str) -> str | None:
    return next((line for line in d.log if text in line), None)


def stored_sum(d: Daemon, metric: str, stat_name: str = "sum") -> float | None:
    status, body = d.request(
        "/api/v1/series", [("metric", metric), ("from", "-1h"), ("stat", stat_name)]
    )
    if status != 200 or not body["series"]:
        return None
    value: float = body["series"][0]["value"]
    return value


def db_files(d: Daemon) -> list[Path]:
    return [p for p in (d.db, Path(f"{d.db}-wal"), Path(f"{d.db}-shm")) if p.exists()]


# ====================================================================== systemd


def receive(sock: socket.socket, until: Callable[[list[str]], bool], timeout: float) -> list[str]:
    """Notification datagrams until `until(messages)` holds (bounded by `timeout`)."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(messages):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"notifications so far: {messages}")
        sock.settimeout(left)
        with contextlib.suppress(TimeoutError):
            messages.append(sock.recv(4096).decode())
    return messages


def test_systemd_notifications_ready_watchdog_reload_stopping(make: Make, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        d = make(config_text(), env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        d.start()
        assert d.proc is not None
        got = receive(notify, lambda m: any("READY=1" in x for x in m), 10)
        ready = next(x.splitlines() for x in got if "READY=1" in x)
        assert f"MAINPID={d.proc.pid}" in ready
        status = next(line for line in ready if line.startswith("STATUS="))
        assert f"udp={d.addresses['udp']}" in status and f"http={d.addresses['http']}" in status
        # WatchdogSec=0.2s: a ping every 0.1 s, from the event loop.
        started = time.monotonic()
        pings = receive(notify, lambda m: sum(x == "WATCHDOG=1" for x in m) >= 5, 5)
        assert time.monotonic() - started < 2.0, pings
        # SIGHUP: RELOADING=1 (with the clock systemd wants), then READY=1 again.
        d.proc.send_signal(signal.SIGHUP)
        got = receive(notify, lambda m: any("READY=1" in x for x in m), 10)
        reloading = [x for x in got if x.startswith("RELOADING=1")]
        assert reloading and "MONOTONIC_USEC=" in reloading[0]
        assert got.index(reloading[0]) < next(i for i, x in enumerate(got) if "READY=1" in x)
        d.proc.send_signal(signal.SIGTERM)
        got = receive(notify, lambda m: any(x.startswith("STOPPING=1") for x in m), 10)
        assert d.proc.wait(30) == 0


def test_notifications_reach_an_abstract_socket() -> None:
    name = f"statsd-aggregator-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert notifier.watchdog_seconds == 3.0
        assert notifier.watchdog()
        notify.settimeout(5)
        assert notify.recv(100) == b"WATCHDOG=1"
    outside = Notifier({})
    assert not outside.enabled and not outside.ready("x") and outside.watchdog_seconds is None


# ====================================================================== SIGHUP


RELOAD_BEFORE = """
[limits]
max_series_per_metric = 5
"""

RELOAD_AFTER = """
[limits]
max_series_per_metric = 50

[http]
dashboard = "ops"

[dashboards.ops]
title = "Ops"

[dashboards.ops.values.hits]
metric = "hup.m"
"""


def test_sighup_applies_limits_and_dashboards_and_names_what_needs_a_restart(
    make: Make,
) -> None:
    d = make(config_text(extra=RELOAD_BEFORE)).start()
    assert d.proc is not None
    d.send_tcp(b"".join(b"hup.m:1|c|#i:%d\n" % i for i in range(10)))
    wait_for(lambda: d.get("/api/v1/limits")["dropped"]["metric_series_limit"] == 5, 10, "drops")

    d.config_path.write_text(
        config_text(extra=RELOAD_AFTER).replace(
            "[listen]", "[listen]\nudp_receive_buffer = 65536"
        )
    )
    d.proc.send_signal(signal.SIGHUP)
    applied = wait_for(lambda: log_has(d, "reload: applied"), 10, "the reload log line")
    for name in ("limits.max_series_per_metric", "http.dashboard", "dashboards"):
        assert name in applied
    restart = wait_for(lambda: log_has(d, "need a restart"), 10, "the restart log line")
    assert "listen.udp_receive_buffer" in restart and "limits" not in restart
    assert d.get("/api/v1/limits")["limits"]["max_series_per_metric"] == 50
    listed = d.get("/api/v1/dashboards")
    assert listed["default"] == "ops" and [x["name"] for x in listed["dashboards"]] == ["ops"]
    d.send_tcp(b"".join(b"hup.m:1|c|#j:%d\n" % i for i in range(10)))
    d.wait_health("lines_received", 20)
    assert d.get("/api/v1/limits")["dropped"]["metric_series_limit"] == 5

    # A broken file on SIGHUP: logged, and the running configuration stays.
    d.config_path.write_text("[limits]\nmax_series = 0\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: log_has(d, "keeping the running configuration"), 10, "the refusal")
    assert "limits.max_series" in (log_has(d, "keeping the running configuration") or "")
    assert d.get("/api/v1/limits")["limits"]["max_series_per_metric"] == 50
    assert d.stop() == 0


# ====================================================================== SIGKILL


def test_sigkill_loses_at_most_the_open_window_and_restarts_on_the_same_files(
    make: Make, tmp_path: Path
) -> None:
    unix, stream = str(tmp_path / "k.dgram"), str(tmp_path / "k.stream")
    d = make(config_text(flush_interval=1, unix=unix, unix_stream=stream)).start()
    assert d.proc is not None
    d.send_udp(*[b"kill.hits:1|c"] * 50, b"kill.g:42|g", b"kill.users:ann|s", b"kill.users:bob|s")
    d.send_unix(*[b"kill.hits:1|c"] * 25)
    d.send_unix_stream(b"kill.hits:1|c\n" * 25 + b"kill.users:cid|s\n")
    # Everything above is stored once these hold (a flush happened after it).
    d.wait_value("kill.hits", 100)
    d.wait_value("kill.g", 42)
    d.wait_value("kill.users", 3)
    d.proc.kill()
    assert d.proc.wait(10) == -signal.SIGKILL
    for path in (unix, stream):  # left behind by the killed daemon
        assert stat.S_ISSOCK(os.stat(path).st_mode)

    restarted_at = time.time()
    d.start()
    d.send_unix(b"kill.users:cid|s", b"kill.users:dan|s")
    d.send_unix_stream(b"kill.hits:1|c\n" * 10)
    d.wait_value("kill.hits", 110)  # nothing stored before the kill is missing
    d.wait_value("kill.users", 4)  # ann bob cid (before) + cid dan (after): the set merges

    # The gauge came back from the database: the windows after the restart carry 42.
    def gauge_after_restart() -> list[list[float]] | None:
        doc = d.query("kill.g", ("stat", "last"), ("step", "1"), ("from", str(int(restarted_at))))
        points: list[list[float]] = doc["series"][0]["points"] if doc["series"] else []
        return points or None

    points = wait_for(gauge_after_restart, 10, "the gauge in a window after the restart")
    assert {value for _, value in points} == {42}
    assert d.health()["spool_backlog"] == 0
    assert d.stop() == 0


# ====================================================================== SQLite failures


def fault_cycle(d: Daemon, break_it: Callable[[], None], fix_it: Callable[[], None]) -> None:
    """100 lines stored; then, while SQLite cannot be written, 150 more, a gauge
    and a set over several flushes; then the fix. Every line must arrive."""
    d.send_tcp(b"fault.hits:1|c\n" * 100)
    d.wait_value("fault.hits", 100)
    break_it()
    try:
        for second in range(3):
            d.send_tcp(
                b"fault.hits:1|c\n" * 50 + b"fault.g:%d|g\nfault.u:m%d|s\n" % (second, second)
            )
            time.sleep(1.0)  # one flush each: the spool grows flush by flush
        health = d.wait_health("spool_backlog", 2)
        assert health["status"] == "degraded" and health["storage_writable"] is False
        assert health["storage_error"]
        spool = Path(f"{d.db}-spool")
        assert len(list(spool.glob("*.msgpack"))) >= 2
        # The daemon keeps receiving meanwhile.
        d.send_udp(b"fault.hits:1|c")
        d.wait_health("lines_received", 100 + 3 * 52 + 1)
    finally:
        fix_it()

    def drained() -> dict[str, Any] | None:
        health = d.health()
        return health if health["spool_backlog"] == 0 and health["storage_writable"] else None

    wait_for(drained, 20, "the spool to drain")
    d.wait_value("fault.hits", 100 + 150 + 1)  # zero lines lost
    d.wait_value("fault.g", 2)
    d.wait_value("fault.u", 3)
    # The backlog was reported in the self metrics too (stored with the replay).
    backlog = stored_sum(d, "statsd_aggregator.spool_backlog", "max")
    assert backlog is not None and backlog >= 2
    assert stored_sum(d, "statsd_aggregator.storage_writable", "min") == 0


def test_a_write_lock_held_by_another_process_loses_nothing(make: Make) -> None:
    d = make(config_text(flush_interval=1)).start()
    locker = sqlite3.connect(d.db, isolation_level=None, timeout=10)
    try:
        fault_cycle(
            d,
            lambda: locker.execute("BEGIN IMMEDIATE"),  # the write lock, held
            lambda: locker.execute("ROLLBACK"),
        )
    finally:
        locker.close()
    assert d.stop() == 0


def immutable_supported(directory: Path) -> str | None:
    """None if `chattr +i` works on files here, else why not."""
    if shutil.which("chattr") is None:
        return "chattr is not installed"
    probe = directory / "probe"
    probe.write_text("x")
    try:
        result = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
        if result.returncode != 0:
            return f"chattr +i fails here: {result.stderr.strip()}"
        subprocess.run(["chattr", "-i", str(probe)], check=True)
        return None
    finally:
        probe.unlink()


def test_a_read_only_database_file_loses_nothing(make: Make, tmp_path: Path) -> None:
    """The database and its WAL made immutable while the daemon writes.

    As root (CI), chmod does not stop writes and an open file keeps its
    access mode; the immutable flag stops them for everyone. Where the file
    system or the capabilities refuse chattr, the next test covers the
    read-only file differently (a daemon started on it, without root's
    override), and this one is skipped with the reason.
    """
    reason = immutable_supported(tmp_path)
    if reason is not None:
        pytest.skip(reason)
    d = make(config_text(flush_interval=1)).start()
    locked: list[Path] = []

    def freeze() -> None:
        locked.extend(p for p in db_files(d) if not p.name.endswith("-shm"))
        subprocess.run(["chattr", "+i", *map(str, locked)], check=True)

    def thaw() -> None:
        subprocess.run(["chattr", "-i", *map(str, locked)], check=True)

    try:
        fault_cycle(d, freeze, thaw)
    finally:
        subprocess.run(["chattr", "-i", *map(str, locked)], check=False)
    assert d.stop() == 0


def test_a_daemon_started_on_a_read_only_database_parks_and_catches_up(make: Make) -> None:
    """Without CAP_DAC_OVERRIDE (setpriv drops every capability when the tests
    run as root), mode 0444 makes the file read-only for the daemon.

    SQLite shares a database's state between the connections of one
    process; opened read-only, it would stay read-only while any of them
    is open, so a fresh writer connection closes the readers too
    (storage.py): once the file is fixed, the backlog drains without a
    restart.
    """
    d = make(config_text(flush_interval=1))
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root's capabilities")
        d.prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    d.start()
    d.send_tcp(b"ro.hits:1|c\n" * 10 + b"ro.g:5|g\n")
    d.wait_value("ro.hits", 10)
    assert d.stop() == 0
    for path in db_files(d):
        path.chmod(0o444)
    try:
        d.start()  # starts even so: it reads, and parks what it cannot write
        d.send_tcp(b"ro.hits:1|c\n" * 15)
        health = d.wait_health("spool_backlog", 2)
        assert health["storage_writable"] is False and "readonly" in health["storage_error"]
        assert stored_sum(d, "ro.hits") == 10  # the stored data stays readable
        assert len(list(Path(f"{d.db}-spool").glob("*.msgpack"))) >= 2
    finally:
        for path in db_files(d):
            path.chmod(0o644)
    wait_for(lambda: d.health()["spool_backlog"] == 0, 20, "the spool to drain")
    assert d.health()["storage_writable"] is True
    d.wait_value("ro.hits", 25)
    d.wait_value("ro.g", 5)  # the gauge came back across the restart and the spool
    assert d.stop() == 0


# ====================================================================== limits


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


FLOOD_SERIES = 1_000_000


def test_a_flood_of_a_million_series_stays_bounded_and_names_its_source(make: Make) -> None:
    d = make(config_text(flush_interval=5, udp="")).start()
    assert d.proc is not None
    d.send_tcp(b"warm.up:1|c\n" * 1000)
    d.wait_health("lines_received", 1000)
    before = rss_kib(d.proc.pid)
    started = time.monotonic()
    with socket.create_connection(d.addr("tcp"), timeout=60) as sock:
        for first in range(0, FLOOD_SERIES, 100_000):
            chunk = b"".join(
                b"flood.requests:1|c|#env:prod,user_id:u%d\n" % i
                for i in range(first, first + 100_000)
            )
            sock.sendall(chunk)
    d.wait_health("lines_received", 1000 + FLOOD_SERIES, timeout=120)
    elapsed = time.monotonic() - started
    after = rss_kib(d.proc.pid)
    report = d.get("/api/v1/limits")
    health = d.health()
    print(
        f"\nflood: {FLOOD_SERIES:,} distinct series in {elapsed:.1f} s; "
        f"RSS {before['VmRSS'] // 1024} -> {after['VmRSS'] // 1024} MiB, "
        f"peak {after['VmHWM'] // 1024} MiB; dropped "
        f"{report['dropped_total']:,}; window series {health['series']:,}"
    )
    per_metric = report["limits"]["max_series_per_metric"]
    admitted = FLOOD_SERIES - report["dropped"]["metric_series_limit"]
    windows = int(elapsed // 5) + 2
    assert 0 < admitted <= per_metric * windows
    assert report["dropped_total"] == health["dropped_samples"] >= FLOOD_SERIES - admitted
    [offender] = report["offenders"]
    assert offender["metric"] == "flood.requests"
    assert offender["tag_keys"][0]["key"] == "user_id" and offender["tag_keys"][0]["at_least"]
    assert [k["key"] for k in offender["tag_keys"]] == ["user_id", "env"]
    # Bounded: growth stays well under what a million series would take
    # (~0.5 KiB each in a window, so ~500 MiB).
    assert after["VmHWM"] - before["VmRSS"] < 200 * 1024, (before, after)
    assert d.stop() == 0


IDLE_CONFIG = """
[limits]
idle_timeout = "2s"
max_connections = 3
"""


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_silent_trickling_and_surplus_connections_are_closed(make: Make) -> None:
    d = make(config_text(extra=IDLE_CONFIG, udp="")).start()
    tcp = d.addr("tcp")
    with contextlib.ExitStack() as stack:
        silent, trickle, busy = (
            stack.enter_context(socket.create_connection(tcp, timeout=5)) for _ in range(3)
        )
        busy.sendall(b"idle.busy:1|c\n")
        wait_for(lambda: d.get("/api/v1/limits")["listeners"]["connections_open"] == 3, 5, "3")
        surplus = stack.enter_context(socket.create_connection(tcp, timeout=5))
        assert closed_by_server(surplus, 1.5)
        sent = 1
        for _ in range(14):  # 3.5 s: longer than the idle timeout (2 s)
            with contextlib.suppress(OSError):  # once closed, the trickle fails
                trickle.sendall(b"x")  # bytes, never a whole line
            busy.sendall(b"idle.busy:1|c\n")
            sent += 1
            time.sleep(0.25)
        assert closed_by_server(silent, 1)
        assert closed_by_server(trickle, 1)
        assert not closed_by_server(busy, 0.2)
        busy.sendall(b"idle.busy:1|c\n")
        sent += 1
    listeners = d.get("/api/v1/limits")["listeners"]
    assert listeners["connections_refused"] == 1
    assert listeners["connections_idle_closed"] == 2
    d.wait_value("idle.busy", sent)
    assert d.stop() == 0


def test_unix_sockets_get_the_configured_mode_and_big_datagrams_are_dropped(
    make: Make, tmp_path: Path
) -> None:
    unix, stream = str(tmp_path / "m.dgram"), str(tmp_path / "m.stream")
    old_umask = os.umask(0)  # the daemon inherits it: the mode must not depend on it
    try:
        d = make(config_text(unix=unix, unix_stream=stream)).start()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(unix).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(stream).st_mode) == 0o660
    big = b"\n".join([b"big.line:1|c"] * 8000)  # ~100 KB, more than max_datagram_size
    assert len(big) > 65536
    d.send_unix(big, b"small.line:1|c")
    d.wait_value("small.line", 1)
    assert d.health()["datagrams_too_large"] == 1
    assert stored_sum(d, "big.line") is None
    assert d.stop() == 0

    strict = make(config_text(unix=unix, unix_stream=stream, extra="")).start()
    assert strict.stop() == 0
    config = config_text(unix=unix, unix_stream=stream).replace(
        "[listen]", '[listen]\nunix_mode = "0600"'
    )
    tight = make(config).start()
    assert stat.S_IMODE(os.stat(unix).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(stream).st_mode) == 0o600
    assert tight.stop() == 0


def test_a_costly_query_answers_400_naming_the_limit(make: Make) -> None:
    d = make(config_text(extra="[limits]\nmax_query_cost = 5000\n")).start()
    d.send_udp(b"cost.m:1|c|#h:a", b"cost.m:1|c|#h:b")
    d.wait_value("cost.m", 2)
    status, body = d.request(
        "/api/v1/series", [("metric", "cost.m"), ("from", "-1h"), ("step", "1")]
    )
    assert status == 400
    assert body["error"].startswith("from: ") and "limits.max_query_cost" in body["error"]
    assert "7,200 points (3,600 buckets x 2 series)" in body["error"]
    # A tag filter (one series) fits; so does the automatic step (60 s here).
    status, _ = d.request(
        "/api/v1/series", [("metric", "cost.m"), ("from", "-1h"), ("step", "1"), ("tag", "h:a")]
    )
    assert status == 200
    assert d.request("/api/v1/series", [("metric", "cost.m"), ("from", "-1h")])[0] == 200
    assert d.stop() == 0


# ====================================================================== security


def test_every_listener_binds_loopback_by_default() -> None:
    defaults = config_module.load(None)
    for address in (defaults.udp, defaults.tcp, defaults.http):
        assert config_module.is_loopback(split_address(address)[0]), address
    assert defaults.unix == defaults.unix_stream == ""
    assert defaults.unix_mode == 0o660
    assert defaults.token == "" and defaults.allow_unauthenticated is False


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.10:8126"])
def test_an_open_api_without_a_token_refuses_to_start(tmp_path: Path, address: str) -> None:
    path = tmp_path / "open.toml"
    path.write_text(config_text(http=address))
    result = run_cli("--config", str(path), "--db", str(tmp_path / "m.db"), timeout=20)
    assert result.returncode != 0
    assert "ready" not in result.stderr
    assert "listen.http" in result.stderr and "http.token" in result.stderr
    assert str(path) in result.stderr
    assert not (tmp_path / "m.db").exists()


def test_the_token_guards_every_api_path_but_health(make: Make) -> None:
    d = make(config_text(extra='[http]\ntoken = "s3cret"\n')).start()
    for path in ("/api/v1/metrics", "/api/v1/limits", "/api/v1/series", "/api/metrics/dashboard"):
        status, body = d.request(path)
        assert status == 401 and "token" in body["error"], path
    d.token = "wrong"
    assert d.request("/api/v1/metrics")[0] == 401
    d.token = "s3cret"
    assert d.request("/api/v1/metrics")[0] == 200
    assert d.request("/api/v1/limits")[0] == 200
    d.token = ""
    assert d.request("/healthz")[0] == 200
    assert d.stop() == 0
