"""The benchmark's load generator and corpora: what is sent is what is counted.

The runner turns "the generator sent n datagrams" into counter totals by
assuming records 0..n-1 of the corpus went out in order; these tests hold
the generator (GSO runs included) and the corpus layout to that.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import workloads  # noqa: E402

#: runs of equal lengths (GSO messages), lone records, and a run longer
#: than one GSO message may hold (64)
RECORDS = (
    [b"a.x:1|c"] * 3
    + [b"bb.y:22|ms", b"c:1|c"]
    + [b"dd.%03d:1|c" % i for i in range(70)]
    + [b"e" * 300, b"ff:2|g"]
)


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        if os.environ.get("CI"):
            pytest.fail("gcc is missing in CI")
        pytest.skip("the load generator needs gcc")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    source = ROOT / "bench" / "loadgen.c"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source)], check=True)
    return binary


def write_corpus(path: Path, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        for record in records:
            f.write(struct.pack("<I", len(record)) + record)


def test_the_generator_sends_the_corpus_records_in_order(loadgen: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.bin"
    write_corpus(corpus, RECORDS)
    received: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(0.5)
        roomy(sink)
        done = threading.Event()

        def read() -> None:
            # until the generator is done and a timeout passes with nothing
            while received_more(sink, received) or not done.is_set():
                pass

        reader = threading.Thread(target=read)
        reader.start()
        try:
            # 40,000 datagrams a second (GSO messages of up to 8) for 0.02 s:
            # about 10 cycles of the corpus
            args = [str(loadgen), str(corpus), "127.0.0.1", str(sink.getsockname()[1]), "40000"]
            run = subprocess.run([*args, "0.02"], capture_output=True, text=True, timeout=30)
        finally:
            done.set()
            reader.join(10)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["errors"] == 0 and report["records"] == len(RECORDS)
    # the 3, two lone ones, the 70 (9 messages of at most 8), two lone ones
    assert report["messages"] == 1 + 2 + 9 + 2
    sent = report["sent"]
    assert sent > 2 * len(RECORDS)
    assert received == [RECORDS[i % len(RECORDS)] for i in range(sent)]


#: Linux's SO_RCVBUFFORCE (<asm-generic/socket.h>), which Python's socket module lacks
SO_RCVBUFFORCE = 33


def roomy(sink: socket.socket) -> None:
    """A receive buffer that holds everything sent, whether or not the reading
    thread keeps up (on a busy machine it may not: the default ~200 KiB held
    less than the 4,000 datagrams of 0.1 s, and the kernel dropped some).
    Root may pass net.core.rmem_max; others get what it allows."""
    size = 8 << 20
    try:
        sink.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def received_more(sink: socket.socket, into: list[bytes]) -> bool:
    """Read one datagram into `into`; False when none came within the timeout."""
    try:
        into.append(sink.recv(65535))
    except TimeoutError:
        return False
    return True


def test_one_line_corpora_hold_each_series_once_a_pass_ordered_by_length_in_blocks(
    tmp_path: Path,
) -> None:
    workload = workloads.Workload("t", "test", 3_000, False, 0)
    corpus = workloads.build(workload, tmp_path)
    datagrams = workloads.read_corpus(corpus.path)
    assert len(datagrams) == corpus.datagrams == corpus.lines
    passes = [datagrams[i : i + workload.series] for i in range(0, len(datagrams), 3_000)]
    for one_pass in passes:
        names = {line.split(b":")[0] for line in one_pass}
        assert len(names) == workload.series
        for first in range(0, len(one_pass), workloads.LENGTH_BLOCK):
            lengths = [len(line) for line in one_pass[first : first + workloads.LENGTH_BLOCK]]
            assert lengths == sorted(lengths)
    counters = sum(
        int(line.split(b":")[1].split(b"|")[0]) for line in datagrams if line.endswith(b"|c")
    )
    assert corpus.counters_sent(len(datagrams)) == counters


def test_flat_out_the_generator_sends_runs_of_up_to_64_datagrams_a_message(
    loadgen: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.bin"
    write_corpus(corpus, RECORDS)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        args = [str(loadgen), str(corpus), "127.0.0.1", str(sink.getsockname()[1]), "0"]
        run = subprocess.run([*args, "0.01"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    # the 3, two lone ones, the 70 (64 and 6), two lone ones
    assert report["messages"] == 1 + 2 + 2 + 2
    assert report["sent"] > 0
