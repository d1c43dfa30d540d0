"""The optional C extension (``_fastpath.c``), or None where it was not built.

It holds the per-line path for lines of known shape (intake.py) and the
batched datagram read (listeners.py). Built by ``pip install`` when a C
compiler is there; without one, every caller takes its pure-Python path,
which gives the same results, slower.
"""

from __future__ import annotations

from types import ModuleType

native: ModuleType | None
try:
    from . import _fastpath as native
except ImportError:  # installed without a C compiler
    native = None

__all__ = ["native"]
