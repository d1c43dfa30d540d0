"""The systemd unit: what it must say, `systemd-analyze verify` passes on it,
and `systemd-analyze security` rates it OK or better.

`verify` checks that ExecStart's program exists, so it runs on a copy whose
ExecStart points at this checkout's console script. Without systemd-analyze
the tests skip with the reason, except under CI=true (.ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "statsd-aggregator.service"
INSTALLED = "/opt/statsd-aggregator/.venv/bin/statsd-aggregator"
SCRIPT = Path(sys.executable).parent / "statsd-aggregator"


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def directives() -> dict[str, list[str]]:
    """KEY -> every value it is given in the unit (some keys repeat)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    assert SCRIPT.exists(), SCRIPT
    copy = tmp_path / UNIT.name
    copy.write_text((text or UNIT.read_text()).replace(INSTALLED, str(SCRIPT)))
    return copy


def test_the_unit_says_what_the_service_needs() -> None:
    unit = directives()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["StateDirectory"] == ["statsd-aggregator"]
    [start] = unit["ExecStart"]
    assert start.startswith(INSTALLED + " ")
    assert "--db /var/lib/statsd-aggregator/metrics.db" in start  # inside StateDirectory
    assert re.fullmatch(r"\d+s", unit["WatchdogSec"][0])
    assert "-HUP" in unit["ExecReload"][0]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert unit[hardening] != ["no"], hardening
    assert unit["CapabilityBoundingSet"] == [""]
    # the writer thread back from SCHED_IDLE to nice 0, never above (priority.py)
    assert unit["LimitNICE"] == ["+0"]
    assert "sched_setscheduler" in unit["SystemCallFilter"]


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    tool = analyze()
    result = subprocess.run(
        [tool, "verify", "--recursive-errors=no", str(local_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr, result.stderr


def test_systemd_analyze_verify_would_catch_a_wrong_key(tmp_path: Path) -> None:
    tool = analyze()
    broken = UNIT.read_text().replace("Restart=on-failure", "Restart=on-failure\nRestartt=always")
    result = subprocess.run(
        [tool, "verify", "--recursive-errors=no", str(local_copy(tmp_path, broken))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "Restartt" in result.stderr


def test_systemd_analyze_security_rates_the_unit_ok_or_better(tmp_path: Path) -> None:
    tool = analyze()
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(local_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", output)
    assert match, output
    exposure, rating = float(match.group(1)), match.group(2)
    assert rating in ("SAFE", "OK"), output
    assert exposure < 4.0, output
