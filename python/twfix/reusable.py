"""Safe reusable-socket constructors.

Each constructor returns a plain :class:`socket.socket` (close-on-exec, usable with asyncio and
selectors) and replaces the classic ``setsockopt(SO_REUSEADDR, 1)`` then ``bind()`` sequence with
the options that are right for the protocol:

* TCP listeners get ``SO_REUSEADDR`` so a restarted server binds over the TIME-WAIT connections of its
  previous incarnation.
* UDP sockets do **not** get ``SO_REUSEADDR``: on Linux it would let a process of another user bind
  the same address later and receive the datagrams (bpo-37228). UDP has no TIME-WAIT, so a port is
  free again as soon as its previous owner closed it.
"""

from __future__ import annotations

import _socket
import errno
import socket
from typing import Final

from twfix import _twfix
from twfix._args import (
    FAMILY_NAMES,
    MAX_BACKLOG,
    cached_literal,
    check_backlog,
    check_bind,
    check_host,
    check_port,
    check_timeout,
    parse_literal,
    resolve,
    resolve_all,
)
from twfix.conflict import address_in_use

__all__ = ["make_reusable", "reusable_tcp_client", "reusable_tcp_server", "reusable_tcp_servers", "reusable_udp"]

# The C-level attribute: a plain int, without the enum conversion of socket.socket.type.
_RAW_TYPE: Final = _socket.socket.type.__get__
_TYPE_MASK: Final = ~(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
_F_REUSE_ADDR: Final = _twfix.F_REUSE_ADDR
_F_REUSE_PORT: Final = _twfix.F_REUSE_PORT
_F_V6ONLY: Final = _twfix.F_V6ONLY
_F_DUALSTACK: Final = _twfix.F_DUALSTACK
_F_BIND_NO_PORT: Final = _twfix.F_BIND_NO_PORT
_TCP: Final = "tcp"
_UDP: Final = "udp"
# Like the stdlib's listen() default.
_DEFAULT_BACKLOG: Final = min(socket.SOMAXCONN, 128)


def _open(
    family: int,
    sotype: int,
    ip: str,
    port: int,
    scope_id: int,
    flags: int,
    backlog: int,
    protocol: str,
    host: str,
    timeout: float | None,
    multicast_group: str | None = None,
    explain: bool = True,
) -> socket.socket:
    """Create the Python socket, configure and bind it; close it on any error."""
    sock = socket.socket(family, sotype)
    try:
        if timeout is not None:
            sock.settimeout(timeout)
        if flags or backlog >= 0 or multicast_group is not None or scope_id:
            _twfix.bind_socket(sock.fileno(), family, sotype, ip, port, scope_id, flags, backlog, multicast_group)
        else:
            sock.bind((ip, port))  # no option to set: this is exactly the stdlib sequence
    except BaseException as exc:
        raise _failed(sock, exc, protocol, host, ip, port, family, flags, explain) from None
    return sock


def _failed(
    sock: socket.socket,
    exc: BaseException,
    protocol: str,
    host: str,
    ip: str,
    port: int,
    family: int,
    flags: int,
    explain: bool,
) -> BaseException:
    """Close the half-built socket; the exception to raise (EADDRINUSE becomes the explained error)."""
    sock.close()
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return address_in_use(
            exc, protocol=protocol, host=host, ip=ip, port=port, family=family, flags=flags, explain=explain
        )
    return exc


def _timeout(timeout: float | None, blocking: bool) -> float | None:
    """``blocking=False`` is ``settimeout(0.0)``: O_NONBLOCK on the descriptor, as event loops need."""
    if blocking:
        return timeout
    if timeout:
        raise ValueError(f"blocking=False and timeout={timeout!r} contradict each other; pass one of them")
    return 0.0


def reusable_udp(
    port: int = 0,
    host: str = "",
    *,
    reuse_port: bool = False,
    timeout: float | None = None,
    family: socket.AddressFamily | None = None,
    multicast_group: str | None = None,
    blocking: bool = True,
    explain: bool = True,
) -> socket.socket:
    """Like ``socket.socket(AF_INET, SOCK_DGRAM)`` + ``setsockopt(SO_REUSEADDR)`` + ``bind()``, but safe.

    UDP has no TIME-WAIT, so a port is free as soon as its previous owner closed it: no option is
    needed for a restart. The socket is bound **without** ``SO_REUSEADDR``, so while it lives no other
    socket (in particular none of another user) can bind the same address and receive its datagrams;
    a conflict raises :class:`~twfix.AddressInUseError`.

    Args:
        port: the local port, 0 for an ephemeral one.
        host: the local address or name ("" for all IPv4 addresses, "::" for all IPv6 ones).
        reuse_port: set ``SO_REUSEPORT``: other sockets **of the same effective user** that also set it
            may bind the same address, and the kernel load-balances datagrams among them.
        timeout: passed to ``settimeout()``; None leaves the default.
        family: ``AF_INET`` or ``AF_INET6``; inferred from ``host`` when None.
        multicast_group: join this multicast group and allow other receivers of the group on this port
            (``SO_REUSEADDR``), the one legitimate reason to share a UDP port between users. The socket is
            bound to the group address, not the wildcard, so it receives the group's datagrams only and no
            unicast datagram of the port is ever delivered to it (nothing of yours for another receiver to
            take); ``host`` must be "" or the group itself.
        blocking: False makes the socket non-blocking (``settimeout(0.0)``), as event loops expect.
        explain: False skips the explanation of an address conflict (hot retry loops): the
            ``AddressInUseError`` then carries the kernel's word only.
    """
    port, host, timeout, fam = check_bind(port, host, timeout, family)
    if not blocking:
        timeout = _timeout(timeout, blocking)
    if multicast_group is None and not reuse_port:
        family_, ip, _scope = cached_literal(host, fam) or resolve(host, port, fam, socket.SOCK_DGRAM)
        if family_ == socket.AF_INET:
            # Nothing to set on an IPv4 socket: exactly the stdlib sequence, kept as cheap as it.
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                if timeout is not None:
                    sock.settimeout(timeout)
                sock.bind((ip, port))
            except BaseException as exc:
                raise _failed(sock, exc, _UDP, host, ip, port, family_, 0, explain) from None
            return sock
    flags = _F_REUSE_PORT if reuse_port else 0
    if multicast_group is not None:
        multicast_group = check_host(multicast_group, "multicast_group")
        group_family, group_ip, _ = resolve(multicast_group, port, fam, socket.SOCK_DGRAM, "multicast_group")
        if not _is_multicast(group_family, group_ip):
            raise ValueError(f"multicast_group {multicast_group!r} is not a multicast address")
        if host not in ("", "*", multicast_group, group_ip):
            raise ValueError(
                f"host {host!r} with multicast_group {multicast_group!r}: a group receiver is bound to the group "
                "address itself (pass host=''), never to a unicast address another receiver could share"
            )
        fam = group_family
        multicast_group = group_ip
        host = group_ip
        flags |= _F_REUSE_ADDR
    family_, ip, scope_id = resolve(host, port, fam, socket.SOCK_DGRAM)
    if family_ == socket.AF_INET6:
        flags |= _F_V6ONLY
    return _open(
        family_, socket.SOCK_DGRAM, ip, port, scope_id, flags, -1, _UDP, host, timeout, multicast_group, explain
    )


def _is_multicast(family: int, ip: str) -> bool:
    packed = socket.inet_pton(family, ip)
    if family == socket.AF_INET:
        return 224 <= packed[0] <= 239
    return packed[0] == 0xFF


def reusable_tcp_server(
    port: int = 0,
    host: str = "",
    *,
    backlog: int | None = None,
    reuse_port: bool = False,
    dualstack_ipv6: bool = False,
    timeout: float | None = None,
    family: socket.AddressFamily | None = None,
    blocking: bool = True,
    explain: bool = True,
) -> socket.socket:
    """Like socket.create_server, but binds over the TIME-WAIT left by a previous server.

    The listener gets ``SO_REUSEADDR``, so the next instance of this server can bind while connections
    of this one sit in TIME-WAIT (the flag is inherited by those TIME-WAIT sockets, which is what lets
    the next bind through). A name is resolved like the stdlib's bind(): its first IPv4 address when it
    has one (``localhost`` is 127.0.0.1), else its first IPv6 address.

    Args:
        port: the port to listen on, 0 for an ephemeral one.
        host: local address or name, resolved once; "" means all IPv4 addresses (all IPv6 and IPv4
            ones with ``dualstack_ipv6=True``).
        backlog: ``listen()`` backlog; None uses ``min(SOMAXCONN, 128)`` like the stdlib.
        reuse_port: also set ``SO_REUSEPORT``, letting several listeners **of the same user** share the
            port with load balancing. Off by default: it silently allows a duplicate server.
        dualstack_ipv6: one IPv6 socket that also accepts IPv4 (``IPV6_V6ONLY=0``).
        timeout: passed to ``settimeout()``; None leaves the default.
        family: ``AF_INET`` or ``AF_INET6``; inferred from ``host`` when None.
        blocking: False makes the listener non-blocking (``settimeout(0.0)``), which tornado's
            ``HTTPServer.add_sockets()`` needs; asyncio, uvicorn and aiohttp set it themselves.
        explain: False skips the explanation of an address conflict (hot retry loops): the
            ``AddressInUseError`` then carries the kernel's word only.
    """
    port, host, timeout, fam = check_bind(port, host, timeout, family)
    if not blocking:
        timeout = _timeout(timeout, blocking)
    if backlog is None:
        backlog = _DEFAULT_BACKLOG
    elif type(backlog) is not int or not 0 <= backlog <= MAX_BACKLOG:
        backlog = check_backlog(backlog)
    flags = _F_REUSE_ADDR | _F_REUSE_PORT if reuse_port else _F_REUSE_ADDR
    if dualstack_ipv6:
        if fam == socket.AF_INET:
            raise ValueError("dualstack_ipv6=True needs family AF_INET6, not AF_INET")
        if not socket.has_dualstack_ipv6():
            raise ValueError("dualstack_ipv6 is not supported on this platform")
        fam = socket.AF_INET6
    family_, ip, scope_id = resolve(host, port, fam, socket.SOCK_STREAM)
    if family_ == socket.AF_INET6:
        flags |= _F_DUALSTACK if dualstack_ipv6 else _F_V6ONLY
    return _open(family_, socket.SOCK_STREAM, ip, port, scope_id, flags, backlog, _TCP, host, timeout, None, explain)


def reusable_tcp_servers(
    port: int = 0,
    host: str = "",
    *,
    backlog: int | None = None,
    reuse_port: bool = False,
    timeout: float | None = None,
    blocking: bool = True,
    explain: bool = True,
) -> list[socket.socket]:
    """A listener on **every** address of ``host``, all on one port (like tornado's ``bind_sockets``).

    ``host=""`` means the IPv4 and the IPv6 wildcard (two sockets, the IPv6 one v6-only); a name such as
    ``localhost`` gives one socket per address it resolves to, IPv4 ones first (``127.0.0.1``, then ``::1``). With
    ``port=0`` the first socket takes an ephemeral port and the others bind the same one. Each socket is
    set up as :func:`reusable_tcp_server` does; if one bind fails, the ones already made are closed.
    """
    port, host, timeout, _fam = check_bind(port, host, timeout, None)
    addresses: list[tuple[int, str, int]]
    if host in ("", "*"):
        addresses = [(int(socket.AF_INET), "0.0.0.0", 0)]
        if socket.has_ipv6:
            addresses.append((int(socket.AF_INET6), "::", 0))
    else:
        # IPv4 first, as tornado's bind_sockets and the stdlib's bind(): code that builds a URL from the
        # first socket gets 127.0.0.1, not a bare IPv6 literal (stable sort: getaddrinfo's order otherwise).
        addresses = sorted(resolve_all(host, port, None, socket.SOCK_STREAM), key=lambda a: a[0] != socket.AF_INET)
    made: list[socket.socket] = []
    try:
        for family, ip, _scope in addresses:
            sock = reusable_tcp_server(
                port,
                ip,
                backlog=backlog,
                reuse_port=reuse_port,
                timeout=timeout,
                family=socket.AddressFamily(family),
                blocking=blocking,
                explain=explain,
            )
            made.append(sock)
            port = port or sock.getsockname()[1]
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


def reusable_tcp_client(
    host: str,
    port: int,
    *,
    source_address: tuple[str, int] | None = None,
    timeout: float | None = None,
) -> socket.socket:
    """Like socket.create_connection, but without burning ephemeral ports.

    When ``source_address`` names an address with port 0, ``IP_BIND_ADDRESS_NO_PORT`` defers the port
    choice to ``connect()``, so the same local port can serve different destinations instead of being
    reserved exclusively by ``bind()``. ``SO_REUSEADDR`` is never set: on a client it would only let an
    explicit source port collide with TIME-WAIT 4-tuples.

    Args:
        host: the server's address or name, resolved once; each of its addresses is tried in turn, like
            :func:`socket.create_connection` (with ``source_address``, only those of its family).
        port: the server's port (1..65535).
        source_address: ``(host, port)`` to bind before connecting, or None.
        timeout: connect and I/O timeout passed to ``settimeout()``; None leaves the default.
    """
    host = check_host(host)
    port = check_port(port)
    if port == 0:
        raise ValueError("port must be in 1..65535 for a connection, got 0")
    timeout = check_timeout(timeout)
    src_host: str | None = None
    src_port = 0
    if source_address is not None:
        if not isinstance(source_address, tuple) or len(source_address) != 2:
            raise TypeError("source_address must be a (host, port) tuple or None")
        src_host = check_host(source_address[0], "source_address host")
        src_port = check_port(source_address[1], "source_address port")
    if host == "":
        raise ValueError("host must name the server to connect to, not be empty")
    src_family: int | None = None
    if src_host is not None:
        src_family = resolve(src_host, src_port, None, socket.SOCK_STREAM, "source_address host")[0]
    candidates = _candidates(host, port, src_family)
    last: OSError | None = None
    for family, ip, scope_id in candidates:  # like create_connection: each address of a name in turn
        try:
            return _connect_one(family, ip, port, scope_id, src_host, src_port, timeout)
        except OSError as exc:
            last = exc
    assert last is not None  # _candidates never returns an empty list
    raise last


def _candidates(host: str, port: int, family: int | None) -> list[tuple[int, str, int]]:
    """The addresses to try for a connection: the literal itself, or every address of a name."""
    literal = parse_literal(host, None, "host")
    if literal is not None and family is not None and literal[0] != family:
        raise ValueError(f"source_address is {FAMILY_NAMES[family]} but host {host!r} is {FAMILY_NAMES[literal[0]]}")
    return resolve_all(host, port, family, socket.SOCK_STREAM)


def _connect_one(
    family: int, ip: str, port: int, scope_id: int, src_host: str | None, src_port: int, timeout: float | None
) -> socket.socket:
    if src_host is not None:
        _, src_ip, src_scope = resolve(src_host, src_port, family, socket.SOCK_STREAM, "source_address host")
        flags = _F_BIND_NO_PORT if src_port == 0 else 0
        if family == socket.AF_INET6:
            flags |= _F_V6ONLY
        sock = _open(family, socket.SOCK_STREAM, src_ip, src_port, src_scope, flags, -1, _TCP, src_host, timeout)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if timeout is not None:
            sock.settimeout(timeout)
    try:
        sock.connect((ip, port, 0, scope_id) if family == socket.AF_INET6 else (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def make_reusable(sock: socket.socket, *, reuse_port: bool = False) -> socket.socket:
    """Apply twfix's safe reuse options to an existing, **not yet bound** socket; returns it.

    TCP sockets get ``SO_REUSEADDR``; UDP sockets get nothing unless ``reuse_port=True``
    (``SO_REUSEPORT``, same-user sharing). The options only matter at ``bind()`` time, so a bound socket
    raises :class:`ValueError` instead of silently doing nothing (the classic "``allow_reuse_address``
    set after ``server_bind``" mistake).
    """
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    fd = sock.fileno()
    if fd < 0:
        raise ValueError("sock is closed")
    sotype = _RAW_TYPE(sock) & _TYPE_MASK
    if sotype == socket.SOCK_STREAM:
        flags = _F_REUSE_ADDR | _F_REUSE_PORT if reuse_port else _F_REUSE_ADDR
    elif sotype == socket.SOCK_DGRAM:
        flags = _F_REUSE_PORT if reuse_port else 0
    else:
        raise ValueError(f"sock must be a SOCK_STREAM or SOCK_DGRAM socket, not {sock.type!r}")
    _twfix.make_reusable(fd, flags)  # also refuses non-IP sockets and bound ones, naming the address
    return sock
