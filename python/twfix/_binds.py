"""What a test's process binds, recorded by an audit hook (``sys.addaudithook``, events ``socket.bind``
and ``socket.__new__``): no socket method is replaced, so no twfix frame appears in a project's tracebacks.
Private to the pytest plugin, and free of pytest itself."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sys
import sysconfig
import traceback
import types
import weakref
from collections.abc import Callable
from typing import Any, Final

from twfix import sysctl
from twfix.kernel import PortRange

__all__ = ["IN_USE_TEXT", "BindLog", "call_site", "current", "in_use", "set_current", "watch"]

# Frames that are not the test's: twfix's own modules, the stdlib's socket and asyncio.
_OWN_FILES: Final = (
    os.path.dirname(__file__) + os.sep,
    socket.__file__,
    # asyncio's folder, found without importing it (the plugin must not import asyncio for every suite).
    os.path.join(sysconfig.get_paths()["stdlib"], "asyncio") + os.sep,
)


class BindLog:
    """The binds (and, for the leak guard, the sockets) a test's process made, recorded by an audit hook."""

    def __init__(self, record_creation: bool, opted_in: bool) -> None:
        self.record_creation = record_creation
        # (socket, family, type, host, port, SO_REUSEADDR set, call site)
        self.binds: list[tuple[weakref.ref[socket.socket], int, int, str, int, bool, str]] = []
        self.created: list[tuple[weakref.ref[socket.socket], list[str]]] = []
        self.last_pick: str | None = None  # where the test last bound port 0 (a free-port helper?)
        self.unreached: dict[str, str] = {}  # location -> note
        self.ports: Callable[..., int] | None = None  # the test's port reservations (--twfix-ports)
        self._range: PortRange | None = None
        self.opted_in = opted_in

    def on_bind(self, sock: socket.socket, address: Any) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
            return
        host, port = str(address[0]), int(address[1])
        site = call_site()
        if site is None:
            return  # twfix's own probe binds
        reuse = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
        self.binds.append((weakref.ref(sock), sock.family, sock.type, host, port, reuse, site))
        if port == 0:
            self.last_pick = site
        elif self.opted_in:
            self._check_reach(port, site)

    def _check_reach(self, port: int, site: str) -> None:
        if self._range is None:
            self._range = sysctl.port_range()
        if not self._range.assigns(port):
            return
        where = self.last_pick or site
        if where in self.unreached:
            return
        if self.last_pick is not None:
            note = (
                f"{where}: a free-port helper twfix cannot reach (port {port}, chosen by its bind(0), was bound "
                f"at {site}); use a port fixture twfix serves (unused_tcp_port, free_tcp_port, twfix_tcp_port)"
            )
        else:
            note = (
                f"{site}: port {port} is bound explicitly but lies in the ephemeral range "
                f"({self._range.low}-{self._range.high}), where bind(0) and connect() may take it first; if it came "
                "from a free-port helper, twfix cannot reach that helper: use a port fixture twfix serves"
            )
        self.unreached[where] = note

    def on_create(self, sock: socket.socket) -> None:
        frames = [f for f in traceback.extract_stack(limit=12) if f.filename not in (__file__, socket.__file__)]
        self.created.append((weakref.ref(sock), traceback.format_list(frames[-4:])))

    def creation_sites(self) -> dict[int, list[str]]:
        sites: dict[int, list[str]] = {}
        for ref, stack in self.created:
            sock = ref()
            if sock is not None and sock.fileno() != -1:
                sites[sock.fileno()] = stack
        return sites

    def failed_binds(self) -> list[tuple[int, str, int, bool]]:
        """(type, host, port, SO_REUSEADDR) of every explicit bind whose socket is not bound there now."""
        found: dict[tuple[int, str, int], bool] = {}
        for ref, _family, sotype, host, port, reuse, _site in self.binds:
            sock = ref()
            if port == 0:
                continue
            with contextlib.suppress(OSError):
                if sock is not None and sock.fileno() != -1 and sock.getsockname()[1] == port:
                    continue  # that bind succeeded and the socket is still there
            found[(sotype, host, port)] = reuse
        return [(sotype, host, port, reuse) for (sotype, host, port), reuse in found.items()]


def call_site() -> str | None:
    """The first frame outside the stdlib's socket and asyncio code that made the call (None for twfix)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back  # the audit hook itself
    first: str | None = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OWN_FILES[0]):
            return None
        if not name.startswith(_OWN_FILES[1:]):
            where = f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
            if first is None:
                first = where
            if "site-packages" not in name:
                return where
        frame = frame.f_back
    return first


class _State:
    current: BindLog | None = None  # the running test's log (None outside tests)
    watching = False


def current() -> BindLog | None:
    return _State.current


def set_current(log: BindLog | None) -> BindLog | None:
    """Make ``log`` the one the audit hook records into; returns the previous one."""
    previous, _State.current = _State.current, log
    return previous


def _audit(event: str, args: tuple[Any, ...]) -> None:
    log = _State.current
    if log is None or event not in ("socket.bind", "socket.__new__"):
        return
    try:
        if event == "socket.bind":
            log.on_bind(args[0], args[1])
        elif log.record_creation:
            log.on_create(args[0])
    except Exception:  # an audit hook must never change what the audited call does
        pass


def watch() -> None:
    """Install the audit hook once per process (it cannot be removed; it does nothing outside a test)."""
    if not _State.watching:
        sys.addaudithook(_audit)
        _State.watching = True


IN_USE_TEXT: Final = re.compile(r"address already in use|EADDRINUSE|errno 98\b", re.IGNORECASE)


def in_use(exc: BaseException | None) -> bool:
    """EADDRINUSE anywhere in the exception, its causes and contexts, and exception groups."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.EADDRINUSE:
            return True
        if IN_USE_TEXT.search(str(current)):
            return True
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend((current.__cause__, current.__context__))
    return False
