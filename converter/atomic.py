"""Build a directory beside its target and rename it into place only when complete.

A conversion that fails, is interrupted or is killed leaves no directory at the target path. The
temporary directory is hidden and named after the converting process, so a later run removes the
leftovers of a killed one (SIGKILL cannot be caught).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from formats.errors import TpDeployError


def tmp_name(target: Path, pid: int) -> Path:
    return target.parent / f".{target.name}.tpconv-tmp-{pid}"


def check_target(target: Path, force: bool) -> None:
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise TpDeployError(f"--dst-path {target} is a file, not a directory; choose another path")
    if target.exists() and not force:
        raise TpDeployError(f"--dst-path {target} already exists; pass --force to replace it")


@contextlib.contextmanager
def building(target: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target`` in one rename."""
    target = Path(target).absolute()
    check_target(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = tmp_name(target, os.getpid())
        tmp.mkdir()
    except OSError as e:
        raise TpDeployError(f"cannot write to {target.parent}: {e.strerror}; choose a writable --dst-path") from e
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield tmp
        _replace(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _replace(tmp: Path, target: Path, force: bool) -> None:
    _fsync_dir(tmp)
    old = None
    if target.exists():
        check_target(target, force)  # it may have appeared while converting
        old = target.parent / f".{target.name}.tpconv-old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    """Delete temporary directories of conversions whose process no longer exists."""
    pattern = re.compile(re.escape(f".{target.name}.tpconv-") + r"(tmp|old)-(\d+)$")
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not _alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)
