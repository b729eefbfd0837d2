"""Builds the optional C extension (``ml_wsgi_metrics._speedups``: the request record, the
numeric kernel); metadata is in setup.cfg.

Without a compiler the build goes on and the package runs its pure-Python record instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ml_wsgi_metrics._speedups",
            ["ml_wsgi_metrics/_speedups.c"],
            optional=True,
            # no fused multiply-add: the numeric kernel's sums are numpy's, to the last bit
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-ffp-contract=off",
            ],
        )
    ]
)
