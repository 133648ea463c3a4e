"""Why would (or did) a bind fail? ``twfix.explain`` and the message of :class:`AddressInUseError`.

The verdict rests on two witnesses: a probe bind made right now (with and without the reuse options),
which is what the kernel actually decides, and the socket table, which says who is in the way:
live sockets with every process holding them, kernel-owned sockets (TIME-WAIT, orphaned closes) with
their remaining time, and, when nothing here explains it, listeners in other network namespaces.

Kernel facts used (see the project's reference on Linux TIME-WAIT):

* A TIME-WAIT socket carries the SO_REUSEADDR flag of the socket it came from (an accepted connection
  inherits it from its listener); a new bind passes it only if both have the flag.
* TIME-WAIT lasts a fixed 60 s on Linux (no sysctl changes that).
* A wildcard address (0.0.0.0, ::) overlaps every specific address of its family; an IPv6 socket with
  IPV6_V6ONLY never overlaps IPv4, a dual-stack one (``[::]`` without it) overlaps all of IPv4.
* connect() takes ports of the range's low parity first, bind(0) the other parity.
* ``ip_local_reserved_ports`` only keeps ports from automatic assignment; explicit binds ignore it.
* Probing never joins a live UDP SO_REUSEPORT group: a bound member would take some of its datagrams.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from twfix import _twfix, kernel, netns, sysctl
from twfix._args import check_host, check_kind, check_port, namespace_path, resolve
from twfix._html import SEVERITY_COLOURS, table
from twfix._text import printable
from twfix.diag import SocketEntry, TcpState, format_endpoint, port_entries
from twfix.errors import AddressInUseError
from twfix.owners import Process, chosen_by_kernel, holders_of
from twfix.sysctl import PortRange

__all__ = ["Explanation", "Holder", "NamespaceHolder", "address_in_use", "explain", "overlaps"]

Kind = Literal["tcp", "udp"]
_KINDS: Final = ("tcp", "udp")


_ORPHAN_STATES: Final = frozenset(
    {TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING, TcpState.LAST_ACK, TcpState.TIME_WAIT}
)


@dataclass(frozen=True)
class Holder:
    """A socket bound to the port in question, with every process holding it when they could be seen.

    ``processes`` lists them all (a prefork server's master and workers); ``pid``, ``name`` and
    ``cmdline`` are the first. ``orphan`` marks a connection no process holds any more (the kernel is
    finishing its close). ``name`` and ``cmdline`` are raw text chosen by whoever started the process.
    """

    state: str
    laddr: tuple[str, int]
    raddr: tuple[str, int] | None
    uid: int | None
    pid: int | None = None
    name: str | None = None
    cmdline: tuple[str, ...] = ()
    processes: tuple[Process, ...] = ()
    orphan: bool = False
    inode: int = 0

    def describe(self) -> str:
        peer = f" to {format_endpoint(*self.raddr)}" if self.raddr else ""
        if self.orphan:
            who = "no process: an orphaned connection the kernel is closing"
        elif self.processes:
            who = _pids(self.processes)
        else:
            who = "a process not visible here" + (f" (uid {self.uid})" if self.uid is not None else "")
        return f"{self.state} {format_endpoint(*self.laddr)}{peer}, held by {who}"


def _pids(processes: tuple[Process, ...] | list[Process]) -> str:
    """``pid 12 (name), pid 13 (name)``, with names escaped: they are chosen by whoever ran the process."""
    return ", ".join(f"pid {p.pid} ({printable(p.name)})" for p in processes)


@dataclass(frozen=True)
class NamespaceHolder:
    """A listener on the port in another network namespace of this host (a container, an ``ip netns``)."""

    netns: str
    laddr: tuple[str, int]
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Explanation:
    """Whether binding ``host:port`` would succeed now, with and without reuse options, and why.

    ``verdict`` is one line; ``reasons`` and ``advice`` expand it. ``can_bind`` is the result of a
    plain bind, ``can_bind_with_reuse`` of a bind with twfix's options (SO_REUSEADDR for TCP,
    SO_REUSEPORT for UDP), both probed on the live kernel (for UDP next to a live socket the reuse
    probe is not made, and ``can_bind_with_reuse`` is False). ``cause`` is a stable code for the
    situation and ``confidence`` says how sure the verdict is ("certain", or "likely" where the kernel
    keeps no record of the answer, such as which side a TIME-WAIT came from).
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
    cause: str = ""
    confidence: str = "certain"
    dualstack: bool = False
    elsewhere: tuple[NamespaceHolder, ...] = ()

    def __str__(self) -> str:
        return "\n".join([printable(self.verdict), *self.detail_lines()])

    def detail_lines(self) -> list[str]:
        """The reasons and the advice as printed under the verdict (escaped): the one rendering that both
        ``str()`` and the constructors' AddressInUseError message use."""
        return [f"  - {printable(r)}" for r in self.reasons] + [f"  > {printable(a)}" for a in self.advice]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def _repr_html_(self) -> str:
        ok = self.can_bind or self.can_bind_with_reuse
        rows = [(("reason", SEVERITY_COLOURS["info"]), r) for r in self.reasons]
        rows += [(("advice", SEVERITY_COLOURS["ok"]), a) for a in self.advice]
        colour = SEVERITY_COLOURS["ok" if ok else "error"]
        return table("twfix-explanation", self.verdict, ("", ""), rows, caption_colour=colour)


