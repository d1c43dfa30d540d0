"""The fuzz harness, run on its seeds and a few hostile inputs (no atheris needed),
so it keeps working between fuzzing runs (tests/fuzz/README.md)."""

from __future__ import annotations

import pytest

from .fuzz_protocol import check, seeds

HOSTILE = [
    b"t:1e308:-1e308:5e-324:-5e-324:0|d",
    b"\n".join(b"t:%de%d|ms" % (sign, e) for e in range(-320, 309, 3) for sign in (1, -1)),
    b"s:" + b"x" * 1000 + b"|s",
    b"c:1|c|T999999999999999999",
    b"c:1|c|@0.0000001",
    b"_e{0,0}:|",
    b"\xff\xfe:1|c\nok:1|c",
    # Found by atheris (tests/fuzz/README.md): a sample rate this small made a
    # sketch weight too large for a msgpack integer, and the whole flush failed.
    b"c:1:3|ms|@0.5e-27",
    b"x:1|ms|@1e-300\nx:2|h",
]


@pytest.mark.parametrize("data", seeds(), ids=lambda data: repr(data[:30]))
def test_every_seed_passes_the_fuzz_properties(data: bytes) -> None:
    check(data)


@pytest.mark.parametrize("data", HOSTILE, ids=lambda data: repr(data[:30]))
def test_hostile_inputs_pass_the_fuzz_properties(data: bytes) -> None:
    check(data)
