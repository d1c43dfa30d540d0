"""The wire parser, driven by the named vectors in tests/vectors/protocol.toml.

Every vector asserts the WHOLE ``Parsed`` result (exact samples, events,
checks, bad reasons and line count), so a vector that expects nothing fails
if anything comes out. Property tests check that no input makes the parser
raise and that every accepted sample survives a trip back through the wire.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import protocol
from aggregator.model import (
    BAD_REASONS,
    COUNTER,
    DISTRIBUTION,
    GAUGE,
    HISTOGRAM,
    SET,
    TIMER,
    Event,
    Parsed,
    Sample,
    ServiceCheck,
    Tags,
)
from aggregator.protocol import Parser

VECTORS_PATH = Path(__file__).parent / "vectors" / "protocol.toml"
MAX_UDP_PAYLOAD = 65_507  # the largest IPv4 UDP datagram: "a 64 KiB datagram"


def load_vectors() -> list[dict[str, Any]]:
    with VECTORS_PATH.open("rb") as handle:
        vectors: list[dict[str, Any]] = tomllib.load(handle)["vector"]
    return vectors


VECTORS = load_vectors()
PARSER_VECTORS = [v for v in VECTORS if not v.get("transport_only", False)]


def vector_input(vector: dict[str, Any]) -> bytes:
    """The vector's bytes: UTF-8 ``input`` or, for invalid UTF-8, ``input_hex``."""
    if "input_hex" in vector:
        return bytes.fromhex(vector["input_hex"])
    text: str = vector["input"]
    return text.encode("utf-8")


def _tags(pairs: list[list[str]]) -> Tags:
    return tuple(sorted((key, value) for key, value in pairs))


def expected_result(vector: dict[str, Any]) -> Parsed:
    """Build the exact ``Parsed`` a vector describes (absent timestamp = None)."""
    samples = [
        Sample(
            name=s["name"],
            type=s["type"],
            tags=_tags(s["tags"]),
            value=s["value"] if s["type"] == SET else float(s["value"]),
            rate=float(s["rate"]),
            timestamp=s.get("timestamp"),
            delta=s["delta"],
        )
        for s in vector["samples"]
    ]
    events = [Event(**{**e, "tags": _tags(e["tags"])}) for e in vector["events"]]
    checks = [ServiceCheck(**{**c, "tags": _tags(c["tags"])}) for c in vector["checks"]]
    return Parsed(samples, events, checks, list(vector["bad"]), vector["lines"])


def strict_parser(clean_names: bool = True) -> Parser:
    """A parser whose internal errors raise instead of becoming a bad line."""
    parser = Parser(clean_names=clean_names)
    parser._strict = True
    return parser


# ---------------------------------------------------------------- the vectors


def test_vector_file_is_well_formed() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "vector names must be unique"
    prefixes = {name.split("/")[0] for name in names}
    assert prefixes == {"conformance", "decision", "client"}
    for vector in PARSER_VECTORS:
        assert ("input" in vector) != ("input_hex" in vector), vector["name"]
        assert vector["all_transports"] is True, vector["name"]
        assert set(vector["bad"]) <= set(BAD_REASONS), vector["name"]


