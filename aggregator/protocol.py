"""PURE StatsD / DogStatsD parser: one datagram (or stream chunk) -> ``Parsed``.

No I/O, no logging, no clock: the listener hands bytes in and counts what
comes out. Behaviour is pinned by ``tests/vectors/protocol.toml``, one named
vector per row of the shared CONFORMANCE.md and per captured client datagram.

Grammar (CONFORMANCE.md, "Grammar")::

    packet = line *( "\\n" line )          ; one trailing "\\r" per line dropped
    metric = name ":" body *( ":" body )  ; Etsy: several bodies per line
    body   = value *( ":" value ) "|" type *( "|" field )   ; DogStatsD v1.1

Decisions for the cases the documents leave open (README "Wire protocol"):

* A line is atomic: one problem anywhere makes the whole line one bad line
  with one reason, and none of its samples are kept. Problems are looked for
  in the order name, type, fields, values; the first one found is reported.
* ``foo:`` and ``foo:|c`` (no value at all) are ``BAD_NO_VALUE``; an empty
  member of a packed list (``foo:1::2|c``) is ``BAD_VALUE``.
* Etsy multi-body lines (``foo:1|c:2|ms``) are told apart from the colons that
  DogStatsD allows elsewhere by *position* (see ``_metric``).
* A sample rate is validated for every type (``g:1|g|@2`` is bad) but only
  kept for c/ms/h/d; gauges and sets always carry rate 1.0.
* Any field starting with ``T`` is the timestamp and must be 1-18 ASCII
  digits, else ``BAD_TIMESTAMP``. Other unknown fields are ignored.
* Tags with an empty key (``#:v``, ``name,=v``) are ``BAD_TAGS``; so is a
  name-dialect tag holding ``|`` (it could not be written back as DogStatsD).
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Final

from aggregator.model import (
    BAD_EMPTY_NAME,
    BAD_EVENT,
    BAD_NO_TYPE,
    BAD_NO_VALUE,
    BAD_RATE,
    BAD_SERVICE_CHECK,
    BAD_TAGS,
    BAD_TIMESTAMP,
    BAD_TYPE,
    BAD_UTF8,
    BAD_VALUE,
    COUNTER,
    DISTRIBUTION,
    GAUGE,
    HISTOGRAM,
    SET,
    TIMER,
    Event,
    Parsed,
    Sample,
    SeriesKey,
    ServiceCheck,
    Tags,
)

__all__ = ["Parser"]

_TYPES: Final = frozenset((COUNTER, GAUGE, TIMER, HISTOGRAM, DISTRIBUTION, SET))

# Every character a wire number may hold. float() also accepts "nan", "inf",
# "1_000", surrounding white space and non-ASCII digits ("١٢"); the protocol
# allows none of them, so a value must consist of these characters only.
_NUMBER_CHARS: Final = "0123456789.eE+-"

# A name made only of these needs no Etsy cleaning (the usual case).
_CLEAN_ASCII: Final = string.ascii_letters + string.digits + "_-."

# Characters that open a tag dialect inside the metric name.
_DIALECT_MARK: Final = re.compile(r"[,;#\[\]]")

# The caches map wire text to its parsed form. They are bounded (cleared when
# full) so a client sending unique names or tag sets cannot grow memory, and
# long keys are never cached for the same reason. The bound must hold every
# active name of a large deployment: a cache cleared every pass over the
# names hits almost never (at 100k series and 8k entries the name parsing was
# 15% of the daemon's time). Full, each holds about 25 MB.
_CACHE_ENTRIES: Final = 1 << 17
_CACHE_KEY_CHARS: Final = 512

_EVENT_PRIORITIES: Final = frozenset(("normal", "low"))
_EVENT_ALERT_TYPES: Final = frozenset(("info", "warning", "error", "success"))
_CHECK_STATUSES: Final = {"0": 0, "1": 1, "2": 2, "3": 3}
_CONTAINER_TAG: Final = "container_id"
_MAX_INT_DIGITS: Final = 18  # fits an int64, far below int()'s digit limit

# Sample(...) goes through the NamedTuple's Python-level __new__; building the
# tuple directly is the same object at half the cost (measured: ~490 -> ~245 ns
# per sample), and it is made once per value on the hot path.
_new_sample: Final = tuple.__new__


class Parser:
    """Parses StatsD, DogStatsD and the name tag dialects into ``Parsed``.

    One parser per listener (it is not thread-safe: it keeps small caches of
    parsed names and tag strings). ``parse`` never raises.
    """

    __slots__ = ("_names", "_pairs", "_plans", "_strict", "_tags", "clean_names")

    def __init__(self, clean_names: bool = True) -> None:
        #: apply Etsy's name cleaning (CONFORMANCE: "configurable off")
        self.clean_names = clean_names
        self._names: dict[str, tuple[str, Tags] | str] = {}
        self._tags: dict[str, Tags] = {}
        #: each tag pair met, one object for every tag set that holds it (_shared)
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}
        #: the text after a one-body line's values -> (type, rate, tags)
        self._plans: dict[str, tuple[str, float, Tags]] = {}
        # Tests set this to let a parser bug surface instead of being
        # counted as a bad line (see ``parse``).
        self._strict = False

    # ------------------------------------------------------------------ lines

    def parse(self, data: bytes) -> Parsed:
        """Parse one datagram, or a chunk of complete newline-ended lines."""
        out = Parsed([], [], [], [], 0)  # positional: skips the default factories
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # CONFORMANCE: "each line that is not valid UTF-8 is a bad line;
            # valid lines count". Only then is the datagram split as bytes.
            lines = self._decode_lines(data, out)
        else:
            lines = text.split("\n")
            if "\r" in text:
                lines = [line[:-1] if line[-1:] == "\r" else line for line in lines]
        samples = out.samples
        bad = out.bad
        metric = self._metric
        count = 0
        for line in lines:
            if not line:
                continue  # blank lines are skipped silently, not counted
            count += 1
            try:
                if line[0] == "_" and line.startswith(("_e{", "_sc|")):
                    self._special(line, out)
                    continue
                result = metric(line)
                if isinstance(result, str):
                    bad.append(result)
                else:
                    samples += result
            except Exception:
                # Defence in depth: a parser bug must cost one line, never the
                # rest of the datagram or the listener. The tests run with
                # _strict set, so such a bug fails them instead.
                if self._strict:
                    raise
                bad.append(BAD_VALUE)
        out.lines += count
        return out

    @staticmethod
    def _decode_lines(data: bytes, out: Parsed) -> list[str]:
        """Split undecodable bytes into lines; count each bad one as BAD_UTF8."""
        lines: list[str] = []
        for raw in data.split(b"\n"):
            if raw[-1:] == b"\r":
                raw = raw[:-1]
            if not raw:
                continue
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.lines += 1
                out.bad.append(BAD_UTF8)
        return lines

    def _special(self, line: str, out: Parsed) -> None:
        """Dispatch DogStatsD events and service checks (parse.go does the same)."""
        if line[1] == "e":
            event = self._event(line)
            if isinstance(event, str):
                out.bad.append(event)
            else:
                out.events.append(event)
        else:
            check = self._check(line)
            if isinstance(check, str):
                out.bad.append(check)
            else:
                out.checks.append(check)

    # ---------------------------------------------------------------- metrics

    def _metric(self, line: str) -> list[Sample] | str:
        """Parse one metric line into its samples, or return the bad reason.

        The name ends at the FIRST ":" (CONFORMANCE: "Names split from the
        value at the first ':'"); the rest is split on "|" into segments.

        How colons after the name are read, by position:

        * segment 0 holds the values: ``1:2:3`` is DogStatsD v1.1 packed
          values (``foo:1:2:3|ms``), except for sets, where it is ONE member
          (``u:a:b|s`` -> "a:b");
        * the type segment never contains ":" in DogStatsD, so ``c:2`` in
          that position is the Etsy multi-body form: type "c", then the
          values of the next body (``foo:1|c:2|ms`` -> counter 1, timer 2);
        * a rate field never contains ":" either, so ``@0.5:2`` ends this
          body and starts the next one, as Etsy reads ``foo:1|c|@0.5:2|ms``;
        * in every other field ":" belongs to the field: ``#a:b:c`` is the
          tag a="b:c", and ``c:2`` AFTER the type segment is the DogStatsD
          container field (``foo:1|c|#env:dev|c:abc123``).
        """
        head, colon, rest = line.partition(":")
        if not colon:
            return BAD_NO_VALUE
        named = self._names.get(head)
        if named is None:
            named = self._name(head)
        if isinstance(named, str):
            return named
        if not rest:
            return BAD_NO_VALUE  # "foo:" (model: "no ':' or nothing after it")
        name, name_tags = named
        if not name_tags:
            # The usual line: one body, its type and fields seen before.
            values, _, tail = rest.partition("|")
            plan = self._plans.get(tail)
            if plan is not None:
                if not values:
                    return BAD_NO_VALUE
                return _samples(name, plan[0], plan[2], values, plan[1], None, [])

        tag_cache = self._tags
        segments = rest.split("|")
        count = len(segments)
        values = segments[0]
        found: list[Sample] = []
        index = 1  # the type segment of the current body
        first_body = True
        while True:
            if index >= count:
                return BAD_NO_TYPE
            type_code = segments[index]
            more = next_values = ""
            if type_code not in _TYPES:
                # Not a bare type: maybe "c:2", the Etsy multi-body form.
                type_code, more, next_values = type_code.partition(":")
                if type_code not in _TYPES:
                    return BAD_TYPE if type_code else BAD_NO_TYPE
            index += 1
            rate = 1.0
            timestamp: int | None = None
            tags = name_tags
            while not more and index < count:
                field = segments[index]
                index += 1
                lead = field[:1]
                if lead == "#":
                    parsed = tag_cache.get(field) or self._dogstatsd_tags(field)
                    if parsed is None:
                        return BAD_TAGS
                    tags = _merge(tags, parsed) if tags else parsed
                elif lead == "@":
                    text, more, next_values = field[1:].partition(":")
                    sample_rate = _number(text)
                    if sample_rate is None or not 0.0 < sample_rate <= 1.0:
                        return BAD_RATE
                    rate = sample_rate
                elif lead == "T":
                    timestamp = _integer(field[1:])
                    if timestamp is None:
                        return BAD_TIMESTAMP
                elif field.startswith("c:") and len(field) > 2:
                    tags = _merge(tags, ((_CONTAINER_TAG, field[2:]),))
                # anything else ("e:", "card:", unknown) is ignored: CONFORMANCE
                # "unknown fields are ignored".
            if not values:
                return BAD_NO_VALUE
            result = _samples(name, type_code, tags, values, rate, timestamp, found)
            if isinstance(result, str):
                return result
            if not more:
                if first_body and timestamp is None and not name_tags:
                    self._remember_plan(rest, type_code, rate, tags)
                return result
            first_body = False
            values = next_values

    def route(self, line: str) -> tuple[str, str, SeriesKey, float] | None:
        """``(head, tail, series key, rate)`` when lines like this one read alike.

        For a line whose name (``head``, before the first ":") and whose text
        after its values (``tail``, after the "|" that ends them) the parser
        has seen and cached as a plain one-body line, the samples depend on
        the values text alone: ``_samples(key name, key type, key tags,
        values, rate)``. The C fast path (fastpath.py) then reads such lines
        without the parser. None for every other line.
        """
        if line[-1:] == "\r":
            line = line[:-1]
        head, colon, rest = line.partition(":")
        named = self._names.get(head)
        if not colon or not isinstance(named, tuple) or named[1]:
            return None
        _, bar, tail = rest.partition("|")
        plan = self._plans.get(tail)
        if not bar or plan is None:
            return None
        return head, tail, (named[0], plan[0], plan[2]), plan[1]

    def forget(self, head: str) -> None:
        """Drop a name from the cache: the C fast path reads its lines now
        (``route`` told it how), and each entry held about 90 bytes a
        series for nothing (bench/README, item 44)."""
        self._names.pop(head, None)

    def _remember_plan(self, rest: str, type_code: str, rate: float, tags: Tags) -> None:
        """Cache what a one-body line's type and fields mean, by their text.

        Only for a line whose samples depend on nothing but its values and
        that text: one body, no timestamp, no name dialect tags. The next
        line with the same text after its values skips the field parsing.
        """
        tail = rest.partition("|")[2]
        if len(tail) <= _CACHE_KEY_CHARS:
            if len(self._plans) >= _CACHE_ENTRIES:
                self._plans.clear()
            self._plans[tail] = (type_code, rate, tags)

    def _name(self, head: str) -> tuple[str, Tags] | str:
        """Split the name from its dialect tags and clean it; cache the result."""
        result: tuple[str, Tags] | str
        split = _name_dialect(head)
        if split is None:
            result = BAD_TAGS
        else:
            name, tags = split
            if tags:
                tags = self._shared(tags)
            if self.clean_names:
                name = _clean_name(name)
            result = (name, tags) if name else BAD_EMPTY_NAME
        if len(head) <= _CACHE_KEY_CHARS:
            if len(self._names) >= _CACHE_ENTRIES:
                self._names.clear()
            self._names[head] = result
        return result

    def _dogstatsd_tags(self, field: str) -> Tags | None:
        """``#k:v,k2`` -> sorted tag pairs, cached by the field text (with its
        "#"); None if a tag is malformed. An empty "#" gives ``()``.
        """
        tags = self._tags.get(field)
        if tags is None:
            tags = _parse_tag_list(field[1:], ",", ":")
            if tags:
                tags = self._shared(tags)
            if tags is not None and len(field) <= _CACHE_KEY_CHARS:
                if len(self._tags) >= _CACHE_ENTRIES:
                    self._tags.clear()
                self._tags[field] = tags
        return tags

    def _shared(self, tags: Tags) -> Tags:
        """``tags`` made of the pair objects met before.

        Many series share each tag (``env:prod``): with one object per pair,
        a window's keys hold a few hundred pairs, not four per series, and
        pickle, which writes a repeated object once and then refers to it,
        pickles an ingest worker's window of 100k series of four tags in
        about half the time (bench/README, item 41).
        """
        pairs = self._pairs
        if len(pairs) >= _CACHE_ENTRIES:
            pairs.clear()
        return tuple([pairs.setdefault(pair, pair) for pair in tags])

    # ----------------------------------------------------- events and checks

    def _event(self, line: str) -> Event | str:
        """``_e{T,X}:title|text|d:ts|h:host|k:key|p:prio|s:src|t:alert|#tags``."""
        close = line.find("}:")
        if close < 0:
            return BAD_EVENT
        title_text, comma, text_text = line[3:close].partition(",")
        title_len = _integer(title_text)
        text_len = _integer(text_text)
        # An empty title is rejected, as the Datadog agent does.
        if not comma or not title_len or text_len is None:
            return BAD_EVENT
        body = line[close + 2 :]
        cut = _event_cut_utf8(body, title_len, text_len)
        if cut is None:
            cut = _event_cut_utf16(body, title_len, text_len)
        if cut is None:
            return BAD_EVENT
        title_end, text_end = cut
        fields: dict[str, str] = {}
        tags: Tags = ()
        if text_end < len(body):
            for field in body[text_end + 1 :].split("|"):
                if field[:1] == "#":
                    parsed = self._dogstatsd_tags(field)
                    if parsed is None:
                        return BAD_TAGS
                    tags = _merge(tags, parsed)
                elif field[1:2] == ":":
                    fields[field[0]] = field[2:]
        if fields.get("c"):
            tags = _merge(tags, ((_CONTAINER_TAG, fields["c"]),))
        timestamp = None
        if "d" in fields:
            timestamp = _integer(fields["d"])
            if timestamp is None:
                return BAD_EVENT
        # Like the Datadog agent, an unknown priority or alert type leaves the
        # default rather than dropping the event.
        priority = fields.get("p", "normal")
        alert_type = fields.get("t", "info")
        return Event(
            title=_unescape(body[:title_end]),
            text=_unescape(body[title_end + 1 : text_end]),
            timestamp=timestamp,
            host=fields.get("h", ""),
            priority=priority if priority in _EVENT_PRIORITIES else "normal",
            alert_type=alert_type if alert_type in _EVENT_ALERT_TYPES else "info",
            aggregation_key=fields.get("k", ""),
            source_type=fields.get("s", ""),
            tags=tags,
        )

    def _check(self, line: str) -> ServiceCheck | str:
        """``_sc|name|status|d:ts|h:host|#tags|m:message``.

        Datadog documents ``m:`` as the last field, so everything after it,
        ``|`` included, is the message.
        """
        name, _, rest = line[4:].partition("|")
        status_text, more, rest = rest.partition("|")
        status = _CHECK_STATUSES.get(status_text)
        if not name or status is None:
            return BAD_SERVICE_CHECK
        timestamp: int | None = None
        host = message = ""
        tags: Tags = ()
        while more:
            field, more, tail = rest.partition("|")
            if field.startswith("m:"):
                message = _unescape(rest[2:])
                break
            if field[:1] == "#":
                parsed = self._dogstatsd_tags(field)
                if parsed is None:
                    return BAD_TAGS
                tags = _merge(tags, parsed)
            elif field.startswith("d:"):
                timestamp = _integer(field[2:])
                if timestamp is None:
                    return BAD_SERVICE_CHECK
            elif field.startswith("h:"):
                host = field[2:]
            elif field.startswith("c:") and len(field) > 2:
                tags = _merge(tags, ((_CONTAINER_TAG, field[2:]),))
            rest = tail
        return ServiceCheck(name, status, timestamp, host, message, tags)


# ------------------------------------------------------------------ helpers


def _samples(
    name: str,
    type_code: str,
    tags: Tags,
    values: str,
    rate: float,
    timestamp: int | None,
    found: list[Sample],
) -> list[Sample] | str:
    """Append the samples of one body's values to ``found``; or the bad reason."""
    if type_code == SET:
        # A set member is a string and may hold ":" (CONFORMANCE: u:a:b|s).
        found.append(_new_sample(Sample, (name, SET, tags, values, 1.0, timestamp, False)))
        return found
    gauge = type_code == GAUGE
    if gauge:
        rate = 1.0  # CONFORMANCE: "sample rate ignored for gauges and sets"
    for text in values.split(":"):
        # Inlined _number(): this loop runs once per value.
        if text.strip(_NUMBER_CHARS):
            return BAD_VALUE
        try:
            value = float(text)
        except ValueError:
            return BAD_VALUE
        if value - value != 0.0:
            return BAD_VALUE
        # Etsy: a leading sign makes a gauge value a delta.
        delta = gauge and text[0] in "+-"
        found.append(_new_sample(Sample, (name, type_code, tags, value, rate, timestamp, delta)))
    return found


def _number(text: str) -> float | None:
    """A finite float in plain wire spelling, or None.

    Accepts what clients send (``1e-07``, ``1e+20``, ``-5``, ``+4``, ``.5``,
    ``100000000000000000000``); rejects NaN and infinity in every spelling,
    ``1_000``, white space and non-ASCII digits (CONFORMANCE: "no NaN, no
    infinity, no underscores").
    """
    if text.strip(_NUMBER_CHARS):
        return None  # a character outside the wire alphabet
    try:
        value = float(text)
    except ValueError:
        return None
    if value - value != 0.0:
        return None  # overflowed to infinity, e.g. "1e999"
    return value


def _integer(text: str) -> int | None:
    """A non-negative integer of 1-18 ASCII digits, or None."""
    if text.isascii() and text.isdigit() and len(text) <= _MAX_INT_DIGITS:
        return int(text)
    return None


def _merge(left: Tags, right: Tags) -> Tags:
    """Union of two tag sets, sorted, duplicates dropped (series identity)."""
    if not left:
        return right
    return tuple(sorted(set(left).union(right)))


def _parse_tag_list(text: str, separator: str, assign: str) -> Tags | None:
    """``k<assign>v<separator>...`` -> sorted pairs; None if a key is empty.

    Only the first ``assign`` character splits key from value; a tag without
    it has the value "" and an empty tag is dropped (CONFORMANCE, tags rows).
    """
    pairs: set[tuple[str, str]] = set()
    for tag in text.split(separator):
        if not tag:
            continue
        key, _, value = tag.partition(assign)
        if not key:
            return None
        pairs.add((key, value))
    return tuple(sorted(pairs))


def _name_dialect(head: str) -> tuple[str, Tags] | None:
    """Split the InfluxDB, Graphite, Librato or SignalFx tags off a name.

    * InfluxDB/Telegraf ``name,k=v,k2=v2`` and Librato ``name#k=v,k2=v2``:
      tags after the first "," or "#", separated by ",";
    * Graphite ``name;k=v;k2=v2``: tags after the first ";", separated by ";";
    * SignalFx ``name[k=v,k2=v2]``: one bracket group anywhere in the name,
      which is the text around it (``a[k=v].b`` -> "a.b"), as statsd_exporter
      reads it.

    Returns None (a bad line) when two dialects are mixed, i.e. the tag part
    holds a marker of another dialect, or brackets do not pair up, or a tag
    has an empty key or holds "|".
    """
    if _DIALECT_MARK.search(head) is None:
        return head, ()
    if "[" in head or "]" in head:
        start = head.find("[")
        end = head.find("]")
        if head.count("[") != 1 or head.count("]") != 1 or end < start:
            return None
        name = head[:start] + head[end + 1 :]
        inner = head[start + 1 : end]
        if any(mark in name for mark in ",;#") or any(mark in inner for mark in ";#"):
            return None
        tag_text, separator = inner, ","
    else:
        cut = min(head.find(mark) for mark in ",;#" if mark in head)
        name, tag_text = head[:cut], head[cut + 1 :]
        separator = ";" if head[cut] == ";" else ","
        other = ",#" if separator == ";" else ";#"
        if any(mark in tag_text for mark in other):
            return None
    if "|" in tag_text:
        return None
    tags = _parse_tag_list(tag_text, separator, "=")
    return None if tags is None else (name, tags)


def _clean_name(name: str) -> str:
    """Etsy statsd's key sanitising, keeping non-ASCII letters and digits.

    Runs of white space become "_", "/" becomes "-", and every character
    that is not a letter, digit (or combining mark, so decomposed "é" keeps
    its accent), "_", "-" or "." is dropped: ``a b/c`` -> ``a_b-c``,
    ``café`` stays.
    """
    if not name.strip(_CLEAN_ASCII):
        return name
    kept: list[str] = []
    in_space = False
    for char in name:
        if char.isspace():
            if not in_space:
                kept.append("_")
            in_space = True
            continue
        in_space = False
        if char == "/":
            kept.append("-")
        elif char.isalnum() or char in "_-." or unicodedata.category(char)[0] == "M":
            kept.append(char)
    return "".join(kept)


def _unescape(text: str) -> str:
    """Clients send a newline in event text as the two characters ``\\n``."""
    return text.replace("\\n", "\n") if "\\n" in text else text


def _event_cut_utf8(body: str, title_len: int, text_len: int) -> tuple[int, int] | None:
    """Where title and text end in ``body`` when lengths count UTF-8 bytes.

    This is the DogStatsD reading (the Python ``datadog`` client sends
    ``_e{11,11}:Déploy ✓|...``). Returns str indices, or None when the byte
    lengths do not land on "|" / the end, or split a character.
    """
    if body.isascii():
        return _event_cut_check(body, title_len, title_len + 1 + text_len)
    raw = body.encode("utf-8")
    text_end = title_len + 1 + text_len
    if len(raw) <= title_len or raw[title_len] != 0x7C:  # "|"
        return None
    if len(raw) < text_end or (len(raw) > text_end and raw[text_end] != 0x7C):
        return None
    try:
        title = raw[:title_len].decode("utf-8")
        text = raw[title_len + 1 : text_end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return len(title), len(title) + 1 + len(text)


def _event_cut_utf16(body: str, title_len: int, text_len: int) -> tuple[int, int] | None:
    """The same cut when lengths count UTF-16 code units (hot-shots: ``_e{8,10}``)."""
    title_end = _utf16_advance(body, 0, title_len)
    if title_end is None:
        return None
    text_end = _utf16_advance(body, title_end + 1, text_len)
    if text_end is None:
        return None
    return _event_cut_check(body, title_end, text_end)


def _event_cut_check(body: str, title_end: int, text_end: int) -> tuple[int, int] | None:
    """Accept a cut only if "|" follows the title and "|" or the end the text."""
    if title_end >= len(body) or body[title_end] != "|":
        return None
    if text_end > len(body) or (text_end < len(body) and body[text_end] != "|"):
        return None
    return title_end, text_end


def _utf16_advance(text: str, start: int, units: int) -> int | None:
    """The index after ``units`` UTF-16 code units from ``start``, or None."""
    index = start
    counted = 0
    while counted < units:
        if index >= len(text):
            return None
        counted += 2 if ord(text[index]) > 0xFFFF else 1
        index += 1
    return index if counted == units else None
