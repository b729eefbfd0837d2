"""What ``pip install .`` of the library installs: the package alone, never the reference
service (``service/`` is an application run from the checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import REPO


def test_the_library_installs_no_service_package(tmp_path: Path) -> None:
    """setuptools' ``build_py`` writes the pure-Python part of the wheel ``pip install .``
    builds: one top-level package, its ``py.typed`` with it."""
    build = tmp_path / "lib"
    command = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in build.iterdir()) == ["ml_wsgi_metrics"]
    assert (build / "ml_wsgi_metrics" / "py.typed").is_file()
    assert not list(build.rglob("service*"))
