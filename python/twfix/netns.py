"""The network namespaces of this host: every container, ``ip netns`` and the host's own.

Found through ``/run/netns`` (named ones) and ``/proc/PID/ns/net`` (every process's), deduplicated by
the namespace's inode. Entering one to read it needs root (CAP_SYS_ADMIN); the caller's own threads
never move: the native layer reads from a short-lived thread that joins the namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

from twfix import _twfix

__all__ = ["NetNamespace", "current_inode", "namespaces", "port_listeners"]

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


def current_inode() -> int:
    """The inode of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def namespaces(*, include_own: bool = True) -> list[NetNamespace]:
    """Every network namespace this process can see, named ones first, then by inode."""
    names: dict[int, tuple[str, str]] = {}
    try:
        entries = sorted(os.listdir("/run/netns"))
    except OSError:
        entries = []
    for name in entries:
        path = os.path.join("/run/netns", name)
        try:
            names.setdefault(os.stat(path).st_ino, (name, path))
        except OSError:
            continue
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