def _port_settings(ns: str | None) -> tuple[PortRange | None, int]:
    """(ephemeral ports, ip_unprivileged_port_start) of the namespace, read in one pass; None where unreadable."""
    names = ["net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports", "net.ipv4.ip_unprivileged_port_start"]
    try:
        rows = sysctl.read(names, netns=ns)
    except OSError:
        return None, kernel.UNPRIVILEGED_PORT_START
    rng, reserved, start = (rows[n].value for n in names)
    try:
        ports: PortRange | None = sysctl.port_range_of(rng, reserved)
    except ValueError:
        ports = None
    return ports, start if isinstance(start, int) else kernel.UNPRIVILEGED_PORT_START


def _probe(kind: str, family: int, ip: str, port: int, flags: int, ns: str | None = None) -> int:
    """Bind a throw-away socket the way the caller would (IPv6: v6-only unless the flags ask for
    dual-stack), in the namespace at ``ns``; returns 0 or the errno. It never listens, so it never takes
    a connection."""
    sotype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    if family == socket.AF_INET6 and not flags & _twfix.F_DUALSTACK:
        flags |= _twfix.F_V6ONLY
    return _twfix.probe_bind(family, sotype, ip, port, flags, ns)


_CAP_NET_BIND_SERVICE: Final = 10


