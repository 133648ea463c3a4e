"""The socket table: ``sockets()``, ``summary()``, ``who_holds()`` and ``ephemeral_usage()``.

Data comes from NETLINK_SOCK_DIAG (what ``ss`` uses), with a /proc/net fallback when netlink is
refused; aggregation runs in Rust while the dump streams. Linux only: elsewhere the functions raise
:class:`twfix.UnsupportedPlatformError`.
"""

from __future__ import annotations

import enum
import json
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from twfix import _twfix
from twfix._html import table
from twfix.errors import UnsupportedPlatformError

__all__ = [
    "Addr",
    "EphemeralUsage",
    "Holders",
    "PortHolder",
    "SocketEntry",
    "SocketSummary",
    "TcpState",
    "ephemeral_usage",
    "sockets",
    "summary",
    "who_holds",
]


class TcpState(enum.StrEnum):
    """Kernel socket states (include/net/tcp_states.h). UDP sockets report CLOSE or ESTABLISHED."""

    ESTABLISHED = "ESTABLISHED"
    SYN_SENT = "SYN_SENT"
    SYN_RECV = "SYN_RECV"
    FIN_WAIT1 = "FIN_WAIT1"
    FIN_WAIT2 = "FIN_WAIT2"
    TIME_WAIT = "TIME_WAIT"
    CLOSE = "CLOSE"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    LISTEN = "LISTEN"
    CLOSING = "CLOSING"
    NEW_SYN_RECV = "NEW_SYN_RECV"
    BOUND_INACTIVE = "BOUND_INACTIVE"

    @property
    def number(self) -> int:
        return _NUMBER[self]

    @classmethod
    def from_number(cls, n: int) -> TcpState:
        return _BY_NUMBER[n]


_NUMBER: Final = {s: i for i, s in enumerate(TcpState, 1)}
_BY_NUMBER: Final = {i: s for s, i in _NUMBER.items()}
_ALL_STATES: Final = 0xFFFFFFFF
_ALIASES: Final = {"TIME-WAIT": "TIME_WAIT", "FIN-WAIT-1": "FIN_WAIT1", "FIN-WAIT-2": "FIN_WAIT2"}


class Addr(NamedTuple):
    ip: str
    port: int


class SocketEntry(NamedTuple):
    """One socket (psutil-like): ``expires`` is the seconds left on its timer, or None."""

    family: socket.AddressFamily
    state: TcpState
    laddr: Addr
    raddr: Addr | None
    uid: int
    inode: int
    expires: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "state": str(self.state),
            "laddr": list(self.laddr),
            "raddr": list(self.raddr) if self.raddr else None,
            "uid": self.uid,
            "inode": self.inode,
            "expires": self.expires,
        }


_KINDS: Final = {
    "tcp": ("tcp", None),
    "tcp4": ("tcp", socket.AF_INET),
    "tcp6": ("tcp", socket.AF_INET6),
    "udp": ("udp", None),
    "udp4": ("udp", socket.AF_INET),
    "udp6": ("udp", socket.AF_INET6),
}


def _require_linux() -> None:
    if not sys.platform.startswith("linux") or not hasattr(_twfix, "dump_entries"):
        raise UnsupportedPlatformError(
            f"the socket table is read through Linux sock_diag; unavailable on {sys.platform}"
        )


def _kind(kind: object) -> tuple[str, int | None]:
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str, not {type(kind).__name__}")
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}; got {kind!r}") from None


def _state_mask(states: Iterable[TcpState | str] | None) -> int:
    if states is None:
        return _ALL_STATES
    if isinstance(states, str):
        states = [states]
    mask = 0
    for s in states:
        if not isinstance(s, str):
            raise TypeError(f"states must hold TcpState values or state names, not {type(s).__name__}")
        name = _ALIASES.get(s.upper(), s.upper())
        try:
            mask |= 1 << TcpState(name).number
        except ValueError:
            raise ValueError(f"unknown socket state {s!r}; known: {', '.join(TcpState)}") from None
    return mask


