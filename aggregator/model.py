"""Value types shared by every stage: samples, events, checks, rollups.

Data flows one way: listener -> protocol (bytes -> Parsed) -> aggregate
(samples -> Rollup) -> storage -> api. Only these types cross the seams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# Wire type codes, as they appear after the "|" of a metric line.
COUNTER = "c"
GAUGE = "g"
TIMER = "ms"
HISTOGRAM = "h"
DISTRIBUTION = "d"
SET = "s"

#: wire code -> the type name used by the HTTP API and in storage
TYPE_NAMES: dict[str, str] = {
    COUNTER: "counter",
    GAUGE: "gauge",
    TIMER: "timer",
    HISTOGRAM: "histogram",
    DISTRIBUTION: "distribution",
    SET: "set",
}
#: type name or wire code -> wire code
TYPE_CODES: dict[str, str] = {**{v: k for k, v in TYPE_NAMES.items()}, **{k: k for k in TYPE_NAMES}}

#: types whose values are summarised by count/sum/min/max and a sketch
DISTRIBUTION_TYPES = frozenset((TIMER, HISTOGRAM, DISTRIBUTION))

#: Tags of a series: (key, value) pairs, sorted, without duplicates.
#: A tag sent without a colon has the value "".
Tags = tuple[tuple[str, str], ...]

#: The identity of a series: (name, type code, tags).
SeriesKey = tuple[str, str, Tags]


class Sample(NamedTuple):
    """One value of one metric line (a packed line gives several samples).

    A NamedTuple rather than a dataclass: it is built once per value on the
    hot path, and ``sample[:3]`` is the series key without a copy of fields.
    """

    name: str
    type: str  # wire code: c g ms h d s
    tags: Tags
    value: float | str  # str only for sets
    rate: float = 1.0  # sample rate in (0, 1]
    timestamp: int | None = None  # the |T field, unix seconds
    delta: bool = False  # a gauge value written with a leading + or -


@dataclass(frozen=True, slots=True)
class Event:
    """A DogStatsD event (``_e{...}``)."""

    title: str
    text: str
    timestamp: int | None = None  # d: field; None means "arrival time"
    host: str = ""
    priority: str = "normal"  # p: normal | low
    alert_type: str = "info"  # t: info | warning | error | success
    aggregation_key: str = ""  # k:
    source_type: str = ""  # s:
    tags: Tags = ()


@dataclass(frozen=True, slots=True)
class ServiceCheck:
    """A DogStatsD service check (``_sc|name|status``)."""

    name: str
    status: int  # 0 ok, 1 warning, 2 critical, 3 unknown
    timestamp: int | None = None  # d: field; None means "arrival time"
    host: str = ""
    message: str = ""
    tags: Tags = ()


CHECK_STATUS_TEXT = ("ok", "warning", "critical", "unknown")

# Bad-line reasons: a closed vocabulary, used as the `reason` tag of the
# statsd_aggregator.bad_lines self metric.
BAD_UTF8 = "invalid_utf8"
BAD_NO_VALUE = "missing_value"  # no ":" or nothing after it
BAD_EMPTY_NAME = "empty_name"
BAD_NO_TYPE = "missing_type"
BAD_TYPE = "unknown_type"
BAD_VALUE = "invalid_value"  # not a finite number (NaN, inf, 1_000, abc)
BAD_RATE = "invalid_sample_rate"
BAD_TAGS = "invalid_tags"  # e.g. two tag dialects mixed in one line
BAD_TIMESTAMP = "invalid_timestamp"
BAD_EVENT = "invalid_event"
BAD_SERVICE_CHECK = "invalid_service_check"
BAD_TOO_LONG = "line_too_long"  # TCP/unix-stream line over the limit
BAD_REASONS = (
    BAD_UTF8,
    BAD_NO_VALUE,
    BAD_EMPTY_NAME,
    BAD_NO_TYPE,
    BAD_TYPE,
    BAD_VALUE,
    BAD_RATE,
    BAD_TAGS,
    BAD_TIMESTAMP,
    BAD_EVENT,
    BAD_SERVICE_CHECK,
    BAD_TOO_LONG,
)


@dataclass(slots=True)
class Parsed:
    """What the parser made of one datagram (or one stream chunk)."""

    samples: list[Sample] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    checks: list[ServiceCheck] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # one reason per bad line
    lines: int = 0  # non-empty lines seen, good or bad


class Rollup(NamedTuple):
    """One series over one flush window, ready to be stored.

    A NamedTuple, like Sample: a flush builds one per active series (100k
    and more), and a tuple is built in C, about 4x faster than a dataclass.

    Field meaning by type (see README "Storage schema"):
    - counter: sum = sum(value / rate), count = sum(1 / rate) over lines.
    - gauge: last = value at the end of the window, min/max over the values
      it held in the window, sum = last, count = 1 (so a range mean is the
      mean of per-window values).
    - timer/histogram/distribution: count = sum of weights (1 / rate),
      sum = sum(value * weight), min, max, last = last value received,
      state = msgpack sketch (see sketch.py), quantiles = exact weighted
      nearest-rank percentiles of this window.
    - set: count = distinct members in the window, state = msgpack set state.
    """

    name: str
    type: str
    tags: Tags
    start: int  # window start, unix seconds, a multiple of the interval
    count: float  # type: ignore[assignment]  # shadows tuple.count(), never called
    sum: float
    min: float
    max: float
    last: float
    state: bytes | None = None
    quantiles: tuple[tuple[float, float], ...] = ()  # (percentile, value), e.g. (99.0, 12.5)
