"""Where our daemon's time goes under load: py-spy samples, summed by function.

Runs our daemon on workloads (a) (1 line/datagram) and (d) (packed) at about
70% of the rate it sustained in this run (or a fixed rate without one),
records it with `py-spy record --nonblocking` for a few seconds, and sums the
samples by function: "self" (the function was on top of the stack) and
"total" (anywhere on it). py-spy is installed into the venv on demand.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import daemons
import workloads
from harness import BUILD, log, send

PY_SPY = daemons.ROOT / ".venv" / "bin" / "py-spy"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def ensure_py_spy() -> bool:
    if PY_SPY.exists():
        return True
    log("installing py-spy into the venv (pip)")
    result = subprocess.run(
        [str(daemons.PYTHON), "-m", "pip", "install", "-q", "py-spy"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode == 0 and PY_SPY.exists()


def _short(frame: str) -> tuple[str, bool]:
    """'add (/work/main/aggregator/aggregate.py:170)' -> ('aggregate.py:add', True).

    The flag tells whether the frame is in our package. A sample whose top
    frame is asyncio's Runner.run is time in C code under the event loop
    (uvloop: epoll, recvfrom, building the datagram, dispatching callbacks).
    """
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), False
    path = match.group("file")
    name = f"{Path(path).name}:{match.group('func')}"
    if name == "runners.py:Runner.run":
        name = "event loop, in C (uvloop: epoll, recvfrom, callbacks)"
    ours = path.startswith("aggregator/") or "/aggregator/" in path
    # cli.py and __main__.py wrap every sample of the main thread: no news.
    return name, ours and Path(path).name not in ("cli.py", "__main__.py")


def summarise(raw: Path, top: int = 12) -> dict[str, Any]:
    """Samples by function: on top of the stack ("self"), anywhere ("total", ours only)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        samples += count
        own[frames[-1][0]] += count
        for name in {name for name, ours in frames if ours}:
            total[name] += count

    def rows(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / samples, 1)] for name, n in counter.most_common(top)]

    return {"samples": samples, "self": rows(own), "total": rows(total)}


def profile_workload(
    key: str, rate: float, seconds: float, flush_interval: int
) -> dict[str, Any] | None:
    corpus = workloads.build(workloads.WORKLOADS[key], BUILD)
    daemon = daemons.Ours(BUILD / "run" / "profile", flush_interval, 0)
    daemon.start()
    raw = BUILD / f"profile-{key}.txt"
    raw.unlink(missing_ok=True)
    try:
        daemon.wait_flush_after(time.time(), flush_interval * 4 + 30)
        # Warm up every series first, as the rate search does.
        send(corpus, daemon.udp_port, min(rate, 25_000), max(1.0, corpus.workload.series / 25_000))
        sender = threading.Thread(
            target=send, args=(corpus, daemon.udp_port, rate, seconds + 2), daemon=True
        )
        sender.start()
        time.sleep(1)
        result = subprocess.run(
            [
                str(PY_SPY),
                "record",
                "--nonblocking",
                "--pid",
                str(daemon.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(raw),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        sender.join(seconds + 40)
    finally:
        daemon.stop()
    if result.returncode != 0 or not raw.exists():
        log(f"  py-spy failed: {result.stderr[-500:]}")
        return None
    summary = summarise(raw)
    summary.update({"workload": key, "lines_per_second": rate, "seconds": seconds})
    return summary


def _rate(results: dict[str, Any], key: str, default: float) -> float:
    figures = [
        t["figure"]
        for t in results.get("rate", {}).get("trials", [])
        if t["daemon"] == "ours" and t["workload"] == key and t["figure"]
    ]
    return round(statistics.median(figures) * 0.7, -3) if figures else default


def tables(profiles: list[dict[str, Any]]) -> str:
    text = []
    for p in profiles:
        text += [
            f"Workload ({p['workload']}) at {p['lines_per_second']:,.0f} lines/s, "
            f"{p['samples']:,} samples:",
            "",
            "| self % | function (on top of the stack) | | total % | function of ours (anywhere) |",
            "|---|---|---|---|---|",
        ]
        for own, total in itertools.zip_longest(p["self"], p["total"], fillvalue=["", ""]):
            own_name = f"`{own[0]}`" if own[0] else ""
            total_name = f"`{total[0]}`" if total[0] else ""
            text.append(f"| {own[1]} | {own_name} | | {total[1]} | {total_name} |")
        text.append("")
    return "\n".join(text)


def run(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    log("profile of our daemon (py-spy)")
    if not ensure_py_spy():
        log("  py-spy is not available: profile skipped")
        return {"skipped": "py-spy not available"}
    seconds = 2.0 if args.smoke else 10.0
    profiles = []
    for key, default in (("a", 20_000.0), ("d", 50_000.0)):
        rate = 2_000.0 if args.smoke else _rate(results, key, default)
        try:
            found = profile_workload(key, rate, seconds, args.flush_interval)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log(f"  profile of ({key}) failed: {exc}")
            found = None
        if found:
            profiles.append(found)
    text = tables(profiles)
    print("\n" + text, flush=True)
    return {"profiles": profiles, "table": text}


if __name__ == "__main__":  # pragma: no cover - a convenience for ad hoc runs
    sys.exit(0)
