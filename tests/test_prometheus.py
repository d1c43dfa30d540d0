"""The /metrics exposition: the pure renderer as named cases (whole text out),
the state kept across flushes, and `promtool check metrics` on the result."""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass

import pytest

from aggregator.model import Rollup, SeriesKey, Tags
from aggregator.prometheus import Exposition, Series, families, format_value, render

from .tools import require_program


def s(
    name: str,
    kind: str,
    value: float,
    tags: Tags = (),
    count: float = 0.0,
    quantiles: tuple[tuple[float, float], ...] = (),
) -> Series:
    return Series(name, kind, tags, value, count, quantiles)


@dataclass(frozen=True)
class Case:
    name: str
    series: list[Series]
    text: str
    dropped: int = 0


CASES = [
    Case("nothing", [], ""),
    Case(
        "counter gets _total",
        [s("app.hits", "c", 7)],
        "# HELP app_hits_total statsd counter app.hits\n"
        "# TYPE app_hits_total counter\n"
        "app_hits_total 7\n",
    ),
    Case(
        "counter already named _total",
        [s("jobs_total", "c", 2.5)],
        "# HELP jobs_total statsd counter jobs_total\n# TYPE jobs_total counter\njobs_total 2.5\n",
    ),
    Case(
        "gauge",
        [s("queue.depth", "g", -3.25)],
        "# HELP queue_depth statsd gauge queue.depth\n"
        "# TYPE queue_depth gauge\n"
        "queue_depth -3.25\n",
    ),
    Case(
        "set is a gauge of distinct members",
        [s("users", "s", 2)],
        "# HELP users statsd set users\n# TYPE users gauge\nusers 2\n",
    ),
    Case(
        "timer is a summary",
        [s("req.lat", "ms", 90, count=4, quantiles=((50.0, 20), (99.9, 30)))],
        "# HELP req_lat statsd timer req.lat\n"
        "# TYPE req_lat summary\n"
        'req_lat{quantile="0.5"} 20\n'
        'req_lat{quantile="0.999"} 30\n'
        "req_lat_sum 90\n"
        "req_lat_count 4\n",
    ),
    Case(
        "histogram and distribution share a summary family, tags apart",
        [
            s("size", "h", 3, (("k", "h"),), 1, ((90.0, 3),)),
            s("size", "d", 5, (("k", "d"),), 2, ((90.0, 4),)),
        ],
        "# HELP size statsd histogram size\n"
        "# TYPE size summary\n"
        'size{k="d",quantile="0.9"} 4\n'
        'size_sum{k="d"} 5\n'
        'size_count{k="d"} 2\n'
        'size{k="h",quantile="0.9"} 3\n'
        'size_sum{k="h"} 3\n'
        'size_count{k="h"} 1\n',
    ),
    Case(
        "names: every character outside [a-zA-Z0-9_] becomes _; no leading digit",
        [s("a.b-c/d café", "g", 1), s("5xx", "c", 1)],
        "# HELP _5xx_total statsd counter 5xx\n"
        "# TYPE _5xx_total counter\n"
        "_5xx_total 1\n"
        "# HELP a_b_c_d_caf_ statsd gauge a.b-c/d café\n"
        "# TYPE a_b_c_d_caf_ gauge\n"
        "a_b_c_d_caf_ 1\n",
    ),
    Case(
        "labels: names cleaned, values escaped, sorted",
        [s("g", "g", 1, (("z", 'say "hi"'), ("path.x", "C:\\dir"), ("1st", "a\nb")))],
        "# HELP g statsd gauge g\n"
        "# TYPE g gauge\n"
        'g{_1st="a\\nb",path_x="C:\\\\dir",z="say \\"hi\\""} 1\n',
    ),
    Case(
        "a tag without a value is no label",
        [s("g", "g", 1, (("canary", ""), ("env", "prod")))],
        '# HELP g statsd gauge g\n# TYPE g gauge\ng{env="prod"} 1\n',
    ),
    Case(
        "reserved label names are exported_",
        [s("t", "ms", 1, (("__meta", "x"), ("le", "2"), ("quantile", "q")), 1, ((50.0, 1),))],
        "# HELP t statsd timer t\n"
        "# TYPE t summary\n"
        't{exported__meta="x",exported_le="2",exported_quantile="q",quantile="0.5"} 1\n'
        't_sum{exported__meta="x",exported_le="2",exported_quantile="q"} 1\n'
        't_count{exported__meta="x",exported_le="2",exported_quantile="q"} 1\n',
    ),
    Case(
        "tag keys equal once cleaned: the first is kept",
        [s("g", "g", 1, (("a.b", "1"), ("a_b", "2")))],
        '# HELP g statsd gauge g\n# TYPE g gauge\ng{a_b="1"} 1\n',
    ),
    Case(
        "two names, one family: distinct label sets both stay",
        [s("a.b", "c", 1, (("k", "1"),)), s("a_b", "c", 2, (("k", "2"),))],
        "# HELP a_b_total statsd counter a.b\n"
        "# TYPE a_b_total counter\n"
        'a_b_total{k="1"} 1\n'
        'a_b_total{k="2"} 2\n',
    ),
    Case(
        "two names, one family, same labels: the first in name order stays",
        [s("a_b", "c", 2), s("a.b", "c", 1)],
        "# HELP a_b_total statsd counter a.b\n# TYPE a_b_total counter\na_b_total 1\n",
        dropped=1,
    ),
    Case(
        "a gauge named like a summary's _count is left out",
        [s("x", "ms", 6, count=2, quantiles=((50.0, 3),)), s("x.count", "g", 9)],
        '# HELP x statsd timer x\n# TYPE x summary\nx{quantile="0.5"} 3\nx_sum 6\nx_count 2\n',
        dropped=1,
    ),
    Case(
        "a counter and a gauge of one name live side by side",
        [s("x", "g", 1), s("x", "c", 2)],
        "# HELP x statsd gauge x\n"
        "# TYPE x gauge\n"
        "x 1\n"
        "# HELP x_total statsd counter x\n"
        "# TYPE x_total counter\n"
        "x_total 2\n",
    ),
    Case(
        "a timer and a gauge of one name: the first family in (name, type) order stays",
        [s("x", "ms", 2, count=1, quantiles=((50.0, 2),)), s("x", "g", 1)],
        "# HELP x statsd gauge x\n# TYPE x gauge\nx 1\n",
        dropped=1,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exposition(case: Case) -> None:
    result = families(case.series)
    assert render(result.families) == case.text
    assert result.dropped == case.dropped


VALUES = [
    ("whole", 7.0, "7"),
    ("negative zero", -0.0, "0"),
    ("fraction", 0.1, "0.1"),
    ("large", 1e20, "1e+20"),
    ("tiny", 1.5e-7, "1.5e-07"),
    ("nan", math.nan, "NaN"),
    ("plus infinity", math.inf, "+Inf"),
    ("minus infinity", -math.inf, "-Inf"),
]


@pytest.mark.parametrize(("value", "text"), [v[1:] for v in VALUES], ids=[v[0] for v in VALUES])
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


# ---------------------------------------------------------------- the state


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def roll(
    name: str,
    kind: str,
    start: int,
    count: float,
    total: float,
    last: float = 0.0,
    quantiles: tuple[tuple[float, float], ...] = (),
    tags: Tags = (),
) -> Rollup:
    return Rollup(name, kind, tags, start, count, total, 0.0, 0.0, last, None, quantiles)


def text_of(exposition: Exposition) -> str:
    return exposition.render().decode()


def test_counters_add_up_across_flushes_and_timers_show_the_latest_window() -> None:
    clock = Clock()
    state = Exposition(expire_after=300, clock=clock)
    state.update(
        [roll("hits", "c", 990, 3, 3), roll("lat", "ms", 990, 2, 30, 0, ((90.0, 20),))], []
    )
    state.update(
        [roll("hits", "c", 1000, 4, 4), roll("lat", "ms", 1000, 1, 5, 0, ((90.0, 5),))], []
    )
    # a |T window from the past adds to the totals, not to the quantiles
    state.update([roll("lat", "ms", 900, 1, 100, 0, ((90.0, 100),))], [])
    assert text_of(state) == (
        "# HELP hits_total statsd counter hits\n"
        "# TYPE hits_total counter\n"
        "hits_total 7\n"
        "# HELP lat statsd timer lat\n"
        "# TYPE lat summary\n"
        'lat{quantile="0.9"} 5\n'
        "lat_sum 135\n"
        "lat_count 4\n"
    )
    assert (state.series, state.dropped) == (2, 0)


def test_idle_series_expire_and_persisted_gauges_do_not_keep_them_alive() -> None:
    clock = Clock()
    state = Exposition(expire_after=30, clock=clock)
    g: SeriesKey = ("temp", "g", ())
    state.update([roll("hits", "c", 990, 1, 1), roll("temp", "g", 990, 1, 5, 5)], [g])
    clock.now += 20
    # untouched, the gauge is carried over in every flush: its age stays
    state.update([roll("temp", "g", 1010, 1, 5, 5), roll("hits", "c", 1010, 1, 1)], [])
    clock.now += 20  # 40 s after the gauge was set, 20 s after the last hit
    state.update([roll("temp", "g", 1030, 1, 5, 5)], [])
    assert text_of(state) == (
        "# HELP hits_total statsd counter hits\n# TYPE hits_total counter\nhits_total 2\n"
    )
    clock.now += 20
    state.update([roll("temp", "g", 1050, 1, 5, 5)], [])
    assert text_of(state) == ""  # an expired gauge does not come back until set
    state.update([roll("temp", "g", 1060, 1, 6, 6)], [g])
    assert text_of(state) == "# HELP temp statsd gauge temp\n# TYPE temp gauge\ntemp 6\n"


def test_each_series_expires_on_time_though_most_flushes_skip_the_walk() -> None:
    clock = Clock()
    state = Exposition(expire_after=30, clock=clock)
    state.update([roll("a", "c", 990, 1, 1), roll("b", "c", 990, 1, 1)], [])
    for now, rollups, left in [
        (1020.0, [roll("a", "c", 1010, 1, 1)], {"a", "b"}),
        (1030.0, [], {"a", "b"}),  # b was seen at 1000: 30 s, not over
        (1031.0, [roll("a", "c", 1020, 1, 1)], {"a"}),
        (1061.0, [], {"a"}),
        (1062.0, [], set()),
    ]:
        clock.now = now
        state.update(rollups, [])
        assert {key[0] for key in state._entries} == left, now
        assert state.series == len(left)


def test_the_first_flush_brings_in_restored_gauges() -> None:
    state = Exposition(expire_after=0, clock=Clock())
    state.update([roll("temp", "g", 990, 1, 5, 5)], [])
    assert text_of(state) == "# HELP temp statsd gauge temp\n# TYPE temp gauge\ntemp 5\n"


def test_expire_after_zero_keeps_everything() -> None:
    clock = Clock()
    state = Exposition(expire_after=0, clock=clock)
    state.update([roll("hits", "c", 990, 1, 1)], [])
    clock.now += 10**6
    state.update([], [])
    assert "hits_total 1\n" in text_of(state)


# ---------------------------------------------------------------- promtool


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    program = require_program("promtool")
    return subprocess.run(
        [program, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


#: every kind of series and label the renderer writes, with names that
#: promtool's lint likes (it flags "a_b" as an abbreviated unit, "x_count"
#: on a gauge, camelCase: remarks about the user's own names)
LINT_CLEAN = [
    s("app.requests", "c", 7, (("route", "/a b"), ("code", "200"))),
    s("app.requests", "c", 1.5, (("route", 'say "hi"\\'), ("code", "500"))),
    s("app_requests", "c", 1, (("route", "/a b"), ("code", "200"))),  # clash: left out
    s("jobs_total", "c", 3),
    s("queue.depth", "g", -3.25, (("canary", ""), ("host", "h\n1"))),
    s("users", "s", 2),
    s("latency", "ms", 90, (("quantile", "q"), ("le", "1")), 4, ((50.0, 20), (99.9, 30))),
    s("payload", "h", 3, (("kind", "h"),), 1, ((90.0, 3),)),
    s("payload", "d", 5, (("kind", "d"),), 2, ((90.0, 4),)),
    s("latency.count", "g", 1),  # clash with the summary's _count: left out
    s("statsd_aggregator.packets_received", "c", 12),
    s("statsd_aggregator.flush_seconds", "g", 0.0015),
]


def test_promtool_accepts_the_exposition_with_no_problem() -> None:
    result = families(LINT_CLEAN)
    assert result.dropped == 2
    text = render(result.families)
    result = promtool(text)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), text


def test_promtool_parses_awkward_names() -> None:
    # camelCase and unit abbreviations are lint remarks (exit 3) about the
    # user's own names, never parse errors (exit 1).
    series = [
        s("a.b-c/d café", "g", 1),
        s("5xx", "c", 1),
        s("loadTime_ms", "ms", 1, (("Route", "/a b"),), 1, ((50.0, 1),)),
    ]
    result = promtool(render(families(series).families))
    assert result.returncode in (0, 3), result.stderr
    assert "error" not in result.stderr
