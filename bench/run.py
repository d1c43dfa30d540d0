#!/usr/bin/env python3
"""The benchmark suite: our daemon against Etsy statsd, then flush and query costs.

    .venv/bin/python bench/run.py                 # everything (about 45 minutes)
    .venv/bin/python bench/run.py --smoke         # everything, tiny (CI)
    .venv/bin/python bench/run.py --workloads a,b --trials 3 --sections rate

See bench/README.md for what is measured and how. Every loop here is bounded
by a step count and by time; every process it starts, it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import daemons
import procfs
import workloads
from harness import (
    BENCH,
    BUILD,
    DAEMON_CPU,
    GENERATOR_SHORTFALL,
    LOAD_CPU,
    LOADGEN,
    MAX_DRAIN_SECONDS,
    MAX_LOSS,
    RMEM_MAX,
    log,
    send,
    wait_drained,
)

#: passes over every series before a trial's first step, at a gentle rate
WARMUP_PASSES = 3

# ---------------------------------------------------------------- preparation


def prepare_environment(smoke: bool) -> dict[str, Any]:
    """rmem_max, the C generator, Etsy statsd; returns what it found or did."""
    notes: dict[str, Any] = {}
    rmem = procfs.read_sysctl("net.core.rmem_max")
    if rmem < RMEM_MAX:
        try:
            procfs.write_sysctl("net.core.rmem_max", RMEM_MAX)
            notes["rmem_max"] = f"raised net.core.rmem_max from {rmem} to {RMEM_MAX}"
        except OSError as exc:
            notes["rmem_max"] = (
                f"net.core.rmem_max is {rmem} (< {RMEM_MAX}) and could not be raised ({exc}); "
                "both daemons get at most that receive buffer"
            )
    else:
        notes["rmem_max"] = f"net.core.rmem_max is {rmem} (>= {RMEM_MAX})"
    log(notes["rmem_max"])

    BUILD.mkdir(parents=True, exist_ok=True)
    source = BENCH / "loadgen.c"
    if not LOADGEN.exists() or LOADGEN.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(LOADGEN), str(source)], check=True
        )
        log(f"compiled {LOADGEN.relative_to(BENCH.parent)}")

    if shutil.which("node") is None:
        notes["etsy"] = "node is not installed: Etsy statsd skipped"
    elif not daemons.ETSY_STATS.exists():
        log("installing Etsy statsd (npm ci in bench/)")
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=BENCH,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0 or not daemons.ETSY_STATS.exists():
            notes["etsy"] = "npm ci failed: Etsy statsd skipped\n" + result.stderr[-2000:]
    if "etsy" in notes:
        log(notes["etsy"])
    return notes


def machine_speed(smoke: bool) -> dict[str, float]:
    """How fast this VM runs right now, taken at a run's start and end.

    Its speed moves from hour to hour by more than most changes here do
    (the same flush took 0.62 s in one hour and 1.75 s in another), so
    figures from different runs compare only next to these: the time of a
    fixed pure-Python loop on the runner's core, and how many one-line
    datagrams a second the generator sends on its core to a socket that
    nobody reads (its ceiling on workloads (a) and (c)).
    """
    additions = 1_000_000 if smoke else 10_000_000
    started = time.perf_counter()
    total = 0
    for i in range(additions):
        total += i
    loop = time.perf_counter() - started
    corpus = workloads.build(workloads.WORKLOADS["a"], BUILD)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sent = send(corpus, sink.getsockname()[1], 0, 0.2 if smoke else 2.0)  # 0: flat out
    return {
        f"python_{additions // 1_000_000}M_additions_seconds": round(loop, 3),
        "generator_datagrams_per_second": round(sent["sent"] / sent["elapsed"]),
    }


def wait_quiet(limit_seconds: float, threshold: float = 0.5) -> float:
    """Wait (bounded) for the 1-minute load average to fall under `threshold`."""
    deadline = time.monotonic() + limit_seconds
    load = procfs.load_average()
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(5)
        load = procfs.load_average()
    return load


# ---------------------------------------------------------------- one step


@dataclass
class Step:
    rate: float  # offered lines/s (the target)
    achieved: float  # lines/s the generator actually sent
    seconds: float
    lines: int
    counters_sent: int
    counters_received: float
    loss: float
    drain_seconds: float | None  # None: not empty within DRAIN_BOUND_SECONDS
    kernel_drops: int
    cpu_seconds: float
    passed: bool
    reason: str
    generator_limited: bool

    @property
    def cpu_us_per_line(self) -> float:
        return self.cpu_seconds / self.lines * 1e6 if self.lines else math.nan


def flush_wait(daemon: daemons.Daemon) -> float:
    """How long to wait for a flush: a slow writer (flushes queued behind a
    long SQLite transaction) can take a while, but not forever."""
    return max(180.0, daemon.flush_interval * 20.0)


def settle(daemon: daemons.Daemon) -> daemons.Totals:
    """Empty the socket, then return the totals of a flush that began after that."""
    wait_drained(daemon.udp_port)
    return daemon.wait_flush_after(time.time() + 0.01, flush_wait(daemon))


def run_step(
    daemon: daemons.Daemon,
    corpus: workloads.Corpus,
    rate: float,
    seconds: float,
    before: daemons.Totals,
) -> tuple[Step, daemons.Totals]:
    port = daemon.udp_port
    sock_before = procfs.udp_socket(port)
    cpu_before = procfs.cpu_seconds(daemon.pid)
    report = send(corpus, port, rate, seconds)
    drain = wait_drained(port)
    drained_at = time.time()
    # CPU from the first datagram to the empty queue: the flushes that fall
    # inside (about one per flush interval, as in steady state) count, the
    # wait for the final flush below does not.
    cpu = procfs.cpu_seconds(daemon.pid) - cpu_before
    after = daemon.wait_flush_after(drained_at + 0.01, flush_wait(daemon))
    sock_after = procfs.udp_socket(port)
    drops = (sock_after.drops - sock_before.drops) if sock_after and sock_before else -1

    lines = corpus.lines_sent(report["sent"])
    sent = corpus.counters_sent(report["sent"])
    received = after.counters - before.counters
    loss = (sent - received) / sent if sent else 0.0
    achieved = lines / report["elapsed"] if report["elapsed"] else 0.0
    reasons = []
    if drain is None or drain > MAX_DRAIN_SECONDS:
        reasons.append("queue not drained in 0.6 s" if drain is not None else "queue never drained")
    if loss >= MAX_LOSS:
        reasons.append(f"loss {loss:.3%}")
    if loss < -MAX_LOSS:
        reasons.append(f"received {received - sent:.0f} more than sent (measurement error)")
    step = Step(
        rate=rate,
        achieved=achieved,
        seconds=report["elapsed"],
        lines=lines,
        counters_sent=sent,
        counters_received=received,
        loss=loss,
        drain_seconds=drain,
        kernel_drops=drops,
        cpu_seconds=cpu,
        passed=not reasons,
        reason="; ".join(reasons) or "ok",
        generator_limited=achieved < rate * GENERATOR_SHORTFALL,
    )
    return step, after


# ---------------------------------------------------------------- the search


def search(
    measure: Callable[[float], Step],
    start: float,
    growth: float,
    max_steps: int,
    steps: list[Step],
    precision: float = 1.1,
) -> Step | None:
    """Grow the rate by `growth` until a step fails, then bisect (geometric).

    Stops when the best passing rate and the lowest failing one are within
    `precision` of each other, when the generator cannot offer more, or after
    `max_steps` steps. Returns the best passing step; appends every step to
    `steps` as it goes (so a caller still has them if a step raises).
    """
    best: Step | None = None
    lowest_fail: float | None = None
    rate = start
    for _ in range(max_steps):
        step = measure(rate)
        steps.append(step)
        mark = "pass" if step.passed else "FAIL"
        drain = step.drain_seconds if step.drain_seconds is not None else -1.0
        log(
            f"    {rate:>11,.0f} lines/s  {mark}  sent {step.achieved:,.0f}/s, loss "
            f"{step.loss:.4%}, drain {drain:.3f}s, "
            f"drops {step.kernel_drops}, {step.cpu_us_per_line:.2f} us/line ({step.reason})"
        )
        if step.passed:
            if best is None or step.rate > best.rate:
                best = step
            if step.generator_limited:
                break
        else:
            lowest_fail = rate if lowest_fail is None else min(lowest_fail, rate)
        if lowest_fail is None:
            rate *= growth
        elif best is None:
            rate /= 2
        elif lowest_fail / best.rate <= precision:
            break
        else:
            rate = math.sqrt(best.rate * lowest_fail)
    return best


@dataclass
class Trial:
    daemon: str
    workload: str
    figure: float  # lines/s, 0 when no rate passed
    generator_limited: bool
    cpu_us_per_line: float
    peak_rss_kib: int
    idle_rss_kib: int
    active_series: int
    load_average: float  # 1-minute load average when the trial started
    steps: list[Step] = field(default_factory=list)
    error: str = ""  # why the trial ended early, if it did

    @property
    def rss_per_series(self) -> float:
        if not self.active_series:
            return math.nan
        return (self.peak_rss_kib - self.idle_rss_kib) * 1024 / self.active_series


def run_trial(
    kind: str,
    corpus: workloads.Corpus,
    options: argparse.Namespace,
    start: float,
    growth: float,
    max_steps: int,
    workdir: Path,
) -> Trial:
    load = procfs.load_average()
    daemon = daemons.make(kind, workdir, options.flush_interval, DAEMON_CPU, options.workers)
    daemon.start()
    steps: list[Step] = []
    best: Step | None = None
    error = ""
    idle = 0
    active = 0
    memory = {"VmHWM": 0}
    try:
        daemon.wait_flush_after(time.time(), flush_wait(daemon))
        idle = procfs.memory_kib(daemon.pid)["VmRSS"]
        if options.warmup:
            # Passes over every series at a gentle rate: series creation
            # (dict entries, SQLite rows, Etsy keys) happens here, not in step 1.
            # With ingest workers, each worker learns a series' line shape
            # from the first of its lines it reads (about 25 us at 100k
            # series): after WARMUP_PASSES, each of two has read about 7/8.
            warm_rate = min(start / 2, 25_000.0)
            seconds = max(1.0, WARMUP_PASSES * corpus.workload.series / warm_rate)
            send(corpus, daemon.udp_port, warm_rate, seconds)
            active = min(corpus.workload.series, int(warm_rate * seconds))
        before = settle(daemon)

        def measure(rate: float) -> Step:
            nonlocal before
            step, before = run_step(daemon, corpus, rate, options.duration, before)
            return step

        best = search(measure, start, growth, max_steps, steps)
        memory = procfs.memory_kib(daemon.pid)
        if kind == "ours" and options.cross_check:
            cross_check(daemon, corpus)  # type: ignore[arg-type]
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        # One bad trial (a daemon that stops flushing, a crash) is reported,
        # not fatal: the figure is the best rate that passed before it.
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log(f"    trial ended early: {error}")
        passed = [s for s in steps if s.passed]
        best = max(passed, key=lambda s: s.rate) if passed else None
        with contextlib.suppress(OSError):
            memory = procfs.memory_kib(daemon.pid)
    finally:
        daemon.stop()
    active = max(active, *(min(corpus.workload.series, s.lines) for s in steps), 0)
    return Trial(
        daemon=kind,
        workload=corpus.workload.key,
        # when the generator fell short, the rate it did send is the figure
        # (the daemon took all of it: "≥" in the table)
        figure=(best.achieved if best.generator_limited else best.rate) if best else 0.0,
        generator_limited=bool(best and best.generator_limited),
        cpu_us_per_line=best.cpu_us_per_line if best else math.nan,
        peak_rss_kib=memory["VmHWM"],
        idle_rss_kib=idle,
        active_series=active,
        load_average=load,
        steps=steps,
        error=error,
    )


def cross_check(daemon: daemons.Ours, corpus: workloads.Corpus, sample: int = 300) -> None:
    """The SQL sums the runner reads must be what the HTTP query API reports."""
    by_name = daemon.counter_sums_by_name()
    names = sorted(by_name)
    if len(names) > sample:
        stride = len(names) / sample
        names = [names[int(i * stride)] for i in range(sample)]
    api = daemon.api_counter_sums(names)
    wrong = [n for n in names if abs(api[n] - by_name[n]) > 1e-6 * max(1.0, by_name[n])]
    if wrong:
        raise RuntimeError(
            f"query API and storage disagree on {len(wrong)} of {len(names)} counters, "
            f"e.g. {wrong[0]}: API {api[wrong[0]]} vs stored {by_name[wrong[0]]}"
        )
    log(f"    cross-check: the query API agrees on {len(names)} counters")


# ---------------------------------------------------------------- reporting


def spread(values: Sequence[float], fmt: str) -> str:
    good = [v for v in values if not math.isnan(v)]
    if not good:
        return "n/a"
    median = statistics.median(good)
    if len(good) == 1:
        return format(median, fmt)
    return f"{format(median, fmt)} ({format(min(good), fmt)}–{format(max(good), fmt)})"


def median(values: Sequence[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return statistics.median(good) if good else math.nan


def table(trials: list[Trial], keys: Sequence[str], corpora: dict[str, workloads.Corpus]) -> str:
    """Markdown: one row per workload, each figure as median (min-max)."""
    rows = [
        "| workload | lines/dgram | ours lines/s | Etsy lines/s | ours/Etsy "
        "| CPU µs/line ours | CPU µs/line Etsy | peak RSS MiB ours | peak RSS MiB Etsy "
        "| RSS B/series ours | RSS B/series Etsy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        cells = {}
        for kind in ("ours", "etsy"):
            mine = [t for t in trials if t.workload == key and t.daemon == kind]
            limited = any(t.generator_limited for t in mine)
            figure = spread([t.figure for t in mine], ",.0f") if mine else "—"
            if any(t.error for t in mine):
                figure += " *"  # a trial ended early (see the JSON's "error")
            cells[kind] = {
                "figure": ("≥ " if limited else "") + figure,
                "median": median([t.figure for t in mine]) if mine else math.nan,
                "cpu": spread([t.cpu_us_per_line for t in mine], ".2f") if mine else "—",
                "rss": spread([t.peak_rss_kib / 1024 for t in mine], ",.0f") if mine else "—",
                "per": spread([t.rss_per_series for t in mine], ",.0f") if mine else "—",
            }
        ours, etsy = cells["ours"], cells["etsy"]
        ratio = (
            f"{ours['median'] / etsy['median']:.2f}"
            if etsy["median"] and not math.isnan(etsy["median"] + ours["median"])
            else "—"
        )
        if ratio != "—" and ours["figure"].startswith("≥"):
            ratio = "≥ " + ratio  # ours is a lower bound: so is the ratio
        workload = workloads.WORKLOADS[key]
        rows.append(
            f"| ({key}) {workload.title} | {corpora[key].lines_per_datagram:.1f} "
            f"| {ours['figure']} | {etsy['figure']} | {ratio} | {ours['cpu']} | {etsy['cpu']} "
            f"| {ours['rss']} | {etsy['rss']} | {ours['per']} | {etsy['per']} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds of everything (CI)")
    parser.add_argument("--workloads", default="a,b,c,d,e", help="comma-separated: a,b,c,d,e")
    parser.add_argument("--trials", type=int, help="trials per workload and daemon (default 3)")
    parser.add_argument("--daemons", default="ours,etsy", help="comma-separated: ours,etsy")
    parser.add_argument(
        "--sections",
        default="rate,flush,query,profile",
        help="comma-separated: rate (the table), flush, query, profile",
    )
    parser.add_argument("--duration", type=float, help="seconds per step (default 5)")
    parser.add_argument("--flush-interval", type=int, help="both daemons (default 5)")
    parser.add_argument("--max-steps", type=int, help="steps per search (default 10)")
    parser.add_argument("--wait-quiet", type=float, default=None, help="seconds to wait for load")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument(
        "--probe-rate",
        type=float,
        help="lines/s offered across the 100k-series flush (default: half ours on (a))",
    )
    parser.add_argument(
        "--flush-series",
        help="flush section: active series per measurement (default 10000,100000,1000000)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run ours with listen.workers = N, on both cores (Etsy stays on core 0)",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.trials = args.trials or (1 if smoke else 3)
    args.duration = args.duration or (1.0 if smoke else 5.0)
    args.flush_interval = args.flush_interval or (1 if smoke else 5)
    args.max_steps = args.max_steps or (1 if smoke else 10)
    args.warmup = not smoke
    args.cross_check = True
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if smoke else 180.0
    args.workload_keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    for key in args.workload_keys:
        if key not in workloads.WORKLOADS:
            parser.error(f"--workloads: unknown workload {key!r} (a, b, c, d, e)")
    args.daemon_kinds = [k.strip() for k in args.daemons.split(",") if k.strip()]
    args.section_names = {s.strip() for s in args.sections.split(",") if s.strip()}
    default_sizes = "1000,10000" if smoke else "10000,100000,1000000"
    try:
        args.flush_sizes = [int(n) for n in (args.flush_series or default_sizes).split(",")]
    except ValueError:
        parser.error("--flush-series: comma-separated numbers of series")
    if not args.flush_sizes or min(args.flush_sizes) < 1:
        parser.error("--flush-series: each number of series must be at least 1")
    if args.trials < 1 or args.trials > 20:
        parser.error("--trials: 1 to 20")
    return args


def start_rate(key: str, smoke: bool) -> float:
    if smoke:
        return 2_000.0
    return 10_000.0 if not workloads.WORKLOADS[key].packed else 40_000.0


def rate_section(
    args: argparse.Namespace, notes: dict[str, Any], save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    kinds = [k for k in args.daemon_kinds if not (k == "etsy" and "etsy" in notes)]
    corpora = {}
    for key in args.workload_keys:
        corpora[key] = workloads.build(workloads.WORKLOADS[key], BUILD)
    trials: list[Trial] = []
    for key in args.workload_keys:
        corpus = corpora[key]
        log(
            f"workload ({key}) {corpus.workload.title}: {corpus.datagrams} datagrams, "
            f"{corpus.lines_per_datagram:.1f} lines/datagram"
        )
        for number in range(args.trials):
            for kind in kinds:
                earlier = [t.figure for t in trials if t.workload == key and t.daemon == kind]
                if earlier and median(earlier) > 0 and not args.smoke:
                    start, growth = median(earlier) * 0.8, 1.25
                else:
                    start, growth = start_rate(key, args.smoke), 2.0
                log(
                    f"  {kind}, trial {number + 1}/{args.trials} "
                    f"(load average {procfs.load_average():.2f})"
                )
                trial = run_trial(
                    kind, corpus, args, start, growth, args.max_steps, BUILD / "run" / kind
                )
                trials.append(trial)
                log(
                    f"  -> {trial.figure:,.0f} lines/s, {trial.cpu_us_per_line:.2f} us/line, "
                    f"peak RSS {trial.peak_rss_kib / 1024:.0f} MiB"
                )
                save(_rate_results(trials, args.workload_keys, corpora))
    found = _rate_results(trials, args.workload_keys, corpora)
    if args.workers:
        found["table"] = (
            f"ours: listen.workers = {args.workers} on cores {daemons.ALL_CPUS} "
            f"(the generator's core too); Etsy on core {DAEMON_CPU}\n\n" + found["table"]
        )
    print("\n" + found["table"] + "\n", flush=True)
    return found


def _rate_results(
    trials: list[Trial], keys: Sequence[str], corpora: dict[str, workloads.Corpus]
) -> dict[str, Any]:
    return {
        "table": table(trials, [k for k in keys if any(t.workload == k for t in trials)], corpora),
        "trials": [{**asdict(t), "rss_per_series": t.rss_per_series} for t in trials],
        "corpora": {
            k: {"datagrams": c.datagrams, "lines": c.lines, "bytes": c.bytes}
            for k, c in corpora.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOAD_CPU})
    started = time.time()
    notes = prepare_environment(args.smoke)
    load = wait_quiet(args.wait_quiet)
    machine = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": procfs.cpu_model(),
        "load_average_at_start": load,
        "speed_at_start": machine_speed(args.smoke),
        "python": sys.version.split()[0],
        "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        if shutil.which("node")
        else None,
    }
    log(f"machine: {machine}")
    results: dict[str, Any] = {"machine": machine, "notes": notes, "args": vars(args).copy()}
    results["args"] = {
        k: (sorted(v) if isinstance(v, set) else v) for k, v in results["args"].items()
    }
    results["args"]["out"] = str(args.out) if args.out else None
    out = args.out or BUILD / f"results-{'smoke' if args.smoke else 'full'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rate: dict[str, Any] | None = None) -> None:
        """Write what is known so far: a long run that dies keeps its figures."""
        if rate is not None:
            results["rate"] = rate
        results["seconds"] = round(time.time() - started, 1)
        out.write_text(json.dumps(results, indent=2, default=str))

    failed = False
    try:
        if "rate" in args.section_names:
            results["rate"] = rate_section(args, notes, save)
            if args.smoke:
                failed |= smoke_check(results["rate"])
        if "flush" in args.section_names or "query" in args.section_names:
            import flushquery

            results.update(flushquery.run(args, results))
        if "profile" in args.section_names:
            import profiling

            results["profile"] = profiling.run(args, results)
        # only after a whole run: a failing one must keep its figures, not probe on
        machine["speed_at_end"] = machine_speed(args.smoke)
        log(f"machine speed at the end: {machine['speed_at_end']}")
    finally:
        save()
        log(f"results: {out} ({results['seconds']:.0f} s)")
    return 1 if failed else 0


def smoke_check(rate: dict[str, Any]) -> bool:
    """In --smoke, the figures are meaningless but the plumbing must work."""
    failed = False
    for trial in rate["trials"]:
        for step in trial["steps"]:
            if step["counters_sent"] and step["counters_received"] <= 0:
                log(f"smoke: {trial['daemon']} ({trial['workload']}) received no counters")
                failed = True
    return failed


if __name__ == "__main__":
    sys.exit(main())
