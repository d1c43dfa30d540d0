"""In-process timings of the daemon's hot paths, without sockets or HTTP.

The rate benchmark (run.py) says how much a whole daemon takes; this says
where a change to the parser, the aggregator or the flush path moved the
cost, in a few seconds and with less noise:

- intake: ``Intake.datagrams`` (parser and window, on the C fast path and
  on the pure one) over a workload's corpus, datagrams handed over in
  batches as the UDP listener does (lines/s): in a window that holds every
  series already, and right after a swap, when each series' first line
  admits it into the window again;
- flush: for N active series (the workload-(d) mix, SAMPLES values each per
  window, in a seeded random order), ``aggregate.snapshot`` and
  ``Storage.write`` of a first window (which creates the series), of the
  window that completes a minute (whose write starts compacting it, a
  slice a window), and the best, median and worst of the windows around
  it; with ``--pickled``, each window goes through pickle first, as an
  ingest worker's does, so the flush meets its keys as fresh objects; with
  ``--registered``, the first window's series are stored while it is open
  (``Storage.register``), as the daemon's writer does, timed on its own;
- handover (only when asked for): two ingest workers' windows of a
  workload's corpus (each worker's intake reads every other batch), cut
  into slices and pickled as a worker hands them over at a swap, then
  unpickled and merged as the daemon's writer does (without the limits);
- hour (only when asked for): the compaction of an hour bucket of N
  series, in one statement and in the writer's slices.

    .venv/bin/python bench/micro.py                  # intake a,b,d,e; flush 100k
    .venv/bin/python bench/micro.py --series 10000 --sections flush
    .venv/bin/python bench/micro.py --sections handover --workloads d,e

Run it pinned to one core on a quiet machine (``taskset -c 0``); each intake
figure is the best of ``--rounds`` (the least disturbed). The garbage
collector is set up as the daemon sets it up (``intake.quiet_gc``, and
``intake.paused_gc`` around each flush).
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402

from aggregator.aggregate import (  # noqa: E402
    Aggregator,
    WorkerAggregator,
    merge_worker_windows,
    snapshot,
)
from aggregator.fastpath import native  # noqa: E402
from aggregator.intake import Intake, paused_gc, quiet_gc  # noqa: E402
from aggregator.limits import Drops, Limits  # noqa: E402
from aggregator.model import Sample  # noqa: E402
from aggregator.protocol import Parser  # noqa: E402
from aggregator.storage import _COMPACT, _SPAN, Storage, Tier  # noqa: E402
from aggregator.worker import SLICE_SERIES, window_slices  # noqa: E402

PERCENTILES = (90.0, 95.0, 99.0)
INTERVAL = 5
#: datagrams per listener batch (listeners.READ_BATCH reads up to 256)
BATCH = 64


def intake(key: str, rounds: int, fast: bool) -> None:
    corpus = workloads.build(workloads.WORKLOADS[key], HERE / "build")
    datagrams = workloads.read_corpus(corpus.path)
    batches = [datagrams[i : i + BATCH] for i in range(0, len(datagrams), BATCH)]
    aggregator = Aggregator(INTERVAL, PERCENTILES, limits=Limits(max_series=10**7))
    feed = Intake(Parser(), aggregator, time.time, fast=fast)
    # one pass first: series creation and cold caches are not the steady state
    for batch in batches:
        feed.datagrams(batch)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for batch in batches:
            feed.datagrams(batch)
        best = min(best, time.perf_counter() - started)
    # then the same right after a swap: each series' first line in the
    # window, which admits it (as every window of an ingest worker starts)
    fresh = float("inf")
    for _ in range(rounds):
        aggregator.swap(aggregator.start + INTERVAL)
        started = time.perf_counter()
        for batch in batches:
            feed.datagrams(batch)
        fresh = min(fresh, time.perf_counter() - started)
    path = "fast" if fast else "pure"
    print(
        f"intake ({key}) {corpus.workload.title}, {path} path: "
        f"{corpus.lines / best:,.0f} lines/s, {best / corpus.lines * 1e6:.2f} us/line; "
        f"after a swap {corpus.lines / fresh:,.0f} lines/s, "
        f"{fresh / corpus.lines * 1e6:.2f} us/line (best of {rounds})"
    )


def handover(key: str, rounds: int, workers: int = 2) -> None:
    """Two ingest workers' windows of a corpus, handed to the daemon: each
    worker's intake reads every other batch of the corpus, its window is
    cut into slices and pickled (as ``worker._Worker.swap`` does), and the
    daemon unpickles and merges them (as ``Daemon._merge_reports`` does,
    but with no limits' budget: the merge admits no series here)."""
    corpus = workloads.build(workloads.WORKLOADS[key], HERE / "build")
    datagrams = workloads.read_corpus(corpus.path)
    batches = [datagrams[i : i + BATCH] for i in range(0, len(datagrams), BATCH)]
    limits = Limits(max_series=10**7)
    feeds = []
    for n in range(workers):
        worker = WorkerAggregator(INTERVAL, False, limits, Drops())
        feed = Intake(Parser(), worker, time.time)
        for batch in batches[n::workers]:  # the shapes learned, as in a warm worker
            feed.datagrams(batch)
        feeds.append(feed)
    best = (float("inf"), float("inf"), 0)
    start = int(time.time()) // INTERVAL * INTERVAL
    for _ in range(rounds):
        for n, feed in enumerate(feeds):
            feed.aggregator.open(start)  # as the daemon aligns its workers' windows
            for batch in batches[n::workers]:
                feed.datagrams(batch)
        with paused_gc():
            t0 = time.perf_counter()
            pieces = [
                pickle.dumps(piece, protocol=pickle.HIGHEST_PROTOCOL)
                for feed in feeds
                for piece in window_slices(feed.aggregator.swap(start + INTERVAL), SLICE_SERIES)
            ]
            t1 = time.perf_counter()
            daemon = Aggregator(INTERVAL, PERCENTILES, limits=limits)
            daemon.open(start)
            closed = daemon.swap(start + INTERVAL)
            merge_worker_windows(closed, (pickle.loads(piece) for piece in pieces), None)
            t2 = time.perf_counter()
        if t2 - t0 < sum(best[:2]):
            best = (t1 - t0, t2 - t1, sum(map(len, pieces)))
        del closed, pieces
    print(
        f"handover ({key}) {corpus.workload.title}, {workers} workers: pickled in "
        f"{best[0]:.3f} s, unpickled and merged in {best[1]:.3f} s, "
        f"{best[2] / 1e6:.1f} MB (best of {rounds})"
    )


def window_samples(series: int, per_series: int, tags: int = 0, seed: int = 1) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    parser = Parser()  # the tags as the daemon's parser makes them
    for i in range(series):
        kind = workloads.kind_of(i)
        name = workloads.series_name(i)
        line = f"{name}:1|c{workloads.series_tags(i, tags)}"
        tagged = parser.parse(line.encode()).samples[0].tags
        for _ in range(per_series):
            member = f"u{rng.randint(1, 50)}"
            value: float | str = member if kind == "s" else float(rng.randint(1, 9))
            samples.append(Sample(name, kind, tagged, value))
    # traffic arrives in no order: series sorted by name would flatter the
    # snapshot's sort and every dict walk after it (0.53 s against 0.74-0.86 s
    # for a later window at 100k series)
    rng.shuffle(samples)
    return samples


def _writer_and_window(folder: str) -> tuple[Storage, Aggregator]:
    """A storage in folder with tiers of INTERVAL, a minute and an hour, and
    an aggregator with no series limit."""
    storage = Storage(
        os.path.join(folder, "metrics.db"),
        [Tier(INTERVAL, 86400), Tier(60, 30 * 86400), Tier(3600, 2 * 365 * 86400)],
    )
    return storage, Aggregator(INTERVAL, PERCENTILES, limits=Limits(max_series=10**7))


def flush(
    series: int, per_series: int, tags: int, pickled: bool, registered: bool, present: float
) -> None:
    samples = window_samples(series, per_series, tags)
    names = sorted({s.name for s in samples})
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as folder:
        storage, aggregator = _writer_and_window(folder)
        # a minute and a half of windows, starting three minutes ago: the 12th
        # completes the minute, and it and the ones after it compact that
        # minute a slice each (storage._Compaction)
        start = int(time.time()) // 60 * 60 - 180
        minute_at = 60 // INTERVAL - 1
        first = minute = (0.0, 0.0)
        stored_early = 0.0
        later: list[tuple[float, float]] = []
        for n in range(minute_at + 1 + 60 // INTERVAL // 2):
            aggregator.open(start + n * INTERVAL)
            if n and present < 1.0:  # each later window lacks a share of the series
                here = {name for name in names if rng.random() < present}
                aggregator.add([s for s in samples if s.name in here])
            else:
                aggregator.add(samples)
            if registered and n == 0:  # as the daemon's writer does while the window is open
                keys = [(s.name, s.type, s.tags) for s in samples]
                t0 = time.perf_counter()
                storage.register(keys, start, lambda key: True)
                stored_early = time.perf_counter() - t0
                storage.checkpoint()
            (closed,) = aggregator.swap(start + (n + 1) * INTERVAL)
            if pickled:  # as the daemon unpickles a worker's window
                closed = pickle.loads(pickle.dumps(closed, protocol=pickle.HIGHEST_PROTOCOL))
            with paused_gc():  # as the daemon's writer thread runs a flush
                t0 = time.perf_counter()
                rollups = snapshot(closed, PERCENTILES)
                t1 = time.perf_counter()
                storage.write(rollups)
                t2 = time.perf_counter()
                storage.checkpoint()  # as the daemon does once a flush is stored
                del closed, rollups
            if n == 0:
                first = (t1 - t0, t2 - t1)
            elif n == minute_at:
                minute = (t1 - t0, t2 - t1)
            else:
                later.append((t1 - t0, t2 - t1))
        storage.close()
    later.sort(key=sum)
    how = ", each window pickled as a worker's" if pickled else ""
    if present < 1.0:
        how += f", each later one holding {present:.0%} of the series, picked at random"
    tagged = f" with {tags} tags" if tags else ""
    each = f"{per_series} values each per {INTERVAL} s window"
    print(f"flush of {series:,} series{tagged}, {each}{how}:")
    if registered:
        print(f"  its series stored while the first window was open: {stored_early:.3f} s")
    for label, (made, written) in (
        ("first window" if registered else "first window (creates the series)", first),
        (f"later windows, best of {len(later)}", later[0]),
        ("later windows, median", later[len(later) // 2]),
        ("later windows, worst", later[-1]),
        ("the window that completes a minute (+ its first slice)", minute),
    ):
        print(f"  {label}: snapshot {made:.3f} s + write {written:.3f} s = {made + written:.3f} s")


def hour(series: int) -> None:
    """The compaction of an hour bucket of ``series`` series from 60 minute
    rows each: in one statement (as before it was sliced) and in the slices
    the writer now spreads over the hour's flushes. One minute is written
    and compacted for real; its rows are copied to the hour's other 59
    minutes with SQL, and the 1-minute tier's watermark moved to the hour's
    end, which is what an hour of flushes would have left."""
    samples = window_samples(series, 1)
    with tempfile.TemporaryDirectory() as folder:
        storage, aggregator = _writer_and_window(folder)
        start = int(time.time()) // 3600 * 3600 - 7200
        for n in range(60 // INTERVAL):
            aggregator.open(start + n * INTERVAL)
            aggregator.add(samples)
            (closed,) = aggregator.swap(start + (n + 1) * INTERVAL)
            storage.write(snapshot(closed, PERCENTILES))
        writer = storage.open_writer()
        for _ in range(100):  # the minute's slices
            if not writer.compacting:
                break
            storage.write([])
        conn = writer.conn
        with conn:
            conn.executemany(
                "INSERT INTO rollups SELECT resolution, ts + ?, metric_id, series_id, count, "
                "sum, min, max, last, state FROM rollups WHERE resolution = 60 AND ts = ?",
                [(60 * m, start) for m in range(1, 60)],
            )
        writer.state[1].complete_from = start
        writer.state[1].complete_until = start + 3600
        writer.state[2].complete_from = writer.state[2].complete_until = start
        params = {"r": 3600, "src": 60, "lo": start, "hi": start + 3600}
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute(_COMPACT.format(span=_SPAN, where=""), params)
        whole = time.perf_counter() - t0
        conn.execute("ROLLBACK")
        slices = []
        while len(slices) < 10_000:
            t0 = time.perf_counter()
            with conn:
                writer._compact(2)
            slices.append(time.perf_counter() - t0)
            writer.checkpoint()  # after each write, as the daemon's writer does
            if 2 not in writer.compacting:
                break
        storage.close()
    slices.sort()
    print(f"compaction of an hour of {series:,} series (60 minute rows each):")
    print(f"  in one statement: {whole:.3f} s")
    print(
        f"  in {len(slices)} slices: median {slices[len(slices) // 2]:.3f} s, "
        f"worst {slices[-1]:.3f} s, {sum(slices):.3f} s in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="intake,flush")
    parser.add_argument("--workloads", default="a,b,d,e", help="intake, handover: corpora")
    parser.add_argument("--series", type=int, default=100_000, help="flush, hour: series")
    parser.add_argument("--samples", type=int, default=3, help="flush: values per series")
    parser.add_argument(
        "--tags", type=int, default=0, help="flush: DogStatsD tags per series, as workload (e)'s"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pickled", action="store_true", help="flush: windows through pickle, as workers hand them"
    )
    parser.add_argument(
        "--registered",
        action="store_true",
        help="flush: the first window's series stored while it is open, as the daemon does",
    )
    parser.add_argument(
        "--present",
        type=float,
        default=1.0,
        help="flush: the share of the series each later window holds, as in real traffic",
    )
    args = parser.parse_args()
    quiet_gc()
    if native is None:
        print("the C fast path is not built: the pure path only", file=sys.stderr)
    sections = args.sections.split(",")
    if "intake" in sections:
        for key in args.workloads.split(","):
            for fast in (True, False) if native is not None else (False,):
                intake(key, args.rounds, fast)
    if "flush" in sections:
        flush(args.series, args.samples, args.tags, args.pickled, args.registered, args.present)
    if "handover" in sections:
        for key in args.workloads.split(","):
            handover(key, args.rounds)
    if "hour" in sections:
        hour(args.series)


if __name__ == "__main__":
    main()