def _port(port: object, name: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{name} must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be in 0..65535, got {port}")
    return port


# What the native dump_entries() builds SocketEntry tuples from: families, and states by number (0 unused).
_FAMILY_OBJS: Final = [socket.AF_INET, socket.AF_INET6]
_STATE_OBJS: Final = [TcpState.CLOSE] + [_BY_NUMBER[n] for n in range(1, 14)]


def sockets(
    kind: str = "tcp",
    *,
    states: Iterable[TcpState | str] | None = None,
    port: int | None = None,
    source: str = "auto",
) -> list[SocketEntry]:
    """The sockets of ``kind`` ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"), like psutil.net_connections.

    Args:
        states: only these states (``TcpState`` values or names such as ``"TIME_WAIT"``); the kernel filters.
        port: only sockets whose local port is this.
        source: "auto" (netlink, /proc when refused), "netlink" or "proc".
    """
    proto, family = _kind(kind)
    mask = _state_mask(states)
    want = None if port is None else _port(port)
    _require_linux()
    return _dump(proto, family, mask, want, source)


def _dump(proto: str, family: int | None, mask: int, port: int | None, source: str = "auto") -> list[SocketEntry]:
    entries: list[SocketEntry] = _twfix.dump_entries(
        proto, mask, port, source, SocketEntry, Addr, _FAMILY_OBJS, _STATE_OBJS
    )
    if family is not None:
        return [e for e in entries if e.family == family]
    return entries


@dataclass(frozen=True)
class SocketSummary:
    """Counts gathered while the dump streamed; its size does not depend on the number of sockets."""

    kind: str
    total: int
    by_state: dict[TcpState, int]
    top_local_ports: dict[TcpState, list[tuple[int, int]]]
    top_remote: dict[TcpState, list[tuple[Addr, int]]]
    time_wait_histogram: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "total": self.total,
            "by_state": {str(k): v for k, v in self.by_state.items()},
            "top_local_ports": {str(k): [list(p) for p in v] for k, v in self.top_local_ports.items()},
            "top_remote": {str(k): [[a.ip, a.port, n] for a, n in v] for k, v in self.top_remote.items()},
            "time_wait_histogram": self.time_wait_histogram,
        }

    def __str__(self) -> str:
        lines = [f"{self.total} {self.kind} sockets"]
        for state, n in sorted(self.by_state.items(), key=lambda kv: -kv[1]):
            ports = ", ".join(f"{p} ({c})" for p, c in self.top_local_ports.get(state, [])[:3])
            lines.append(f"  {state:<13} {n:>8}   top local ports: {ports}")
        if self.by_state.get(TcpState.TIME_WAIT):
            hist = ", ".join(f"{k}: {v}" for k, v in self.time_wait_histogram.items())
            lines.append(f"  TIME_WAIT seconds left: {hist}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [
            (str(s), str(n), ", ".join(f"{p} ({c})" for p, c in self.top_local_ports.get(s, [])[:5]))
            for s, n in sorted(self.by_state.items(), key=lambda kv: -kv[1])
        ]
        caption = f"{self.total} {self.kind} sockets"
        return table("twfix-summary", caption, ("state", "count", "top local ports"), rows)


_HIST_LABELS: Final = ("0-10s", "10-20s", "20-30s", "30-40s", "40-50s", "50-60s", ">=60s")


def summary(kind: str = "tcp", *, top: int = 10, source: str = "auto") -> SocketSummary:
    """Counts by state, top local ports and remote peers per state, and a TIME-WAIT age histogram."""
    proto, family = _kind(kind)
    if family is not None:
        raise ValueError(f"summary() covers both families; use kind='tcp' or 'udp', not {kind!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a non-negative int, got {top!r}")
    _require_linux()
    total, counts, ports, remotes, hist = _twfix.summarize(proto, _ALL_STATES, top, source)
    by_state = {_BY_NUMBER[s]: n for s, n in counts if s in _BY_NUMBER}
    top_ports: dict[TcpState, list[tuple[int, int]]] = {}
    for s, p, n in ports:
        if s in _BY_NUMBER:
            top_ports.setdefault(_BY_NUMBER[s], []).append((p, n))
    top_remote: dict[TcpState, list[tuple[Addr, int]]] = {}
    for s, _fam, ip, p, n in remotes:
        if s in _BY_NUMBER:
            top_remote.setdefault(_BY_NUMBER[s], []).append((Addr(ip, p), n))
    return SocketSummary(kind, total, by_state, top_ports, top_remote, dict(zip(_HIST_LABELS, hist, strict=True)))


class PortHolder(NamedTuple):
    """A socket bound to the port, and the process holding it (None for TIME-WAIT or unseen owners)."""

    state: TcpState
    laddr: Addr
    raddr: Addr | None
    uid: int
    inode: int
    pid: int | None = None
    name: str | None = None
    cmdline: tuple[str, ...] = ()

    @property
    def owned(self) -> bool:
        return self.pid is not None