def _can_bind_privileged() -> bool:
    """Whether this process may bind ports below ip_unprivileged_port_start (CAP_NET_BIND_SERVICE)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _udp_free(family: int, ip: str, port: int, flags: int, unprivileged: int, ns: str | None) -> int:
    """What a plain UDP bind of a port no socket covers would get (0, EACCES or EADDRNOTAVAIL), without
    binding that port: privilege from the capability and the namespace's ip_unprivileged_port_start,
    whether the address is local from a bind of port 0 on it with IP_BIND_ADDRESS_NO_PORT (the kernel checks
    the address and takes no port: a plain bind(0) would take a random one, and a service restarting on an
    ephemeral port lost it to such probes about once in a hundred, measured)."""
    if 0 < port < unprivileged and not _can_bind_privileged():
        return errno.EACCES
    return _probe("udp", family, ip, 0, flags | _twfix.F_BIND_NO_PORT, ns)


def _is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::", "::ffff:0.0.0.0")


def _unmap(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def overlaps(family: int, ip: str, dualstack: bool, entry: SocketEntry) -> bool:
    """Could ``entry`` conflict with a bind of ``ip`` (same port, ``family``; an IPv6 bind is v6-only
    unless ``dualstack``)? An IPv6 entry whose v6-only flag the source did not report (``/proc``)
    counts as dual-stack: the cautious answer."""
    e_ip = entry.laddr.ip
    if entry.family == family:
        return _is_wildcard(ip) or _is_wildcard(e_ip) or ip == e_ip
    if family == socket.AF_INET:  # an IPv6 entry covers IPv4 as a dual-stack wildcard or a v4-mapped address
        if e_ip == "::":
            return entry.v6only is not True
        return e_ip.startswith("::ffff:") and (_is_wildcard(ip) or _unmap(e_ip) in (ip, "0.0.0.0"))
    if not dualstack:  # a v6-only bind never conflicts with IPv4 sockets
        return False
    return ip == "::" or _is_wildcard(e_ip) or _unmap(ip) == e_ip


def _holders(
    entries: list[SocketEntry], kind: str, port: int, ns: str | None = None
) -> tuple[list[Holder], str | None]:
    """Sockets as holders with every process holding them; kernel-owned ones marked as orphans."""
    found = holders_of(entries, port, kind, ns)
    out = [
        Holder(
            str(h.state),
            (h.laddr.ip, h.laddr.port),
            (h.raddr.ip, h.raddr.port) if h.raddr else None,
            h.uid,
            h.pid,
            h.name,
            h.cmdline,
            h.processes,
            orphan=h.inode == 0 and h.state in _ORPHAN_STATES,
            inode=h.inode,
        )
        for h in found.holders
    ]
    return out, found.note


@dataclass
class _Facts:
    """What the probes and the table showed; the verdict is built from these."""

    kind: str
    host: str
    family: int
    ip: str
    port: int
    dualstack: bool
    plain: int
    reuse: int | None
    ports: PortRange | None
    unprivileged_start: int
    listeners: list[Holder] = field(default_factory=list)
    connections: list[Holder] = field(default_factory=list)
    orphans: list[Holder] = field(default_factory=list)
    time_wait: list[SocketEntry] = field(default_factory=list)
    orphan_entries: list[SocketEntry] = field(default_factory=list)
    note: str | None = None
    ns: str | None = None
    joins_group: bool = False  # TCP: a bind with SO_REUSEPORT would join the listeners' group

    @property
    def where(self) -> str:
        return f"{format_endpoint(self.ip, self.port)}/{self.kind}" + (" (dual-stack)" if self.dualstack else "")


def _analyse(
    kind: str, host: str, family: int, ip: str, port: int, flags: int, *, elsewhere: bool = True, ns: str | None = None
) -> Explanation:
    dualstack = bool(flags & _twfix.F_DUALSTACK)
    base = flags & (_twfix.F_DUALSTACK | _twfix.F_V6ONLY)
    reuse_flags = flags & (_twfix.F_REUSE_ADDR | _twfix.F_REUSE_PORT) or _reuse_flags(kind)
    address = (ip, port)
    if port == 0:
        where = f"{format_endpoint(ip, port)}/{kind}"
        return Explanation(kind, host, address, f"{where}: port 0 asks the kernel for any free port", True, True)
    ports, unprivileged = _port_settings(ns)
    rows: list[SocketEntry] | None = None
    if kind == "udp":
        # Never bind the port itself: a UDP service restarting at that instant would find it taken. The
        # table says whether a socket covers the address; only what it cannot tell is asked of the kernel.
        rows = [e for e in port_entries(kind, port, None, ns) if overlaps(family, ip, dualstack, e)]
        plain = errno.EADDRINUSE if rows else _udp_free(family, ip, port, base, unprivileged, ns)
    else:
        plain = _probe(kind, family, ip, port, base, ns)
    facts = _Facts(kind, host, family, ip, port, dualstack, plain, None, ports, unprivileged, ns=ns)
    if plain == errno.EACCES:
        return _explain_privileged(facts)
    if plain == errno.EADDRNOTAVAIL:
        return _build(
            facts,
            "not-local",
            f"{facts.where}: {ip} is not an address of this host (EADDRNOTAVAIL), so nothing can bind it",
            advice=["bind an address that is configured on an interface, or the wildcard"],
            can_reuse=False,
        )
    # A live listener explains most conflicts, and a listen-only dump costs next to nothing (the kernel
    # skips the established hash); the whole-table walk is made only when it does not.
    if plain != 0 and kind == "tcp":
        live = [e for e in port_entries(kind, port, [TcpState.LISTEN], ns) if overlaps(family, ip, dualstack, e)]
        if live:
            facts.listeners, facts.note = _holders(live, kind, port, ns)
            facts.reuse = _probe(kind, family, ip, port, base | reuse_flags, ns)
            # A bound, never-listening TCP socket takes no connection: probing the group is harmless.
            facts.joins_group = _probe(kind, family, ip, port, base | _twfix.F_REUSE_PORT, ns) == 0
            return _explain_listener(facts)
    if rows is None:
        rows = [e for e in port_entries(kind, port, None, ns) if overlaps(family, ip, dualstack, e)]
    facts.time_wait = [e for e in rows if e.state == TcpState.TIME_WAIT]
    facts.orphan_entries = [e for e in rows if e.inode == 0 and e.state in _ORPHAN_STATES - {TcpState.TIME_WAIT}]
    others, facts.note = _holders([e for e in rows if e.state != TcpState.TIME_WAIT], kind, port, ns)
    facts.orphans = [h for h in others if h.orphan]
    facts.listeners = [h for h in others if not h.orphan and (h.state == "LISTEN" or kind == "udp")]
    facts.connections = [h for h in others if not h.orphan and h not in facts.listeners]
    # UDP: binding a probe with SO_REUSEPORT next to a live socket would join its reuseport group and
    # take some of its datagrams. There the holders' own options are read instead (a duplicate of their
    # descriptor), and the kernel's rule applied to them.
    if kind == "tcp":
        facts.reuse = _probe(kind, family, ip, port, base | reuse_flags, ns)
    elif plain != errno.EADDRINUSE:
        facts.reuse = plain  # nothing on the port: the options change nothing
    else:
        facts.reuse = _udp_reuse_by_reading([*facts.listeners, *facts.connections], reuse_flags)
    if plain == 0:
        return _explain_free(facts, elsewhere and ns is None)
    if facts.listeners:
        if kind == "tcp":
            facts.joins_group = _probe(kind, family, ip, port, base | _twfix.F_REUSE_PORT, ns) == 0
        return _explain_listener(facts)
    if facts.orphans and not facts.connections:
        return _explain_orphans(facts)
    if facts.time_wait and not facts.connections:
        return _explain_time_wait(facts)
    if facts.connections:
        return _explain_connections(facts)
    return _explain_unseen(facts, elsewhere)


def _udp_reuse_by_reading(holders: list[Holder], flags: int) -> int | None:
    """What a UDP bind with ``flags`` would get next to ``holders``, from their own socket options: 0,
    EADDRINUSE, or None when one of them cannot be inspected. The kernel lets two UDP sockets overlap
    when both set SO_REUSEADDR, or both set SO_REUSEPORT under the same effective uid."""
    for h in holders:
        proc = next((p for p in h.processes if p.fd is not None), None)
        if proc is None or proc.fd is None:
            return None
        try:
            addr, port_ = _twfix.socket_reuse_flags(proc.pid, proc.fd, h.inode)
        except OSError:
            return None
        shares = (addr and flags & _twfix.F_REUSE_ADDR) or (
            port_ and flags & _twfix.F_REUSE_PORT and h.uid == os.geteuid()
        )
        if not shares:
            return errno.EADDRINUSE
    return 0


def _build(
    f: _Facts,
    cause: str,
    verdict: str,
    *,
    reasons: list[str] | None = None,
    advice: list[str] | None = None,
    holders: list[Holder] | None = None,
    can_reuse: bool | None = None,
    tw_reuse: bool | None = None,
    frees_in: float | None = None,
    confidence: str = "certain",
    elsewhere: tuple[NamespaceHolder, ...] = (),
) -> Explanation:
    reasons = list(reasons or [])
    if f.ports is not None and f.ports.assigns(f.port) and f.plain != 0 and cause != "time-wait-client":
        procs = [p for h in (*f.listeners, *f.connections) for p in h.processes]
        if f.listeners and chosen_by_kernel(f.ports, f.port, procs):
            reasons.append(
                f"port {f.port} lies inside the ephemeral range with the parity bind(0) takes first, and no holder "
                "names it on its command line: most likely the kernel chose it for this listener (bind to port 0)"
            )
        else:
            reasons.append(f"port {f.port} lies inside the ephemeral range, where outgoing connections may take it")
    reserved = f.ports is not None and f.ports.is_reserved(f.port)
    if reserved:
        reasons.append(f"port {f.port} is in ip_local_reserved_ports: only automatic assignment skips it")
    if f.note:
        reasons.append(f.note)
    return Explanation(
        f.kind,
        f.host,
        (f.ip, f.port),
        verdict,
        f.plain == 0,
        (f.reuse == 0) if can_reuse is None else can_reuse,
        tuple(reasons),
        tuple(advice or []),
        tuple(holders if holders is not None else f.listeners + f.connections + f.orphans),
        len(f.time_wait),
        tw_reuse,
        frees_in,
        f.ports is not None and f.ports.contains(f.port),
        reserved,
        f.port < f.unprivileged_start,
        f.note,
        cause,
        confidence,
        f.dualstack,
        elsewhere,
    )


def _explain_privileged(f: _Facts) -> Explanation:
    return _build(
        f,
        "privileged",
        f"{f.where}: port {f.port} is privileged (below ip_unprivileged_port_start={f.unprivileged_start}); "
        "binding it needs root or CAP_NET_BIND_SERVICE",
        advice=["use a port >= ip_unprivileged_port_start, or grant CAP_NET_BIND_SERVICE"],
        can_reuse=False,
    )


def _seconds(entries: list[SocketEntry]) -> float | None:
    left = max((e.expires for e in entries if e.expires is not None), default=None)
    return round(left, 1) if left is not None else None


def _explain_free(f: _Facts, elsewhere: bool) -> Explanation:
    reasons = []
    if f.time_wait:
        reasons.append(f"{len(f.time_wait)} TIME-WAIT socket(s) remain on the port but do not block this bind")
    found = _listeners_elsewhere(f) if elsewhere else ()
    for h in found:
        pids = f" (pid {', '.join(map(str, h.pids))})" if h.pids else ""
        reasons.append(
            f"note: {format_endpoint(*h.laddr)} listens in another network namespace, {h.netns}{pids}; "
            "it does not conflict here, but clients in that namespace reach that one"
        )
    return _build(f, "free", f"{f.where} is free: a bind would succeed now", reasons=reasons, elsewhere=found)


def _explain_listener(f: _Facts) -> Explanation:
    first = f.listeners[0]
    noun = "listener" if f.kind == "tcp" else "socket"
    overlap = "" if first.laddr[0] == f.ip else f" (overlapping {format_endpoint(*first.laddr)})"
    members = list({p.pid: p for h in f.listeners for p in h.processes}.values())
    owner = _pids(members) if members else "its owner could not be seen"
    many = f"{len(f.listeners)} live {noun}s" if len(f.listeners) > 1 else f"a live {noun}"
    reasons = [h.describe() for h in f.listeners]
    advice = []
    if first.laddr[0] != f.ip:
        if f.kind == "tcp":
            rule = "Linux refuses the overlap even with SO_REUSEADDR (only SO_REUSEPORT of the same user shares it)"
        else:
            rule = (
                "two UDP sockets share overlapping addresses only if both set SO_REUSEADDR (any user: the "
                "datagram theft twfix avoids) or both set SO_REUSEPORT (same user)"
            )
        what = "a dual-stack [::] covers every IPv4 address too" if f.dualstack or ":" in first.laddr[0] else ""
        reasons.append(
            f"{format_endpoint(*first.laddr)} overlaps {format_endpoint(f.ip, f.port)}: a wildcard address covers "
            f"every address of its family{'; ' + what if what else ''}, and {rule}"
        )
    opt = "SO_REUSEADDR" if f.kind == "tcp" else "SO_REUSEPORT"
    uids = sorted({h.uid for h in f.listeners if h.uid is not None})
    group = (f.kind == "tcp" and f.joins_group) or (f.kind == "udp" and f.reuse == 0)
    if group:
        reasons.append(
            f"the {len(f.listeners)} socket(s) form an SO_REUSEPORT group: every member set SO_REUSEPORT and runs as "
            f"uid {', '.join(map(str, uids))}; a bind with reuse_port=True (SO_REUSEPORT) by the same effective "
            "user joins it now, and the kernel then spreads "
            + ("connections" if f.kind == "tcp" else "datagrams")
            + " over every member"
        )
        advice.append(
            f"pass reuse_port=True to join the group (same effective user, uid {', '.join(map(str, uids))}; the "
            "option must be set on every member), only if sharing is what you want; otherwise stop "
            + ("them" if len(members) > 1 else "it")
            + " or choose another port"
        )
    elif f.reuse == 0:
        reasons.append("the holder set SO_REUSEPORT as well (same user), so a bind with it shares the port")
        advice.append("pass reuse_port=True only if you really want both to share the port (SO_REUSEPORT)")
    else:
        if f.reuse is None:
            reasons.append(
                f"whether the holder set {opt} could not be read (its process is not inspectable), and twfix "
                "never probes by joining a live UDP socket's SO_REUSEPORT group (a member takes its datagrams)"
            )
        advice.append("stop the process holding the port, or choose another port")
    return _build(
        f,
        "listener",
        f"{f.where} is in use by {many}{overlap}: {owner}",
        reasons=reasons,
        advice=advice,
        holders=f.listeners,
    )


_RETRANSMITTING: Final = frozenset({TcpState.FIN_WAIT1, TcpState.CLOSING, TcpState.LAST_ACK})


def _orphan_retries(ns: str | None) -> tuple[int | None, int | None]:
    """(tcp_orphan_retries, the retransmissions the kernel allows an orphan): 0 means 8 for a peer that
    still answers (tcp_orphan_retries() in net/ipv4/tcp_timer.c)."""
    try:
        value = sysctl.get("net.ipv4.tcp_orphan_retries", netns=ns)
    except (OSError, LookupError):
        return None, None
    if not isinstance(value, int):
        return None, None
    return value, value or kernel.ORPHAN_RETRIES_WHEN_ZERO


def _explain_orphans(f: _Facts) -> Explanation:
    states = sorted({h.state for h in f.orphans})
    retransmitting = [e for e in f.orphan_entries if e.state in _RETRANSMITTING]
    # FIN_WAIT2 and TIME-WAIT timers are the time left; a retransmitting orphan's timer is only the next
    # retransmission, and how many more follow, each after twice the wait, is the kernel's to decide.
    frees = None if retransmitting else _seconds(f.orphan_entries)
    reasons = [h.describe() for h in f.orphans]
    reasons.append(
        "orphans are connections of a socket that was closed (or whose process died) while the peer had not "
        "finished: the kernel completes the close on its own"
    )
    if TcpState.FIN_WAIT2 in states:
        reasons.append(
            "an orphaned FIN_WAIT2 lasts net.ipv4.tcp_fin_timeout (default 60 s): the one place where that knob matters"
        )
    secs = f" (about {frees:.0f} s left on the longest timer)" if frees is not None else ""
    if retransmitting:
        knob, allowed = _orphan_retries(f.ns)
        made = max(e.retrans for e in retransmitting)
        nxt = _seconds(retransmitting)
        if allowed is not None:
            model = kernel.orphan_give_up_seconds(allowed)
            limit = (
                f"the kernel gives up: at the first retransmission timer that fires once {model:.1f} s have passed "
                f"since the first retransmission, the time {allowed} retransmissions take from the minimum RTO of "
                f"200 ms (net.ipv4.tcp_orphan_retries={knob}{', which means 8' if knob == 0 else ''}; "
                "retransmits_timed_out() in net/ipv4/tcp_timer.c)"
            )
        else:
            limit = "the kernel gives up once the retransmissions net.ipv4.tcp_orphan_retries allows run out"
        reasons.append(
            f"FIN_WAIT1, CLOSING and LAST_ACK orphans last until their FIN is acknowledged or {limit}. The furthest "
            f"has retransmitted {made} time(s); the next is due in "
            + (f"{nxt:.1f} s" if nxt is not None else "an unknown time")
            + ", each later one after twice the wait (up to 120 s). When the first retransmission happened is "
            "not in the socket table, so the time left cannot be known; lower tcp_orphan_retries to shorten it"
        )
        secs = " (until the kernel gives up retransmitting: no time can be promised)"
    if f.time_wait:
        reasons.append(f"{len(f.time_wait)} TIME-WAIT socket(s) also remain on the port")
    if f.reuse == 0:
        verdict = (
            f"{f.where} is held only by {len(f.orphans)} orphaned connection(s) of a closed server; a bind with "
            f"SO_REUSEADDR (twfix.reusable_tcp_server) succeeds now{secs}"
        )
        advice = ["bind with SO_REUSEADDR (twfix.reusable_tcp_server) instead of waiting"]
    else:
        verdict = f"{f.where} is held by {len(f.orphans)} orphaned connection(s) of a closed server{secs}"
        advice = ["wait for the kernel to finish closing them, or bind another port meanwhile"]
    return _build(f, "orphans", verdict, reasons=reasons, advice=advice, holders=f.orphans, frees_in=frees)


def _client_side(f: _Facts) -> tuple[bool, str, str]:
    """(client?, confidence, evidence): did the TIME-WAITs on the port come from an outgoing connection
    that used it as its source port? The kernel keeps no record of that; the evidence, strongest first:
    the peer endpoint is a live listener of this namespace (then this side certainly connected to it), the
    port lies outside the ephemeral range (connect() never picks it), and the parities connect() and
    bind(0) search first, for this port and the peer's."""
    ports = f.ports
    if ports is None or not ports.assigns(f.port):
        return False, "likely", "the port lies outside the ephemeral range, so connect() never gave it out"
    peers = sorted({(e.raddr.ip, e.raddr.port) for e in f.time_wait if e.raddr is not None})
    own = {_unmap(e.laddr.ip) for e in f.time_wait}
    for ip, port in peers:
        peer_ip = _unmap(ip)
        local = peer_ip in own or ipaddress.ip_address(peer_ip).is_loopback
        for e in port_entries("tcp", port, [TcpState.LISTEN], f.ns):
            # A wildcard listener covers the peer only if the peer address is this host's own.
            if _unmap(e.laddr.ip) == peer_ip or (_is_wildcard(e.laddr.ip) and local):
                where = format_endpoint(ip, port)
                return True, "certain", f"the peer {where} is a live listener here: this side connected to it"
    if not ports.connect_first(f.port):
        return (
            False,
            "likely",
            (
                f"port {f.port} has the parity bind(0) takes first, not the one connect() takes first: most likely a "
                "server's port chosen by the kernel"
            ),
        )
    if all(not ports.assigns(p) for _ip, p in peers):
        return (
            True,
            "likely",
            (
                f"port {f.port} has the parity connect() takes first, and every peer is on a port outside the range "
                "(a service port)"
            ),
        )
    if all(ports.bind_first(p) or not ports.assigns(p) for _ip, p in peers):
        return (
            True,
            "likely",
            (
                f"port {f.port} has the parity connect() takes first, and the peers' ports the parity bind(0) takes "
                "first (servers on kernel-chosen ports) or lie outside the range"
            ),
        )
    return (
        False,
        "likely",
        (
            f"port {f.port} has the parity connect() takes first, but so do its peers: the side that closed first "
            "cannot be told"
        ),
    )


