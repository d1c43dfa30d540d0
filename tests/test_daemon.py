"""The daemon's composition, in process: what the end-to-end tests cannot reach."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator import daemon as daemon_module
from aggregator.config import load
from aggregator.daemon import Daemon
from aggregator.model import Sample

START = 1_764_000_000


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    made = Daemon(load(None, {"storage.path": str(tmp_path / "metrics.db")}))
    yield made
    made._writer.submit(made.storage.close).result(10)
    made._writer.shutdown(wait=True)
    made._readers.shutdown(wait=True)


def test_series_learned_beyond_one_batch_are_stored_batch_after_batch(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_module, "REGISTER_BATCH", 3)
    daemon.aggregator.open(START)
    keys = [(f"m{i}", "c", ()) for i in range(10)]
    daemon._learned(START, keys[:4])
    daemon._learned(START, keys[4:])
    daemon._learned(START - 10, [("closed.window", "c", ())])  # its flush stores it
    for _ in range(len(keys)):  # each batch queues the next behind it
        daemon._writer.submit(lambda: None).result(10)
    with contextlib.closing(sqlite3.connect(daemon.storage.path)) as conn:
        stored = conn.execute("SELECT name, first_seen FROM series ORDER BY id").fetchall()
    assert sorted(stored) == sorted((key[0], START) for key in keys)


def test_a_failed_compaction_after_a_flush_is_logged_and_left_due(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The window is stored whatever its compaction does afterwards; a failure
    there is logged (no one awaits the flush) and left due, for the next write
    to run first (test_storage's test_a_flush_leaves_compaction_and_retention_to_maintain)."""
    daemon.aggregator.open(START)
    daemon.aggregator.add([Sample("kept", "c", (), 3.0)])
    writer = daemon.storage.open_writer  # the writer thread's own, opened there

    def broken() -> None:
        raise RuntimeError("a bug in compaction")

    monkeypatch.setattr(daemon.storage, "maintain", broken)
    daemon.flush(START + 10).result(10)
    with contextlib.closing(sqlite3.connect(daemon.storage.path)) as conn:
        stored = conn.execute(
            "SELECT s.name, r.sum FROM rollups r JOIN series s ON s.id = r.series_id "
            "WHERE s.name = 'kept'"
        )
        assert stored.fetchall() == [("kept", 3.0)]
    assert "compaction and retention after a flush failed" in caplog.text
    assert daemon._writer.submit(lambda: writer().maintenance_due).result(10)
