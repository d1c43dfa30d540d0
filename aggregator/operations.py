"""Operations: what SIGHUP reloads, the self metrics and health of the limits and
the spool, and the cost estimate that bounds a series query (buckets x the
series that match, counted by storage.Storage.count_series).

The daemon owns the objects (limits.Limits, limits.Drops, spool.DurableWriter,
listeners.ListenerStats); this module only reads them and turns them into
samples, JSON and log lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .config import _FIELD, SETTINGS, Config
from .limits import DROP_REASONS, Drops, Limits
from .listeners import ListenerStats
from .model import COUNTER, GAUGE, Sample
from .selfstats import PREFIX
from .spool import DurableWriter

__all__ = ["OpsStats", "QueryGuard", "query_points", "reload_changes"]

#: settings SIGHUP applies at once; every other change needs a restart
RELOADABLE_SECTIONS = ("limits",)
RELOADABLE_KEYS = ("http.dashboard",)


def reload_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(applied at once, needing a restart): the settings that differ, by dotted name.

    Dashboards and limits are read afresh by every request and every new
    series, so swapping them is safe; sockets, the database, the flush
    interval and the token are bound at start.
    """
    applied: list[str] = []
    restart: list[str] = []
    for setting in SETTINGS:
        name = _FIELD.get(setting.dotted)
        if name is None or getattr(old, name) == getattr(new, name):
            continue
        if setting.section in RELOADABLE_SECTIONS or setting.dotted in RELOADABLE_KEYS:
            applied.append(setting.dotted)
        else:
            restart.append(setting.dotted)
    if old.dashboards != new.dashboards:
        applied.append("dashboards")
    return applied, restart


class OpsStats:
    """Self metrics and /healthz fields for the limits, the listeners' guards and the spool."""

    def __init__(self, drops: Drops, listeners: ListenerStats, durable: DurableWriter) -> None:
        self.drops = drops
        self.listeners = listeners
        self.durable = durable
        self._seen = (0, 0, 0)

    def window_samples(self) -> list[Sample]:
        """Samples for the window about to close (under the statsd_aggregator. prefix)."""
        listeners = self.listeners
        now = (listeners.too_large, listeners.refused, listeners.idle_closed)
        too_large, refused, idle = (a - b for a, b in zip(now, self._seen, strict=True))
        self._seen = now
        dropped = self.drops.take_window()
        status = self.durable.status()

        def counter(name: str, value: float, tags: tuple[tuple[str, str], ...] = ()) -> Sample:
            return Sample(PREFIX + name, COUNTER, tags, float(value))

        def gauge(name: str, value: float) -> Sample:
            return Sample(PREFIX + name, GAUGE, (), float(value))

        samples = [
            counter("dropped_samples", sum(dropped.values())),
            counter("datagrams_too_large", too_large),
            counter("connections_refused", refused),
            counter("connections_idle_closed", idle),
            gauge("spool_backlog", status["spool_backlog"]),
            gauge("spool_bytes", status["spool_bytes"]),
            gauge("storage_writable", 1.0 if status["storage_writable"] else 0.0),
        ]
        samples.extend(
            counter("dropped_samples_by_reason", count, (("reason", reason),))
            for reason, count in sorted(dropped.items())
        )
        return samples

    def health(self) -> dict[str, Any]:
        listeners = self.listeners
        status = self.durable.status()
        return {
            "dropped_samples": self.drops.dropped_total(),
            "datagrams_too_large": listeners.too_large,
            "connections_refused": listeners.refused,
            "connections_idle_closed": listeners.idle_closed,
            **status,
        }

    def limits_report(self) -> dict[str, Any]:
        report = self.drops.report()
        report["dropped"] = {reason: report["dropped"][reason] for reason in DROP_REASONS}
        report["listeners"] = {
            "datagrams_too_large": self.listeners.too_large,
            "connections_refused": self.listeners.refused,
            "connections_idle_closed": self.listeners.idle_closed,
            "connections_open": self.listeners.connections,
        }
        return report


def query_points(
    start: int, end: int, step: int | None, resolutions: Sequence[int], auto: int
) -> int:
    """Buckets a series query reads per series: (end - start) / step. Without a
    step, storage picks the finest resolution giving at most ``auto`` points
    (storage.MAX_AUTO_POINTS), and so does this estimate."""
    span = max(end - start, 1)
    if step is None:
        for resolution in resolutions:
            if span <= resolution * auto:
                return -(-span // resolution)
        return auto
    return -(-span // max(step, resolutions[0]))


class QueryGuard:
    """Refuses a series query whose cost, buckets x matching series, exceeds
    limits.max_query_cost (read at each query, so SIGHUP applies at once)."""

    def __init__(
        self,
        limits: Limits,
        counter: Callable[[str, Sequence[tuple[str, str]], str | None], int],
        resolutions: Sequence[int],
        auto: int,
    ) -> None:
        self.limits = limits
        self.counter = counter
        self.resolutions = tuple(resolutions)
        self.auto = auto

    def check(
        self,
        metric: str,
        start: int,
        end: int,
        step: int | None,
        tags: Sequence[tuple[str, str]],
        type_code: str | None,
    ) -> str | None:
        """None when the query may run, else why not (for a 400 answer)."""
        points = query_points(start, end, step, self.resolutions, self.auto)
        limit = self.limits.max_query_cost
        # Counting is needless when the buckets alone exceed the limit.
        series = self.counter(metric, tags, type_code) if points <= limit else 1
        cost = points * max(series, 1)
        if cost <= limit:
            return None
        return (
            f"the query would read about {cost:,} points ({points:,} buckets x {series:,} "
            f"series), more than limits.max_query_cost ({limit:,}); narrow from/to, "
            "raise step, or add tag filters"
        )
