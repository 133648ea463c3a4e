"""What the running kernel can do, found out once per process by trying it, never by reading a version.

twfix runs on kernels from 5.10 to the newest, and what it relies on changed between them: the socket dump
shows sockets that are bound but neither listening nor connected only from 6.8, ``tcp_ehash_entries``
(the size every TIME-WAIT default derives from) exists only from 6.1, ``pidfd_getfd`` (reading a holder's
socket options) from 5.6, ``tcp_tw_reuse_delay`` from 6.14. A distribution kernel may carry a backport, so
each feature is probed: a socket bound and looked for, a system call tried, a file looked at. Every answer
twfix gives where a feature is missing says so instead of guessing.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from dataclasses import dataclass
from typing import Any

from twfix import _twfix

__all__ = ["Feature", "bound_inactive", "established_hash", "features", "pidfd_getfd"]


@dataclass(frozen=True)
class Feature:
    """One kernel feature twfix uses: whether this kernel has it, how that was found, and what changes."""

    name: str
    available: bool
    since: str
    how: str
    without: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        state = "yes" if self.available else "no"
        tail = "" if self.available else f"; without it: {self.without}"
        return f"{self.name}: {state} (upstream since Linux {self.since}; found by {self.how}){tail}"


@functools.cache
def bound_inactive() -> bool:
    """True when the socket dump (sock_diag) reports TCP sockets that are bound but neither listening nor
    connected. Probed with a socket of our own, bound to port 0 and looked for by its port."""
    from twfix import diag  # diag asks this module; importing it here keeps the import one-way

    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
                rows = diag.port_entries("tcp", port, ["BOUND_INACTIVE"])
        except OSError:
            continue  # this family is off in the namespace, or sock_diag is refused (then nothing shows them)
        return any(row.laddr.port == port for row in rows)
    return False


@functools.cache
def pidfd_getfd() -> bool:
    """True when this process can duplicate another's descriptor (pidfd_open + pidfd_getfd), which twfix
    uses to read a holder's SO_REUSEADDR/SO_REUSEPORT. Tried on a socket of our own."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            _twfix.socket_reuse_flags(os.getpid(), probe.fileno(), os.fstat(probe.fileno()).st_ino)
        except OSError as e:
            return e.errno not in (errno.ENOSYS, errno.EPERM)
    return True


@functools.cache
def established_hash() -> tuple[int | None, str]:
    """(size of the TCP established hash every namespace shares, where it came from) on kernels without
    ``tcp_ehash_entries``. Before 6.1 every namespace starts with tcp_max_tw_buckets = hash / 2, so a
    namespace created for the question (a thread of our own, gone at once) tells the size. (None, why)
    when this process may not create one."""
    try:
        ((_key, raw),) = _twfix.fresh_netns_sysctls(["net.ipv4.tcp_max_tw_buckets"])
    except OSError as e:
        return None, f"cannot create a network namespace to read it ({os.strerror(e.errno or 0)})"
    if raw is None or not raw.strip().isdigit():
        return None, "a new namespace has no tcp_max_tw_buckets"
    return 2 * int(raw), "twice a new namespace's tcp_max_tw_buckets"


def _has_ehash_entries() -> bool:
    return os.path.exists("/proc/sys/net/ipv4/tcp_ehash_entries")


def _has_reuse_delay() -> bool:
    return os.path.exists("/proc/sys/net/ipv4/tcp_tw_reuse_delay")


def features() -> list[Feature]:
    """Every kernel feature twfix uses, as probed here (the doctor lists them)."""
    ehash = _has_ehash_entries()
    return [
        Feature(
            "bound-only sockets in the socket dump (BOUND_INACTIVE)",
            bound_inactive(),
            "6.8",
            "a socket of twfix's own bound to port 0 and looked for",
            "a socket bound but neither listening nor connected is invisible: explanations say it may be one",
        ),
        Feature(
            "per-namespace established hash (tcp_ehash_entries)",
            ehash,
            "6.1",
            "the sysctl file",
            "the TIME-WAIT cap's default comes from a new namespace's tcp_max_tw_buckets (needs root)",
        ),
        Feature(
            "another process's socket options (pidfd_getfd)",
            pidfd_getfd(),
            "5.6",
            "the system call tried on a socket of twfix's own",
            "whether a UDP holder lets a reuse bind share its port is left unknown",
        ),
        Feature(
            "tcp_tw_reuse_delay",
            _has_reuse_delay(),
            "6.14",
            "the sysctl file",
            "tcp_tw_reuse takes over TIME-WAIT after about 1 s, fixed",
        ),
    ]
