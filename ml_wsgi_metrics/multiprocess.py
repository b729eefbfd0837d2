"""Multiprocess storage whose file count does not grow with worker restarts: the public door.

prometheus_client's multiprocess mode keeps one set of ``*.db`` files per pid for ever, so every
restarted worker adds files and every scrape reads them all. Here each process writes under a
*process identifier*: gunicorn workers get a stable slot (``w0``, ``w1``, ...) assigned by the
master, so a replacement worker reopens its predecessor's files and continues its counters.
Two live processes never share an identifier: the master hands out a slot only once its previous
holder has been reaped. Anything else (the master, a script) writes under its pid.

The files keep prometheus_client's format, so :class:`prometheus_client.multiprocess.
MultiProcessCollector` merges them unchanged. The directory must be private to this user
(:func:`check_directory`); no file is opened through a symbolic link, and only the names this
package writes (:data:`SLOT_FILE`) are read or removed.

Writes fail open: a value whose file cannot be opened (a directory missing, unwritable or full, a
link planted there) is kept in memory, the error is logged and exported
(:mod:`ml_wsgi_metrics._errors`), and the file is tried again at most once a second; when it
opens, what was counted meanwhile is carried into it. A file that does not read whole is moved
aside and started anew.

This module owns the directory (checked, activated, emptied), the process identifier, dead
processes' live gauges, and the scrape's merge of the files. The file format lives in
:mod:`ml_wsgi_metrics._slotfile`, the values and this process's open files in
:mod:`ml_wsgi_metrics._slots`.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from typing import Any

import prometheus_client.values
from prometheus_client.multiprocess import mark_process_dead

from . import _errors, _retired, _scrape_cache
from ._slotfile import IDENTIFIER, MODEL_FILES, SLOT_FILE, CorruptFile, readable_file
from ._slots import (
    RETRY_SECONDS,
    SlotValue,
    State,
    close_files,
    compact,
    process_identifier,
    reopen_all,
    retry_unavailable,
    storage_lock,
)

__all__ = [
    "ENV_VAR",
    "IDENTIFIER",
    "MODEL_FILES",
    "RETRY_SECONDS",
    "SLOT_FILE",
    "CorruptFile",
    "SlotFilesCollector",
    "activate",
    "active_directory",
    "check_directory",
    "clear_directory",
    "compact",
    "deactivate",
    "instrumentation_errors",
    "mark_dead",
    "merged_directory",
    "process_identifier",
    "readable_file",
    "remove_file",
    "report_error",
    "retry_unavailable",
    "slot_files",
    "storage_lock",
    "use_identifier",
]

#: prometheus_client's documented variable; a directory given there is the one used.
ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"


def instrumentation_errors() -> int:
    """How many storage errors (files not opened, grown, read or written) this process had."""
    return _errors.count()


def report_error(where: str, error: BaseException, stage: str = "storage_write") -> None:
    """Report a storage error through the one error channel, :func:`ml_wsgi_metrics._errors.
    report` (logged, the first of each ``where`` in full; counted; exported)."""
    _errors.report(stage, error, where=where)


def check_directory(
    path: str | os.PathLike[str], *, setting: str = ENV_VAR, create: bool = True
) -> str:
    """``path`` made absolute, created private (0700) if missing and ``create``, checked private.

    Another local user must not be able to plant files or links there: a directory that is
    missing, a symbolic link, belongs to another user or is writable by group or others is
    refused with a ``ValueError`` naming ``setting`` (default :data:`ENV_VAR`).
    """
    path = os.path.abspath(os.fspath(path))
    if create:
        try:
            os.makedirs(path, mode=0o700)
        except FileExistsError:
            pass
        except OSError as error:
            raise ValueError(f"{setting}: cannot create {path!r}: {error.strerror}") from None
    try:
        info = os.lstat(path)
    except OSError as error:
        raise ValueError(f"{setting}: {path!r} cannot be used: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ValueError(f"{setting}: {path!r} is a symbolic link: give the directory itself")
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{setting}: {path!r} is not a directory")
    if info.st_uid != os.geteuid():
        raise ValueError(
            f"{setting}: {path!r} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}): use a directory of this user's"
        )
    if info.st_mode & 0o022:
        raise ValueError(
            f"{setting}: {path!r} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}) and must not be writable by other users: "
            "chmod 700 it, or name a new directory"
        )
    return path


def active_directory() -> str | None:
    """The multiprocess directory in use, or ``None`` in single-process mode."""
    return State.directory if prometheus_client.values.ValueClass is SlotValue else None


def merged_directory() -> str | None:
    """The directory whose files a scrape merges: this package's, or else prometheus_client's
    own (``PROMETHEUS_MULTIPROC_DIR`` set when it was imported: one file set per pid)."""
    directory = active_directory()
    if directory is None and getattr(prometheus_client.values.ValueClass, "_multiprocess", False):
        directory = os.environ.get(ENV_VAR) or os.environ.get(ENV_VAR.lower())
    return directory


def slot_files(directory: str) -> list[str]:
    """The paths of the files named as this package writes them, sorted."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if SLOT_FILE.fullmatch(n))


