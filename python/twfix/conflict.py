"""Why would (or did) a bind fail? ``twfix.explain`` and the message of :class:`AddressInUseError`.

The verdict rests on two witnesses: a probe bind made right now (with and without the reuse options),
which is what the kernel actually decides, and the socket table, which says who is in the way:
live sockets with their owning processes, and TIME-WAIT remnants with their remaining time.

Kernel facts used (see the project's reference on Linux TIME-WAIT):

* A TIME-WAIT socket carries the SO_REUSEADDR flag of the socket it came from (an accepted connection
  inherits it from its listener); a new bind passes it only if both have the flag.
* TIME-WAIT lasts a fixed 60 s on Linux (no sysctl changes that).
* A wildcard address (0.0.0.0, ::) overlaps every specific address of its family.
* ``ip_local_reserved_ports`` only keeps ports from automatic assignment; explicit binds ignore it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from twfix import _twfix, sysctl
from twfix._args import check_host, check_kind, check_port, resolve
from twfix._html import SEVERITY_COLOURS, table
from twfix.diag import SocketEntry, TcpState, format_endpoint, holders_of, port_entries
from twfix.errors import AddressInUseError
from twfix.sysctl import PortRange

__all__ = ["Explanation", "Holder", "address_in_use", "explain"]

Kind = Literal["tcp", "udp"]
_KINDS: Final = ("tcp", "udp")


@dataclass(frozen=True)
class Holder:
    """A socket bound to the port in question, with its owner when it could be found."""

    state: str
    laddr: tuple[str, int]
    raddr: tuple[str, int] | None
    uid: int | None
    pid: int | None = None
    name: str | None = None
    cmdline: tuple[str, ...] = ()

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.name})" if self.pid is not None else "an unknown process"
        if self.pid is None and self.uid is not None:
            who += f" of uid {self.uid}"
        peer = f" to {format_endpoint(*self.raddr)}" if self.raddr else ""
        return f"{self.state} {format_endpoint(*self.laddr)}{peer}, held by {who}"


@dataclass(frozen=True)
class Explanation:
    """Whether binding ``host:port`` would succeed now, with and without reuse options, and why.

    ``verdict`` is one line; ``reasons`` and ``advice`` expand it. ``can_bind`` is the result of a
    plain bind, ``can_bind_with_reuse`` of a bind with twfix's options (SO_REUSEADDR for TCP,
    SO_REUSEPORT for UDP), both probed on the live kernel.
    """

    kind: str
    host: str
    address: tuple[str, int]
    verdict: str
    can_bind: bool
    can_bind_with_reuse: bool
    reasons: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()
    holders: tuple[Holder, ...] = ()
    time_wait: int = 0
    time_wait_reuseaddr: bool | None = None
    frees_in: float | None = None
    in_ephemeral_range: bool = False
    reserved: bool = False
    privileged: bool = False
    incomplete: str | None = field(default=None)

    def __str__(self) -> str:
        lines = [self.verdict]
        lines += [f"  - {r}" for r in self.reasons]
        lines += [f"  > {a}" for a in self.advice]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def _repr_html_(self) -> str:
        ok = self.can_bind or self.can_bind_with_reuse
        rows = [(("reason", SEVERITY_COLOURS["info"]), r) for r in self.reasons]
        rows += [(("advice", SEVERITY_COLOURS["ok"]), a) for a in self.advice]
        caption = self.verdict
        colour = SEVERITY_COLOURS["ok" if ok else "error"]
        return (
            table("twfix-explanation", caption, ("", ""), rows)
            .replace("<p>", f'<p style="color:{colour}"><b>', 1)
            .replace("</p>", "</b></p>", 1)
        )


def _port_settings() -> tuple[PortRange | None, int]:
    """(ephemeral ports, ip_unprivileged_port_start) of the caller's namespace; None where unreadable."""
    try:
        ports: PortRange | None = sysctl.port_range()
    except (OSError, LookupError, ValueError):
        ports = None
    try:
        start = sysctl.get("net.ipv4.ip_unprivileged_port_start")
    except (OSError, LookupError):
        start = 1024
    return ports, start if isinstance(start, int) else 1024


def _probe(kind: str, family: int, ip: str, port: int, flags: int) -> int:
    """Bind a throw-away socket the way the caller would; returns 0 or the errno."""
    sotype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    if family == socket.AF_INET6:
        flags |= _twfix.F_V6ONLY
    with socket.socket(family, sotype) as probe:
        try:
            _twfix.bind_socket(probe.fileno(), family, sotype, ip, port, 0, flags, -1, None)
        except OSError as exc:
            return exc.errno or errno.EIO
    return 0


def _is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::", "::ffff:0.0.0.0")


