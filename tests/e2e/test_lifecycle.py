"""The daemon's life: stop inside a flush window and restart on the same
database, gauges carried across a restart, SIGINT, the command line, config
errors, and the ready line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.fastpath import native

from .harness import Daemon, config_text, free_port, run_cli, wait_for

DaemonFactory = Callable[..., Daemon]

pytestmark = pytest.mark.e2e

#: A window long enough that three daemon runs surely fit in one. Coarser
#: storage tiers must be multiples of it (config.py), hence the downsample.
LONG_WINDOW = 600
LONG_WINDOW_CONFIG = config_text(
    flush_interval=LONG_WINDOW, extra='[storage]\ndownsample = ["1h:30d"]\n'
)


def window_start(now: float) -> int:
    return int(now // LONG_WINDOW) * LONG_WINDOW


def wait_for_roomy_window(seconds_needed: float = 30.0) -> int:
    """Wait (rarely, at most `seconds_needed`) until the current window has
    `seconds_needed` left, so everything below happens inside ONE window."""
    wait_for(
        lambda: LONG_WINDOW - time.time() % LONG_WINDOW > seconds_needed,
        seconds_needed + 5,
        "a flush window with room left",
    )
    return window_start(time.time())


def send_lines(d: Daemon, lines: list[bytes]) -> None:
    """Half over UDP (one datagram per line), half over TCP (one connection)."""
    half = len(lines) // 2
    d.send_udp(*lines[:half])
    d.send_tcp(b"".join(line + b"\n" for line in lines[half:]))


def stop_with(d: Daemon, sig: int) -> None:
    code = d.stop(sig)
    assert code == 0, f"exit code {code} after {signal.Signals(sig).name}:\n" + "".join(d.log)


def run_once(d: Daemon, lines: list[bytes], sig: int = signal.SIGTERM) -> None:
    """Start, send `lines`, wait until /healthz shows them received, stop with `sig`."""
    d.start()
    send_lines(d, lines)
    d.wait_health("lines_received", len(lines))
    assert d.health()["lines_received"] == len(lines)
    stop_with(d, sig)


def first_run_lines() -> list[bytes]:
    lines = [b"life.hits:1|c|#run:any"] * 40
    lines += [b"life.hits:2.5|c|@0.5"] * 4  # +5 each
    lines += [f"life.lat:{v}|ms".encode() for v in (10, 20, 30, 40)]
    lines += [b"life.lat:50|ms|@0.25"]  # weight 4
    lines += [f"life.users:{m}|s".encode() for m in ("ann", "bob", "cid", "ann")]
    lines += [b"life.temp:10|g", b"life.temp:12|g", b"life.level:10|g"]
    return lines


def second_run_lines() -> list[bytes]:
    lines = [b"life.hits:1|c|#run:any"] * 25
    lines += [f"life.lat:{v}|ms".encode() for v in (5, 60)]
    lines += [f"life.users:{m}|s".encode() for m in ("cid", "dan", "eve")]
    lines += [b"life.temp:7.5|g", b"life.level:+5|g"]
    return lines


def test_sigterm_inside_a_window_then_restart_keeps_every_count(
    start_daemon: DaemonFactory,
) -> None:
    start = wait_for_roomy_window()
    d = start_daemon(config=LONG_WINDOW_CONFIG)
    # The daemon is started once by the fixture: stop it, then run twice.
    stop_with(d, signal.SIGTERM)
    run_once(d, first_run_lines())
    run_once(d, second_run_lines())
    d.start()
    assert window_start(time.time()) == start, "the test left its flush window"

    step = ("step", str(LONG_WINDOW))
    hits = d.query("life.hits", step)
    assert hits["type"] == "counter" and hits["stat"] == "sum"
    [series] = hits["series"]
    assert series["value"] == 40 + 4 * 5 + 25
    assert series["points"] == [[start, 40 + 4 * 5 + 25]]
    assert d.query("life.hits", ("tag", "run:any"))["series"][0]["value"] == 65

    def stat(metric: str, name: str) -> float:
        doc = d.query(metric, ("stat", name), step)
        value: float = doc["series"][0]["value"]
        return value

    # Timer: 10, 20, 30, 40, 50 (x4), then 5, 60.
    assert stat("life.lat", "count") == 4 + 4 + 2
    assert stat("life.lat", "sum") == 10 + 20 + 30 + 40 + 50 * 4 + 5 + 60
    assert stat("life.lat", "min") == 5
    assert stat("life.lat", "max") == 60
    assert stat("life.lat", "p50") == pytest.approx(40, rel=0.01)  # 5 10 20 30 40 50*4 60
    # Set: {ann, bob, cid} then {cid, dan, eve}: five distinct members.
    assert stat("life.users", "unique") == 5
    # Gauges: the last value, and a delta applied to the value from the first run.
    assert stat("life.temp", "last") == 7.5
    assert stat("life.level", "last") == 15


def test_gauge_persists_across_restart(start_daemon: DaemonFactory) -> None:
    d = start_daemon()
    d.send_udp(b"g:10|g", b"g2:-4|g")
    d.wait_value("g", 10)
    d.wait_value("g2", -4)  # a delta on a gauge never seen starts from 0
    stop_with(d, signal.SIGTERM)
    d.start()
    d.send_udp(b"g:+5|g", b"g2:-1|g")
    d.wait_value("g", 15)
    d.wait_value("g2", -5)
    # Untouched since, the gauge keeps its value in the windows that follow.
    changed = int(time.time())

    def later_windows() -> list[list[float]] | None:
        doc = d.query("g", ("stat", "last"), ("step", "1"), ("from", str(changed - 1)))
        points: list[list[float]] = doc["series"][0]["points"]
        return points if any(t > changed + 1 for t, _ in points) else None

    points = wait_for(later_windows, 10, "a later window of gauge g")
    assert {value for _, value in points} == {15}


def test_each_flush_is_checkpointed_into_the_database_file(start_daemon: DaemonFactory) -> None:
    """The checkpoint runs right after each flush, not inside the next one's
    write nor when the WAL reaches 1,000 pages: a copy of the file alone,
    without its WAL, has the window within 4 s, before the next flush (5 s
    later) could have copied it there."""
    daemon = start_daemon(config=config_text(flush_interval=5))
    daemon.send_udp(b"ckpt.hits:5|c")
    daemon.wait_value("ckpt.hits", 5)
    copy = daemon.workdir / "file-only.db"

    def stored_in_file() -> int:
        copy.write_bytes(daemon.db.read_bytes())
        try:
            with contextlib.closing(sqlite3.connect(copy)) as conn:
                (hits,) = conn.execute(
                    "SELECT sum(r.sum) FROM rollups r JOIN series s ON s.id = r.series_id "
                    "WHERE s.name = 'ckpt.hits' AND r.resolution = 5"
                ).fetchone()
        except sqlite3.DatabaseError as exc:  # copied in the middle of a checkpoint
            raise ValueError(exc) from exc
        finally:
            for leftover in daemon.workdir.glob("file-only.db*"):
                leftover.unlink()
        return int(hits or 0)

    assert wait_for(stored_in_file, 4, "the flush's window in the database file") == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_new_series_are_stored_while_their_window_is_open(
    start_daemon: DaemonFactory, workers: int
) -> None:
    """The intakes hand the series they meet first to the writer every
    second, and it stores them before the window's flush: the file holds
    their series rows and none of their rows of values. The flush (here the
    one at stop) then writes the values under them."""
    if native is None:  # series are met first on the C fast path's routes
        if os.environ.get("CI"):
            pytest.fail("the C fast path is not built (pip install -e . builds it)")
        pytest.skip("the C fast path is not built (no C compiler?)")
    start = wait_for_roomy_window(20)
    config = config_text(
        flush_interval=LONG_WINDOW, extra='[storage]\ndownsample = ["1h:30d"]\n', workers=workers
    )
    d = start_daemon(config=config)
    d.send_udp(b"early.udp:1|c", b"early.lat:5|ms|#k:v", b"early.udp:1|c")
    d.send_tcp(b"early.tcp:2|c\nearly.g:3|g\n")
    names = {"early.udp", "early.lat", "early.tcp", "early.g"}

    def stored() -> dict[str, int] | None:
        """Each series stored, with its rows of values at the flush resolution
        (the window that ends an hour also writes the hour's row)."""
        with contextlib.closing(sqlite3.connect(d.db)) as conn:
            found = dict(
                conn.execute(
                    "SELECT s.name, (SELECT count(*) FROM rollups r WHERE r.series_id = s.id "
                    "AND r.resolution = ?) FROM series s WHERE s.name LIKE 'early.%'",
                    (LONG_WINDOW,),
                )
            )
        return found if set(found) == names else None

    assert wait_for(stored, 10, "the new series in the database") == dict.fromkeys(names, 0)
    stop_with(d, signal.SIGTERM)
    d.start()
    step = ("step", str(LONG_WINDOW))
    assert d.query("early.udp", step)["series"][0]["points"] == [[start, 2]]
    assert d.query("early.tcp", step)["series"][0]["points"] == [[start, 2]]
    assert d.query("early.g", step)["series"][0]["value"] == 3
    lat = d.query("early.lat", ("stat", "max"), ("tags", "k:v"), step)["series"][0]
    assert lat["value"] == 5
    assert stored() == dict.fromkeys(names, 1)


def test_sigint_stops_like_sigterm(start_daemon: DaemonFactory) -> None:
    start = wait_for_roomy_window(20)
    d = start_daemon(config=LONG_WINDOW_CONFIG)
    lines = [b"int.hits:1|c"] * 30 + [b"int.g:3|g", b"int.t:8|ms", b"int.s:x|s"]
    send_lines(d, lines)
    d.wait_health("lines_received", len(lines))
    stop_with(d, signal.SIGINT)
    d.start()
    step = ("step", str(LONG_WINDOW))
    assert d.query("int.hits", step)["series"][0]["points"] == [[start, 30]]
    assert d.query("int.g", step)["series"][0]["value"] == 3
    assert d.query("int.t", ("stat", "count"), step)["series"][0]["value"] == 1
    assert d.query("int.s", step)["series"][0]["value"] == 1


# ====================================================================== command line


def test_help_lists_the_subcommands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "check-config", "query"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.MULTILINE), result.stdout
    for flag in ("--config", "--udp", "--tcp", "--unix", "--http", "--db", "--flush-interval"):
        assert flag in result.stdout, flag


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(config_text(flush_interval=5))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr + result.stdout
    shipped = run_cli("check-config", "--config", "config.toml")
    assert shipped.returncode == 0, shipped.stderr + shipped.stdout


