"""The C bulk statements (aggregator/_sqlitefast.c) against sqlite3's executemany.

``executemany(conn, sql, rows)`` must leave the file exactly as
``conn.executemany`` leaves it (the same values with the same storage
classes), raise sqlite3's own exception classes with ``sqlite_errorcode``
(the spool tells "cannot write now" from a bad batch by them), refuse to
run outside a transaction, and let other threads run while it steps.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator import storage
from aggregator.fastpath import sqlite_native

if sqlite_native is None:
    if os.environ.get("CI"):
        pytest.fail("the C bulk statements are not built (pip install -e . builds them)")
    pytest.skip("the C bulk statements are not built (no C compiler?)", allow_module_level=True)

native = sqlite_native

#: rows for ``INSERT INTO t VALUES (?, ?, ?)``: name -> rows
ROWS: dict[str, list[tuple[Any, ...]]] = {
    "ints": [(0, 1, -1), (2**63 - 1, -(2**63), 7)],
    "floats": [(0.5, -0.0, 1e308), (5e-324, math.inf, -math.inf)],
    "nulls": [(None, None, None)],
    "text": [("", "plain", "ünïcødé ✓"), ("a\x00b", "x" * 10_000, "tab\tnew\nline")],
    "blobs": [(b"", b"\x00\x01\xff", b"z" * 100_000)],
    "bools-as-ints": [(True, False, 1)],
    "mixed": [(1, 2.5, "three"), (None, b"four", 5), (6.0, None, "")],
    "more-than-a-batch": [(i, i * 0.5, str(i)) for i in range(1000)],
    "no-rows": [],
}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, sqlite3.Connection]]:
    """Two fresh files with the same table: one for sqlite3, one for the C path."""
    conns = []
    for name in ("python.db", "c.db"):
        conn = sqlite3.connect(tmp_path / name)
        conn.execute("CREATE TABLE t (a, b, c)")
        conns.append(conn)
    yield conns[0], conns[1]
    for conn in conns:
        conn.close()


def dump(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT rowid, a, typeof(a), b, typeof(b), c, typeof(c) FROM t ORDER BY rowid"
    ).fetchall()


@pytest.mark.parametrize("case", sorted(ROWS))
def test_rows_are_stored_as_sqlite3_stores_them(
    case: str, pair: tuple[sqlite3.Connection, sqlite3.Connection]
) -> None:
    python, c = pair
    rows = ROWS[case]
    with python:
        python.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    c.execute("BEGIN")
    native.executemany(c, "INSERT INTO t VALUES (?, ?, ?)", rows)
    c.execute("COMMIT")
    assert len(dump(c)) == len(rows)
    assert dump(c) == dump(python)


def test_numbered_parameters_and_upsert(
    pair: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    """?N parameters, reused, and ON CONFLICT: the writer's _UPSERT shape."""
    sql = (
        "INSERT INTO t (rowid, a, b) VALUES (?1, ?2, ?3) "
        "ON CONFLICT (rowid) DO UPDATE SET a = a + excluded.a, b = ?3 || b"
    )
    rows = [(1, 10, "x"), (2, 20, "y"), (1, 5, "z")]
    python, c = pair
    with python:
        python.executemany(sql, rows)
    c.execute("BEGIN")
    native.executemany(c, sql, rows)
    c.execute("COMMIT")
    assert dump(c) == dump(python) == [(1, 15, "integer", "zx", "text", None, "null"),
                                       (2, 20, "integer", "y", "text", None, "null")]  # fmt: skip


