"""The C extensions; everything else is in pyproject.toml.

aggregator/_fastpath.c is the per-line intake path, aggregator/_sketchfast.c
the flush's per-series work (workers' windows, sketches, rollups, storage rows).
``optional=True``: without a C compiler the package still installs and the
daemon runs the pure-Python paths (slower, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aggregator._fastpath",
            ["aggregator/_fastpath.c"],
            # the same float operations as the Python path, never fused
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        ),
        Extension(
            "aggregator._sketchfast",
            ["aggregator/_sketchfast.c"],
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        ),
    ]
)
