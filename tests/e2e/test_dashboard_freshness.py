"""The dashboard document is computed once per stored flush (README "HTTP API"),
and yet a flush shows in the first request made after it is stored.

The event stream (`/api/v1/stream`) says when a flush is stored: its event
goes out after the daemon has moved to the new flush, so a request made
after the event must see that flush, however warm the answer was before.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest

from .harness import Daemon

pytestmark = pytest.mark.e2e

VIEWS = "sigma_playground.workbook.views"


class EventStream:
    """`GET /api/v1/stream`, read event by event (socket timeout: 10 s per read)."""

    def __init__(self, daemon: Daemon) -> None:
        host, port = daemon.addr("http")
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        self.conn.request("GET", "/api/v1/stream")
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.next() == ["retry: 2000", ": connected"]

    def next(self) -> list[str]:
        lines: list[str] = []
        while True:
            line = self.response.readline().decode().rstrip("\n")
            if not line:
                if lines:
                    return lines
                continue
            lines.append(line)

    def flush_storing(self, window: int, timeout: float = 15.0) -> dict[str, Any]:
        """The data of the first flush event whose windows include `window`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.next()
            if "event: flush" in lines:
                data: dict[str, Any] = json.loads(lines[-1].removeprefix("data: "))
                if window in data["windows"]:
                    return data
        raise AssertionError(f"no flush of window {window} within {timeout}s")

    def close(self) -> None:
        self.response.close()
        self.conn.close()


def test_a_stored_flush_shows_in_the_next_dashboard_request(daemon: Daemon) -> None:
    before = daemon.get("/api/metrics/dashboard")  # computed now, and kept
    assert (before["workbookViews"], before["topWorkbooks"]) == (0, [])
    page = daemon.get("/api/v1/dashboards/sigma_playground", {"from": "-15m"})
    assert page["values"]["workbookViews"] == 0

    stream = EventStream(daemon)
    try:
        # |T pins the window (flush_interval = 1 s), so the stream tells
        # exactly when this line is stored.
        window = int(time.time()) - 60
        for workbook, views in (("wb-1", 3), ("wb-2", 5)):
            line = f"{VIEWS}:{views}|c|#workbook_id:{workbook},user_id:u-1|T{window}"
            daemon.send_udp(line.encode())
            stream.flush_storing(window)
            document = daemon.get("/api/metrics/dashboard")
            page = daemon.get("/api/v1/dashboards/sigma_playground", {"from": "-15m"})
            assert page["values"] == document
            if workbook == "wb-1":
                assert document["workbookViews"] == 3
                assert document["topWorkbooks"] == [{"id": "wb-1", "views": 3}]
            else:
                assert document["workbookViews"] == 8
                assert document["topWorkbooks"] == [
                    {"id": "wb-2", "views": 5},
                    {"id": "wb-1", "views": 3},
                ]
            assert document["activeUsers"] == 1
    finally:
        stream.close()