def _explain_time_wait(f: _Facts) -> Explanation:
    frees = _seconds(f.time_wait)
    secs = f"{frees:.0f}" if frees is not None else "60"
    client, confidence, evidence = _client_side(f)
    peers = sorted({format_endpoint(*e.raddr) for e in f.time_wait if e.raddr})
    reasons: list[str] = []
    advice: list[str] = []
    tw_reuse = f.reuse == 0 if f.kind == "tcp" else None
    if client:
        assert f.ports is not None
        sure = "" if confidence == "certain" else "most likely "
        verdict = (
            f"{f.where} is blocked by {len(f.time_wait)} TIME-WAIT connection(s) {sure}left by an outgoing "
            f"connection that used port {f.port} as its source port (to {', '.join(peers[:3])}); the port frees in "
            f"about {secs} s"
        )
        reasons.append(f"{evidence} ({confidence})")
        reasons.append(
            f"port {f.port} lies in the ephemeral range {f.ports.low}-{f.ports.high}, from which connect() picks "
            "source ports; the side that closes first keeps the TIME-WAIT, here the client"
        )
        if f.reuse != 0:
            reasons.append(
                "a client socket rarely sets SO_REUSEADDR, so its TIME-WAIT blocks even a reuse-enabled bind: "
                "SO_REUSEADDR on the server cannot help"
            )
        advice.append(f"wait about {secs} s, or bind another port meanwhile")
        advice.append(
            f"reserve the port (add {f.port} to net.ipv4.ip_local_reserved_ports) so that outgoing connections never "
            "take it, or give the service a port outside net.ipv4.ip_local_port_range"
        )
        return _build(
            f,
            "time-wait-client",
            verdict,
            reasons=reasons,
            advice=advice,
            tw_reuse=tw_reuse,
            frees_in=frees,
            confidence=confidence,
        )
    if f.reuse == 0:
        verdict = (
            f"{f.where} is blocked only by {len(f.time_wait)} TIME-WAIT connection(s); a bind with SO_REUSEADDR "
            "(twfix.reusable_tcp_server) succeeds now"
        )
        reasons.append(
            "the TIME-WAIT sockets inherited SO_REUSEADDR from their listener, so they yield to a new bind that "
            "sets it too"
        )
        cause = "time-wait"
    else:
        verdict = (
            f"{f.where} is blocked by {len(f.time_wait)} TIME-WAIT connection(s) of a previous server that did not "
            f"set SO_REUSEADDR; the port frees in about {secs} s"
        )
        reasons.append(f"{evidence} ({confidence})")
        reasons.append(
            "a TIME-WAIT socket only yields to a new bind if the old listener also had SO_REUSEADDR (the flag is "
            "inherited by its connections); this one did not, so even SO_REUSEADDR cannot bind now"
        )
        reasons.append("TIME-WAIT lasts a fixed 60 s on Linux; tcp_fin_timeout does not shorten it")
        advice.append(f"wait about {secs} s, or bind another port meanwhile")
        advice.append(
            "make the server set SO_REUSEADDR before bind() (twfix.reusable_tcp_server does) so that the next "
            "restart is immediate"
        )
        cause = "time-wait-server"
    return _build(
        f, cause, verdict, reasons=reasons, advice=advice, tw_reuse=tw_reuse, frees_in=frees, confidence=confidence
    )


