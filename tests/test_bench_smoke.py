"""The benchmark suite in its smoke mode, so CI keeps it working.

Its figures mean nothing at these rates; what is checked is that every
part ran: both daemons received the load (the runner exits non-zero when
one received nothing), the flush and query sections produced figures, and
every query answered 200.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def require(*tools: str) -> None:
    """Skip without the tools on a developer's machine; under CI, fail."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    message = f"the benchmark needs {', '.join(missing)}"
    if os.environ.get("CI"):
        pytest.fail(message + "; under CI a missing tool is a failure")
    pytest.skip(message)


@pytest.mark.timeout(600)
def test_the_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    require("gcc", "node", "npm", "taskset")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--smoke",
            "--sections",
            "rate,flush,query",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ours/Etsy" in done.stdout
    results = json.loads(out.read_text())
    assert results["args"]["smoke"] is True
    for when in ("speed_at_start", "speed_at_end"):
        speed = results["machine"][when]
        assert speed["python_1M_additions_seconds"] > 0
        assert speed["generator_datagrams_per_second"] > 0
    assert results["flush"], "no flush figures"
    assert [q["status"] for q in results["query"]] == [200] * len(results["query"])


@pytest.mark.timeout(300)
def test_the_benchmark_runs_ours_with_ingest_workers(tmp_path: Path) -> None:
    require("gcc", "taskset")
    out = tmp_path / "results.json"
    args = ["--smoke", "--workers", "2", "--daemons", "ours", "--workloads", "b"]
    done = subprocess.run(
        [sys.executable, "bench/run.py", *args, "--sections", "rate", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "listen.workers = 2" in done.stdout
    [trial] = json.loads(out.read_text())["rate"]["trials"]
    assert trial["steps"] and not trial["error"], trial


def test_the_hot_path_timings_run() -> None:
    args = ["--sections", "intake,flush,hour", "--workloads", "a", "--series", "2000"]
    args += ["--rounds", "1"]
    done = subprocess.run(
        [sys.executable, "bench/micro.py", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "intake (a)" in done.stdout
    assert "the window that completes a minute" in done.stdout
    assert "compaction of an hour of 2,000 series" in done.stdout
    pickled = subprocess.run(
        [
            sys.executable, "bench/micro.py", "--sections", "flush", "--series", "2000",
            "--pickled", "--present", "0.9",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert pickled.returncode == 0, pickled.stderr[-3000:]
    assert "each window pickled as a worker's" in pickled.stdout
    assert "each later one holding 90% of the series" in pickled.stdout
    assert "the window that completes a minute" in pickled.stdout
