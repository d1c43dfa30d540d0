"""Flush and query costs of our daemon (issue 4, part 1, item 6).

- flush: the time to flush N active series to SQLite (N = 10k, 100k, 1M),
  read from /healthz `last_flush_seconds` (from the window's close to its
  commit; the /metrics update that follows is `last_outputs_seconds`, then
  the compaction slice and retention `last_maintenance_seconds`) after
  a window that held exactly one line for each of N new series (the flush
  creates them), then after the next windows with one line for each of the
  same series;
- loss during a flush: a steady 1-line-per-datagram load offered across
  the flush of a 100k-series window, lines sent vs lines received;
- query: p50/p95 latency of /api/v1/series and /api/metrics/dashboard over a
  day of stored data at 1,000 series, written straight through
  aggregator.storage.Storage.write (real rollups from aggregator.aggregate,
  replayed at every 10 s window of the last 24 hours).
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import daemons
import procfs
import workloads
from harness import BUILD, log, send, wait_drained

sys.path.insert(0, str(daemons.ROOT))

from aggregator import config as config_module
from aggregator.aggregate import Aggregator, snapshot
from aggregator.model import Rollup, Sample
from aggregator.storage import Storage


def _corpus(series: int) -> workloads.Corpus:
    workload = workloads.Workload(f"flush{series}", f"{series} series", series, True, 0)
    return workloads.build(workload, BUILD)


def _datagrams_for_one_pass(corpus: workloads.Corpus) -> int:
    """Datagrams holding the first pass (each series exactly once, give or take the last)."""
    n = corpus.workload.series
    for i, lines in enumerate(corpus.lines_prefix):
        if lines >= n:
            return i
    return corpus.datagrams


class _QueueWatch:
    """Samples a UDP socket's receive queue every 10 ms in a thread (bounded)."""

    def __init__(self, port: int, limit_seconds: float) -> None:
        self.port = port
        self.limit = limit_seconds
        self.max_queue = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            sock = procfs.udp_socket(self.port)
            if sock is not None:
                self.max_queue = max(self.max_queue, sock.rx_queue)
            time.sleep(0.01)

    def __enter__(self) -> _QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _send_lines(daemon: daemons.Ours, corpus: workloads.Corpus, rate: float) -> int:
    """Send one pass (every series once) at `rate` lines/s; the lines sent."""
    datagrams = _datagrams_for_one_pass(corpus)
    lines = corpus.lines_prefix[datagrams]
    seconds = lines / rate
    # loadgen stops on time, so ask for the exact count's worth of seconds.
    report = send(corpus, daemon.udp_port, rate, seconds)
    return corpus.lines_sent(report["sent"])


def _windows_after(series: int, smoke: bool) -> int:
    """Windows measured after the first: enough for a median, fewer at 1M (30 s each)."""
    if smoke:
        return 1
    return 6 if series <= 100_000 else 2


