"""``twfix tune``: recommended sysctl changes for this host, printed, written or applied.

Recommendations come from the doctor's findings; each carries its reason. ``tcp_tw_recycle`` is never
recommended, and every value is checked against what the running kernel accepts before it is offered.
Nothing is written or changed unless :func:`write` or :func:`apply` is called.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from twfix import _twfix, sysctl
from twfix.doctor import Change, doctor
from twfix.errors import TwfixError

__all__ = ["Change", "Plan", "Written", "apply", "plan", "write"]

MARKER: Final = "# Written by twfix tune."


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]

    def snippet(self) -> str:
        lines = [
            MARKER,
            "# Recommended TIME-WAIT and port settings for this host; see `twfix doctor` for the findings.",
            "# These knobs are per network namespace: a container gets kernel defaults, not these values.",
            "",
        ]
        if not self.changes:
            lines.append("# Nothing to change: the running values are fine.")
        for c in self.changes:
            lines.append(f"# {c.reason}" if c.reason else "#")
            lines.append(f"# running value: {sysctl.render(c.before)}")
            lines.append(f"{c.name} = {sysctl.render(c.after)}")
            lines.append("")
        return "\n".join(lines).rstrip("\n") + "\n"


@dataclass(frozen=True)
class Written:
    path: Path
    backup: Path | None


def plan(
    *,
    root: str | os.PathLike[str] = "/",
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> Plan:
    """The recommended changes: the fixes the doctor's findings carry, worst finding first, one change
    per knob, and only changes that change something. Every value is checked against what the running
    kernel accepts before it is offered. ``netns``/``pid``: plan for another network namespace."""
    changes: dict[str, Change] = {}
    for finding in doctor(root=root, netns=netns, pid=pid).findings:
        for change in finding.fixes:
            if change.after != change.before and change.name not in changes:
                changes[change.name] = change
    for c in changes.values():
        sysctl.validate(c.name, c.after)
    return Plan(tuple(changes.values()))


# A snippet twfix writes is a few hundred bytes; nothing larger is read back to check who wrote it.
_MAX_FILE: Final = 64 * 1024


def write(p: Plan, path: str | os.PathLike[str]) -> Written:
    """Write the snippet atomically, never replacing a file twfix did not write.

    Every step works relative to a descriptor of the target's directory: the new text goes to a fresh
    temporary file (``O_EXCL``, mode set on the descriptor, fsync), which is then swapped with the target
    (``renameat2(RENAME_EXCHANGE)``); what was displaced is checked, and put back unless twfix wrote it.
    So a file that appears between a check and the rename is never lost. The previous version of a file
    twfix wrote is kept as ``PATH.bak`` under the same rule. Only regular files of at most 64 KiB are
    read, never through a symbolic link, and a directory that another non-root user can write is refused.
    """
    shown = os.fspath(path)
    if not isinstance(shown, str):
        raise TypeError(f"path must be a str or os.PathLike[str], not {type(shown).__name__}")
    if not shown:
        raise ValueError("the path to write is empty; give a file such as /etc/sysctl.d/99-twfix.conf")
    parent, name = os.path.split(shown)
    if name in ("", ".", ".."):
        raise IsADirectoryError(f"{shown!r} names a directory; give a file such as {shown.rstrip('/')}/99-twfix.conf")
    dir_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_directory(dir_fd, parent or ".")
        if _read_own(dir_fd, name, shown) is not None:  # fail early; the swap below checks again
            _read_own(dir_fd, name + ".bak", shown + ".bak")
        tmp = _write_temp(dir_fd, name, p.snippet().encode())
        try:
            displaced = _install(dir_fd, tmp, name, shown)
            backup: Path | None = None
            if displaced:  # tmp now holds the previous version, which twfix wrote
                backup = Path(shown + ".bak")
                _install(dir_fd, tmp, name + ".bak", str(backup), keep_displaced=False)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return Written(Path(shown), backup)


def _check_directory(dir_fd: int, shown: str) -> None:
    st = os.fstat(dir_fd)
    if st.st_uid not in (0, os.geteuid()):
        raise PermissionError(f"{shown} belongs to uid {st.st_uid}, who could swap files under twfix; refusing")
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0):
        raise PermissionError(f"{shown} is writable by other users, who could swap files under twfix; refusing")


def _read_own(dir_fd: int, name: str, shown: str) -> bytes | None:
    """The content of ``name`` if twfix wrote it, None if there is no such file; raises otherwise
    (a foreign file, a link, a FIFO, a device, a directory, a file too large to be a snippet)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileExistsError(f"{shown} is a symbolic link; refusing to write through it") from None
        raise TwfixError(f"cannot open {shown} to check who wrote it: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{shown} is a directory; give a file inside it, such as {shown}/99-twfix.conf")
        if not stat.S_ISREG(st.st_mode):
            raise FileExistsError(f"{shown} is not a regular file; refusing to replace it")
        if st.st_size > _MAX_FILE:
            raise FileExistsError(f"{shown} is larger than any file twfix writes; refusing to replace it")
        data = os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)
    if data.split(b"\n", 1)[0] != MARKER.encode():
        raise FileExistsError(f"{shown} exists and was not written by twfix tune; refusing to replace it")
    return data


