"""Limits that keep the daemon bounded under abuse, and the account of what they dropped.

PURE: the standard library and ``model`` only, like ``aggregate`` (which
calls it). One mutable :class:`Limits` is shared by the aggregator, the
listeners and the HTTP API; SIGHUP updates its fields in place.

Nothing here runs per sample. The aggregator asks :meth:`Budget.admit`
only when a sample would create a NEW series in a window (the first sample
of a series in each window), so the name, tag and series-count checks cost
one call per series per window, not per line. A sample that a limit
refuses is dropped and counted in :class:`Drops`, by reason, under the
metric it belongs to, with the tag keys that made its series new
(README "Operations").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .model import Tags

__all__ = ["DROP_REASONS", "Budget", "Drops", "Limits", "Registrations"]

# Why a valid sample was dropped: a closed vocabulary, the `reason` tag of
# the self metric statsd_aggregator.dropped_samples.
SERIES_LIMIT = "series_limit"  # limits.max_series series already in the window
METRIC_SERIES_LIMIT = "metric_series_limit"  # limits.max_series_per_metric for its name
NAME_TOO_LONG = "name_too_long"
TOO_MANY_TAGS = "too_many_tags"
TAG_TOO_LONG = "tag_too_long"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"  # |T too old or too far ahead
DROP_REASONS = (
    SERIES_LIMIT,
    METRIC_SERIES_LIMIT,
    NAME_TOO_LONG,
    TOO_MANY_TAGS,
    TAG_TOO_LONG,
    TIMESTAMP_OUT_OF_RANGE,
)

#: metrics whose drops are itemised; drops of further metrics count as "other"
MAX_OFFENDERS = 100
#: tag keys itemised per offending metric
MAX_OFFENDER_KEYS = 32
#: distinct values remembered per (metric, tag key): enough to tell a key
#: that takes many values (the culprit) from one that takes a few
MAX_KEY_VALUES = 64
#: an offending name longer than this is shown cut, with "..."
SHOWN_NAME_LENGTH = 120


@dataclass(slots=True)
class Limits:
    """Every limit, with its default (config.py declares the settings)."""

    max_series: int = 200_000
    max_series_per_metric: int = 20_000
    max_tags: int = 64
    max_tag_length: int = 200
    max_name_length: int = 200
    max_timestamp_age: int = 2 * 86400
    max_timestamp_future: int = 600
    max_datagram_size: int = 65536
    max_connections: int = 1024
    idle_timeout: int = 300
    max_query_cost: int = 5_000_000

    def update(self, other: Limits) -> list[str]:
        """Take ``other``'s values in place; the names of those that changed."""
        changed = []
        for f in fields(self):
            new = getattr(other, f.name)
            if getattr(self, f.name) != new:
                setattr(self, f.name, new)
                changed.append(f.name)
        return changed

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _shown(name: str) -> str:
    return name if len(name) <= SHOWN_NAME_LENGTH else name[:SHOWN_NAME_LENGTH] + "..."


class _Offender:
    __slots__ = ("dropped", "keys", "reasons")

    def __init__(self) -> None:
        self.dropped = 0
        self.reasons: dict[str, int] = {}
        #: tag key -> hashes of the distinct values seen on dropped samples (capped)
        self.keys: dict[str, set[int]] = {}


class Drops:
    """Samples dropped by a limit: per reason, per metric, and the tag keys responsible."""

    def __init__(self) -> None:
        #: reason -> samples dropped since the last flush (the self metric)
        self.window: dict[str, int] = {}
        #: reason -> samples dropped since start
        self.total: dict[str, int] = {}
        self._offenders: dict[str, _Offender] = {}
        self._other = 0  # drops of metrics past MAX_OFFENDERS

    def drop(self, reason: str, name: str, tags: Tags) -> None:
        window = self.window
        window[reason] = window.get(reason, 0) + 1
        name = _shown(name)
        offender = self._offenders.get(name)
        if offender is None:
            if len(self._offenders) >= MAX_OFFENDERS:
                self._other += 1
                return
            offender = self._offenders[name] = _Offender()
        offender.dropped += 1
        reasons = offender.reasons
        reasons[reason] = reasons.get(reason, 0) + 1
        keys = offender.keys
        for key, value in tags:
            seen = keys.get(key)
            if seen is None:
                if len(keys) >= MAX_OFFENDER_KEYS:
                    continue
                seen = keys[key] = set()
            if len(seen) < MAX_KEY_VALUES:
                seen.add(hash(value))

    def take_window(self) -> dict[str, int]:
        """The per-reason counts since the last call (for the flush's self metrics)."""
        window, self.window = self.window, {}
        for reason, count in window.items():
            self.total[reason] = self.total.get(reason, 0) + count
        return window

    def dropped_total(self) -> int:
        return sum(self.total.values()) + sum(self.window.values())

    def report(self) -> dict[str, Any]:
        """The JSON of GET /api/v1/limits: what was dropped and who is responsible.

        Offenders come most-dropped first; each names its tag keys, the key
        with the most distinct values on the dropped samples first: the key
        that multiplies the series (a user or request id) tops the list.
        """
        totals = dict(self.total)
        for reason, count in self.window.items():
            totals[reason] = totals.get(reason, 0) + count
        offenders = []
        for name, o in sorted(self._offenders.items(), key=lambda kv: (-kv[1].dropped, kv[0])):
            keys = sorted(o.keys.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:MAX_OFFENDER_KEYS]
            offenders.append(
                {
                    "metric": name,
                    "dropped": o.dropped,
                    "reasons": dict(sorted(o.reasons.items())),
                    "tag_keys": [
                        {
                            "key": _shown(key),
                            "distinct_values": len(values),
                            "at_least": len(values) >= MAX_KEY_VALUES,
                        }
                        for key, values in keys
                    ],
                }
            )
        return {
            "dropped": {reason: totals.get(reason, 0) for reason in DROP_REASONS},
            "dropped_total": sum(totals.values()),
            "offenders": offenders,
            "other_metrics_dropped": self._other,
        }