@dataclass(frozen=True)
class Holders:
    """Answer of :func:`who_holds`: the holders and a note on what could not be seen."""

    port: int
    kind: str
    holders: tuple[PortHolder, ...]
    denied: int = 0
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "kind": self.kind,
            "holders": [{**h._asdict(), "state": str(h.state)} for h in self.holders],
            "denied": self.denied,
            "note": self.note,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def _repr_html_(self) -> str:
        rows = [
            (
                str(h.state),
                f"{h.laddr.ip}:{h.laddr.port}",
                f"{h.raddr.ip}:{h.raddr.port}" if h.raddr else "",
                str(h.pid) if h.pid is not None else "",
                h.name or "",
                " ".join(h.cmdline),
            )
            for h in self.holders
        ]
        caption = f"{self.kind} port {self.port}" + (f" ({self.note})" if self.note else "")
        return table("twfix-holders", caption, ("state", "local", "remote", "pid", "program", "command"), rows)

    def __str__(self) -> str:
        if not self.holders:
            return f"nothing holds {self.kind} port {self.port}"
        lines = [f"{self.kind} port {self.port}:"]
        for h in self.holders:
            peer = f" -> {h.raddr.ip}:{h.raddr.port}" if h.raddr else ""
            if h.state == TcpState.TIME_WAIT:
                who = "no process (TIME-WAIT belongs to the kernel)"
            elif h.pid is not None:
                who = f"pid {h.pid} {h.name} (uid {h.uid}): {' '.join(h.cmdline)[:120]}"
            else:
                who = f"uid {h.uid}, process not visible"
            lines.append(f"  {h.state:<12} {h.laddr.ip}:{h.laddr.port}{peer}  {who}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def who_holds(port: int, kind: str = "tcp") -> Holders:
    """The sockets bound to ``port`` with their owning processes (pid, name, command line, uid, state).

    Maps socket inodes to processes by scanning /proc only until all are found. Without root, other
    users' processes cannot be inspected: their sockets are listed without an owner and ``note`` says so.
    """
    proto, family = _kind(kind)
    port = _port(port)
    _require_linux()
    return holders_of(_dump(proto, family, _ALL_STATES, port), port, kind)


def port_entries(kind: str, port: int) -> list[SocketEntry]:
    """Every socket of ``kind`` ("tcp"/"udp") whose local port is ``port`` (for the conflict explanation)."""
    return _dump(kind, None, _ALL_STATES, port)


def holders_of(entries: list[SocketEntry], port: int, kind: str) -> Holders:
    """Attach owning processes to socket entries (shared by who_holds and the conflict explanation)."""
    pairs, denied = _twfix.socket_owners([e.inode for e in entries if e.inode])
    pid_of = dict(pairs)
    holders = []
    for e in entries:
        pid = pid_of.get(e.inode) if e.inode else None
        name = cmd = None
        if pid is not None:
            comm = _read(f"/proc/{pid}/comm")
            raw = _read(f"/proc/{pid}/cmdline")
            name = comm.decode(errors="replace").strip() if comm else None
            cmd = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a) if raw else ()
        holders.append(PortHolder(e.state, e.laddr, e.raddr, e.uid, e.inode, pid, name, cmd or ()))
    unseen = [h for h in holders if h.inode and h.pid is None]
    note = None
    if unseen and denied:
        note = (
            f"{len(unseen)} socket(s) have no visible owner: {denied} process(es) of other users could not be "
            "inspected (run as root to see them)"
        )
    elif unseen:
        note = f"{len(unseen)} socket(s) have no visible owner (the process may have exited)"
    return Holders(port, kind, tuple(holders), denied, note)


class EphemeralUsage(NamedTuple):
    """Source-port use toward one destination: the 4-tuple arithmetic behind EADDRNOTAVAIL."""

    local_ip: str
    remote_ip: str
    remote_port: int
    in_use: int
    time_wait: int
    capacity: int
    headroom: int


def port_range() -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The ephemeral range and the reserved port ranges of this network namespace."""
    from twfix import sysctl

    rng = sysctl.get("net.ipv4.ip_local_port_range")
    reserved = sysctl.get("net.ipv4.ip_local_reserved_ports")
    if not (isinstance(rng, tuple) and len(rng) == 2):
        raise ValueError(f"unexpected net.ipv4.ip_local_port_range value {rng!r}")
    ranges = [(int(a), int(b)) for a, b in reserved] if isinstance(reserved, list) else []
    return (int(rng[0]), int(rng[1])), ranges


def usable_ports(lo: int, hi: int, reserved: list[tuple[int, int]]) -> int:
    """Size of the ephemeral range minus the reserved ports inside it."""
    return hi - lo + 1 - sum(max(0, min(hi, b) - max(lo, a) + 1) for a, b in reserved)


def ephemeral_usage() -> list[EphemeralUsage]:
    """Per destination (local ip, remote ip, remote port): ephemeral ports in use and in TIME-WAIT,
    against the usable range (ip_local_port_range minus ip_local_reserved_ports), busiest first."""
    _require_linux()
    (lo, hi), reserved = port_range()
    capacity = usable_ports(lo, hi, reserved)
    rows = _twfix.ephemeral_usage(lo, hi, [(a, b) for a, b in reserved if a <= 65535 and b <= 65535], "auto")
    return [
        EphemeralUsage(local, remote, rport, used, tw, capacity, capacity - used - tw)
        for _fam, local, remote, rport, used, tw in rows
    ]