def _unmap(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _overlaps(family: int, ip: str, entry_family: int, entry_ip: str) -> bool:
    """Could a socket bound to entry_ip conflict with a bind to ip (same port)?"""
    if family == entry_family:
        return _is_wildcard(ip) or _is_wildcard(entry_ip) or ip == entry_ip
    if family == socket.AF_INET and entry_family == socket.AF_INET6:
        # An IPv6 socket covers IPv4 only as a dual-stack wildcard or through a v4-mapped address.
        return entry_ip == "::" or (
            entry_ip.startswith("::ffff:") and (_is_wildcard(ip) or _unmap(entry_ip) in (ip, "0.0.0.0"))
        )
    return False  # twfix binds IPv6 with IPV6_V6ONLY, which never conflicts with IPv4 sockets


def _owners(entries: list[SocketEntry], kind: str, port: int) -> tuple[list[Holder], str | None]:
    """Live (non-TIME-WAIT) sockets as holders with their owning processes."""
    found = holders_of(entries, port, kind)
    out = [
        Holder(
            "UNCONN" if kind == "udp" and h.state == TcpState.CLOSE else str(h.state),
            (h.laddr.ip, h.laddr.port),
            (h.raddr.ip, h.raddr.port) if h.raddr else None,
            h.uid,
            h.pid,
            h.name,
            h.cmdline,
        )
        for h in found.holders
    ]
    return out, found.note


def _analyse(kind: str, host: str, family: int, ip: str, port: int, reuse_flags: int) -> Explanation:
    address = (ip, port)
    where = f"{format_endpoint(ip, port)}/{kind}"
    if port == 0:
        return Explanation(
            kind, host, address, f"{where}: port 0 asks the kernel for any free port", True, True, advice=()
        )
    plain = _probe(kind, family, ip, port, 0)
    reuse = _probe(kind, family, ip, port, reuse_flags)
    ephemeral, unpriv = _port_settings()
    in_range = ephemeral is not None and ephemeral.contains(port)
    reserved = ephemeral is not None and ephemeral.is_reserved(port)
    privileged = port < unpriv
    reasons: list[str] = []
    advice: list[str] = []

    if plain == errno.EACCES or reuse == errno.EACCES:
        return Explanation(
            kind,
            host,
            address,
            f"{where}: port {port} is privileged (below ip_unprivileged_port_start={unpriv}); "
            "binding it needs root or CAP_NET_BIND_SERVICE",
            False,
            False,
            advice=("use a port >= ip_unprivileged_port_start, or grant CAP_NET_BIND_SERVICE",),
            privileged=True,
        )
    if plain == errno.EADDRNOTAVAIL:
        return Explanation(
            kind,
            host,
            address,
            f"{where}: {ip} is not an address of this host (EADDRNOTAVAIL), so nothing can bind it",
            False,
            False,
            advice=("bind an address that is configured on an interface, or the wildcard",),
        )

    rows = [e for e in port_entries(kind, port) if _overlaps(family, ip, e.family, e.laddr.ip)]
    tw_rows = [e for e in rows if e.state == TcpState.TIME_WAIT]
    live_rows = [e for e in rows if e.state != TcpState.TIME_WAIT]
    live: list[Holder] = []
    incomplete = None
    if live_rows:
        live, incomplete = _owners(live_rows, kind, port)
    frees = max((e.expires for e in tw_rows if e.expires is not None), default=None)
    frees = round(frees, 1) if frees is not None else None
    tw_reuse: bool | None = None
    if tw_rows and not live and kind == "tcp":
        tw_reuse = reuse == 0

    listeners = [h for h in live if h.state == "LISTEN" or kind == "udp"]
    others = [h for h in live if h not in listeners]
    opt = "SO_REUSEADDR" if kind == "tcp" else "SO_REUSEPORT"

    if plain == 0:
        verdict = f"{where} is free: a bind would succeed now"
        if tw_rows:
            reasons.append(f"{len(tw_rows)} TIME-WAIT socket(s) remain on the port but do not block this bind")
    elif listeners:
        first = listeners[0]
        overlap = "" if first.laddr[0] == ip else f" (overlapping {format_endpoint(*first.laddr)})"
        verdict = f"{where} is in use by a live {'listener' if kind == 'tcp' else 'socket'}{overlap}: " + (
            f"pid {first.pid} ({first.name})" if first.pid is not None else "its owner could not be seen"
        )
        for h in listeners:
            reasons.append(h.describe())
        if first.laddr[0] != ip:
            reasons.append(
                f"{format_endpoint(*first.laddr)} overlaps {format_endpoint(ip, port)}: a wildcard address covers "
                "every address of its family, and Linux refuses the overlap even with SO_REUSEADDR"
            )
        if reuse == 0:
            reasons.append(f"the holder set {opt} as well (same user), so a bind with {opt} shares the port")
            advice.append(f"pass reuse_port=True only if you really want both to share the port ({opt})")
        else:
            advice.append("stop the process holding the port, or choose another port")
    elif tw_rows and not others:
        secs = f"{frees:.0f}" if frees is not None else "60"
        if reuse == 0:
            verdict = (
                f"{where} is blocked only by {len(tw_rows)} TIME-WAIT connection(s); a bind with SO_REUSEADDR "
                "(twfix.reusable_tcp_server) succeeds now"
            )
            reasons.append(
                "the TIME-WAIT sockets inherited SO_REUSEADDR from their listener, so they yield to a new "
                "bind that sets it too"
            )
        else:
            verdict = (
                f"{where} is blocked by {len(tw_rows)} TIME-WAIT connection(s) of a previous server that did not set "
                f"SO_REUSEADDR; the port frees in about {secs} s"
            )
            reasons.append(
                "a TIME-WAIT socket only yields to a new bind if the old listener also had SO_REUSEADDR "
                "(the flag is inherited by its connections); this one did not, so even SO_REUSEADDR cannot bind now"
            )
            reasons.append("TIME-WAIT lasts a fixed 60 s on Linux; tcp_fin_timeout does not shorten it")
            advice.append(f"wait about {secs} s, or bind another port meanwhile")
            advice.append(
                "make the server set SO_REUSEADDR before bind() (twfix.reusable_tcp_server does) so that the next "
                "restart is immediate"
            )
    elif others:
        first = others[0]
        if ephemeral is not None and ephemeral.assigns(port) and first.raddr is not None:
            verdict = (
                f"{where} is held by a connection that took it from the ephemeral range "
                f"{ephemeral.low}-{ephemeral.high}"
            )
            advice.append(
                "keep service ports outside net.ipv4.ip_local_port_range, or list them in "
                "net.ipv4.ip_local_reserved_ports so that outgoing connections never take them"
            )
        else:
            verdict = f"{where} is in use by {len(others)} connection(s) bound to the port"
            advice.append("close those connections (a previous instance may still be running), or choose another port")
        reasons += [h.describe() for h in others]
        if tw_rows:
            reasons.append(f"{len(tw_rows)} TIME-WAIT socket(s) also remain on the port")
    else:
        verdict = f"{where} cannot be bound now ({os.strerror(plain)}), but no socket on it is visible"
        reasons.append("the socket table shows nothing on this port in this network namespace")

    if kind == "tcp" and reuse == 0 and plain != 0 and not listeners and not tw_rows:
        advice.append("a bind with SO_REUSEADDR succeeds now (twfix.reusable_tcp_server)")
    if ephemeral is not None and ephemeral.assigns(port) and plain != 0:
        reasons.append(f"port {port} lies inside the ephemeral range, where outgoing connections may take it")
    if reserved:
        reasons.append(f"port {port} is in ip_local_reserved_ports: only automatic assignment skips it")
    if incomplete:
        reasons.append(incomplete)
    return Explanation(
        kind,
        host,
        address,
        verdict,
        plain == 0,
        reuse == 0,
        tuple(reasons),
        tuple(advice),
        tuple(live),
        len(tw_rows),
        tw_reuse,
        frees,
        in_range,
        reserved,
        privileged,
        incomplete,
    )


def explain(port: int, host: str = "", kind: str = "tcp") -> Explanation:
    """Explain whether binding ``host:port`` would succeed now, with and without reuse options, and why.

    Args:
        port: the port (1..65535; 0 is always free).
        host: the local address or name ("" for the IPv4 wildcard).
        kind: ``"tcp"`` or ``"udp"``.
    """
    port = check_port(port)
    host = check_host(host)
    kind = check_kind(kind, _KINDS)
    sotype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    family, ip, _scope = resolve(host, port, None, sotype)
    return _analyse(kind, host, family, ip, port, _reuse_flags(kind))


def _reuse_flags(kind: str) -> int:
    return _twfix.F_REUSE_ADDR if kind == "tcp" else _twfix.F_REUSE_PORT


def address_in_use(
    exc: OSError, *, protocol: str, host: str, ip: str, port: int, family: int, flags: int
) -> AddressInUseError:
    """The explained error for a constructor whose bind or listen failed with EADDRINUSE."""
    where = f"{format_endpoint(ip, port)}/{protocol}"
    asked = f" (host {host!r})" if host not in ("", ip) else ""
    explanation: Explanation | None = None
    try:
        explanation = _analyse(protocol, host, family, ip, port, flags or _reuse_flags(protocol))
    except OSError:
        explanation = None
    if explanation is None or explanation.can_bind:
        # Nothing to add (or the holder left meanwhile): keep the kernel's word.
        message = f"Address already in use: {where}{asked} ({exc.strerror})"
    else:
        message = f"Address already in use: {explanation.verdict}{asked}"
        details = str(explanation).split("\n", 1)
        if len(details) == 2:
            message += "\n" + details[1]
    return AddressInUseError(message, address=(ip, port), protocol=protocol, explanation=explanation)