#: bad calls: (rows, exception class, words of its message)
BAD_ROWS: dict[str, tuple[list[Any], type[Exception], str]] = {
    "too-few-values": ([(1, 2)], ValueError, "has 2 values"),
    "too-many-values": ([(1, 2, 3, 4)], ValueError, "has 4 values"),
    "a-list-not-a-tuple": ([[1, 2, 3]], TypeError, "not a tuple"),
    "an-unbindable-value": ([(1, 2, object())], TypeError, "type object"),
    "an-int-past-64-bits": ([(2**64, 0, 0)], OverflowError, "too big"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_raises_and_the_transaction_rolls_back(
    case: str, pair: tuple[sqlite3.Connection, sqlite3.Connection]
) -> None:
    rows, error, words = BAD_ROWS[case]
    _, c = pair
    c.execute("BEGIN")
    with pytest.raises(error, match=words):
        native.executemany(c, "INSERT INTO t VALUES (?, ?, ?)", [(0, 0, 0)] * 300 + rows)
    c.execute("ROLLBACK")
    assert dump(c) == []


def test_sqlite_errors_are_sqlite3_exceptions_with_their_code(
    pair: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    _, c = pair
    c.execute("CREATE UNIQUE INDEX t_a ON t (a)")
    c.execute("BEGIN")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE") as caught:
        native.executemany(c, "INSERT INTO t VALUES (?, ?, ?)", [(1, 0, 0), (1, 0, 0)])
    assert caught.value.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_UNIQUE  # type: ignore[attr-defined]
    with pytest.raises(sqlite3.OperationalError, match="no such table") as caught:
        native.executemany(c, "INSERT INTO nowhere VALUES (?)", [(1,)])
    assert caught.value.sqlite_errorcode == sqlite3.SQLITE_ERROR  # type: ignore[attr-defined]
    c.execute("ROLLBACK")


def test_a_raising_sql_function_is_an_operational_error(
    pair: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    _, c = pair

    def fails(x: object) -> object:
        raise ValueError("no")

    c.create_function("fails", 1, fails)
    c.execute("BEGIN")
    with pytest.raises(sqlite3.OperationalError, match="user-defined function raised"):
        native.executemany(c, "INSERT INTO t VALUES (fails(?), 0, 0)", [(1,)])
    c.execute("ROLLBACK")


def test_outside_a_transaction_it_refuses(
    pair: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    """Each row would be a transaction of its own: the writer's helper takes
    sqlite3's path there instead (storage._executemany)."""
    python, c = pair
    with pytest.raises(sqlite3.ProgrammingError, match="inside a transaction"):
        native.executemany(c, "INSERT INTO t VALUES (?, ?, ?)", [(1, 2, 3)])
    assert dump(c) == []
    storage._executemany(python, "INSERT INTO t VALUES (?, ?, ?)", [(1, 2, 3)])
    python.commit()
    assert len(dump(python)) == 1


def test_a_closed_or_foreign_connection_is_refused(
    pair: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    _, c = pair
    with pytest.raises(TypeError, match=r"sqlite3\.Connection"):
        native.executemany(object(), "SELECT 1", [])  # type: ignore[arg-type]
    c.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        native.executemany(c, "INSERT INTO t VALUES (?, ?, ?)", [(1, 2, 3)])


def test_other_threads_run_while_it_steps(
    pair: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    """The GIL is let go around each batch's steps (the daemon's event loop
    reads sockets meanwhile): a thread counting while 200k rows are written
    must get to count many times before the call returns."""
    _, c = pair
    rows = [(i, float(i), "v") for i in range(200_000)]
    done = threading.Event()
    ticks = 0

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        c.execute("BEGIN")
        before = ticks
        native.executemany(c, "INSERT INTO t VALUES (?, ?, ?)", rows)
        during = ticks - before
        c.execute("COMMIT")
    finally:
        done.set()
        counter.join(10)
    assert c.execute("SELECT count(*), sum(a) FROM t").fetchone() == (200_000, sum(range(200_000)))
    assert during > 10


def test_the_library_check_tells_another_library_apart(tmp_path: Path) -> None:
    """fastpath.py uses the module only if sqlite3's extension resolves to
    this SQLite; a file that is not that extension does not."""
    import _sqlite3

    assert native.shares_library(_sqlite3.__file__) is True
    assert native.shares_library(str(tmp_path / "missing.so")) is False