@pytest.mark.parametrize("vector", PARSER_VECTORS, ids=[v["name"] for v in PARSER_VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    parser = strict_parser(vector.get("clean_names", True))
    data = vector_input(vector)
    want = expected_result(vector)
    assert parser.parse(data) == want
    # Again with the parser's name and tag caches warm, as in a listener.
    assert parser.parse(data) == want


def test_vectors_through_one_shared_parser() -> None:
    """All vectors, in order, through one parser: caches never leak between lines."""
    parsers = {True: strict_parser(True), False: strict_parser(False)}
    for vector in PARSER_VECTORS:
        parser = parsers[vector.get("clean_names", True)]
        assert parser.parse(vector_input(vector)) == expected_result(vector), vector["name"]


def test_client_datagrams_only_bad_where_the_spec_says() -> None:
    """Real clients' bytes parse cleanly, except python-statsd's r/a types and NaN."""
    for vector in PARSER_VECTORS:
        if not vector["name"].startswith("client/"):
            continue
        data = vector_input(vector)
        if b"|r|" in data or data.endswith(b"|a") or b":nan|" in data.lower():
            assert vector["bad"], vector["name"]
        else:
            assert not vector["bad"], vector["name"]
            assert vector["samples"] or vector["events"] or vector["checks"], vector["name"]


# ---------------------------------------------------------- generated vectors


def test_64k_datagram_of_valid_lines() -> None:
    """CONFORMANCE: "a 64 KiB datagram of valid lines -> every line counted"."""
    types = (COUNTER, GAUGE, TIMER, HISTOGRAM, DISTRIBUTION, SET)
    lines: list[bytes] = []
    want: list[Sample] = []
    size = 0
    index = 0
    while True:
        type_code = types[index % len(types)]
        name = f"load.metric_{index % 50}"
        shard = str(index % 7)
        line = f"{name}:{index}|{type_code}|#shard:{shard}".encode()
        if size + len(line) + 1 > MAX_UDP_PAYLOAD:
            break
        lines.append(line)
        size += len(line) + 1
        value: float | str = str(index) if type_code == SET else float(index)
        want.append(Sample(name, type_code, (("shard", shard),), value))
        index += 1
    datagram = b"\n".join(lines) + b"\n"
    assert MAX_UDP_PAYLOAD - 100 < len(datagram) <= MAX_UDP_PAYLOAD
    assert strict_parser().parse(datagram) == Parsed(want, [], [], [], len(lines))


def test_one_bad_line_among_many_costs_only_itself() -> None:
    good = [f"m{i}:1|c".encode() for i in range(100)]
    data = b"\n".join([*good[:50], b"broken\xff:1|c", b"m:1|x", *good[50:]])
    result = strict_parser().parse(data)
    assert result.bad == ["invalid_utf8", "unknown_type"]
    assert [s.name for s in result.samples] == [f"m{i}" for i in range(100)]
    assert result.lines == 102


def test_internal_error_costs_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defence-in-depth guard: a parser bug becomes one bad line, not a crash."""
    parser = Parser()
    original = parser._metric

    def fragile(line: str) -> list[Sample] | str:
        if line.startswith("boom"):
            raise IndexError("simulated parser bug")
        return original(line)

    monkeypatch.setattr(Parser, "_metric", lambda self, line: fragile(line))
    result = parser.parse(b"a:1|c\nboom:1|c\nb:1|c")
    assert [s.name for s in result.samples] == ["a", "b"]
    assert result.bad == ["invalid_value"]
    assert result.lines == 3


# ------------------------------------------------------------------- caches


def test_name_and_tag_caches_are_bounded() -> None:
    parser = strict_parser()
    entries = protocol._CACHE_ENTRIES
    for start in range(0, 3 * entries, 1000):
        batch = "\n".join(f"n{i}:1|c|#t:{i}" for i in range(start, start + 1000))
        assert len(parser.parse(batch.encode()).samples) == 1000
    assert 0 < len(parser._names) <= entries
    assert 0 < len(parser._tags) <= entries
    assert 0 < len(parser._plans) <= entries
    assert 0 < len(parser._pairs) <= entries


def test_a_tag_pair_is_one_object_in_every_tag_set_that_holds_it() -> None:
    """So a window's keys hold each pair once, and pickle refers to it after
    its first use (an ingest worker's hand-over)."""
    parser = strict_parser()
    lines = [
        b"a:1|c|#env:prod,host:web-1",
        b"b:1|ms|#host:web-2,env:prod",
        b"c,env=prod:1|g",
        b"d;env=prod;host=web-1:1|s",
        b"e:1|c|#env:prod|#host:web-1",
    ]
    tags = [parser.parse(line).samples[0].tags for line in lines]
    assert [dict(t)["env"] for t in tags] == ["prod"] * 5
    env = {id(pair) for t in tags for pair in t if pair[0] == "env"}
    web1 = {id(pair) for t in tags for pair in t if pair == ("host", "web-1")}
    assert len(env) == 1 and len(web1) == 1


def test_long_names_and_tags_are_not_cached() -> None:
    parser = strict_parser()
    name = "n" * (protocol._CACHE_KEY_CHARS + 1)
    tag = "t:" + "v" * protocol._CACHE_KEY_CHARS
    result = parser.parse(f"{name}:1|c|#{tag}".encode())
    assert result.samples == [Sample(name, COUNTER, (("t", "v" * protocol._CACHE_KEY_CHARS),), 1.0)]
    assert parser._names == {}
    assert parser._tags == {}
    assert parser._plans == {}


#: runs of lines whose text after the values repeats: a warm parser (which
#: reuses what that text meant) must read each line as a fresh parser does
PLAN_SEQUENCES = {
    "same-tail-new-values": ["a:1|c|#env:x", "a:2:3|c|#env:x", "a:|c|#env:x", "a:x|c|#env:x"],
    "same-tail-other-names": ["a:1|ms|@0.5|#k:v", "b:2|ms|@0.5|#k:v", "b,t=1:3|ms|@0.5|#k:v"],
    "name-tags-then-plain": ["a;t=1:1|c|#k:v", "a:1|c|#k:v", "a;t=2:1|c|#k:v"],
    "multi-body-then-one": ["a:1|c:2|ms", "a:1|c", "a:1|c|@0.5:2|ms", "a:2|c|@0.5"],
    "timestamps": ["a:1|c|T1700000000", "a:1|c|T1700000000", "a:1|c|T1700000009"],
    "gauge-deltas-and-sets": ["g:+1|g|#k:v", "g:-2|g|#k:v", "g:3|g|#k:v", "s:a:b|s", "s:c|s"],
    "rates-on-gauges-and-sets": ["g:1|g|@0.5", "g:2|g|@0.5", "s:x|s|@0.1", "s:y|s|@0.1"],
    "container-field": ["a:1|c|c:abc", "a:2|c|c:abc", "a:3|c|#c:d|c:abc"],
}


@pytest.mark.parametrize("lines", PLAN_SEQUENCES.values(), ids=PLAN_SEQUENCES.keys())
def test_warm_parser_reads_each_line_as_a_fresh_one(lines: list[str]) -> None:
    warm = strict_parser()
    for _ in range(2):
        for line in lines:
            assert warm.parse(line.encode()) == strict_parser().parse(line.encode()), line


def test_cached_bad_name_stays_bad() -> None:
    parser = strict_parser()
    for _ in range(3):
        assert parser.parse(b"a,k=v;x=y:1|c\n$$:1|c").bad == ["invalid_tags", "empty_name"]


# --------------------------------------------------------------- properties

# Pieces of the wire syntax, so generated lines reach deep into the parser
# (arbitrary bytes almost never form a valid line).
_TOKENS = [
    "foo", "a.b", "x_y-z", "café", "e\u0301", "😀", " ", "\t", "/", "$", "\r", "\x00",
    ":", "|", "||", ",", ";", "=", "#", "[", "]", "@", "{", "}", "\\n",
    "c", "g", "ms", "h", "d", "s", "C", "r", "x",
    "0", "1", "-2", "+3", "1.5", ".5", "1e3", "1e-07", "1e+20", "1e999", "nan", "inf", "1_0",
    "@0.5", "@1", "@0", "@2", "#k:v", "#a:b:c,d", "#", "k=v", "T1700000000", "T12x",
    "c:abc", "c:a,b", "e:ext", "card:high", "m:msg", "d:1700000000", "h:host", "p:low",
    "_e{", "_e{5,4}:", "_sc|", "title|text", "\n",
]  # fmt: skip
_NAME_PARTS = [
    "foo", "a.b", "x_y-z", "café", "e\u0301", "😀", " ", "/", "$", "\x00", "\r", "|",
    ",k=v", ",k=v,flag", ";k=v;x=a=b", "#k=v", "[k=v,x=y]", "[", "=",
]  # fmt: skip
_FIELDS = [
    "@0.5", "@1", "@0.125", "@1e-3", "@2", "@0", "#k:v", "#a:b:c,d", "#", "#x,,y", "#:v",
    "#k:v\r", "#container_id", "T1700000000", "T0", "Tx", "c:abc", "c:a,b", "c:", "e:ext",
    "card:high", "", "?",
]  # fmt: skip
_value = st.one_of(
    st.sampled_from(["0", "1", "-2", "+3", "-0", "1.5", ".5", "5.", "1e3", "1e-07", "1e+20"]),
    st.sampled_from(["", "abc", "nan", "inf", "1_0", " 1", "a:b"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
_body = st.builds(
    lambda values, type_code, fields: "|".join([":".join(values), type_code, *fields]),
    st.lists(_value, min_size=1, max_size=3),
    st.sampled_from(["c", "g", "ms", "h", "d", "s", "x", ""]),
    st.lists(st.sampled_from(_FIELDS), max_size=3),
)
_metric_line = st.builds(
    lambda name, bodies: "".join(name) + ":" + ":".join(bodies),
    st.lists(st.sampled_from(_NAME_PARTS), min_size=1, max_size=4),
    st.lists(_body, min_size=1, max_size=2),
)


def _event_text(title: str, text: str, measure: Callable[[str], int], fields: list[str]) -> str:
    tail = "".join("|" + field for field in fields)
    return f"_e{{{measure(title)},{measure(text)}}}:{title}|{text}{tail}"


_event_line = st.builds(
    _event_text,
    st.text(max_size=8),
    st.text(max_size=8),
    st.sampled_from([len, lambda s: len(s.encode()), lambda s: len(s.encode("utf-16-le")) // 2]),
    st.lists(st.sampled_from(["d:1", "d:x", "h:h", "p:low", "t:error", "#k:v", "k:a", "s:b"])),
)
_check_line = st.builds(
    lambda name, status, fields: f"_sc|{name}|{status}" + "".join("|" + f for f in fields),
    st.text(max_size=6),
    st.sampled_from(["0", "1", "2", "3", "4", ""]),
    st.lists(st.sampled_from(["d:1", "d:x", "h:h", "#k:v", "m:a|b", "m:x\\ny", "c:id"])),
)
_wire_text = st.lists(st.sampled_from(_TOKENS), max_size=24).map("".join)
_datagram = st.lists(st.one_of(_metric_line, _event_line, _check_line, _wire_text), max_size=6).map(
    "\n".join
)
_wire_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    _datagram.map(lambda text: text.encode("utf-8", "surrogatepass")),
)
_SETTINGS = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(data=_wire_bytes, clean_names=st.booleans())
def test_parse_never_raises(data: bytes, clean_names: bool) -> None:
    result = strict_parser(clean_names).parse(data)
    assert isinstance(result, Parsed)
    assert set(result.bad) <= set(BAD_REASONS)
    outputs = len(result.events) + len(result.checks) + len(result.bad)
    assert outputs <= result.lines  # samples may be several per line; the rest one
    assert result.lines <= data.count(b"\n") + 1


def serialise(sample: Sample) -> bytes:
    """One sample back on the wire as ``name:value|type|#tags|c:..|@rate|T..``.

    Tags go before the rate so that a tag ending in "\\r" is never last on the
    line (a final "\\r" is a line ending). A container id holding "," (it came
    from a ``c:`` field, which may list several ids) goes back as ``c:``.
    """
    if sample.type == SET:
        value = str(sample.value)
    elif sample.delta:
        value = format(sample.value, "+")  # the sign is what makes it a delta
    else:
        value = repr(sample.value)
    fields = [f"{sample.name}:{value}", sample.type]
    plain = [f"{key}:{val}" if val else key for key, val in sample.tags if "," not in val]
    if plain:
        fields.append("#" + ",".join(plain))
    fields.extend(f"c:{val}" for key, val in sample.tags if "," in val)
    fields.append(f"@{sample.rate!r}")
    if sample.timestamp is not None:
        fields.append(f"T{sample.timestamp}")
    return "|".join(fields).encode("utf-8")


@_SETTINGS
@given(data=_wire_bytes)
def test_accepted_samples_round_trip(data: bytes) -> None:
    parser = strict_parser()
    for sample in parser.parse(data).samples:
        wire = serialise(sample)
        assert strict_parser().parse(wire) == Parsed([sample], [], [], [], 1), wire


@_SETTINGS
@given(
    name=st.text(st.characters(codec="utf-8", exclude_characters="\n:"), min_size=1, max_size=20),
    type_code=st.sampled_from([COUNTER, GAUGE, TIMER, HISTOGRAM, DISTRIBUTION]),
    value=st.floats(allow_nan=False, allow_infinity=False),
    rate=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    tags=st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_characters="\n,|:#"), min_size=1, max_size=8),
        st.text(st.characters(codec="utf-8", exclude_characters="\n,|\r"), max_size=8),
        max_size=4,
    ),
)
def test_well_formed_lines_are_accepted(
    name: str, type_code: str, value: float, rate: float, tags: dict[str, str]
) -> None:
    """Any finite value, rate and tag set a client could send is accepted."""
    tag_field = ",".join(f"{key}:{val}" for key, val in tags.items())
    line = f"metric:{value!r}|{type_code}|@{rate!r}|#{tag_field}"
    result = strict_parser().parse(line.encode())
    assert result.bad == []
    [sample] = result.samples
    assert sample.value == value
    assert sample.rate == (1.0 if type_code == GAUGE else rate)
    assert sample.tags == tuple(sorted(tags.items()))
    assert sample.delta == (type_code == GAUGE and repr(value)[0] == "-")
    # Any name goes through Etsy cleaning, and cleaning a clean name changes nothing.
    for kept in strict_parser().parse(f"{name}:1|c".encode()).samples:
        again = strict_parser().parse(f"{kept.name}:1|c".encode()).samples
        assert [s.name for s in again] == [kept.name]
