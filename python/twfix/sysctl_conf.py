"""The persistent sysctl configuration as systemd-sysctl reads it: which files, their assignments, read
safely (regular files of bounded size only, never a FIFO into a hang). Parsing only: the doctor judges."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from twfix import sysctl

__all__ = ["assignments", "mentions_time_wait", "numeric", "places", "read"]

# sysctl.d files are small; a larger one is read up to this size.
_MAX_CONFIG: Final = 1 << 20
_TW_HINT: Final = re.compile(r"time[_ -]?wait|timewait|tw_(?:reuse|recycle|buckets)|fin_timeout", re.I)
_DIRECTORIES: Final = ("etc/sysctl.d", "run/sysctl.d", "usr/lib/sysctl.d", "lib/sysctl.d")


def places(root: Path) -> list[tuple[Path, OSError | None]]:
    """The sysctl files systemd-sysctl reads under ``root``, each with the error that stops twfix from
    reading it (a file, or the directory it would be listed from); one unreadable place never hides the
    others."""
    found: list[tuple[Path, OSError | None]] = [(root / "etc" / "sysctl.conf", None)]
    for d in _DIRECTORIES:
        folder = root / d
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append((folder, exc))
            continue
        found += [(folder / n, None) for n in names if n.endswith(".conf")]
    return found


def assignments(text: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, normalised key, value, raw line) of each assignment in a sysctl.d file."""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip().lstrip("-").replace("/", ".")
        yield n, key, value.strip(), raw


def read(path: Path) -> str | None:
    """A config file's text: a regular file of bounded size, opened without following a FIFO into a hang;
    None when it is absent or not a regular file (systemd-sysctl reads those, twfix does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(_MAX_CONFIG).decode(errors="replace")
    finally:
        os.close(fd)


def mentions_time_wait(text: str) -> bool:
    """Does the file tune TIME-WAIT (so that an unrelated knob in it is folklore worth a word)?"""
    return _TW_HINT.search(text) is not None


def numeric(value: str) -> bool:
    """A value an integer knob (or a range of them) accepts: ASCII numbers separated by blanks."""
    parts = value.split()
    return bool(parts) and all(sysctl.is_int_text(p) for p in parts)