def _write_temp(dir_fd: int, name: str, data: bytes) -> str:
    tmp = f".{name}.twfix-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o644)  # on the descriptor: no path anyone could swap
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


def _install(dir_fd: int, src: str, dst: str, shown: str, *, keep_displaced: bool = True) -> bool:
    """Move ``src`` to ``dst``. When ``dst`` exists the two are exchanged atomically and the displaced
    file (now at ``src``) is checked: twfix's own stays there (``keep_displaced``) or is removed;
    anything else is exchanged back and FileExistsError raised. Returns whether a file was displaced."""
    try:
        _twfix.rename_at(dir_fd, src, dst)
        return False
    except FileExistsError:
        pass
    _twfix.rename_at(dir_fd, src, dst, exchange=True)
    try:
        _read_own(dir_fd, src, shown)
    except (OSError, TwfixError):
        _twfix.rename_at(dir_fd, src, dst, exchange=True)  # put the foreign file back where it was
        raise
    if not keep_displaced:
        os.unlink(src, dir_fd=dir_fd)
    return True


def apply(p: Plan) -> list[Change]:
    """Set the planned values now (root only), all or none: when one write fails, the knobs already
    changed are set back, and the error says what happened. Returns before/after for each knob."""
    if os.geteuid() != 0:
        raise PermissionError("twfix tune --apply changes kernel settings and must run as root")
    done: list[Change] = []
    for c in p.changes:
        try:
            before = _set(c.name, c.after)
        except (OSError, ValueError) as exc:
            restored, failed = _roll_back(done)
            detail = f"; set back {', '.join(restored)}" if restored else ""
            if failed:
                detail += f"; could NOT set back {', '.join(failed)}"
            raise TwfixError(f"could not set {c.name} to {sysctl.render(c.after)}: {exc}{detail}") from exc
        done.append(Change(c.name, before, sysctl.get(c.name), c.reason))
    return done


def _set(name: str, value: object) -> object:
    """Set a catalogue knob in the caller's network namespace (root only); returns the previous value.
    The one place twfix writes a sysctl: every value goes through :func:`twfix.sysctl.validate` first."""
    text = sysctl.validate(name, value)
    if os.geteuid() != 0:
        raise PermissionError(f"setting {name} needs root")
    key, _path = _twfix.sysctl_key(name)
    before = _twfix.write_sysctl(name, text)
    return sysctl.parse(key, before) if before is not None else None


def _roll_back(done: list[Change]) -> tuple[list[str], list[str]]:
    restored, failed = [], []
    for c in reversed(done):
        try:
            _set(c.name, c.before)
            restored.append(f"{c.name} = {sysctl.render(c.before)}")
        except (OSError, ValueError) as exc:
            failed.append(f"{c.name} ({exc})")
    return restored, failed
