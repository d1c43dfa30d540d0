"""The C extensions; everything else is in pyproject.toml.

aggregator/_fastpath.c is the per-line intake path, aggregator/_sketchfast.c
the flush's per-series work (workers' windows, sketches, rollups, storage rows),
aggregator/_sqlitefast.c the flush's bulk statements (it links the SQLite
library that Python's sqlite3 uses, so it needs SQLite's header).
``optional=True``: without a C compiler the package still installs and the
daemon runs the pure-Python paths (slower, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aggregator._fastpath",
            ["aggregator/_fastpath.c"],
            depends=["aggregator/_admission.h"],
            # the same float operations as the Python path, never fused
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        ),
        Extension(
            "aggregator._sketchfast",
            ["aggregator/_sketchfast.c"],
            depends=["aggregator/_admission.h"],
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        ),
        Extension(
            "aggregator._sqlitefast",
            ["aggregator/_sqlitefast.c"],
            libraries=["sqlite3"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
