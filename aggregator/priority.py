"""The writer thread's CPU priority when ingest workers read the sockets.

With ``listen.workers``, a flush's CPU work (unpickling and merging the
workers' windows, the snapshot, SQLite) runs in the daemon's writer
thread, on the cores the workers read from. At the moment of a flush the
workers are busy too (they pickle their windows), and a worker that
falls behind loses datagrams once its socket's buffer fills, while a
flush that finishes later loses nothing. So the writer runs under
``SCHED_IDLE``: it takes the CPU the workers leave. A flush that starts
more than half an interval late (the previous one took the CPU it was
left and more) runs at normal priority, and so does every one after it
until one starts on time: the writer cannot fall behind for good when
the workers take every core.

Going back from ``SCHED_IDLE`` to normal priority needs ``CAP_SYS_NICE``
or an ``RLIMIT_NICE`` of 20 or more (a nice value of 0; systemd:
``LimitNICE=+0``). Without either the writer keeps normal priority
throughout. Without workers the writer shares one interpreter with the
socket readers, and a writer put off while it holds the GIL would hold
them up, so this is for workers only.
"""

from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger(__name__)

#: bit of CAP_SYS_NICE in /proc/self/status' CapEff
_CAP_SYS_NICE = 23
#: RLIMIT_NICE that lets a thread back to nice 0 (the ceiling is 20 - limit)
_NICE_LIMIT_FOR_NORMAL = 20


def can_return_to_normal() -> bool:
    """May a thread of this process leave SCHED_IDLE for normal priority again?"""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if nice_limit_allows_normal(soft):
        return True
    try:
        with open("/proc/self/status") as status:
            return has_cap_sys_nice(status.read())
    except OSError:
        return False


def nice_limit_allows_normal(soft: int) -> bool:
    """Does an RLIMIT_NICE of ``soft`` let a thread set nice 0?"""
    return soft == resource.RLIM_INFINITY or soft >= _NICE_LIMIT_FOR_NORMAL


def has_cap_sys_nice(status: str) -> bool:
    """Is CAP_SYS_NICE among the effective capabilities of a /proc/.../status text?"""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    return False


def behind(queued: float, interval: float) -> bool:
    """Did a flush wait so long for the writer that the writer is falling behind?"""
    return queued > interval / 2


class WriterPriority:
    """Sets the calling thread (the writer) idle or normal, as each flush starts."""

    def __init__(self) -> None:
        self.idle = False
        self.enabled = True

    def flush_starts(self, queued: float, interval: float) -> None:
        """Before a flush that waited ``queued`` seconds for the writer."""
        idle = not behind(queued, interval)
        if not self.enabled or idle == self.idle:
            return
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError as exc:  # a seccomp filter, say: stay as the thread is
            self.enabled = False
            log.warning("the writer thread keeps its CPU priority: %s", exc)
            return
        self.idle = idle
        if idle:
            log.info("the writer flushes on the CPU the ingest workers leave (SCHED_IDLE)")
        else:
            log.warning(
                "a flush waited %.1f s for the writer: flushing at normal CPU priority "
                "until a flush starts on time",
                queued,
            )
