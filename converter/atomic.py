"""Build a directory beside its target and rename it into place only when complete.

A conversion that fails, is interrupted or is killed leaves no directory at the target path. The
temporary directory is hidden and named after the converting process, so a later run removes the
leftovers of a killed one (SIGKILL cannot be caught). An existing target is replaced only when
``--force`` is given and it is a workspace or an empty directory, never anything overlapping the source.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from formats.errors import TpDeployError
from formats.layout import MANIFEST_NAME
from formats.manifest import FORMAT_NAME


def tmp_name(target: Path, pid: int) -> Path:
    return target.parent / f".{target.name}.tpconv-tmp-{pid}"


def check_target(target: Path, force: bool, src: Path | None = None) -> None:
    """Refuse, before anything is written, a target whose replacement would destroy data."""
    if src is not None:
        _check_outside(Path(target), Path(src))
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise TpDeployError(f"--dst-path {target} is a file, not a directory; choose another path")
    problem = _not_a_workspace(target) if target.is_dir() and not _is_empty(target) else None
    if problem:  # checked before --force: passing it would not help, so do not suggest it
        raise TpDeployError(f"--dst-path {target} is not a tpdeploy workspace ({problem}); --force replaces "
                            "only workspaces; choose an empty or new directory")
    if target.exists() and not force:
        raise TpDeployError(f"--dst-path {target} already exists; pass --force to replace it")


def check_writable(target: Path) -> None:
    """The nearest existing ancestor of ``target`` accepts a new directory.

    Tried, not only asked: ``os.access`` says yes to root everywhere, and pseudo file systems
    (/proc, /sys) refuse mkdir while reporting 0 bytes free, which would read as a full disk.
    """
    probe = Path(target).absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        reason = "not a directory"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = "permission denied"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".tpconv-probe-", dir=probe))
            reason = None
        except OSError as e:
            reason = e.strerror
    if reason:
        raise TpDeployError(f"{probe} is not writable ({reason}), so --dst-path {target} cannot be created there; "
                            "choose a writable --dst-path")


def _check_outside(target: Path, src: Path) -> None:
    """The output may not be, contain or sit inside the source (symlinks resolved)."""
    t, s = target.resolve(), src.resolve()
    if t == s:
        where = "is the source checkpoint directory"
    elif s in t.parents:
        where = "is inside the source checkpoint directory"
    elif t in s.parents:
        where = "contains the source checkpoint directory"
    else:
        return
    raise TpDeployError(f"--dst-path {target} {where} {src}; the output may not overlap the checkpoint it "
                        f"is read from; choose a directory outside {s}")


def _is_empty(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:  # unreadable: not known to be empty, so never replaced
        return False


def _not_a_workspace(path: Path) -> str | None:
    """Why a non-empty directory is not a tpdeploy workspace, or None when it is one."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return f"no {MANIFEST_NAME}"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"its {MANIFEST_NAME} cannot be read: {e}"
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return f"its {MANIFEST_NAME} does not say \"format\": \"{FORMAT_NAME}\""
    return None


@contextlib.contextmanager
def building(target: Path, force: bool, src: Path | None = None, resume: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target`` in one rename.

    It is empty, or with ``resume`` the newest one a killed conversion of ``target`` left (the caller
    decides what in it to keep, ``converter.resume``).
    """
    target = Path(target).absolute()
    check_target(target, force, src)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(target, os.getpid())
        adopted = _stale(target, "tmp")[-1:] if resume else []
        if adopted:
            os.rename(adopted[0], tmp)
        _remove_stale(target)
        if not adopted:
            tmp.mkdir()
    except OSError as e:
        raise TpDeployError(f"{target.parent} is not writable ({e.strerror}); choose a writable --dst-path") from e
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield tmp
        _replace(tmp, target, force, src)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _replace(tmp: Path, target: Path, force: bool, src: Path | None) -> None:
    _fsync_dir(tmp)
    old = None
    if target.exists():
        check_target(target, force, src)  # it may have appeared, or changed, while converting
        old = target.parent / f".{target.name}.tpconv-old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None and old.is_symlink():
        old.unlink()  # a link to a workspace: the link is replaced, what it pointed to is left alone
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    """Delete temporary directories of conversions whose process no longer exists."""
    for entry in _stale(target, "tmp|old"):
        shutil.rmtree(entry, ignore_errors=True)


def _stale(target: Path, kinds: str) -> list[Path]:
    """Leftover directories of ``target``'s conversions whose process is gone, oldest first."""
    pattern = re.compile(re.escape(f".{target.name}.tpconv-") + f"({kinds})" + r"-(\d+)$")
    found = [e for e in target.parent.iterdir() if (m := pattern.match(e.name)) and not _alive(int(m.group(2)))]
    return sorted(found, key=lambda e: e.stat().st_mtime)


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


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
