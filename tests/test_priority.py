"""The writer thread's CPU priority against the ingest workers (priority.py).

The guard (may a thread come back from SCHED_IDLE?) is checked against what
the kernel allows, in child processes with the limits and the user set up
for each case; the switches are checked on a real thread's policy.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aggregator import priority

CI = bool(os.environ.get("CI"))

BEHIND = [
    # (seconds a flush waited for the writer, interval, behind?)
    (0.0, 10, False),
    (4.9, 10, False),
    (5.0, 10, False),
    (5.01, 10, True),
    (0.6, 1, True),
    (30.0, 10, True),
]


@pytest.mark.parametrize(("queued", "interval", "expected"), BEHIND)
def test_behind_is_more_than_half_an_interval_late(
    queued: float, interval: int, expected: bool
) -> None:
    assert priority.behind(queued, interval) is expected


NICE_LIMITS = [
    # (RLIMIT_NICE soft limit, may a thread set nice 0?): the ceiling is 20 - limit
    (0, False),
    (19, False),
    (20, True),
    (40, True),
    (resource.RLIM_INFINITY, True),
]


@pytest.mark.parametrize(("soft", "expected"), NICE_LIMITS)
def test_an_rlimit_nice_of_20_allows_normal_priority(soft: int, expected: bool) -> None:
    assert priority.nice_limit_allows_normal(soft) is expected


STATUS = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{}\nCapBnd:\t000001ffffffffff\n"
CAPABILITIES = [
    ("000001fffeffffff", True),  # root without CAP_SYS_RESOURCE (bit 24)
    ("0000000000800000", True),  # CAP_SYS_NICE (bit 23) alone
    ("000001ffff7fffff", False),  # everything but CAP_SYS_NICE
    ("0000000000000000", False),  # an ordinary user
]


@pytest.mark.parametrize(("bits", "expected"), CAPABILITIES)
def test_cap_sys_nice_is_read_from_cap_eff(bits: str, expected: bool) -> None:
    assert priority.has_cap_sys_nice(STATUS.format(bits)) is expected


def test_no_cap_eff_line_is_no_capability() -> None:
    assert priority.has_cap_sys_nice("Name:\tx\n") is False


def _needs_root() -> None:
    if os.geteuid() != 0:
        if CI:
            pytest.fail("CI runs as root: these cases change user, which only root may")
        pytest.skip("changing user needs root")


# In a child, as the user given with RLIMIT_NICE at 0: what the guard says,
# and whether the kernel let the thread back from SCHED_IDLE.
_CHILD = """
import os, resource, sys
from aggregator import priority
user = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
if user:
    os.setgroups([]); os.setgid(user); os.setuid(user)
says = priority.can_return_to_normal()
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
try:
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    back = True
except PermissionError:
    back = False
print(says, back)
"""

NOBODY = 65534


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (NOBODY, "False False"),  # no capability, no limit: the guard says no, rightly
        (0, "True True"),  # root: CAP_SYS_NICE
    ],
)
def test_the_guard_says_what_the_kernel_allows(user: int, expected: str) -> None:
    _needs_root()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(user)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert done.stdout.split() == expected.split()


def _policies(steps: list[float]) -> list[int]:
    """The thread's policy after each flush_starts(queued, 10) of a fresh WriterPriority."""
    seen: list[int] = []

    def run() -> None:
        writer = priority.WriterPriority()
        for queued in steps:
            writer.flush_starts(queued, 10)
            seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen


def test_the_writer_goes_idle_and_back_when_a_flush_starts_late() -> None:
    if not priority.can_return_to_normal():
        if CI:
            pytest.fail("CI runs as root, which may leave SCHED_IDLE")
        pytest.skip("this process may not come back from SCHED_IDLE (RLIMIT_NICE, CAP_SYS_NICE)")
    idle, normal = os.SCHED_IDLE, os.SCHED_OTHER
    assert _policies([0.1, 0.2, 6.0, 7.0, 0.3]) == [idle, idle, normal, normal, idle]
    assert os.sched_getscheduler(0) == normal  # only the writer's own thread moved
