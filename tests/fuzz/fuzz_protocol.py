"""Coverage-guided fuzzing of the wire path with atheris: bytes -> parser ->
aggregator (with limits) -> rollups (sketches, set states) -> msgpack and back.

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_protocol.py -max_total_time=300 -max_len=4096

(any libFuzzer flag works; a crash writes ``crash-<sha1>`` with the input).
The seed corpus is every input of tests/vectors/protocol.toml; pass a folder
as the first argument to keep the corpus libFuzzer grows. tests/fuzz/README.md
says what the runs found. ``check`` is also run by
tests/fuzz/test_fuzz_targets.py on the seeds, so the harness keeps working
without atheris.

Properties, per input:
* the parser never raises (it runs strict: an internal error would
  otherwise be counted as a bad line and hidden);
* every bad line has a reason of the closed vocabulary, and no more
  events, checks and bad lines come out than there are lines;
* every accepted sample, written back as a DogStatsD line, parses to itself;
* the aggregator takes every sample, and the window's rollups (exact
  percentiles, sketches of hostile values, set states) are built, their
  sketches stay within the bucket cap, and survive msgpack.
"""

from __future__ import annotations

import math
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aggregator.aggregate import Aggregator, snapshot  # noqa: E402
from aggregator.limits import Limits  # noqa: E402
from aggregator.model import BAD_REASONS, DISTRIBUTION_TYPES, SET, Parsed, Sample  # noqa: E402
from aggregator.protocol import Parser  # noqa: E402
from aggregator.sketch import MAX_BUCKETS, SetState, Sketch  # noqa: E402

VECTORS = ROOT / "tests" / "vectors" / "protocol.toml"
WINDOW = 1_800_000_000


def strict_parser() -> Parser:
    parser = Parser()
    parser._strict = True
    return parser


def serialise(sample: Sample) -> bytes:
    """The sample as one DogStatsD line (tests/test_protocol.py does the same)."""
    if sample.type == SET:
        value = str(sample.value)
    elif sample.delta:
        value = format(sample.value, "+")
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


def check(data: bytes) -> None:
    """One fuzz input through every property above; raises on a violation."""
    parsed = strict_parser().parse(data)
    assert set(parsed.bad) <= set(BAD_REASONS), parsed.bad
    assert len(parsed.events) + len(parsed.checks) + len(parsed.bad) <= parsed.lines
    assert parsed.lines <= data.count(b"\n") + 1

    for sample in parsed.samples:
        wire = serialise(sample)
        again = strict_parser().parse(wire)
        assert again == Parsed([sample], [], [], [], 1), (sample, wire, again)

    aggregator = Aggregator(10, [50.0, 99.0], limits=Limits(max_series=64))
    aggregator.open(WINDOW)
    aggregator.add(parsed.samples)
    for window in aggregator.swap(WINDOW + 10):
        for rollup in snapshot(window, [50.0, 99.0]):
            if rollup.type in DISTRIBUTION_TYPES:
                assert rollup.state is not None
                sketch = Sketch.from_bytes(rollup.state)
                assert len(sketch.positive) <= MAX_BUCKETS
                assert len(sketch.negative) <= MAX_BUCKETS
                assert math.isclose(sketch.count, rollup.count, rel_tol=1e-9)
                assert sketch.min <= sketch.quantile(0.5) <= sketch.max
            elif rollup.type == SET:
                assert rollup.state is not None
                assert SetState.from_bytes(rollup.state).cardinality() == rollup.count


def seeds() -> list[bytes]:
    with VECTORS.open("rb") as handle:
        vectors = tomllib.load(handle)["vector"]
    out = []
    for vector in vectors:
        if "input_hex" in vector:
            out.append(bytes.fromhex(vector["input_hex"]))
        elif "input" in vector:
            out.append(vector["input"].encode("utf-8", "surrogatepass"))
    return out


def main() -> None:
    import atheris  # only the fuzzing run needs it

    args = list(sys.argv)
    if len(args) < 2 or args[1].startswith("-"):
        args.insert(1, tempfile.mkdtemp(prefix="statsd-fuzz-"))
    first = Path(args[1])
    if not first.is_file():  # a corpus folder (a file argument replays one input)
        first.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (first / f"seed-{i:04d}").write_bytes(seed)
    atheris.instrument_all()
    atheris.Setup(args, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
