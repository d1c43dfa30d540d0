"""What the runner and the flush/query section share: paths, pinning, sending, draining."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procfs
import workloads

BENCH = Path(__file__).resolve().parent
BUILD = BENCH / "build"
LOADGEN = BUILD / "loadgen"
RMEM_MAX = 33_554_432

#: the daemons run on this core, the generator and this runner on the other
DAEMON_CPU = 0
LOAD_CPU = 1

#: pass criteria (issue 4): loss under 0.1 %, receive queue empty within 0.6 s
MAX_LOSS = 0.001
MAX_DRAIN_SECONDS = 0.6
#: a step whose generator sent less than this share of the target is
#: "generator-limited": the generator, not the daemon, set the rate
GENERATOR_SHORTFALL = 0.97
#: after a failed step, wait at most this long for the socket to empty
DRAIN_BOUND_SECONDS = 60.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def send(
    corpus: workloads.Corpus, port: int, lines_per_second: float, seconds: float
) -> dict[str, Any]:
    datagrams_per_second = lines_per_second / corpus.lines_per_datagram
    cmd = [
        "taskset",
        "-c",
        str(LOAD_CPU),
        str(LOADGEN),
        str(corpus.path),
        "127.0.0.1",
        str(port),
        f"{datagrams_per_second:.3f}",
        f"{seconds:.3f}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def wait_drained(port: int) -> float | None:
    """Seconds until the receive queue is empty (polled every 5 ms), None if never."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        sock = procfs.udp_socket(port)
        if sock is None or sock.rx_queue == 0:
            return elapsed
        if elapsed > DRAIN_BOUND_SECONDS:
            return None
        time.sleep(0.005)
