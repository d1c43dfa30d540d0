"""The optional C extensions, or None where they were not built.

``native`` (``_fastpath.c``) holds the per-line path for lines of known
shape (intake.py) and the batched datagram read (listeners.py);
``sketch_native`` (``_sketchfast.c``) the flush's per-series work: the
merge of the ingest workers' windows, sketch and set-state serialization
and merging (sketch.py), the window's rollups (aggregate.snapshot), the
storage rows and the fold of the minute being filled (storage.py). Built
by ``pip install`` when a C compiler is there; without one, every caller
takes its pure-Python path, which gives the same results, slower.
"""

from __future__ import annotations

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

__all__ = ["native", "sketch_native"]
