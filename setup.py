"""The C fast path (aggregator/_fastpath.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the package still installs and the
daemon runs the pure-Python path (slower, same results).
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
        )
    ]
)