def _explain_connections(f: _Facts) -> Explanation:
    first = f.connections[0]
    reasons = [h.describe() for h in f.connections]
    if f.time_wait:
        reasons.append(f"{len(f.time_wait)} TIME-WAIT socket(s) also remain on the port")
    advice = []
    if all(h.state == TcpState.BOUND_INACTIVE for h in f.connections):
        owners = _pids([p for h in f.connections for p in h.processes]) or "a process"
        verdict = f"{f.where} is bound by a socket that is neither listening nor connected (yet): {owners}"
        cause = "bound"
        reasons.append(
            "a bound socket owns its port until it is closed, even before listen() or connect(); two such sockets "
            "may share a port only if both set SO_REUSEADDR, and then only the first listen() succeeds"
        )
        advice.append("close that socket (or let its owner listen on it), or choose another port")
    elif f.ports is not None and f.ports.assigns(f.port) and first.raddr is not None:
        verdict = (
            f"{f.where} is held by a connection that took it from the ephemeral range {f.ports.low}-{f.ports.high}"
        )
        cause = "ephemeral-taken"
        advice.append(
            "keep service ports outside net.ipv4.ip_local_port_range, or list them in "
            "net.ipv4.ip_local_reserved_ports so that outgoing connections never take them"
        )
    else:
        verdict = f"{f.where} is in use by {len(f.connections)} connection(s) bound to the port"
        cause = "connection"
        advice.append("close those connections (a previous instance may still be running), or choose another port")
    if f.kind == "tcp" and f.reuse == 0:
        advice.append("a bind with SO_REUSEADDR succeeds now (twfix.reusable_tcp_server)")
    return _build(f, cause, verdict, reasons=reasons, advice=advice, holders=f.connections)


