"""The verdicts of an address conflict: from what the probes and the socket table showed (``Facts``),
the one-line verdict, its reasons and advice, and how sure it is. ``twfix.conflict`` gathers the facts."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Final

from twfix import features, kernel, netns, sysctl
from twfix.diag import SocketEntry, TcpState, format_endpoint, sockets
from twfix.explanation import Explanation, Holder, NamespaceHolder, process_list
from twfix.kernel import PortRange
from twfix.owners import chosen_by_kernel

__all__ = [
    "Facts",
    "build",
    "connections",
    "free",
    "is_wildcard",
    "listener",
    "orphans",
    "privileged",
    "time_wait",
    "unmap",
    "unseen",
]


@dataclass
class Facts:
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


def is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::", "::ffff:0.0.0.0")


def unmap(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def build(
    f: Facts,
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


def privileged(f: Facts) -> Explanation:
    return build(
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


def free(f: Facts, elsewhere: bool) -> Explanation:
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
    return build(f, "free", f"{f.where} is free: a bind would succeed now", reasons=reasons, elsewhere=found)


def listener(f: Facts) -> Explanation:
    first = f.listeners[0]
    noun = "listener" if f.kind == "tcp" else "socket"
    overlap = "" if first.laddr[0] == f.ip else f" (overlapping {format_endpoint(*first.laddr)})"
    members = list({p.pid: p for h in f.listeners for p in h.processes}.values())
    owner = process_list(members) if members else "its owner could not be seen"
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
            why = (
                "this kernel does not let twfix duplicate another process's socket (pidfd_getfd, Linux 5.6+)"
                if not features.pidfd_getfd()
                else "its process is not inspectable"
            )
            reasons.append(
                f"whether the holder set {opt} could not be read ({why}), and twfix never probes by joining a "
                "live UDP socket's SO_REUSEPORT group (a member takes its datagrams)"
            )
        advice.append("stop the process holding the port, or choose another port")
    return build(
        f,
        "listener",
        f"{f.where} is in use by {many}{overlap}: {owner}",
        reasons=reasons,
        advice=advice,
        holders=f.listeners,
    )


# Orphans whose timer is a retransmission (FIN_WAIT2 and TIME-WAIT run a fixed timer instead).
_RETRANSMITTING: Final = kernel.ORPHAN_STATES - {"FIN_WAIT2", "TIME_WAIT"}


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


def orphans(f: Facts) -> Explanation:
    states = sorted({h.state for h in f.orphans})
    retransmitting = [e for e in f.orphan_entries if str(e.state) in _RETRANSMITTING]
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
    return build(f, "orphans", verdict, reasons=reasons, advice=advice, holders=f.orphans, frees_in=frees)


def _client_side(f: Facts) -> tuple[bool, str, str]:
    """(client?, confidence, evidence): did the TIME-WAITs on the port come from an outgoing connection
    that used it as its source port? The kernel keeps no record of that; the evidence, strongest first:
    the peer endpoint is a live listener of this namespace (then this side certainly connected to it), the
    port lies outside the ephemeral range (connect() never picks it), and the parities connect() and
    bind(0) search first, for this port and the peer's."""
    ports = f.ports
    if ports is None or not ports.assigns(f.port):
        return False, "likely", "the port lies outside the ephemeral range, so connect() never gave it out"
    peers = sorted({(e.raddr.ip, e.raddr.port) for e in f.time_wait if e.raddr is not None})
    own = {unmap(e.laddr.ip) for e in f.time_wait}
    # One listen-only dump (the kernel skips the established hash) for every peer, however many there are.
    listening: dict[int, list[str]] = {}
    for e in sockets("tcp", states=[TcpState.LISTEN], netns=f.ns):
        listening.setdefault(e.laddr.port, []).append(unmap(e.laddr.ip))
    for ip, port in peers:
        peer_ip = unmap(ip)
        local = peer_ip in own or ipaddress.ip_address(peer_ip).is_loopback
        for listener_ip in listening.get(port, ()):
            # A wildcard listener covers the peer only if the peer address is this host's own.
            if listener_ip == peer_ip or (is_wildcard(listener_ip) and local):
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


def time_wait(f: Facts) -> Explanation:
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
        return build(
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
    return build(
        f, cause, verdict, reasons=reasons, advice=advice, tw_reuse=tw_reuse, frees_in=frees, confidence=confidence
    )


def connections(f: Facts) -> Explanation:
    first = f.connections[0]
    reasons = [h.describe() for h in f.connections]
    if f.time_wait:
        reasons.append(f"{len(f.time_wait)} TIME-WAIT socket(s) also remain on the port")
    advice = []
    if all(h.state == TcpState.BOUND_INACTIVE for h in f.connections):
        owners = process_list([p for h in f.connections for p in h.processes]) or "a process"
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
    return build(f, cause, verdict, reasons=reasons, advice=advice, holders=f.connections)


def unseen(f: Facts, elsewhere: bool) -> Explanation:
    reasons = ["the socket table shows nothing on this port in this network namespace"]
    if f.kind == "tcp" and not features.bound_inactive():
        reasons.append(
            "this kernel's socket dump cannot show a TCP socket that is bound but neither listening nor connected "
            "(sock_diag reports those from Linux 6.8): a process that bound the port and then neither called "
            "listen() nor connect() is the likely holder"
        )
    return build(
        f,
        "unknown",
        f"{f.where} cannot be bound now ({os.strerror(f.plain)}), but no socket on it is visible",
        reasons=reasons,
    )


def _listeners_elsewhere(f: Facts) -> tuple[NamespaceHolder, ...]:
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
