"""The optional C extensions, or None where they were not built.

``native`` (``_fastpath.c``) holds the per-line path for lines of known
shape (intake.py) and the batched datagram read (listeners.py);
``sketch_native`` (``_sketchfast.c``) the flush's per-series work: the
merge of the ingest workers' windows, sketch and set-state serialization
and merging (sketch.py), the window's rollups (aggregate.snapshot), the
storage rows and the fold of the minute being filled (storage.py);
``sqlite_native`` (``_sqlitefast.c``) the writer's bulk statements
(storage.py), used only when it calls the very SQLite library that
Python's sqlite3 calls. Built by ``pip install`` when a C compiler (and,
for the last, SQLite's header) is there; without one, every caller takes
its pure-Python path, which gives the same results, slower.
"""

from __future__ import annotations

import _sqlite3
from types import ModuleType

native: ModuleType | None
try:
    from . import _fastpath as native
except ImportError:  # installed without a C compiler
    native = None

sketch_native: ModuleType | None
try:
    from . import _sketchfast as sketch_native
except ImportError:
    sketch_native = None

sqlite_native: ModuleType | None
try:
    from . import _sqlitefast as sqlite_native
except ImportError:
    sqlite_native = None
if sqlite_native is not None and not sqlite_native.shares_library(_sqlite3.__file__):
    sqlite_native = None  # sqlite3 carries its own SQLite: its handles are not ours to use

__all__ = ["native", "sketch_native", "sqlite_native"]
