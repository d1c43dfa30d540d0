"""What SIGHUP applies and what needs a restart; the query cost estimate; the
operations settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator import config
from aggregator.config import SETTINGS, ConfigError
from aggregator.limits import Limits
from aggregator.operations import QueryGuard, query_points, reload_changes


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path)


def test_limits_and_dashboards_reload_the_rest_needs_a_restart(tmp_path: Path) -> None:
    old = load(tmp_path, "")
    new = load(
        tmp_path,
        "[listen]\nudp = '127.0.0.1:9999'\n[aggregation]\nflush_interval = 5\n"
        "[storage]\ndownsample = ['1m:30d']\n"
        "[limits]\nmax_series = 10\nidle_timeout = '1m'\n"
        "[http]\ndashboard = 'd'\n[dashboards.d.values.v]\nmetric = 'm'\n",
    )
    applied, restart = reload_changes(old, new)
    assert applied == ["limits.max_series", "limits.idle_timeout", "http.dashboard", "dashboards"]
    assert restart == ["listen.udp", "aggregation.flush_interval", "storage.downsample"]
    assert reload_changes(old, load(tmp_path, "")) == ([], [])


def test_every_limit_setting_reaches_the_limits_object(tmp_path: Path) -> None:
    limit_settings = [s for s in SETTINGS if s.section == "limits"]
    assert {s.key for s in limit_settings} == set(Limits().as_dict())
    cfg = load(tmp_path, "[limits]\nmax_tags = 3\nmax_timestamp_future = '1h'\n")
    assert cfg.limits() == Limits(max_tags=3, max_timestamp_future=3600)
    assert config.load(None).limits() == Limits()


@pytest.mark.parametrize("mode", ["0999", "rw", "06600", "660x"])
def test_a_bad_unix_mode_names_the_key(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ConfigError, match=r"listen\.unix_mode"):
        load(tmp_path, f"[listen]\nunix_mode = '{mode}'\n")
    with pytest.raises(ConfigError, match=r"listen\.unix_mode"):
        load(tmp_path, "[listen]\nunix_mode = 660\n")
    assert load(tmp_path, "[listen]\nunix_mode = '600'\n").unix_mode == 0o600


def test_the_point_estimate_follows_the_automatic_step() -> None:
    tiers = [10, 60, 3600]
    assert query_points(0, 3600, None, tiers, 1500) == 360  # 10 s buckets
    assert query_points(0, 86400, None, tiers, 1500) == 1440  # 1 min buckets
    assert query_points(0, 365 * 86400, None, tiers, 1500) == 1500  # capped
    assert query_points(0, 3600, 1, tiers, 1500) == 360  # a step rounds up to 10 s
    assert query_points(0, 3600, 7200, tiers, 1500) == 1


def test_the_guard_counts_series_only_when_it_must() -> None:
    asked: list[tuple[str, tuple[tuple[str, str], ...], str | None]] = []

    def count(metric: str, tags: object, kind: str | None) -> int:
        asked.append((metric, tuple(tags), kind))  # type: ignore[arg-type]
        return 500

    guard = QueryGuard(Limits(max_query_cost=500_000), count, [10], 1500)
    assert guard.check("m", 0, 3600, None, [("k", "v")], "c") is None  # 360 x 500
    assert asked == [("m", (("k", "v"),), "c")]
    problem = guard.check("m", 0, 36000, None, [], None)  # 1500 x 500
    assert problem is not None and "750,000 points (1,500 buckets x 500 series)" in problem
    asked.clear()
    assert guard.check("m", 0, 10**7, 10, [], None) is not None  # 1M buckets alone
    assert asked == []


def test_storage_counts_the_series_a_query_would_read(tmp_path: Path) -> None:
    from aggregator.model import COUNTER, GAUGE, Rollup
    from aggregator.storage import Storage

    storage = Storage(str(tmp_path / "m.db"), config.load(None).tiers)
    try:
        rows = [
            Rollup("m", COUNTER, (("env", env), ("host", host)), 1_800_000_000, 1, 1, 1, 1, 1)
            for env in ("prod", "dev")
            for host in ("a", "b", "c")
        ]
        rows.append(Rollup("m", GAUGE, (), 1_800_000_000, 1, 1, 1, 1, 1))
        storage.write(rows)
        assert storage.count_series("m") == 7
        assert storage.count_series("m", type_code=COUNTER) == 6
        assert storage.count_series("m", [("env", "prod")]) == 3
        assert storage.count_series("m", [("env", "prod"), ("host", "b")], COUNTER) == 1
        assert storage.count_series("m", [("env", "qa")]) == 0
        assert storage.count_series("nope") == 0
    finally:
        storage.close()
