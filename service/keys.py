"""The prediction-id key the workers of one models directory share, created once."""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from ml_wsgi_metrics import signals

__all__ = ["KEY_FILE", "shared_key"]

log = logging.getLogger("service")

KEY_FILE = ".prediction-id-key"


def shared_key(models_dir: Path) -> str:
    """The prediction-id key every worker using ``models_dir`` shares, created once.

    Written to a private temporary file and linked into place, so concurrent first starts
    agree on one key and nobody reads half of it.
    """
    path = models_dir / KEY_FILE
    if not path.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)
            log.warning(
                "prediction ids are signed with a key generated in %s; set %s to share one "
                "key between hosts",
                path,
                signals.SECRET_KEY_ENV,
            )
        except FileExistsError:
            pass  # another worker won the race: use its key
        finally:
            os.unlink(tmp)
    return path.read_text().strip()
