#!/usr/bin/env python3
"""Where the two cores go while our daemon takes one workload at given rates.

The rate benchmark (run.py) says whether a rate passed; this says who used
the CPU meanwhile: the daemon's process, each ingest worker, the generator
(user and system time, which on loopback includes delivering each datagram
into the receiving socket), the machine's softirq and idle shares, and the
socket's kernel drops. One daemon, started once and warmed with one pass
over every series; each rate is offered for ``--seconds``, then the socket
is drained and the next one follows after a flush interval.

    .venv/bin/python bench/cpusplit.py --workload c --workers 2 --rates 380000,420000
    # one worker on core 0, the daemon's own process on core 1 (with the generator)
    .venv/bin/python bench/cpusplit.py --workers 1 --worker-cpus 0 --daemon-cpus 1

Every loop is bounded: the rates given, each for the seconds given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import daemons
import procfs
import workloads
from harness import BUILD, LOAD_CPU, LOADGEN, log, wait_drained

#: /proc/stat's first fields, in order
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")


def machine_ticks() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1 : 1 + len(CPU_FIELDS)]]


def process_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: str, threads: bool) -> None:
    cmd = ["taskset", "-p", "-c", cpus, str(pid)]
    if threads:
        cmd.insert(1, "-a")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def offer(corpus: workloads.Corpus, port: int, rate: float, seconds: float) -> dict[str, float]:
    """Send at ``rate`` lines/s; the generator's report and its own CPU seconds."""
    cmd = [
        "/usr/bin/time", "-f", "%U %S", "taskset", "-c", str(LOAD_CPU), str(LOADGEN),
        str(corpus.path), "127.0.0.1", str(port),
        f"{rate / corpus.lines_per_datagram:.3f}", f"{seconds:.3f}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    report: dict[str, float] = json.loads(done.stdout)
    user, system = (float(x) for x in done.stderr.split()[-2:])
    report["generator_user"], report["generator_system"] = user, system
    return report


def measure(
    daemon: daemons.Daemon, family: list[int], corpus: workloads.Corpus, rate: float, seconds: float
) -> str:
    """Offer ``rate`` for ``seconds``, wait for the socket to drain; one line of figures."""
    before = {pid: process_seconds(pid) for pid in family}
    ticks = machine_ticks()
    sock = procfs.udp_socket(daemon.udp_port)
    report = offer(corpus, daemon.udp_port, rate, seconds)
    drain = wait_drained(daemon.udp_port)
    spent = [b - a for a, b in zip(ticks, machine_ticks(), strict=True)]
    after = procfs.udp_socket(daemon.udp_port)
    elapsed = report["elapsed"]
    cores = {
        name: round(n / sum(spent) * (os.cpu_count() or 1), 2)
        for name, n in zip(CPU_FIELDS, spent, strict=True)
    }
    used = [(process_seconds(pid) - before[pid]) / elapsed for pid in family]
    processes = ", ".join(
        f"{'daemon' if i == 0 else f'worker {i}'} {share:.2f}" for i, share in enumerate(used)
    )
    generator = (report["generator_user"] + report["generator_system"]) / elapsed
    sent = corpus.lines_sent(int(report["sent"])) / elapsed
    drops = after.drops - sock.drops if after and sock else -1
    drained = f"{drain:.2f} s" if drain is not None else "never"
    return (
        f"offered {rate:,.0f} lines/s: sent {sent:,.0f}/s, kernel drops {drops:,}, "
        f"drained in {drained}; cores: generator {generator:.2f}, {processes}; machine {cores}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="c", choices=sorted(workloads.WORKLOADS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rates", default="300000,380000,420000,460000", help="lines/s")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--worker-cpus", help="comma-separated: worker i on the i-th core")
    parser.add_argument("--daemon-cpus", help="the daemon's own process (taskset list)")
    args = parser.parse_args()
    corpus = workloads.build(workloads.WORKLOADS[args.workload], BUILD)
    with tempfile.TemporaryDirectory() as folder:
        daemon = daemons.make("ours", Path(folder), 5, 0, args.workers)
        daemon.start()
        try:
            family = procfs.family(daemon.pid)
            if args.daemon_cpus:
                pin(family[0], args.daemon_cpus, threads=True)
            for cpus, worker in zip((args.worker_cpus or "").split(","), family[1:], strict=False):
                if cpus:
                    pin(worker, cpus, threads=True)
            daemon.wait_flush_after(time.time(), 60)
            warm = 25_000.0
            offer(corpus, daemon.udp_port, warm, max(1.0, corpus.workload.series / warm))
            for rate in (float(r) for r in args.rates.split(",")):
                daemon.wait_flush_after(time.time(), 60)
                log(measure(daemon, family, corpus, rate, args.seconds))
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
