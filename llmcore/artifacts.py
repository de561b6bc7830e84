"""Atomic artifact writing and content digests.

Every stage writes its outputs through these helpers: a file is written to a temporary name and renamed
into place, and a stage's output folder is built under a temporary name and renamed only when complete,
so a killed or failed stage never leaves something a later stage would take for finished. A folder is
finished exactly when its `manifest.json` exists. Temporary names carry the host and process id of their
writer, so that a later run can remove what a killed one left (`remove_stale_temps`) without touching the
work of a live one. Files and folders are created with modes 0o666/0o777 and the kernel applies the user's
umask. Reused files are checked against the sha256 their manifest recorded (`verify_digest`), and a
training folder is owned by one process at a time (`folder_lock`). This module does not decide what goes
in a manifest.
"""

import contextlib
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from llmcore.errors import ConfigError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
P = ParamSpec("P")
R = TypeVar("R")
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"
# `.NAME.HOST-PID-RANDOM.tmp` (a file or folder being written) and `.NAME.HOST-PID-RANDOM.old` (a
# finished folder being replaced).
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+\.(tmp|old)$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _disk_full(path: Path, error: OSError) -> ConfigError:
    return ConfigError(
        f"disk full: could not write {path} ({os.strerror(error.errno)}): free space on that disk "
        "(or raise the file-size limit) or point the output at a larger one, then rerun"
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename.

    A full disk is a ConfigError naming the file; the file's previous content, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        # mode 0o666 and no chmod: the kernel applies the user's umask, as for any file they create
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise _disk_full(path, error) from None
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success, replace `final` with it in one rename.

    On an exception the temporary folder is removed and `final` is left as it was. Temporary folders that
    a killed run left beside `final` are removed first; a full disk is a ConfigError naming the folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent)
    tmp = _temp_name(final)
    os.mkdir(tmp, 0o777)  # the kernel applies the user's umask
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise _disk_full(final, error) from None
        raise
    if final.exists():
        trash = _temp_name(final, "old")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` whose writer (a process on this host) is gone.

    Those of live processes, and of other hosts sharing the folder, are left alone. Returns what was
    removed; each removal is logged as one warning line.
    """
    folder = Path(folder)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in folder.iterdir():
            m = _TEMP.match(entry.name)
            if not m or m["host"] != _HOST or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            log.warning("removed %s, left by a killed process (pid %s)", entry, m["pid"])
            removed.append(entry)
    return removed


def is_finished(folder: Path) -> bool:
    """A stage's output folder is finished once its manifest exists."""
    return (Path(folder) / MANIFEST).is_file()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's content, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def verify_digest(path: Path, expected: str | None, manifest: Path, fix: str) -> None:
    """ConfigError naming `path` unless its sha256 is `expected` (the digest `manifest` recorded for it).

    `expected` None (a manifest written before digests were recorded) checks only that the file exists.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}, listed in {manifest}, is missing: {fix}")
    if expected is not None and file_digest(path) != expected:
        raise ConfigError(
            f"{path} does not match the sha256 recorded in {manifest} (changed or corrupted after "
            f"it was written): {fix}"
        )


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (flock on `folder/.lock`) for the duration of the block.

    When another process holds it, log one line saying who (pid, host, start time) and wait for it. Once
    held, the temporary files that killed writers left in `folder` are removed. The kernel releases the
    lock when its holder exits, however it dies, so a killed run never blocks the next. The lock file
    stays: deleting it would let two processes lock two different files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(
                "%s%s is locked by %s: waiting for it to finish", what and f"{what}: ", folder, _holder(lock)
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                }
            ).encode(),
            0,
        )
        remove_stale_temps(folder)  # e.g. a model.pt half-written by a killed holder
        yield
    finally:
        os.close(fd)  # releases the lock


def locks_folder(parameter: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: the function runs holding `folder_lock` on its argument named `parameter` (a folder), so
    that two processes never write one training folder at once and the second finds the first's result."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            from llmcore.distributed import env_rank  # it imports this module

            if (
                env_rank() != 0
            ):  # torchrun's other ranks: rank 0 holds the lock for the job, and waits for them
                return function(*args, **kwargs)
            folder = signature.bind(*args, **kwargs).arguments[parameter]
            with folder_lock(Path(folder), function.__name__):
                return function(*args, **kwargs)

        return locked

    return decorate
