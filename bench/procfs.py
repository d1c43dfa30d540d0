"""Readings from /proc: a UDP socket's queue and drops, a process's CPU and memory."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class UdpSocket:
    rx_queue: int  # bytes waiting in the receive queue
    drops: int  # datagrams the kernel dropped on this socket since it was opened


def udp_socket(port: int) -> UdpSocket | None:
    """The IPv4 UDP socket bound to local `port`, from /proc/net/udp."""
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local = fields[1]
            if int(local.rsplit(":", 1)[1], 16) != port:
                continue
            rx_queue = int(fields[4].split(":")[1], 16)
            return UdpSocket(rx_queue=rx_queue, drops=int(fields[12]))
    return None


def family(pid: int) -> list[int]:
    """`pid` and every live descendant (our daemon's ingest workers)."""
    found = [pid]
    for member in found:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{member}/task"):
                with open(f"/proc/{member}/task/{task}/children") as f:
                    found.extend(int(child) for child in f.read().split())
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its children (every thread), in seconds."""
    total = 0
    for member in family(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/stat") as f:
            text = f.read()
            # The command name is in parentheses and may hold spaces: split after it.
            fields = text[text.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of the process plus its children, in KiB.

    For a family, the sum of each member's peak: an upper bound of the
    family's peak, which is reached when every member peaks at once.
    """
    out = {"VmRSS": 0, "VmHWM": 0}
    for member in family(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0])
    return out


def read_sysctl(name: str) -> int:
    with open("/proc/sys/" + name.replace(".", "/")) as f:
        return int(f.read().split()[0])


def write_sysctl(name: str, value: int) -> None:
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(str(value))


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown"
