"""Race-free port numbers for code that insists on a number (the pytest plugin's port fixtures).

The usual helper binds port 0, closes the socket and returns the number: anything else on the host may
take that port before the caller binds it, and the kernel hands the same number to the next bind(0) or
connect() as readily as to anyone. A :class:`PortPool` closes those gaps:

* it hands out only ports the kernel never assigns on its own (outside ``ip_local_port_range``, or in
  ``ip_local_reserved_ports``), so no bind(0), connect() or other free-port helper can be given one;
* a TCP port stays **held in the kernel** until it is released: the pool keeps a bound, non-listening
  socket with ``SO_REUSEADDR`` on it (one dual-stack ``[::]`` socket, or ``0.0.0.0`` without IPv6). A plain
  ``bind()`` of the port by anyone (a hard-coded port, another user's suite, portpicker) then fails, while
  a server that sets ``SO_REUSEADDR`` (``socket.create_server``, asyncio, uvicorn, aiohttp, tornado,
  gunicorn, ``http.server``) binds and listens on it as usual. Code that binds without the option fails
  too: reserve with ``hold=False`` for it;
* pools coordinate through open-file-description locks (``F_OFD_SETLK``, byte N stands for port N) on
  one lock file per user, in a directory only that user can write: no two pools hold the same port,
  whether they live in one process (threads, two pools) or in several (pytest-xdist workers, separate
  runs), and the kernel drops a closed pool's locks, so nothing leaks. Pools of other users skip a held
  TCP port because their own check bind fails on it;
* a port is handed out only if a bind without ``SO_REUSEADDR`` on the dual-stack wildcard shows it free
  on every IPv4 and IPv6 address, TIME-WAIT included.

UDP ports are not held (a UDP server rarely sets ``SO_REUSEADDR``, and one that does shares its datagrams
with the holder): they are free when handed out and never given to bind(0), connect() or another pool of
the same user, but another user's pool or an explicit bind can still take one before the test binds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import stat
import struct
import threading
from typing import Final

from twfix import kernel, sysctl
from twfix._args import check_kind

__all__ = ["PortPool", "PortsExhaustedError", "lock_directory"]

_DIR_ENV: Final = "TWFIX_PORTS_DIR"
# struct flock on 64-bit Linux: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
_FLOCK: Final = "hh4xqqi4x"


class PortsExhaustedError(OSError):
    """No port outside the kernel's ephemeral range is free (errno EADDRNOTAVAIL)."""


def _user_directory() -> str:
    """Where the lock directory lives: ``$TWFIX_PORTS_DIR``, else the user's runtime directory
    (``$XDG_RUNTIME_DIR``), else their cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    chosen = os.environ.get(_DIR_ENV)
    if chosen:
        return chosen
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "twfix")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "twfix")


def _private_directory(path: str) -> int:
    """Open ``path`` (created 0700 when missing) as a directory of the caller that nobody else may write."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PermissionError(
            exc.errno, f"twfix's port lock directory {path!r} cannot be used: {exc.strerror}"
        ) from exc
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise PermissionError(
            errno.EPERM,
            f"twfix's port lock directory {path!r} belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
            f"it must be uid {os.geteuid()}'s with mode 700 (remove it, or set {_DIR_ENV} to another directory)",
        )
    return fd


def lock_directory() -> str:
    """The directory of the caller's lock file (see the module's documentation)."""
    return _user_directory()


