"""PURE: one flush's rollups -> lines of carbon's plaintext protocol.

``<path> <value> <timestamp>``, one per line, named as Etsy statsd's
Graphite backend names them with ``legacyNamespace = false``:

=================  ==================================================
counter            ``<prefix>.counters.<name>.count`` (sum of the window)
                   and ``.rate`` (per second)
gauge              ``<prefix>.gauges.<name>``
timer, histogram,  ``<prefix>.timers.<name>.count``, ``.count_ps``,
distribution       ``.sum``, ``.mean``, ``.lower``, ``.upper`` and
                   ``.upper_<p>`` for each configured percentile
                   (``upper_99_9`` for 99.9)
set                ``<prefix>.sets.<name>.count``
=================  ==================================================

Tags, in ``tags = "graphite"`` mode, follow the path as Graphite 1.1 tags
(``path;k=v;k2=v2``, sorted by key); in ``"fold"`` mode each tag becomes one
more path segment ``k_v`` (or ``k`` when it has no value) after the metric
name, before the stat. Graphite has no tag without a value, so in
``"graphite"`` mode such tags are left out. The timestamp is the window's
start. Characters Graphite cannot hold are replaced (see the ``_clean_*``
functions); nothing here raises on odd input.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .model import COUNTER, DISTRIBUTION_TYPES, GAUGE, SET, Rollup, Tags

TAG_MODES = ("graphite", "fold")

#: bound of the memos of cleaned names and tags (they repeat every flush)
_MEMO = 1 << 17

_SPACE = re.compile(r"\s+")
_TAG_KEY_BAD = re.compile(r"[;!^=\s]+")
_TAG_VALUE_BAD = re.compile(r"[;\s]+")
_SEGMENT_BAD = re.compile(r"[.;=\s]+")


@dataclass(frozen=True, slots=True)
class Naming:
    """How rollups become Graphite paths."""

    interval: int  # seconds per window, for .rate and .count_ps
    prefix: str = "stats"
    tags: str = "graphite"  # "graphite" | "fold"


@functools.lru_cache(maxsize=_MEMO)
def clean_path(name: str) -> str:
    """A metric name as a Graphite path: no white space (it ends a field), no `;`
    (it starts tags), `/` -> `-` (it would be a directory in whisper)."""
    return _SPACE.sub("_", name).replace(";", "_").replace("/", "-")


def clean_tag_key(key: str) -> str:
    return _TAG_KEY_BAD.sub("_", key) or "_"


def clean_tag_value(value: str) -> str:
    cleaned = _TAG_VALUE_BAD.sub("_", value)
    return "_" + cleaned[1:] if cleaned.startswith("~") else cleaned


def fold_segment(key: str, value: str) -> str:
    """One tag as a path segment: `k_v`, or `k` without a value."""
    text = f"{key}_{value}" if value else key
    return _SEGMENT_BAD.sub("_", text).replace("/", "-") or "_"


@functools.lru_cache(maxsize=_MEMO)
def graphite_tags(tags: Tags) -> str:
    """`;k=v;k2=v2` (sorted, first of equal keys kept), or "" without tags.

    Graphite keeps the tag `name` for the path: a tag of that name is sent
    as `exported_name`.
    """
    seen: dict[str, str] = {}
    for key, value in tags:
        if value == "":
            continue
        cleaned = clean_tag_key(key)
        if cleaned == "name":
            cleaned = "exported_name"
        seen.setdefault(cleaned, clean_tag_value(value))
    return "".join(f";{k}={v}" for k, v in sorted(seen.items()))


def format_number(value: float) -> str:
    value = float(value)
    if value.is_integer() and -1e15 < value < 1e15:
        return str(int(value))
    return repr(value)


def percentile_suffix(percentile: float) -> str:
    """90 -> "90", 99.9 -> "99_9" (Etsy's naming)."""
    return format_number(percentile).replace(".", "_").replace("-", "_")


def _stats(rollup: Rollup, interval: int) -> list[tuple[str | None, float]]:
    """(stat suffix or None for the bare path, value) of one rollup."""
    kind = rollup.type
    if kind == COUNTER:
        return [("count", rollup.sum), ("rate", rollup.sum / interval)]
    if kind == GAUGE:
        return [(None, rollup.last)]
    if kind == SET:
        return [("count", rollup.count)]
    if kind in DISTRIBUTION_TYPES:
        stats: list[tuple[str | None, float]] = [
            ("count", rollup.count),
            ("count_ps", rollup.count / interval),
            ("sum", rollup.sum),
            ("mean", rollup.sum / rollup.count if rollup.count else 0.0),
            ("lower", rollup.min),
            ("upper", rollup.max),
        ]
        stats.extend((f"upper_{percentile_suffix(p)}", v) for p, v in rollup.quantiles)
        return stats
    return []


_GROUP = {COUNTER: "counters", GAUGE: "gauges", SET: "sets"}


@functools.lru_cache(maxsize=_MEMO)
def _base(prefix: str, group: str, name: str, folded: Tags) -> str:
    """The path up to the stat: prefix, group, name and any folded tags."""
    head = [prefix] if prefix else []
    head += [group, clean_path(name)]
    head += [fold_segment(k, v) for k, v in folded]
    return ".".join(head)


def graphite_lines(rollups: Iterable[Rollup], naming: Naming) -> list[str]:
    """Every line of one flush, without the trailing newlines."""
    lines: list[str] = []
    fold = naming.tags == "fold"
    for rollup in rollups:
        group = _GROUP.get(rollup.type, "timers")
        base = _base(naming.prefix, group, rollup.name, rollup.tags if fold else ())
        suffix = "" if fold else graphite_tags(rollup.tags)
        stamp = str(rollup.start)
        for stat, value in _stats(rollup, naming.interval):
            path = f"{base}.{stat}" if stat else base
            lines.append(f"{path}{suffix} {format_number(value)} {stamp}")
    return lines
