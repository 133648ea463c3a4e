"""Race-free port numbers for code that insists on a number (the pytest plugin's port fixtures).

The usual helper binds port 0, closes the socket and returns the number: anything else on the host may
take that port before the caller binds it, and the kernel hands the same number to the next bind(0) or
connect() as readily as to anyone. A :class:`PortPool` closes both gaps:

* it hands out only ports the kernel never assigns on its own (outside ``ip_local_port_range``, or in
  ``ip_local_reserved_ports``), so no bind(0), connect() or other free-port helper can be given one;
* processes coordinate through byte-range locks on one lock file per user (byte N stands for port N):
  no two pools of that user (pytest-xdist workers, separate pytest runs) hold the same port, and the
  kernel drops a dead process's locks, so nothing leaks;
* a port is handed out only if a dual-stack bind shows it free on every IPv4 and IPv6 address (so also
  of TIME-WAIT left by a previous test), and it stays reserved until released.

Nothing holds the port in the kernel meanwhile, so the code under test binds it with or without
SO_REUSEADDR. Limits: a process that binds ports explicitly without asking the pool (another user's, or
a hard-coded port) can still take one, as it could any port.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import stat
import tempfile
import threading
from typing import Final

from twfix import sysctl
from twfix._args import check_kind

__all__ = ["PortPool", "PortsExhaustedError"]

_KINDS: Final = ("tcp", "udp")


class PortsExhaustedError(OSError):
    """No port outside the kernel's ephemeral range is free (errno EADDRNOTAVAIL)."""


def _lock_file() -> int:
    """The caller's lock file, opened without following links and checked to be its own."""
    path = os.path.join(tempfile.gettempdir(), f"twfix-ports-{os.geteuid()}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"{path} is not a regular file of uid {os.geteuid()}; refusing to use it")
    return fd


def _candidates(low_limit: int) -> list[int]:
    """Ports automatic assignment never hands out, at or above ``low_limit``."""
    ports = sysctl.port_range()
    return [p for p in range(max(low_limit, 1024), 65536) if not ports.assigns(p)]


class PortPool:
    """Reserve and release port numbers (see the module's documentation for the mechanism)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._held: set[int] = set()
        self._candidates: list[int] = []
        self._next = 0
        self._mutex = threading.Lock()

    def _setup(self) -> None:
        self._fd = _lock_file()
        try:
            start = sysctl.get("net.ipv4.ip_unprivileged_port_start")
        except (OSError, LookupError):
            start = 1024
        self._candidates = _candidates(start if isinstance(start, int) else 1024)
        if not self._candidates:
            raise PortsExhaustedError(
                errno.EADDRNOTAVAIL,
                "every unprivileged port is in ip_local_port_range and none is reserved; no port is safe from "
                "automatic assignment",
            )
        # Pools of different processes start at different places, so they rarely meet.
        self._next = random.Random(os.getpid() ^ id(self)).randrange(len(self._candidates))

    def reserve(self, kind: str = "tcp") -> int:
        """A port free for ``kind`` ("tcp" or "udp") on every IPv4 and IPv6 address, held until released."""
        kind = check_kind(kind, _KINDS)
        sotype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
        with self._mutex:
            if self._fd is None:
                self._setup()
            assert self._fd is not None
            count = len(self._candidates)
            for _ in range(count):
                port = self._candidates[self._next]
                self._next = (self._next + 1) % count
                if port in self._held or not self._lock(port):
                    continue
                if _free(port, sotype):
                    self._held.add(port)
                    return port
                self._unlock(port)
        raise PortsExhaustedError(errno.EADDRNOTAVAIL, "no port outside the ephemeral range is free")

    def release(self, port: int) -> None:
        """Give ``port`` back (other pools may hand it out again)."""
        with self._mutex:
            if port in self._held:
                self._held.discard(port)
                self._unlock(port)

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def close(self) -> None:
        """Release every port (closing the lock file drops this process's locks)."""
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._held.clear()

    def _lock(self, port: int) -> bool:
        assert self._fd is not None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False  # another process of this user holds it
            raise
        return True

    def _unlock(self, port: int) -> None:
        assert self._fd is not None
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, port)


def _free(port: int, sotype: int) -> bool:
    """One dual-stack bind (IPV6_V6ONLY=0 on the IPv6 wildcard) conflicts with any socket of the port, on
    any address of either family, TIME-WAIT included; without IPv6, an IPv4 wildcard bind."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, sotype)
        except OSError:
            continue  # no IPv6 here: the IPv4 wildcard bind below decides
        with probe:
            try:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind((address, port))
            except OSError:
                return False
            return True
    return False