def flush_costs(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    sizes = args.flush_sizes
    interval = 2 if args.smoke else 10
    fill_rate = 20_000.0 if args.smoke else 50_000.0
    rows = []
    for size in sizes:
        corpus = _corpus(size)
        # The window must hold the whole fill: 30 s for 1M series, else 10 s.
        interval_here = interval if size / fill_rate * 1.5 < interval else 30
        daemon = daemons.ours(BUILD / "run" / "flush", interval_here, 0, args.workers)
        daemon.start()
        try:
            daemon.wait_flush_after(time.time(), interval_here * 2 + 30)
            before = daemon.health()
            sent = _send_lines(daemon, corpus, fill_rate)
            wait_drained(daemon.udp_port)
            daemon.wait_flush_after(time.time(), interval_here * 2 + 600)
            after = daemon.health()
            # the same series again, window after window: windows whose series
            # are all known (one in six, at 10 s, also completes a minute)
            again_runs = []
            for _ in range(_windows_after(size, args.smoke)):
                before_again = daemon.health()
                again_sent = _send_lines(daemon, corpus, fill_rate)
                wait_drained(daemon.udp_port)
                daemon.wait_flush_after(time.time(), interval_here * 2 + 600)
                again = daemon.health()
                again_runs.append(
                    {
                        "lines_sent": again_sent,
                        "lines_received": again["lines_received"]
                        - before_again["lines_received"],
                        "flush_seconds": again["last_flush_seconds"],
                        "flush_phases": again["last_flush_phases"],
                        "outputs_seconds": again["last_outputs_seconds"],
                        # the compaction slice and retention after a flush:
                        # this window's, or (still running) the one before's
                        "maintenance_seconds": again["last_maintenance_seconds"],
                    }
                )
            memory = procfs.memory_kib(daemon.pid)
        except RuntimeError as exc:
            log(f"  flush of {size:,} series failed: {exc}")
            rows.append({"series": size, "error": str(exc).splitlines()[0]})
            continue
        finally:
            daemon.stop()
        received = after["lines_received"] - before["lines_received"]
        row = {
            "series": size,
            "lines_sent": sent,
            "lines_received": received,
            "flush_seconds": after["last_flush_seconds"],
            "flush_phases": after["last_flush_phases"],
            "again": again_runs,
            "again_lines_sent": sum(r["lines_sent"] for r in again_runs),
            "again_lines_received": sum(r["lines_received"] for r in again_runs),
            "again_flush_seconds": statistics.median(r["flush_seconds"] for r in again_runs),
            "again_flush_seconds_min": min(r["flush_seconds"] for r in again_runs),
            "again_flush_seconds_max": max(r["flush_seconds"] for r in again_runs),
            "again_outputs_seconds_max": max(r["outputs_seconds"] for r in again_runs),
            "again_maintenance_seconds_max": max(r["maintenance_seconds"] for r in again_runs),
            "flush_interval": interval_here,
            "peak_rss_mib": round(memory["VmHWM"] / 1024),
        }
        log(f"  flush of {size:,} series: {row}")
        rows.append(row)

    # Loss while a 100k-series window is flushed.
    size = 10_000 if args.smoke else 100_000
    interval = 2 if args.smoke else 10
    fill = _corpus(size)
    probe = workloads.build(workloads.WORKLOADS["a"], BUILD)
    probe_rate = _probe_rate(args, results)
    flush_estimate = next(
        (r["flush_seconds"] for r in rows if r["series"] == size and "error" not in r), 1.0
    )
    daemon = daemons.ours(BUILD / "run" / "flushloss", interval, 0, args.workers)
    daemon.start()
    try:
        daemon.wait_flush_after(time.time(), interval * 2 + 30)
        boundary = (time.time() // interval + 1) * interval
        before = daemon.health()
        sock_before = procfs.udp_socket(daemon.udp_port)
        fill_sent = _send_lines(daemon, fill, fill_rate)
        lead = 0.5 if args.smoke else 1.0
        pause = boundary - lead - time.time()
        if pause > 0:
            time.sleep(pause)
        probe_seconds = lead + flush_estimate + lead
        with _QueueWatch(daemon.udp_port, probe_seconds + 30) as watch:
            report = send(probe, daemon.udp_port, probe_rate, probe_seconds)
            drain = wait_drained(daemon.udp_port)
        # The full window's flush began at the boundary, during the probe; it
        # may still run when the probe ends: wait for it, then read its time
        # (the final wait below ends on a later, small flush).
        daemon.wait_flush_after(boundary - 1, interval * 2 + 120)
        during = daemon.health()
        probe_sent = probe.lines_sent(report["sent"])
        daemon.wait_flush_after(time.time(), interval * 2 + 120)
        after = daemon.health()
        sock_after = procfs.udp_socket(daemon.udp_port)
    finally:
        daemon.stop()
    sent = fill_sent + probe_sent
    received = after["lines_received"] - before["lines_received"]
    loss = {
        "series": size,
        "flush_interval": interval,
        "probe_lines_per_second": probe_rate,
        "probe_seconds": probe_seconds,
        "probe_lines": probe_sent,
        "lines_sent": sent,
        "lines_lost": sent - received,
        "kernel_drops": (sock_after.drops - sock_before.drops)
        if sock_after and sock_before
        else None,
        "max_rx_queue_bytes": watch.max_queue,
        "drain_seconds": drain,
        "flush_seconds": during["last_flush_seconds"],
        "flushes_during_probe": during["flushes"] - before["flushes"],
    }
    log(f"  loss during a {size:,}-series flush: {loss}")
    return {"flush": rows, "flush_loss": loss}


def _probe_rate(args: argparse.Namespace, results: dict[str, Any]) -> float:
    """--probe-rate, else half our sustained rate on workload (a) when this run measured it."""
    if args.smoke:
        return 2_000.0
    if args.probe_rate:
        return float(args.probe_rate)
    figures = [
        t["figure"]
        for t in results.get("rate", {}).get("trials", [])
        if t["daemon"] == "ours" and t["workload"] == "a" and t["figure"]
    ]
    return round(statistics.median(figures) / 2, -3) if figures else 20_000.0


# ---------------------------------------------------------------- queries


#: 1,000 series: the dashboard's metrics with realistic tags
def _day_samples(rng: random.Random) -> list[Sample]:
    out = []
    p = "sigma_playground."
    for w in range(50):
        for u in range(10):
            tags = (("user_id", f"u-{u}"), ("workbook_id", f"wb-{w}"))
            out.append(Sample(p + "workbook.views", "c", tags, float(rng.randint(1, 5))))
    for w in range(50):
        for ok in ("false", "true"):
            tags = (("success", ok), ("workbook_id", f"wb-{w}"))
            out.append(Sample(p + "workbook.embeds", "c", tags, float(rng.randint(0, 3))))
    for w in range(100):
        tags = (("workbook_id", f"wb-{w}"),)
        out.append(Sample(p + "workbook.errors", "c", tags, float(rng.randint(0, 1))))
    for u in range(100):
        tags = (("user_id", f"u-{u}"),)
        out.append(Sample(p + "user.logins", "c", tags, 1.0))
    for w in range(200):
        tags = (("workbook_id", f"wb-{w}"),)
        for _ in range(8):
            out.append(Sample(p + "workbook.load_time", "ms", tags, float(rng.randint(40, 2000))))
    return out


def build_day(path: Path, hours: float, interval: int = 10) -> dict[str, Any]:
    """A day (or `hours`) of 10 s rollups for 1,000 series, via Storage.write."""
    config = config_module.load(None, {"aggregation.flush_interval": interval})
    rng = random.Random(7)
    variants: list[list[Rollup]] = []
    for _ in range(4):
        aggregator = Aggregator(interval, config.percentiles)
        aggregator.open(0)
        aggregator.add(_day_samples(rng))
        variants.append(
            [r for w in aggregator.swap(interval) for r in snapshot(w, config.percentiles)]
        )
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = Storage(str(path), config.tiers)
    now = int(time.time()) // interval * interval
    first = now - int(hours * 3600)
    started = time.monotonic()
    batch: list[Rollup] = []
    rows = 0
    windows = int(hours * 3600) // interval
    for i in range(windows):
        start = first + i * interval
        batch.extend(r._replace(start=start) for r in variants[i % len(variants)])
        if len(batch) >= 60_000 or i == windows - 1:
            storage.write(batch)
            rows += len(batch)
            batch = []
    storage.close()
    seconds = time.monotonic() - started
    series = len(variants[0])
    log(f"  wrote {rows:,} rollups ({series} series x {windows} windows) in {seconds:.0f} s")
    return {"series": series, "windows": windows, "rollups": rows, "write_seconds": seconds}


QUERIES: list[tuple[str, str, dict[str, str]]] = [
    (
        "counter, 500 series merged, 24 h",
        "/api/v1/series",
        {"metric": "sigma_playground.workbook.views", "from": "-1d"},
    ),
    (
        "counter, group_by workbook_id top 10, 24 h",
        "/api/v1/series",
        {
            "metric": "sigma_playground.workbook.views",
            "from": "-1d",
            "group_by": "workbook_id",
            "limit": "10",
        },
    ),
    (
        "timer p99, 200 series merged, 24 h",
        "/api/v1/series",
        {"metric": "sigma_playground.workbook.load_time", "from": "-1d", "stat": "p99"},
    ),
    (
        "counter, one tag, 1 h",
        "/api/v1/series",
        {"metric": "sigma_playground.workbook.views", "from": "-1h", "tag": "workbook_id:wb-7"},
    ),
    ("dashboard, 24 h", "/api/metrics/dashboard", {}),
    ("dashboard, 1 h", "/api/metrics/dashboard", {"from": "-1h"}),
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def query_costs(args: argparse.Namespace) -> dict[str, Any]:
    hours = 0.5 if args.smoke else 24.0
    repeats = 3 if args.smoke else 40
    workdir = BUILD / "run" / "query"
    if workdir.exists():
        shutil.rmtree(workdir)
    built = build_day(workdir / "metrics.db", hours)
    daemon = daemons.Ours(workdir, 10, 0)
    daemon.keep_db = True
    daemon.start()
    rows = []
    try:
        host, _, port = daemon.addresses["http"].rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        for title, path, params in QUERIES:
            url = path + ("?" + urllib.parse.urlencode(params) if params else "")
            times = []
            status = 0
            size = 0
            for _ in range(repeats):
                started = time.perf_counter()
                conn.request("GET", url)
                response = conn.getresponse()
                body = response.read()
                times.append(time.perf_counter() - started)
                status, size = response.status, len(body)
            row = {
                "query": title,
                "url": url,
                "status": status,
                "bytes": size,
                "p50_ms": round(_percentile(times, 50) * 1000, 1),
                "p95_ms": round(_percentile(times, 95) * 1000, 1),
                "repeats": repeats,
            }
            log(f"  {title}: {row}")
            rows.append(row)
        conn.close()
    finally:
        daemon.stop()
    return {"query_data": built, "query": rows}


def _guarded(name: str, part: Any, *part_args: Any) -> dict[str, Any]:
    """Run one part; a failure is reported in the results, not fatal."""
    try:
        found: dict[str, Any] = part(*part_args)
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
        log(f"  {name} failed: {exc}")
        return {f"{name}_error": str(exc)}
    return found


def tables(out: dict[str, Any]) -> str:
    text = []
    if "flush" in out:
        text += [
            "| active series | first window: flush seconds | lines sent / received "
            "| next windows: flush seconds, median (min-max) | then /metrics, max s "
            "| then compaction and retention, max s "
            "| lines sent / received | flush interval | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in out["flush"]:
            if "error" in r:
                text.append(f"| {r['series']:,} | failed: {r['error']} | | | | | | | |")
                continue
            text.append(
                f"| {r['series']:,} | {r['flush_seconds']:.2f} | {r['lines_sent']:,} / "
                f"{r['lines_received']:,} | {r['again_flush_seconds']:.2f} "
                f"({r['again_flush_seconds_min']:.2f}-{r['again_flush_seconds_max']:.2f}) "
                f"over {len(r['again'])} | {r['again_outputs_seconds_max']:.2f} | "
                f"{r['again_maintenance_seconds_max']:.2f} | "
                f"{r['again_lines_sent']:,} / {r['again_lines_received']:,} | "
                f"{r['flush_interval']} s | {r['peak_rss_mib']:,} |"
            )
    if "flush_loss" in out:
        loss = out["flush_loss"]
        text += [
            "",
            f"Loss during the flush of a {loss['series']:,}-series window "
            f"(flush took {loss['flush_seconds']:.2f} s): offered "
            f"{loss['probe_lines_per_second']:,.0f} lines/s (1 line/datagram) for "
            f"{loss['probe_seconds']:.1f} s around it: {loss['lines_lost']:,} of "
            f"{loss['lines_sent']:,} lines lost (kernel drops {loss['kernel_drops']}), "
            f"receive queue peaked at {loss['max_rx_queue_bytes']:,} bytes and drained "
            f"{loss['drain_seconds']:.2f} s after sending stopped.",
            "",
        ]
    if "query" in out:
        data = out["query_data"]
        text += [
            f"Queries over {data['windows']:,} windows x {data['series']} series "
            f"({data['rollups']:,} rollups, written in {data['write_seconds']:.0f} s):",
            "",
            "| query | status | p50 ms | p95 ms | bytes |",
            "|---|---|---|---|---|",
        ]
        for r in out["query"]:
            text.append(
                f"| {r['query']} | {r['status']} | {r['p50_ms']} | {r['p95_ms']} | {r['bytes']:,} |"
            )
    return "\n".join(text)


def run(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "flush" in args.section_names:
        log("flush costs")
        out.update(_guarded("flush", flush_costs, args, results))
    if "query" in args.section_names:
        log("query costs")
        out.update(_guarded("query", query_costs, args))
    text = tables(out)
    print("\n" + text + "\n", flush=True)
    out["flush_query_tables"] = text
    return out
