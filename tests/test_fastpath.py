"""The C fast path (aggregator/_fastpath.c) against the pure path it stands in for.

``Intake`` reads lines either way; both must leave the same window (every
float bit for bit, -0.0 included), the same persisted gauges, the same
counts of lines, samples and bad reasons, the same events and the same
limit drops. Each test feeds the same reads to one Intake of each kind and
compares everything, then swaps and compares the rollups.

The inputs: every parser vector, a seeded corpus that repeats line shapes
(so the fast path learns them and then reads them itself) with good and
bad values of every type, and Hypothesis-made reads from the same pieces.
"""

from __future__ import annotations

import gc
import os
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.aggregate import Aggregator, WorkerAggregator, snapshot
from aggregator.fastpath import native
from aggregator.intake import Intake, paused_gc
from aggregator.limits import Drops, Limits
from aggregator.protocol import Parser
from tests.test_protocol import PARSER_VECTORS, vector_input

if native is None:
    if os.environ.get("CI"):
        pytest.fail("the C fast path is not built (pip install -e . builds it)")
    pytest.skip("the C fast path is not built (no C compiler?)", allow_module_level=True)

NAMES = ["api.req", "db.q", "café.temps", "_private", "x", "a b/c", "n,env=prod", "n;k=v"]
TYPES = ["c", "ms", "h", "d", "g", "s"]
VALUES = [
    "1", "0", "-0", "+0", "-0.0", "2.5", "+3", "-5", "1e3", "1E-7", ".5", "7.",
    "1e999", "nan", "inf", "1_0", "", "1:2:3", "abc", "--1", "1e", "١", " 1",
    "12345678901234567890123456789012345678901234567890123456789012345678",
]
FIELDS = ["", "|@0.5", "|@0.25", "|@1", "|@0", "|@2", "|#env:prod,role:db", "|#b,a:1",
          "|#:bad", "|T1700000000", "|c:abc", "|@0.5|#k:v", "|#env:prod|@0.1", "|e:x"]
OTHER_LINES = [
    "_e{5,4}:title|text|#a:b",
    "_sc|db.up|0|#a:b",
    "_e{1,1}:a|b:1|c",
    "foo",
    ":1|c",
    "foo:1|x",
    "foo:1",
    "foo:1|c:2|ms",
    "x:1|c\r",
    "x:1|c\r\r",
    "\r",
    "u:a:b|s",
    "u:é|s",
]