def _lock_file() -> int:
    """The caller's lock file, in a private directory, opened without following links and checked."""
    directory = _private_directory(_user_directory())
    try:
        fd = os.open("ports.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=directory)
    finally:
        os.close(directory)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(errno.EPERM, f"{_user_directory()}/ports.lock is not a regular file of this user")
    return fd


def _candidates(low_limit: int) -> list[int]:
    """Ports automatic assignment never hands out, at or above ``low_limit``."""
    ports = sysctl.port_range()
    # Never below the default unprivileged start, even for root: those are the well-known service ports.
    return [p for p in range(max(low_limit, kernel.UNPRIVILEGED_PORT_START), 65536) if not ports.assigns(p)]


class PortPool:
    """Reserve and release port numbers (see the module's documentation for the mechanism)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._held: set[int] = set()
        self._holders: dict[int, socket.socket] = {}
        self._candidates: list[int] = []
        self._next = 0
        self._mutex = threading.Lock()

    def _setup(self) -> None:
        self._fd = _lock_file()
        try:
            start = sysctl.get("net.ipv4.ip_unprivileged_port_start")
        except (OSError, LookupError):
            start = kernel.UNPRIVILEGED_PORT_START
        self._candidates = _candidates(start if isinstance(start, int) else kernel.UNPRIVILEGED_PORT_START)
        if not self._candidates:
            raise PortsExhaustedError(
                errno.EADDRNOTAVAIL,
                "every unprivileged port is in ip_local_port_range and none is reserved; no port is safe from "
                "automatic assignment",
            )
        # Pools of different processes start at different places, so they rarely meet.
        self._next = random.Random(os.getpid() ^ id(self)).randrange(len(self._candidates))

    def reserve(self, kind: str = "tcp", *, hold: bool = True) -> int:
        """A port free for ``kind`` ("tcp" or "udp") on every IPv4 and IPv6 address, reserved until released.

        A TCP port is held in the kernel (a bound socket with ``SO_REUSEADDR``) unless ``hold=False``: only
        code that sets ``SO_REUSEADDR`` before its bind can use it meanwhile."""
        kind = check_kind(kind, kernel.PROTOCOLS)
        if not isinstance(hold, bool):
            raise TypeError(f"hold must be True or False, not {hold!r}")
        sotype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
        with self._mutex:
            if self._fd is None:
                self._setup()
            count = len(self._candidates)
            for _ in range(count):
                port = self._candidates[self._next]
                self._next = (self._next + 1) % count
                if port in self._held or not self._lock(port):
                    continue
                probe = _bound(port, sotype)
                if probe is None:
                    self._unlock(port)
                    continue
                if hold and kind == "tcp":
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    self._holders[port] = probe
                else:
                    probe.close()
                self._held.add(port)
                return port
        raise PortsExhaustedError(errno.EADDRNOTAVAIL, "no port outside the ephemeral range is free")

    def release(self, port: int) -> None:
        """Give ``port`` back: its holding socket is closed, and other pools may hand it out again."""
        with self._mutex:
            if port in self._held:
                self._held.discard(port)
                holder = self._holders.pop(port, None)
                if holder is not None:
                    holder.close()
                self._unlock(port)

    @property
    def held(self) -> frozenset[int]:
        """The ports reserved and not yet released."""
        return frozenset(self._held)

    def holds(self, port: int) -> bool:
        """True while the pool keeps a socket bound on TCP ``port``."""
        return port in self._holders

    def close(self) -> None:
        """Release every port (closing the lock file drops this pool's locks, and only this pool's)."""
        with self._mutex:
            for holder in self._holders.values():
                holder.close()
            self._holders.clear()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._held.clear()

    def _lock(self, port: int) -> bool:
        try:
            self._setlk(fcntl.F_WRLCK, port)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False  # another pool (of any process of this user) holds it
            raise
        return True

    def _unlock(self, port: int) -> None:
        self._setlk(fcntl.F_UNLCK, port)

    def _setlk(self, how: int, port: int) -> None:
        assert self._fd is not None
        # Open-file-description locks belong to this pool's descriptor, not to the process: two pools of
        # one process exclude each other, and closing one keeps the other's locks.
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, how, os.SEEK_SET, port, 1, 0))


def _bound(port: int, sotype: int) -> socket.socket | None:
    """A socket bound to ``port`` without SO_REUSEADDR on the dual-stack wildcard (IPV6_V6ONLY=0), so the
    bind succeeds only if no socket of either family, TIME-WAIT included, is on the port; the IPv4
    wildcard where there is no IPv6. None when the port is taken."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, sotype)
        except OSError:
            continue  # no IPv6 here: the IPv4 wildcard bind below decides
        try:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((address, port))
        except OSError:
            probe.close()
            return None
        return probe
    return None