BAD_CONFIGS = {
    "unknown key": ('[listen]\nudp = "127.0.0.1:0"\nudpp = "127.0.0.1:0"\n', "udpp"),
    "unknown section": ("[listener]\nudp = 1\n", "listener"),
    "wrong type": ('[aggregation]\nflush_interval = "10"\n', "flush_interval"),
    "wrong type of list": ('[aggregation]\npercentiles = "p99"\n', "percentiles"),
    "impossible interval": ("[aggregation]\nflush_interval = 0\n", "flush_interval"),
    "impossible percentile": ("[aggregation]\npercentiles = [50, 150]\n", "percentiles"),
    "impossible port": ('[listen]\nudp = "127.0.0.1:99999"\n', "udp"),
    "not TOML": ("[listen\nudp = \n", None),
}


def one_line_naming(output: str, key: str | None, path: Path) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {output!r}"
    assert str(path) in lines[0], lines[0]
    if key is not None:
        assert key in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_config_rejects_a_bad_file_with_one_line(tmp_path: Path, case: str) -> None:
    text, key = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode != 0
    one_line_naming(result.stderr + result.stdout, key, path)


def port_is_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_daemon_with_a_bad_config_exits_without_binding(tmp_path: Path) -> None:
    udp, tcp, http = free_port(socket.SOCK_DGRAM), free_port(), free_port()
    unix, unix_stream = tmp_path / "d.sock", tmp_path / "s.sock"
    db = tmp_path / "data" / "m.db"
    path = tmp_path / "bad.toml"
    path.write_text(
        config_text(
            udp=f"127.0.0.1:{udp}",
            tcp=f"127.0.0.1:{tcp}",
            http=f"127.0.0.1:{http}",
            unix=str(unix),
            unix_stream=str(unix_stream),
            extra=f'[storage]\npath = "{db}"\nraw_retention = "forever"\n',
        )
    )
    started = time.monotonic()
    result = run_cli("--config", str(path), timeout=20)
    assert result.returncode != 0
    assert time.monotonic() - started < 15
    line = one_line_naming(result.stderr + result.stdout, "raw_retention", path)
    assert "ready" not in line
    assert not unix.exists() and not unix_stream.exists()
    assert not db.exists() and not db.parent.exists()
    assert port_is_free(udp, socket.SOCK_DGRAM)
    assert port_is_free(tcp, socket.SOCK_STREAM)
    assert port_is_free(http, socket.SOCK_STREAM)


