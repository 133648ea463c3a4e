"""The socket table: ``sockets()``, ``summary()``, ``who_holds()`` and ``ephemeral_usage()``.

Data comes from NETLINK_SOCK_DIAG (what ``ss`` uses), with a /proc/net fallback when netlink is
refused; aggregation runs in Rust while the dump streams.
"""

from __future__ import annotations

import enum
import os
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from twfix import _twfix, features, kernel, sysctl
from twfix._args import check_count, check_kind, check_port, namespace_path
from twfix._html import SEVERITY_COLOURS, Cell, table
from twfix._text import printable
from twfix.errors import KernelCannotTellWarning
from twfix.kernel import PortRange

__all__ = [
    "Addr",
    "EphemeralUsage",
    "Listener",
    "SocketEntry",
    "SocketList",
    "SocketSummary",
    "TableSnapshot",
    "TcpState",
    "UsageList",
    "ephemeral_usage",
    "format_endpoint",
    "port_entries",
    "snapshot",
    "sockets",
    "summary",
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


# State numbers and ss's spellings come from the kernel's table (twfix.kernel), never from enum order.
_NUMBER: Final = {TcpState(name): number for name, number, _ss in kernel.TCP_STATES}
_BY_NUMBER: Final = {i: s for s, i in _NUMBER.items()}
_ALL_STATES: Final = 0xFFFFFFFF
# Whole-table walks leave bound-only sockets out (see kernel.WALK_STATES).
_WALK_STATES: Final = kernel.WALK_STATES
_BOUND_ONLY: Final = kernel.BOUND_ONLY_STATES
BOUND_ONLY_UNSEEN: Final = (
    "this kernel's socket dump does not report TCP sockets that are bound but neither listening nor connected "
    "(sock_diag's BOUND_INACTIVE, Linux 6.8 and later): any such socket is missing from this answer"
)
# ss's spellings (UNCONN: an unconnected UDP socket, which the kernel calls CLOSE): names a filter accepts
# besides twfix's own.
_ALIASES: Final = {ss.upper(): name for name, _number, ss in kernel.TCP_STATES if ss.upper() != name}


class Addr(NamedTuple):
    ip: str
    port: int

    def __str__(self) -> str:
        return format_endpoint(self.ip, self.port)


def format_endpoint(ip: str, port: int) -> str:
    """``ip:port`` as ``ss`` prints it: IPv6 addresses always in brackets (``[::1]:8080``)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class SocketEntry(NamedTuple):
    """One socket (psutil-like): ``expires`` is the seconds left on its timer, or None; ``v6only`` is the
    ``IPV6_V6ONLY`` flag of an IPv6 listening or unconnected socket as the kernel reports it (None when
    not reported: IPv4, other states, or the /proc source); ``retrans`` counts the retransmissions (or
    probes) its running timer has made."""

    family: socket.AddressFamily
    state: TcpState
    laddr: Addr
    raddr: Addr | None
    uid: int
    inode: int
    expires: float | None
    v6only: bool | None = None
    retrans: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "state": str(self.state),
            "laddr": list(self.laddr),
            "raddr": list(self.raddr) if self.raddr else None,
            "uid": self.uid,
            "inode": self.inode,
            "expires": self.expires,
            "v6only": self.v6only,
            "retrans": self.retrans,
        }


# Rows a text rendering shows before "N more" (the HTML tables cut likewise).
TEXT_ROWS: Final = 20


class SocketList(list[SocketEntry]):
    """The result of :func:`sockets`: a list, with ``to_records()`` (pandas-ready) and an HTML table."""

    def to_records(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self]

    def render(self, rows: int = TEXT_ROWS) -> str:
        """A text table of the first ``rows`` sockets and how many more there are (addresses escaped)."""
        return _cut(f"{len(self)} sockets", [_socket_line(e) for e in self[:rows]], len(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's text rendering: a cut table, not the whole list's repr (99 KB for 465 sockets)."""
        printer.text(self.render())

    def _repr_html_(self) -> str:
        rows = (
            (
                str(e.state),
                str(e.laddr),
                str(e.raddr) if e.raddr else "",
                str(e.uid),
                f"{e.expires:.1f} s" if e.expires is not None else "",
            )
            for e in self
        )
        headers = ("state", "local", "peer", "uid", "timer")
        return table("twfix-sockets", f"{len(self)} sockets", headers, rows, total=len(self))


def _kind(kind: object) -> tuple[str, int | None]:
    return kernel.KINDS[check_kind(kind, tuple(kernel.KINDS))]


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


# What the native dump_entries() builds SocketEntry tuples from: families, and states by number (0 unused).
_FAMILY_OBJS: Final = [socket.AF_INET, socket.AF_INET6]
_STATE_OBJS: Final = [TcpState.CLOSE] + [_BY_NUMBER[n] for n in range(1, max(_BY_NUMBER) + 1)]


def sockets(
    kind: str = "tcp",
    *,
    states: Iterable[TcpState | str] | None = None,
    port: int | None = None,
    source: str = "auto",
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> SocketList:
    """The sockets of ``kind`` ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"), like psutil.net_connections.

    Args:
        states: only these states (``TcpState`` values or names such as ``"TIME_WAIT"`` or ``ss``'s
            ``"time-wait"``); the kernel filters. Without ``states`` or ``port``, TCP sockets that are bound
            but neither listening nor connected (``BOUND_INACTIVE``) are left out, as ``ss -a`` leaves them
            out: asking for them makes the kernel walk the host's whole bind hash too. Name the state, or
            give a ``port``, to see them.
        port: only sockets whose local port is this.
        source: "auto" (netlink, /proc when refused), "netlink" or "proc".
        netns: read another network namespace (a path such as ``/run/netns/NAME``).
        pid: read the network namespace of this process.
    """
    proto, family = _kind(kind)
    mask = _state_mask(states)
    want = None if port is None else check_port(port)
    if states is None and want is None and proto == "tcp":
        mask = _WALK_STATES
    elif proto == "tcp" and states is not None and mask & _BOUND_ONLY and not features.bound_inactive():
        warnings.warn(KernelCannotTellWarning(BOUND_ONLY_UNSEEN), stacklevel=2)
    return SocketList(_dump(proto, family, mask, want, source, namespace_path(netns, pid)))


def _dump(
    proto: str, family: int | None, mask: int, port: int | None, source: str = "auto", ns: str | None = None
) -> list[SocketEntry]:
    entries: list[SocketEntry] = _twfix.dump_entries(
        proto, mask, port, source, SocketEntry, Addr, _FAMILY_OBJS, _STATE_OBJS, ns
    )
    if family is not None:
        return [e for e in entries if e.family == family]
    return entries


@dataclass(frozen=True)
class SocketSummary:
    """Counts gathered while the dump streamed; its size does not depend on the number of sockets.

    ``time_wait_server_side`` counts TIME-WAITs on a listening port, or on a port connect() is never given
    (outside the ephemeral range): the server closed first; the rest of ``by_state[TIME_WAIT]`` are
    client-side. In ``top_remote``, the peers of the server side of connections (clients, each on its own
    ephemeral port) are counted per address, with port 0. ``exact`` is False when the kernel flagged every attempt
    at the dump as interrupted (the table changed during the walk).
    """

    kind: str
    total: int
    by_state: dict[TcpState, int]
    top_local_ports: dict[TcpState, list[tuple[int, int]]]
    top_remote: dict[TcpState, list[tuple[Addr, int]]]
    time_wait_histogram: dict[str, int] = field(default_factory=dict)
    time_wait_server_side: int = 0
    exact: bool = True

    def __str__(self) -> str:
        return self.render()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's text rendering (a notebook's text/plain): the summary, not the dataclass's fields."""
        printer.text(self.render())

    def render(self, top: int = 5) -> str:
        """The summary as ``twfix summary`` prints it (``ss -s`` with the top ports and peers per state);
        peers on a port 0 are the clients of a local listener, counted per address."""
        lines = [
            f"{self.total} {self.kind.upper()} sockets" + ("" if self.exact else " (the table changed during the dump)")
        ]
        width = max((len(str(state)) for state in self.by_state), default=5)
        for state, n in sorted(self.by_state.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {state!s:<{width}}  {n:>9}")
        for state, ports in sorted(self.top_local_ports.items(), key=lambda kv: -self.by_state.get(kv[0], 0)):
            shown = ", ".join(f"{p} ({c})" for p, c in ports[:top])
            remote = self.top_remote.get(state, [])[:top]
            peers = ", ".join(f"{a if a.port else a.ip + ' clients'} ({c})" for a, c in remote)
            lines.append(f"{state}:")
            lines.append(f"  top local ports: {shown}")
            if peers:
                lines.append(f"  top peers: {printable(peers)}")
        tw = self.by_state.get(TcpState.TIME_WAIT, 0)
        if tw:
            ages = ", ".join(f"{k}: {v}" for k, v in self.time_wait_histogram.items() if v)
            server = self.time_wait_server_side
            lines.append(f"TIME-WAIT seconds left: {ages}")
            lines.append(
                f"TIME-WAIT by side: {server} server-side (on a listening or service port: servers here closed "
                f"first), {tw - server} client-side (clients here closed first)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "total": self.total,
            "by_state": {str(k): v for k, v in self.by_state.items()},
            "top_local_ports": {str(k): [list(p) for p in v] for k, v in self.top_local_ports.items()},
            "top_remote": {str(k): [[a.ip, a.port, n] for a, n in v] for k, v in self.top_remote.items()},
            "time_wait_histogram": self.time_wait_histogram,
            "time_wait_server_side": self.time_wait_server_side,
            "exact": self.exact,
        }

    def to_records(self) -> list[dict[str, Any]]:
        """One record per state: count and top local ports (pandas-ready)."""
        return [
            {"state": str(s), "count": n, "top_local_ports": self.top_local_ports.get(s, [])}
            for s, n in sorted(self.by_state.items(), key=lambda kv: -kv[1])
        ]

    def _repr_html_(self) -> str:
        rows = [
            (str(s), str(n), ", ".join(f"{p} ({c})" for p, c in self.top_local_ports.get(s, [])[:5]))
            for s, n in sorted(self.by_state.items(), key=lambda kv: -kv[1])
        ]
        caption = f"{self.total} {self.kind} sockets"
        return table("twfix-summary", caption, ("state", "count", "top local ports"), rows)


_HIST_LABELS: Final = ("0-10s", "10-20s", "20-30s", "30-40s", "40-50s", "50-60s", ">=60s")


class Listener(NamedTuple):
    """A listening socket as the snapshot saw it."""

    family: socket.AddressFamily
    laddr: Addr
    uid: int
    inode: int
    v6only: bool | None


class EphemeralUsage(NamedTuple):
    """Source-port use toward one destination: the 4-tuple arithmetic behind EADDRNOTAVAIL."""

    local_ip: str
    remote_ip: str
    remote_port: int
    in_use: int
    time_wait: int
    capacity: int
    headroom: int


def _cut(title: str, lines: list[str], total: int) -> str:
    """A text rendering: the title, the lines shown, and how many more there are."""
    more = [f"  ... {total - len(lines)} more"] if total > len(lines) else []
    return "\n".join([title, *lines, *more])


def _socket_line(e: SocketEntry) -> str:
    peer = f" -> {e.raddr}" if e.raddr else ""
    timer = f"  {e.expires:.1f} s" if e.expires is not None else ""
    return printable(f"  {e.state!s:<14} {e.laddr}{peer}  uid {e.uid}{timer}")


def _usage_line(u: EphemeralUsage) -> str:
    where = format_endpoint(u.remote_ip, u.remote_port)
    return printable(f"  {u.local_ip} -> {where}: {u.in_use} in use, {u.time_wait} TIME-WAIT, {u.headroom} left")


class UsageList(list[EphemeralUsage]):
    """The result of :func:`ephemeral_usage`: a list, with ``to_records()`` and an HTML table."""

    def to_records(self) -> list[dict[str, Any]]:
        return [u._asdict() for u in self]

    def render(self, rows: int = TEXT_ROWS) -> str:
        """A text table of the busiest ``rows`` destinations and how many more there are."""
        return _cut(f"ephemeral ports per destination ({len(self)})", [_usage_line(u) for u in self[:rows]], len(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.render())

    def _repr_html_(self) -> str:
        def cell(u: EphemeralUsage) -> Cell:
            level = "error" if u.headroom <= 0 else "warning" if u.headroom <= 0.1 * u.capacity else "ok"
            return (str(u.headroom), SEVERITY_COLOURS[level])

        rows = (
            (u.local_ip, format_endpoint(u.remote_ip, u.remote_port), str(u.in_use), str(u.time_wait), cell(u))
            for u in self
        )
        headers = ("local", "destination", "in use", "TIME-WAIT", "headroom")
        return table("twfix-usage", f"ephemeral ports per destination ({len(self)})", headers, rows, total=len(self))


@dataclass(frozen=True)
class TableSnapshot:
    """One walk of the socket table, aggregated natively: what ``summary()``, ``ephemeral_usage()`` and
    the doctor read. ``usage`` is empty unless a :class:`~twfix.sysctl.PortRange` was given."""

    summary: SocketSummary
    listeners: tuple[Listener, ...]
    usage: tuple[EphemeralUsage, ...]
    ports: PortRange | None = None
    # Client-side TIME-WAITs toward destinations that are not loopback, over every destination (also
    # those that ``usage_limit`` kept out of ``usage``).
    outgoing_time_wait_not_loopback: int = 0

    def _repr_html_(self) -> str:
        listeners = table(
            "twfix-listeners",
            f"{len(self.listeners)} listeners",
            ("local", "uid", "v6only"),
            ((str(s.laddr), str(s.uid), "" if s.v6only is None else str(s.v6only)) for s in self.listeners),
            total=len(self.listeners),
        )
        return self.summary._repr_html_() + listeners + UsageList(self.usage)._repr_html_()


def snapshot(
    kind: str = "tcp",
    *,
    top: int = 10,
    ports: PortRange | None = None,
    source: str = "auto",
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
    usage_limit: int | None = None,
) -> TableSnapshot:
    """Walk the table once: counts, top ports and peers, listeners and (with ``ports``) ephemeral use
    per destination (the ``usage_limit`` busiest only, or every destination with None: thousands of
    destinations cost milliseconds to turn into Python objects). For TCP a listen-only dump comes first;
    it costs next to nothing (the kernel skips the established hash)."""
    proto, family = _kind(kind)
    if family is not None:
        raise ValueError(f"a snapshot covers both families; use kind='tcp' or 'udp', not {kind!r}")
    top = check_count(top, "top")
    ns = namespace_path(netns, pid)
    # The range tells server-side from client-side TIME-WAIT even without usage counts (``ports``).
    known = ports
    if known is None:
        try:
            known = sysctl.port_range(netns=ns)
        except (OSError, LookupError, ValueError):
            known = None
    port_set = known.port_set() if known is not None else b""
    total, counts, top_ports, remotes, hist, tw_server, listeners, usage, exact, outside = _twfix.snapshot(
        proto,
        _WALK_STATES if proto == "tcp" else _ALL_STATES,  # the mask lives in twfix.kernel only
        top,
        port_set,
        ports is not None,
        source,
        ns,
        0 if usage_limit is None else max(check_count(usage_limit, "usage_limit"), 1),  # 0: every one
    )
    by_state = {_BY_NUMBER[s]: n for s, n in counts if s in _BY_NUMBER}
    ports_by_state: dict[TcpState, list[tuple[int, int]]] = {}
    for s, p, n in top_ports:
        if s in _BY_NUMBER:
            ports_by_state.setdefault(_BY_NUMBER[s], []).append((p, n))
    remote_by_state: dict[TcpState, list[tuple[Addr, int]]] = {}
    for s, _fam, ip, p, n in remotes:
        if s in _BY_NUMBER:
            remote_by_state.setdefault(_BY_NUMBER[s], []).append((Addr(ip, p), n))
    counted = SocketSummary(
        kind,
        total,
        by_state,
        ports_by_state,
        remote_by_state,
        dict(zip(_HIST_LABELS, hist, strict=True)),
        tw_server,
        exact,
    )
    capacity = ports.usable if ports is not None else 0
    return TableSnapshot(
        counted,
        tuple(
            Listener(_FAMILY_OBJS[fam == socket.AF_INET6], Addr(ip, p), uid, inode, v6)
            for fam, ip, p, uid, inode, v6 in listeners
        ),
        tuple(
            EphemeralUsage(local, remote, rport, used, tw, capacity, capacity - used - tw)
            for _fam, local, remote, rport, used, tw in usage
        ),
        ports,
        outside,
    )


def summary(
    kind: str = "tcp",
    *,
    top: int = 10,
    source: str = "auto",
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> SocketSummary:
    """Counts by state, top local ports and remote peers per state, and a TIME-WAIT age histogram."""
    return snapshot(kind, top=top, source=source, netns=netns, pid=pid).summary


def ephemeral_usage(*, netns: str | os.PathLike[str] | None = None, pid: int | None = None) -> UsageList:
    """Per destination (local ip, remote ip, remote port): ephemeral ports in use and in TIME-WAIT,
    against the usable range (ip_local_port_range minus ip_local_reserved_ports), busiest first."""
    ns = namespace_path(netns, pid)
    return UsageList(snapshot("tcp", top=0, ports=sysctl.port_range(netns=ns), netns=ns).usage)


def port_entries(
    kind: str, port: int, states: Iterable[TcpState | str] | None = None, ns: str | None = None
) -> list[SocketEntry]:
    """The sockets of ``kind`` ("tcp"/"udp") whose local port is ``port`` (for the conflict explanation),
    optionally only in ``states`` (a LISTEN-only dump skips the established hash: next to free), in the
    namespace at path ``ns``."""
    return _dump(kind, None, _state_mask(states), port, "auto", ns)