def _explain_unseen(f: _Facts, elsewhere: bool) -> Explanation:
    reasons = ["the socket table shows nothing on this port in this network namespace"]
    return _build(
        f,
        "unknown",
        f"{f.where} cannot be bound now ({os.strerror(f.plain)}), but no socket on it is visible",
        reasons=reasons,
    )


def _listeners_elsewhere(f: _Facts) -> tuple[NamespaceHolder, ...]:
    """Listeners on the port in the host's other network namespaces (root only: entering one needs it)."""
    if os.geteuid() != 0:
        return ()
    found = []
    for ns in netns.namespaces(include_own=False):
        try:
            entries = netns.port_listeners(f.kind, f.port, ns)
        except (OSError, ValueError):
            continue  # gone meanwhile, or replaced by something that is no namespace
        for family, ip, port in entries:
            if family == f.family or f.dualstack:
                found.append(NamespaceHolder(ns.label, (ip, port), ns.pids))
    return tuple(found)


def explain(
    port: int,
    host: str = "",
    kind: str = "tcp",
    *,
    dualstack_ipv6: bool = False,
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> Explanation:
    """Explain whether binding ``host:port`` would succeed now, with and without reuse options, and why.

    Args:
        port: the port (1..65535; 0 is always free).
        host: the local address or name ("" for the IPv4 wildcard, or the IPv6 one with ``dualstack_ipv6``).
        kind: ``"tcp"`` or ``"udp"``.
        dualstack_ipv6: ask about one IPv6 socket that also accepts IPv4 (``IPV6_V6ONLY=0``), as
            ``reusable_tcp_server(..., dualstack_ipv6=True)`` binds it.
        netns, pid: ask about another network namespace (a container's): the probe binds run there.
    """
    port = check_port(port)
    host = check_host(host)
    kind = check_kind(kind, _KINDS)
    sotype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    family, ip, _scope = resolve(host, port, socket.AF_INET6 if dualstack_ipv6 else None, sotype)
    flags = _twfix.F_DUALSTACK if dualstack_ipv6 else 0
    return _analyse(kind, host, family, ip, port, flags, ns=namespace_path(netns, pid))


def _reuse_flags(kind: str) -> int:
    return _twfix.F_REUSE_ADDR if kind == "tcp" else _twfix.F_REUSE_PORT


def address_in_use(
    exc: OSError, *, protocol: str, host: str, ip: str, port: int, family: int, flags: int, explain: bool = True
) -> AddressInUseError:
    """The explained error for a constructor whose bind or listen failed with EADDRINUSE. With
    ``explain=False`` (hot retry loops) nothing is probed or read: the kernel's word only."""
    where = f"{format_endpoint(ip, port)}/{protocol}"
    asked = f" (host {host!r})" if host not in ("", ip) else ""
    explanation: Explanation | None = None
    if explain:
        try:
            explanation = _analyse(protocol, host, family, ip, port, flags, elsewhere=False)
        except OSError:
            explanation = None
    if explanation is None or explanation.can_bind:
        # Nothing to add (or the holder left meanwhile): keep the kernel's word.
        message = f"Address already in use: {where}{printable(asked)} ({exc.strerror})"
    else:
        message = "\n".join(
            [f"Address already in use: {printable(explanation.verdict)}{printable(asked)}", *explanation.detail_lines()]
        )
    return AddressInUseError(message, address=(ip, port), protocol=protocol, explanation=explanation)
