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
import os
import socket
from typing import Final, Literal

from twfix import _twfix, kernel, sysctl, verdicts
from twfix._args import check_host, check_kind, check_port, namespace_path, resolve
from twfix._text import printable
from twfix.diag import SocketEntry, TcpState, format_endpoint, port_entries
from twfix.errors import AddressInUseError
from twfix.explanation import Explanation, Holder, NamespaceHolder
from twfix.kernel import PortRange
from twfix.owners import holders_of

__all__ = ["Explanation", "Holder", "NamespaceHolder", "address_in_use", "explain", "overlaps"]

Kind = Literal["tcp", "udp"]


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


def overlaps(family: int, ip: str, dualstack: bool, entry: SocketEntry) -> bool:
    """Could ``entry`` conflict with a bind of ``ip`` (same port, ``family``; an IPv6 bind is v6-only
    unless ``dualstack``)? An IPv6 entry whose v6-only flag the source did not report (``/proc``)
    counts as dual-stack: the cautious answer."""
    e_ip = entry.laddr.ip
    if entry.family == family:
        return verdicts.is_wildcard(ip) or verdicts.is_wildcard(e_ip) or ip == e_ip
    if family == socket.AF_INET:  # an IPv6 entry covers IPv4 as a dual-stack wildcard or a v4-mapped address
        if e_ip == "::":
            return entry.v6only is not True
        return e_ip.startswith("::ffff:") and (verdicts.is_wildcard(ip) or verdicts.unmap(e_ip) in (ip, "0.0.0.0"))
    if not dualstack:  # a v6-only bind never conflicts with IPv4 sockets
        return False
    return ip == "::" or verdicts.is_wildcard(e_ip) or verdicts.unmap(ip) == e_ip


def _holders(
    entries: list[SocketEntry], kind: str, port: int, ns: str | None = None
) -> tuple[list[Holder], str | None]:
    """Sockets as holders with every process holding them; kernel-owned ones marked as orphans."""
    found = holders_of(entries, port, kind, ns)
    return list(found.holders), found.note


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
    facts = verdicts.Facts(kind, host, family, ip, port, dualstack, plain, None, ports, unprivileged, ns=ns)
    if plain == errno.EACCES:
        return verdicts.privileged(facts)
    if plain == errno.EADDRNOTAVAIL:
        return verdicts.build(
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
            return verdicts.listener(facts)
    if rows is None:
        rows = [e for e in port_entries(kind, port, None, ns) if overlaps(family, ip, dualstack, e)]
    facts.time_wait = [e for e in rows if e.state == TcpState.TIME_WAIT]
    facts.orphan_entries = [e for e in rows if e.inode == 0 and str(e.state) in kernel.ORPHAN_STATES - {"TIME_WAIT"}]
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
        return verdicts.free(facts, elsewhere and ns is None)
    if facts.listeners:
        if kind == "tcp":
            facts.joins_group = _probe(kind, family, ip, port, base | _twfix.F_REUSE_PORT, ns) == 0
        return verdicts.listener(facts)
    if facts.orphans and not facts.connections:
        return verdicts.orphans(facts)
    if facts.time_wait and not facts.connections:
        return verdicts.time_wait(facts)
    if facts.connections:
        return verdicts.connections(facts)
    return verdicts.unseen(facts, elsewhere)


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
        netns: ask about another network namespace (a path, a container's): the probe binds run there.
        pid: ask about the network namespace of this process (as ``netns``).
    """
    port = check_port(port)
    host = check_host(host)
    kind = check_kind(kind, kernel.PROTOCOLS)
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