def line(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return rng.choice(OTHER_LINES)
    name = rng.choice(NAMES)
    kind = rng.choice(TYPES)
    if kind == "s":
        value = rng.choice(["u1", "u2", "a:b", "", "é", "u3"])
    else:
        value = rng.choice(VALUES) if rng.random() < 0.3 else str(rng.randint(-3, 9))
    return f"{name}:{value}|{kind}{rng.choice(FIELDS)}"


def corpus(seed: int, reads: int) -> list[list[bytes]]:
    """Reads of one to four datagrams of one to six lines, some not UTF-8."""
    rng = random.Random(seed)
    out = []
    for _ in range(reads):
        read = []
        for _ in range(rng.randint(1, 4)):
            text = "\n".join(line(rng) for _ in range(rng.randint(1, 6)))
            data = text.encode()
            if rng.random() < 0.02:
                data += b"\nbad:\xff|c"
            read.append(data)
        out.append(read)
    return out


def exact(value: Any) -> Any:
    """A comparable form that tells -0.0 from 0.0 and keeps int apart from float."""
    if isinstance(value, float):
        return ("f", struct.pack("<d", value))
    if isinstance(value, dict):
        return sorted((repr(k), exact(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [exact(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted(repr(item) for item in value)
    return value


def pair(
    worker: bool = False, gauge_deltas: bool = True, limits: Limits | None = None
) -> tuple[Intake, Intake]:
    def one(fast: bool) -> Intake:
        drops = Drops()
        aggregator: Aggregator
        if worker:
            aggregator = WorkerAggregator(10, gauge_deltas, limits, drops)
            aggregator.now = 12.5
        else:
            aggregator = Aggregator(10, (50.0, 99.0), gauge_deltas, limits, drops)
        aggregator.open(1_700_000_000)
        made = Intake(Parser(), aggregator, lambda: 1_700_000_003.0, fast=fast)
        assert (made.routes is not None) == fast
        return made

    return one(True), one(False)


def state(feed: Intake) -> dict[str, Any]:
    aggregator = feed.aggregator
    window = aggregator._open
    budget = aggregator._budget
    stats = feed.stats
    return {
        "counters": exact(window.counters),
        "timers": exact(window.timers),
        "weights": exact(window.weights),
        "gauges": exact(window.gauges),
        "sets": exact(window.sets),
        "persisted": exact(aggregator._gauges),
        "timestamped": sorted(aggregator._timestamped),
        "lines": stats.lines,
        "samples": stats.samples,
        "bad": sorted(stats.bad.items()),
        "events": feed.events,
        "checks": feed.checks,
        "drops": exact(aggregator.drops.take_window()),
        "budget": (budget.created, budget.per_metric, budget.gauges_per_metric),
    }


def run_both(reads: list[list[bytes]], fast: Intake, pure: Intake, stream: bool = False) -> None:
    for read in reads:
        for feed in (fast, pure):
            if stream:
                feed.lines(b"\n".join(read) + b"\n")
            else:
                feed.datagrams(read)
    assert state(fast) == state(pure)


def rollups(feed: Intake) -> list[Any]:
    """Swap: the closed windows as they are, and (but for a worker's) their rollups."""
    aggregator = feed.aggregator
    closed = aggregator.swap(aggregator.start + aggregator.interval)
    raw = [exact([w.start, w.counters, w.timers, w.weights, w.gauges, w.sets]) for w in closed]
    if isinstance(aggregator, WorkerAggregator):
        return raw  # its gauges are merged by the daemon, not rolled up
    return raw + [exact(sorted(snapshot(w, aggregator.percentiles), key=repr)) for w in closed]


@pytest.mark.parametrize("vector", PARSER_VECTORS, ids=[v["name"] for v in PARSER_VECTORS])
def test_every_parser_vector_lands_alike(vector: dict[str, Any]) -> None:
    fast, pure = pair()
    data = vector_input(vector)
    # three times: the first teaches the fast path the shapes, the rest use them
    run_both([[data]] * 3, fast, pure)
    assert rollups(fast) == rollups(pure)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "setup",
    [
        {},
        {"worker": True},
        {"gauge_deltas": False},
        {"worker": True, "gauge_deltas": False},
        {"limits": Limits(max_series=25, max_series_per_metric=6, max_tags=1)},
        {"worker": True, "limits": Limits(max_series=25)},
        {"limits": Limits(max_name_length=4, max_tag_length=7, max_series_per_metric=3)},
        {"worker": True, "limits": Limits(max_name_length=5, max_tag_length=6)},
    ],
    ids=[
        "daemon",
        "worker",
        "no-deltas",
        "worker-no-deltas",
        "limits",
        "worker-limits",
        "name-tag-limits",
        "worker-name-tag-limits",
    ],
)
def test_a_mixed_corpus_lands_alike(seed: int, setup: dict[str, Any]) -> None:
    fast, pure = pair(**setup)
    reads = corpus(seed, 400)
    run_both(reads, fast, pure)
    assert fast.routes is not None and len(fast.routes) > 20, "the fast path learned nothing"
    assert rollups(fast) == rollups(pure)
    # the next window: every series is new to it again, the shapes are not
    run_both(corpus(seed + 100, 200), fast, pure)
    assert rollups(fast) == rollups(pure)


@pytest.mark.parametrize("gauge_deltas", [True, False])
def test_gauges_carried_in_land_alike(gauge_deltas: bool) -> None:
    """Values a window starts from (a restart, the workers' merge), signed zeros included."""
    fast, pure = pair(gauge_deltas=gauge_deltas)
    carried = {(f"g{i}", "g", ()): value for i, value in enumerate([-0.0, 0.0, 2.5, -1.0])}
    values = ["0", "-0", "+0", "-0.0", "3", "-2", "+1", "0.0"]
    reads = [
        [f"g{i}:{value}|g".encode() for i in range(4)] for value in values for _ in range(2)
    ]
    for start in range(0, len(reads), 2):
        # each round starts from the carried values; from the second on, the
        # fast path knows every line's shape and reads them all itself
        for feed in (fast, pure):
            feed.aggregator.restore_gauges(dict(carried))
        for read in reads[start:] + reads[:start]:
            run_both([read], fast, pure)  # compared after every read: min and max forget
        assert rollups(fast) == rollups(pure)


def test_stream_chunks_land_alike() -> None:
    fast, pure = pair()
    run_both(corpus(7, 300), fast, pure, stream=True)
    assert rollups(fast) == rollups(pure)


class CountingParser(Parser):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def parse(self, data: bytes) -> Any:
        self.calls += 1
        return super().parse(data)


def test_lines_of_known_shapes_skip_the_parser() -> None:
    fast, pure = pair()
    counting = fast.parser = CountingParser()
    reads = [[b"api.req:1|c\ndb.q:2.5|ms|#env:prod\nt:+3|g\nu:a|s\nv:1|ms|@0.5"]] * 50
    run_both(reads, fast, pure)
    assert counting.calls == 5  # each shape once, then learned
    assert fast.stats.lines == 250


def test_names_the_fast_path_learned_leave_the_parser_cache() -> None:
    fast, pure = pair()
    same_name = [b"api.req:1|c", b"api.req:2|c|@0.5", b"api.req:3|c"]  # two shapes, one name
    unrouted = [b"multi:1|c:2|ms"]  # two bodies: the parser's alone, and kept cached
    run_both([same_name + unrouted] * 3, fast, pure)
    assert list(fast.parser._names) == ["multi"]
    assert len(fast.routes or ()) == 2


def test_a_full_route_table_starts_over_and_still_agrees() -> None:
    fast, pure = pair()
    assert native is not None
    fast.routes = native.Routes(3)
    run_both(corpus(11, 300), fast, pure)
    assert len(fast.routes) <= 3
    assert rollups(fast) == rollups(pure)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(NAMES[:4]),
                st.sampled_from([*VALUES, "1", "2", "-1", "u1"]),
                st.sampled_from(TYPES),
                st.sampled_from(FIELDS),
            ),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_any_reads_of_these_pieces_land_alike(reads: list[list[Any]], worker: bool) -> None:
    fast, pure = pair(worker=worker)
    datagrams = [
        ["\n".join(f"{n}:{v}|{t}{f}" for n, v, t, f in read).encode()] for read in reads
    ]
    run_both(datagrams * 2, fast, pure)
    assert rollups(fast) == rollups(pure)


def test_bad_arguments_are_type_errors() -> None:
    assert native is not None
    routes = native.Routes(8)
    with pytest.raises(TypeError):
        routes.learn("a", b"c", ("a", "c", ()), 0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        routes.learn(b"a", b"c", ("a", "c", ()), 9, 1.0)
    with pytest.raises(TypeError):
        routes.feed([b"a:1|c"])
    with pytest.raises(ValueError):
        native.Routes(0)


@pytest.mark.parametrize("batched", [True, False], ids=["recvmmsg", "recv"])
async def test_a_datagram_read_is_the_same_either_way(
    batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DatagramReader with the C recv_batch and with plain recv: same batches, same counts."""
    import asyncio
    import socket

    from aggregator import listeners

    if not batched:
        monkeypatch.setattr(listeners, "native", None)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = [f"m{i}:{i}|c".encode() * (1 + i % 5) for i in range(600)]
    sent[10] = b"x" * 1001  # over the limit below: counted, not handed over
    got: list[bytes] = []
    stats = listeners.ListenerStats()
    reader = listeners.DatagramReader(
        receiver, got.extend, stats, "udp", Limits(max_datagram_size=1000)
    )
    loop = asyncio.get_running_loop()
    try:
        # in runs of 100, each read before the next: the default receive buffer is small
        for at in range(0, len(sent), 100):
            for data in sent[at : at + 100]:
                sender.sendto(data, receiver.getsockname())
            deadline = loop.time() + 10
            while stats.packets < at + 100 and loop.time() < deadline:
                await asyncio.sleep(0.005)
    finally:
        reader.close()
        sender.close()
    assert got == sent[:10] + sent[11:]
    assert (stats.packets, stats.bytes, stats.too_large) == (600, sum(map(len, sent)), 1)


# (what the reads hold, the reads, the series take_learned hands over after them)
LEARNED_VECTORS = [
    ("a new series, once", [b"api.req:1|c", b"api.req:2|c"], [("api.req", "c", ())]),
    (
        "every type",
        [b"t:1|ms\nh:1|h\nd:1|d\ng:1|g\nu:a|s"],
        [("t", "ms", ()), ("h", "h", ()), ("d", "d", ()), ("g", "g", ()), ("u", "s", ())],
    ),
    ("a tagged series", [b"db.q:2.5|ms|#env:prod"], [("db.q", "ms", (("env", "prod"),))]),
    ("a second shape of one series, again", [b"a:1|c", b"a:1|c|@0.5"], [("a", "c", ())] * 2),
    ("a line with a timestamp: no shape", [b"a:1|c|T1700000000"], []),
    ("name dialect tags: no shape", [b"n,env=prod:1|c"], []),
    ("several values: no shape", [b"a:1:2|ms"], []),
    ("a name over the limit: not in the window", [b"x" * 300 + b":1|c"], []),
    ("a bad value", [b"a:x|c"], []),
]


@pytest.mark.parametrize(
    ("reads", "learned"), [v[1:] for v in LEARNED_VECTORS], ids=[v[0] for v in LEARNED_VECTORS]
)
def test_the_series_first_met_are_handed_over_once(reads: list[bytes], learned: list[Any]) -> None:
    fast, _ = pair(worker=True)
    for read in reads:
        fast.datagrams([read])
    assert fast.take_learned() == learned
    fast.datagrams(reads)
    assert fast.take_learned() == []


def test_series_learned_in_a_window_now_closed_are_left_to_its_flush() -> None:
    fast, _ = pair()
    fast.datagrams([b"a:1|c"])
    fast.aggregator.open(1_700_000_000)  # aligning the open window's start keeps it
    assert fast.take_learned() == [("a", "c", ())]
    fast.datagrams([b"z:1|c"])
    fast.aggregator.swap(1_700_000_010)
    assert fast.take_learned() == []
    fast.datagrams([b"b:1|c"])
    fast.aggregator.swap(1_700_000_020)
    fast.datagrams([b"c:1|c", b"b:1|c"])
    assert fast.take_learned() == [("c", "c", ())]


def test_a_shape_table_that_overflows_hands_nothing_over_for_two_windows() -> None:
    """Emptied, the table learns again shapes whose series are stored: those
    are not handed over, nor anything else until the window after next."""
    fast, _ = pair()
    assert native is not None
    fast.routes = native.Routes(4)
    fast.datagrams([b"a:1|c\nb:1|c\nc:1|c\nd:1|c"])
    assert fast.take_learned() == [("a", "c", ()), ("b", "c", ()), ("c", "c", ()), ("d", "c", ())]
    fast.datagrams([b"e:1|c"])  # the fifth shape empties the table
    fast.datagrams([b"a:1|c"])  # learned again
    assert fast.take_learned() == []
    fast.aggregator.swap(1_700_000_010)
    fast.datagrams([b"g:1|c"])
    assert fast.take_learned() == []
    fast.aggregator.swap(1_700_000_020)
    fast.datagrams([b"h:1|c"])
    assert fast.take_learned() == [("h", "c", ())]


@pytest.mark.parametrize("enabled_before", [True, False])
def test_paused_gc_stops_the_collector_for_the_block_and_restores_its_state(
    enabled_before: bool,
) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled_before else gc.disable)()
        with paused_gc():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled_before
        with pytest.raises(RuntimeError), paused_gc():
            raise RuntimeError("a failed flush")
        assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()
