"""Builds the optional C record (``ml_wsgi_metrics._speedups``); metadata is in setup.cfg.

Without a compiler the build goes on and the package runs its pure-Python record instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ml_wsgi_metrics._speedups",
            ["ml_wsgi_metrics/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
