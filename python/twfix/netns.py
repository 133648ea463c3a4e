"""The network namespaces of this host: every container, ``ip netns`` and the host's own.

Found through ``/run/netns`` (named ones) and ``/proc/PID/ns/net`` (every process's), deduplicated by
the namespace's inode. Entering one to read it needs root (CAP_SYS_ADMIN); the caller's own threads
never move: the native layer reads from a short-lived thread that joins the namespace.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Final

from twfix import _twfix
from twfix._text import printable

__all__ = [
    "BadEntry",
    "NetNamespace",
    "bad_entries",
    "current",
    "current_inode",
    "namespaces",
    "port_listeners",
]

# Processes remembered per namespace: enough to name it, bounded on hosts with thousands of processes.
_PIDS_KEPT: Final = 3


@dataclass(frozen=True)
class NetNamespace:
    """One network namespace: its inode (what ``lsns`` and ``ip netns identify`` show), a path that
    enters it, its ``ip netns`` name when it has one, and a few of the processes in it."""

    inode: int
    path: str
    name: str | None = None
    pids: tuple[int, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.name} (net:[{self.inode}])" if self.name else f"net:[{self.inode}]"

    @property
    def program(self) -> str:
        """The name of a representative process in the namespace ("" when none or not readable)."""
        if not self.pids:
            return ""
        try:
            with open(f"/proc/{self.pids[0]}/comm", "rb") as f:
                return f.read(64).decode(errors="replace").strip()
        except OSError:
            return ""

    @property
    def container(self) -> str:
        """The container id in the representative process's cgroup path (64 hex digits), or ""."""
        if not self.pids:
            return ""
        try:
            with open(f"/proc/{self.pids[0]}/cgroup", "rb") as f:
                text = f.read(1 << 16).decode(errors="replace")
        except OSError:
            return ""
        found = _CONTAINER_ID.search(text)
        return found.group(1) if found else ""


_CONTAINER_ID: Final = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$", re.M)


def current() -> NetNamespace:
    """The caller's own namespace, described like the others (its representative process is the caller:
    no scan of /proc, which costs a few milliseconds on a busy host)."""
    own = current_inode()
    names, _bad = _scan_run_netns()
    name, path = names.get(own, (None, "/proc/thread-self/ns/net"))
    return NetNamespace(own, path, name, (os.getpid(),))


def current_inode() -> int:
    """The inode of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


_RUN_NETNS: Final = "/run/netns"


@dataclass(frozen=True)
class BadEntry:
    """An entry of ``/run/netns`` that is not a network namespace (skipped): ``name`` is escaped."""

    name: str
    reason: str


def _scan_run_netns() -> tuple[dict[int, tuple[str, str]], list[BadEntry]]:
    """The named namespaces of /run/netns by inode (name, path), and the entries that are none: an
    empty file left by a removed namespace (``ip netns`` and CNI plugins leave them), a FIFO, a
    directory. A namespace is a file of nsfs, the filesystem of ``/proc/self/ns/net``; nothing is opened."""
    names: dict[int, tuple[str, str]] = {}
    bad: list[BadEntry] = []
    try:
        entries = sorted(os.listdir(_RUN_NETNS))
        nsfs = os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return names, bad
    for name in entries:
        path = os.path.join(_RUN_NETNS, name)
        try:
            st = os.stat(path)
        except OSError as exc:
            bad.append(BadEntry(printable(name), f"cannot be examined: {exc.strerror}"))
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_dev != nsfs:
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a file"
            bad.append(BadEntry(printable(name), f"{what}, not a mounted namespace (left by a removed one?)"))
            continue
        names.setdefault(st.st_ino, (printable(name), path))
    return names, bad


def bad_entries() -> list[BadEntry]:
    """The entries of /run/netns that :func:`namespaces` skipped because they are no namespace."""
    return _scan_run_netns()[1]


def namespaces(*, include_own: bool = True) -> list[NetNamespace]:
    """Every network namespace this process can see, named ones first, then by inode. Entries of
    /run/netns that are no namespace are skipped (:func:`bad_entries` lists them); names are escaped."""
    names, _bad = _scan_run_netns()
    pids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue  # exited, or not ours to inspect
        kept = pids.setdefault(inode, [])
        if len(kept) < _PIDS_KEPT:
            kept.append(int(entry))
    own = current_inode()
    found = []
    for inode in sorted(set(names) | set(pids), key=lambda i: (i not in names, i)):
        if inode == own and not include_own:
            continue
        held = tuple(sorted(pids.get(inode, ())))
        if inode in names:
            name, path = names[inode]
            found.append(NetNamespace(inode, path, name, held))
        else:
            found.append(NetNamespace(inode, f"/proc/{held[0]}/ns/net", None, held))
    return found


def port_listeners(kind: str, port: int, ns: NetNamespace) -> list[tuple[int, str, int]]:
    """The listening (TCP) or unconnected (UDP) sockets on ``port`` in ``ns``, as (family, ip, port)."""
    return _twfix.listeners_in(kind, port, ns.path)