class SlotFilesCollector:
    """prometheus_client's merge of the slot files in ``directory`` (no other file is read).

    A file that does not read whole (corrupt, or removed meanwhile) is left out of the scrape
    and reported; the others are still served. Each scrape also retries this process's
    unavailable files (at most once a second).
    """

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Any:
        retry_unavailable()
        _errors.export_kept()
        from ._merge import merger_for  # numpy: loaded at the first scrape, not at import

        ours = active_directory() is not None  # slot files, not prometheus_client's
        return merger_for(self._directory, SLOT_FILE, share_files=ours).families()


def activate(directory: str | os.PathLike[str] | None = None) -> str:
    """Switch prometheus_client to multiprocess mode with slot files; return the directory.

    The directory is, in order: ``directory``, ``$PROMETHEUS_MULTIPROC_DIR``, or a fresh private
    temporary directory (removed by :func:`deactivate`). It is created (0700) if missing,
    refused if another user could write there (:func:`check_directory`), and exported in
    ``PROMETHEUS_MULTIPROC_DIR`` for child processes. Metrics created before this call keep
    their storage, so activate before defining metrics.
    """
    path = os.fspath(directory) if directory is not None else os.environ.get(ENV_VAR)
    owned = not path
    if owned:
        path = tempfile.mkdtemp(prefix="ml-wsgi-metrics-")
    path = check_directory(path)  # type: ignore[arg-type]
    with storage_lock():
        if prometheus_client.values.ValueClass is not SlotValue:
            State.previous_value_class = prometheus_client.values.ValueClass
        State.directory = path
        State.owned_directory = owned
        os.environ[ENV_VAR] = path
        prometheus_client.values.ValueClass = SlotValue
    reopen_all()
    return path


def deactivate() -> None:
    """Close all files and return to the value class in use before :func:`activate`."""
    with storage_lock():
        close_files()
        merge = sys.modules.get(f"{__package__}._merge")  # its merger keeps the files open
        if merge is not None and State.directory:
            merge.forget(State.directory)
        for value in State.values:  # values still referenced count on in memory
            value.forget()
        State.values.clear()
        State.identifier = None
        _errors.export_storage_errors_with(None)  # its counter's values are gone too
        if State.previous_value_class is not None:
            prometheus_client.values.ValueClass = State.previous_value_class
        if State.owned_directory and State.directory:
            shutil.rmtree(State.directory, ignore_errors=True)
        if State.directory is not None and os.environ.get(ENV_VAR) == State.directory:
            del os.environ[ENV_VAR]
        State.directory = None
        State.owned_directory = False


def use_identifier(identifier: str | None) -> None:
    """Write this process's values under ``identifier`` (a slot), continuing its stored values.

    The caller guarantees that no other live process uses the same identifier. Values are
    reopened when next used: those this process never uses stay where they are (a forked
    worker's copies of the master's metrics stay in the master's files).
    """
    if identifier is not None and not IDENTIFIER.fullmatch(identifier):
        raise ValueError(f"identifier: {identifier!r} must be letters then digits, e.g. 'w0'")
    State.identifier = identifier
    reopen_all(lazily=True)


def mark_dead(identifier: str) -> None:
    """Drop the live gauges (``livesum``, ``liveall``, ...) of a process that has exited."""
    if State.directory:
        try:
            mark_process_dead(identifier, State.directory)
        except OSError as error:
            where = f"removing the live gauges of {identifier}"
            _errors.report("storage_write", error, where=where)


def remove_file(path: str) -> None:
    """Remove ``path`` (not what a link there points to); a failure is reported, not raised."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        _errors.report("storage_write", error, where=f"removing {path}")


def clear_directory() -> None:
    """Start afresh: remove the slot files left in the directory (a previous run's), and the
    record of retired model versions, and write this process's values into new ones.

    This process's values keep their current value (a gauge set, a counter counted before
    the server started, e.g. a model registered in the gunicorn master with ``preload_app``):
    their old files are gone, so each is counted once.
    """
    with storage_lock():
        for value in State.values:
            value.carry()
        close_files()
        if State.directory:
            for path in slot_files(State.directory):
                remove_file(path)
            _retired.remove(State.directory)
            _scrape_cache.remove(State.directory)
        for value in State.values:
            value._open()
