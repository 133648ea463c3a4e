"""The leak guard's evidence (private to the pytest plugin, free of pytest): this process's socket
descriptors, the namespace's TIME-WAIT count (O(1), from sockstat), and the report naming each leaked socket
with where it was created."""

from __future__ import annotations

import os

import twfix
from twfix import counters

__all__ = ["leak_report", "socket_fds", "time_wait_count"]


def socket_fds() -> dict[int, int]:
    """This process's socket descriptors: fd -> inode."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(name)] = int(target[8:-1])
    return found


def time_wait_count() -> int:
    """TIME-WAIT of the test's namespace from sockstat: O(1), where a dump would walk the whole table."""
    try:
        return counters.tcp().time_wait
    except OSError:
        return 0


def leak_report(leaked: dict[int, int], created: dict[int, list[str]]) -> str:
    by_inode: dict[int, twfix.SocketEntry] = {}
    for kind in ("tcp", "udp"):
        try:
            for entry in twfix.sockets(kind):
                by_inode[entry.inode] = entry
        except OSError:
            pass
    lines = [f"twfix: the test left {len(leaked)} socket(s) open:"]
    for fd, inode in sorted(leaked.items()):
        found = by_inode.get(inode)
        what = "socket"
        if found is not None:
            what = f"{found.state} {found.laddr}" + (f" -> {found.raddr}" if found.raddr else "")
        lines.append(f"  fd {fd}: {what}")
        for frame in created.get(fd, [])[-2:]:
            lines.extend("    " + line for line in frame.rstrip().splitlines())
    return "\n".join(lines)