def test_daemon_exits_when_a_port_is_taken(tmp_path: Path) -> None:
    """Nothing is half-started: a listener that cannot bind stops the daemon."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(config_text(tcp=f"127.0.0.1:{port}"))
        result = run_cli("--config", str(path), "--db", str(tmp_path / "m.db"), timeout=20)
    assert result.returncode != 0
    assert not re.search(r"\bready\b", result.stderr), result.stderr
    assert str(port) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_ready_line_holds_the_real_addresses(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    unix, unix_stream = str(tmp_path / "r.dgram"), str(tmp_path / "r.stream")
    d = start_daemon(args=("--unix", unix, "--unix-stream", unix_stream))
    [ready] = [line for line in d.log if re.search(r"\bready\b", line)]
    for name in ("udp", "tcp", "http"):
        host, port = d.addr(name)
        assert host == "127.0.0.1" and port > 0, (name, ready)
        assert f"{name}=127.0.0.1:{port}" in ready
    assert d.addresses["unix"] == unix and d.addresses["unix_stream"] == unix_stream
    # which intake path runs: the C one wherever the extension is built
    assert d.addresses["fastpath"] == ("python" if native is None else "c"), ready
    # The addresses are the real ones: each listener answers on them.
    assert d.health()["status"] == "ok"
    d.send_udp(b"ready.udp:1|c")
    d.send_tcp(b"ready.tcp:1|c\n")
    d.send_unix(b"ready.unix:1|c")
    d.send_unix_stream(b"ready.stream:1|c\n")
    for name in ("ready.udp", "ready.tcp", "ready.unix", "ready.stream"):
        d.wait_value(name, 1)
