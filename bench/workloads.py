"""The benchmark workloads: which series, which lines, packed how.

Every workload is a fixed, seeded corpus of datagrams written to a file that
bench/loadgen.c sends in a loop. Because the corpus is known, so is the sum
of every counter value in any prefix of it: the runner turns "the generator
sent n datagrams" into "these counter totals were sent" exactly.

Series and lines: a workload of N series has N/2 counters, N/4 timers,
3N/20 gauges and N/10 sets (by index: i % 20 in 0-9, 10-14, 15-17, 18-19).
The corpus is a run of passes; each pass is a fresh random permutation of all
N series, one line each, so the line mix is the series mix (50% counters,
25% timers, 15% gauges, 10% sets) and every series is active as soon as one
pass has been sent.

One-line workloads are sent with UDP GSO (bench/loadgen.c), which takes a
run of equal-length datagrams in one send. So within each pass, every
block of ``LENGTH_BLOCK`` datagrams is ordered by length (stably): the
lines, their counts and their passes are the same, only their order
within a block of a few milliseconds' worth changes.
"""

from __future__ import annotations

import itertools
import random
import struct
from dataclasses import dataclass
from pathlib import Path

#: every bench metric name starts with this; the Etsy counting backend and
#: our daemon's totals both add up the counters under it
PREFIX = "bench."

#: biggest datagram of the packed workloads: fits a 1,500-byte MTU with headers
PACKED_BYTES = 1400

#: a corpus holds at least this many lines (and at least one full pass)
MIN_CORPUS_LINES = 200_000

#: one-line workloads: datagrams ordered by length in blocks of this many
LENGTH_BLOCK = 512


@dataclass(frozen=True, slots=True)
class Workload:
    key: str
    title: str
    series: int
    packed: bool  # False: one line per datagram; True: up to PACKED_BYTES
    tags: int  # DogStatsD tags on every line


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload("a", "1 line/datagram, 1k series", 1_000, False, 0),
        Workload("b", "~1400 B datagrams, 1k series", 1_000, True, 0),
        Workload("c", "1 line/datagram, 100k series", 100_000, False, 0),
        Workload("d", "~1400 B datagrams, 100k series", 100_000, True, 0),
        Workload("e", "as d + 4 DogStatsD tags", 100_000, True, 4),
    )
}


def kind_of(index: int) -> str:
    """Series index -> StatsD type: 50% c, 25% ms, 15% g, 10% s."""
    slot = index % 20
    if slot < 10:
        return "c"
    if slot < 15:
        return "ms"
    if slot < 18:
        return "g"
    return "s"


_LETTER = {"c": "c", "ms": "t", "g": "g", "s": "s"}


def series_name(index: int) -> str:
    return f"{PREFIX}service.{_LETTER[kind_of(index)]}.{index:07d}"


def series_tags(index: int, count: int) -> str:
    """Four DogStatsD tags, fixed per series (so they add no series)."""
    if not count:
        return ""
    tags = [
        f"env:{('prod', 'staging', 'dev')[index % 3]}",
        f"region:{('us-east-1', 'us-west-2', 'eu-west-1', 'ap-south-1')[index % 4]}",
        f"host:web-{index % 64:03d}",
        f"version:1.{index % 7}.{index % 5}",
    ]
    return "|#" + ",".join(tags[:count])


@dataclass(slots=True)
class Corpus:
    workload: Workload
    path: Path
    datagrams: int
    lines: int
    bytes: int
    #: counter_prefix[k] = sum of counter values in datagrams 0..k-1
    counter_prefix: list[int]
    #: lines_prefix[k] = lines in datagrams 0..k-1
    lines_prefix: list[int]

    @property
    def lines_per_datagram(self) -> float:
        return self.lines / self.datagrams

    def _cycled(self, prefix: list[int], sent: int) -> int:
        rounds, rest = divmod(sent, self.datagrams)
        return rounds * prefix[-1] + prefix[rest]

    def counters_sent(self, datagrams_sent: int) -> int:
        """The sum of every counter value in the first `datagrams_sent` datagrams."""
        return self._cycled(self.counter_prefix, datagrams_sent)

    def lines_sent(self, datagrams_sent: int) -> int:
        return self._cycled(self.lines_prefix, datagrams_sent)


def _line(index: int, rng: random.Random, tags: str) -> tuple[str, int]:
    """One line for series `index` and its counter value (0 for other types)."""
    kind = kind_of(index)
    name = series_name(index)
    if kind == "c":
        value = rng.randint(1, 9)
        return f"{name}:{value}|c{tags}", value
    if kind == "ms":
        return f"{name}:{rng.randint(0, 2000) / 4:g}|ms{tags}", 0
    if kind == "g":
        return f"{name}:{rng.randint(0, 100_000)}|g{tags}", 0
    return f"{name}:u{rng.randint(0, 999)}|s{tags}", 0


def read_corpus(path: Path) -> list[bytes]:
    """The datagrams of a corpus file, in order."""
    data = path.read_bytes()
    datagrams = []
    at = 0
    while at < len(data):
        (size,) = struct.unpack_from("<I", data, at)
        datagrams.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return datagrams


def _by_length_in_blocks(lines: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each block of LENGTH_BLOCK lines, stably ordered by length: the runs
    of equal-length datagrams that one GSO send takes."""
    ordered: list[tuple[str, int]] = []
    for first in range(0, len(lines), LENGTH_BLOCK):
        ordered.extend(sorted(lines[first : first + LENGTH_BLOCK], key=lambda lv: len(lv[0])))
    return ordered


def build(workload: Workload, directory: Path, seed: int = 4) -> Corpus:
    """Write the workload's corpus under `directory` and describe it."""
    rng = random.Random(seed)
    n = workload.series
    tags = [series_tags(i, workload.tags) for i in range(min(n, 64 * 105))]
    passes = max(1, -(-MIN_CORPUS_LINES // n))
    datagrams: list[bytes] = []
    counter_values: list[int] = []
    line_counts: list[int] = []
    pending: list[bytes] = []
    pending_bytes = 0
    pending_value = 0
    order = list(range(n))
    for _ in range(passes):
        rng.shuffle(order)
        lines = [_line(index, rng, tags[index % len(tags)]) for index in order]
        if not workload.packed:
            for line, value in _by_length_in_blocks(lines):
                datagrams.append(line.encode())
                counter_values.append(value)
                line_counts.append(1)
            continue
        for text, value in lines:
            line = text.encode()
            extra = len(line) + (1 if pending else 0)
            if pending and pending_bytes + extra > PACKED_BYTES:
                datagrams.append(b"\n".join(pending))
                counter_values.append(pending_value)
                line_counts.append(len(pending))
                pending, pending_bytes, pending_value = [], 0, 0
                extra = len(line)
            pending.append(line)
            pending_bytes += extra
            pending_value += value
    if pending:
        datagrams.append(b"\n".join(pending))
        counter_values.append(pending_value)
        line_counts.append(len(pending))

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"corpus-{workload.key}.bin"
    with open(path, "wb") as f:
        for datagram in datagrams:
            f.write(struct.pack("<I", len(datagram)))
            f.write(datagram)
    return Corpus(
        workload=workload,
        path=path,
        datagrams=len(datagrams),
        lines=sum(line_counts),
        bytes=sum(len(d) for d in datagrams),
        counter_prefix=[0, *itertools.accumulate(counter_values)],
        lines_prefix=[0, *itertools.accumulate(line_counts)],
    )