class Budget:
    """Admission of new series into the windows of one flush; reset at each swap.

    The global count is the series created since the swap (open and ``|T``
    windows alike) plus every persisted gauge, since the open window emits
    all of them. Gauges are counted per name across windows for the same
    reason.
    """

    __slots__ = ("created", "drops", "gauges_per_metric", "limits", "per_metric")

    def __init__(self, limits: Limits, drops: Drops) -> None:
        self.limits = limits
        self.drops = drops
        self.created = 0
        self.per_metric: dict[str, int] = {}
        #: name -> persisted gauges of that name (they are series of every window)
        self.gauges_per_metric: dict[str, int] = {}

    def reset(self) -> None:
        self.created = 0
        self.per_metric = {}

    def copy(self) -> Budget:
        """The counts as they stand, to go on counting elsewhere."""
        other = Budget(self.limits, self.drops)
        other.created = self.created
        other.per_metric = dict(self.per_metric)
        other.gauges_per_metric = dict(self.gauges_per_metric)
        return other

    def admit(self, name: str, tags: Tags, persisted: int, gauge: bool = False) -> bool:
        """May a new series (name, tags) enter? Counts it if so, drops the sample if not.

        ``persisted`` is the number of persisted gauges; ``gauge`` says that
        the new series becomes one of them.
        """
        limits = self.limits
        reason = None
        in_metric = self.per_metric.get(name, 0)
        gauges_of_name = self.gauges_per_metric.get(name, 0)
        # The counts first: under a flood they decide, and cost least.
        if self.created + persisted >= limits.max_series:
            reason = SERIES_LIMIT
        elif in_metric + gauges_of_name >= limits.max_series_per_metric:
            reason = METRIC_SERIES_LIMIT
        elif len(name) > limits.max_name_length:
            reason = NAME_TOO_LONG
        elif len(tags) > limits.max_tags:
            reason = TOO_MANY_TAGS
        elif tags and max(len(k) + len(v) for k, v in tags) >= limits.max_tag_length:
            # "key:value" is len(k) + 1 + len(v) characters
            reason = TAG_TOO_LONG
        if reason is not None:
            self.drops.drop(reason, name, tags)
            return False
        if gauge:
            self.gauges_per_metric[name] = gauges_of_name + 1
        else:
            self.created += 1
            self.per_metric[name] = in_metric + 1
        return True

    def count_gauges(self, names: list[str]) -> None:
        """Recount the persisted gauges by name (after they are restored)."""
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        self.gauges_per_metric = counts


class Registrations:
    """The series stored ahead of one window's flush (``Storage.register``).

    Ingest workers admit series each under its own count, so together they
    may let in more than one window holds; what is stored before the merge
    stays within what the window may hold: ``max_series`` series, and
    ``max_series_per_metric`` of one name. Nothing is dropped here: a
    series refused is only left for its flush to create, if the merge
    admits it.
    """

    __slots__ = ("count", "limits", "per_metric", "start")

    def __init__(self, limits: Limits, start: int) -> None:
        self.limits = limits
        self.start = start
        self.count = 0
        self.per_metric: dict[str, int] = {}

    def admit(self, key: tuple[str, str, Tags]) -> bool:
        name = key[0]
        in_metric = self.per_metric.get(name, 0)
        if self.count >= self.limits.max_series or in_metric >= self.limits.max_series_per_metric:
            return False
        self.count += 1
        self.per_metric[name] = in_metric + 1
        return True
