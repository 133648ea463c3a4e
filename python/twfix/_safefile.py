"""Replacing a file twfix owns, safely, in a directory others may reach (private).

The one way twfix writes a file (``tune --write`` and ``metrics --textfile``, both often run as root from
a timer). Every step works relative to a descriptor of the target's directory: the new text goes to a fresh
temporary file (``O_EXCL|O_NOFOLLOW``, mode set on the descriptor, fsync), which is then swapped with the
target (``renameat2(RENAME_EXCHANGE)``); what was displaced is checked, and put back unless twfix wrote it
(its first line is the writer's marker). So a file that appears between a check and the rename is never
lost, no path anyone could swap is followed, and a directory that another non-root user owns or can write
is refused. Only regular files are read back, never through a symbolic link, and only their first line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from twfix import _twfix
from twfix.errors import TwfixError

__all__ = ["replace", "write_temp"]


def replace(
    path: str | os.PathLike[str],
    data: bytes,
    marker: str,
    *,
    writer: str,
    example: str,
    keep_backup: bool,
    max_size: int = 64 * 1024,
    mode: int = 0o644,
) -> tuple[Path, Path | None]:
    """Write ``data`` (whose first line is ``marker``) to ``path``; returns (path, backup or None).

    A file at ``path`` is replaced only if ``writer`` wrote it (its first line is ``marker``) and it is a
    regular file of at most ``max_size`` bytes; with ``keep_backup`` the previous version stays as
    ``PATH.bak`` under the same rule. ``example`` is a path to suggest when ``path`` is no file name."""
    shown = os.fspath(path)
    if not isinstance(shown, str):
        raise TypeError(f"path must be a str or os.PathLike[str], not {type(shown).__name__}")
    if not shown:
        raise ValueError(f"the path to write is empty; give a file such as {example}")
    parent, name = os.path.split(shown)
    if name in ("", ".", ".."):
        raise IsADirectoryError(
            f"{shown!r} names a directory; give a file such as {shown.rstrip('/')}/{Path(example).name}"
        )
    dir_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    owner = _Owner(marker, writer, max_size)
    try:
        _check_directory(dir_fd, parent or ".")
        backup: Path | None = None
        if owner.check(dir_fd, name, shown) and keep_backup:  # fail early; the swap below checks again
            owner.check(dir_fd, name + ".bak", shown + ".bak")
        tmp = write_temp(dir_fd, name, data, mode)
        try:
            displaced = _install(dir_fd, tmp, name, shown, owner)
            if displaced and keep_backup:  # tmp now holds the previous version, which twfix wrote
                backup = Path(shown + ".bak")
                _install(dir_fd, tmp, name + ".bak", str(backup), owner)
            if displaced:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return Path(shown), backup


def _check_directory(dir_fd: int, shown: str) -> None:
    st = os.fstat(dir_fd)
    if st.st_uid not in (0, os.geteuid()):
        raise PermissionError(f"{shown} belongs to uid {st.st_uid}, who could swap files under twfix; refusing")
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0):
        raise PermissionError(f"{shown} is writable by other users, who could swap files under twfix; refusing")


class _Owner:
    """Tells a file the writer wrote (first line ``marker``) from anything else."""

    def __init__(self, marker: str, writer: str, max_size: int) -> None:
        self.marker = marker.encode()
        self.writer = writer
        self.max_size = max_size

    def check(self, dir_fd: int, name: str, shown: str) -> bool:
        """True if ``name`` is the writer's file, False if there is none; raises otherwise (a foreign file,
        a link, a FIFO, a device, a directory, a file larger than the writer ever writes)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FileExistsError(f"{shown} is a symbolic link; refusing to write through it") from None
            raise TwfixError(f"cannot open {shown} to check who wrote it: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(f"{shown} is a directory; give a file inside it")
            if not stat.S_ISREG(st.st_mode):
                raise FileExistsError(f"{shown} is not a regular file; refusing to replace it")
            if st.st_size > self.max_size:
                raise FileExistsError(f"{shown} is larger than any file {self.writer} writes; refusing to replace it")
            head = os.read(fd, len(self.marker) + 1)
        finally:
            os.close(fd)
        if head.split(b"\n", 1)[0] != self.marker:
            raise FileExistsError(f"{shown} exists and was not written by {self.writer}; refusing to replace it")
        return True


def write_temp(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> str:
    """A fresh temporary file next to ``name`` holding ``data`` (fsynced); returns its name."""
    tmp = f".{name}.twfix-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # on the descriptor: no path anyone could swap
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    return tmp


def _install(dir_fd: int, src: str, dst: str, shown: str, owner: _Owner) -> bool:
    """Move ``src`` to ``dst``. When ``dst`` exists the two are exchanged atomically and the displaced
    file (now at ``src``) is checked: the writer's own stays at ``src`` for the caller; anything else is
    exchanged back and FileExistsError raised. Returns whether a file was displaced."""
    try:
        _twfix.rename_at(dir_fd, src, dst)
        return False
    except FileExistsError:
        pass
    _twfix.rename_at(dir_fd, src, dst, exchange=True)
    try:
        owner.check(dir_fd, src, shown)
    except (OSError, TwfixError):
        _twfix.rename_at(dir_fd, src, dst, exchange=True)  # put the foreign file back where it was
        raise
    return True
