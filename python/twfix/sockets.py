"""Safe reusable-socket constructors.

Each constructor returns a plain :class:`socket.socket` (close-on-exec, usable with asyncio and
selectors) and replaces the classic ``setsockopt(SO_REUSEADDR, 1)`` then ``bind()`` sequence with
the options that are right for the protocol:

* TCP listeners get ``SO_REUSEADDR`` (POSIX) so a restarted server binds over the TIME-WAIT
  connections of its previous incarnation; on Windows they get ``SO_EXCLUSIVEADDRUSE`` instead,
  because Windows' ``SO_REUSEADDR`` lets another socket steal a port in active use.
* UDP sockets do **not** get ``SO_REUSEADDR``: on Linux it would let a process of another user bind
  the same address later and receive the datagrams (bpo-37228). UDP has no TIME-WAIT, so a port is
  free again as soon as its previous owner closed it.
"""

from __future__ import annotations

import errno
import math
import operator
import socket
import sys
from typing import Final

from twfix import _twfix
from twfix.errors import AddressInUseError

__all__ = ["make_reusable", "reusable_tcp_client", "reusable_tcp_server", "reusable_udp"]

_IS_WINDOWS: Final = sys.platform == "win32"
_TCP: Final = "tcp"
_UDP: Final = "udp"


def _check_port(port: object, name: str = "port") -> int:
    if isinstance(port, bool) or not hasattr(port, "__index__"):
        raise TypeError(f"{name} must be an int, not {type(port).__name__}")
    value = operator.index(port)  # type: ignore[arg-type]
    if not 0 <= value <= 65535:
        raise ValueError(f"{name} must be in 0..65535, got {value}")
    return value


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    value = float(timeout)
    if math.isnan(value) or value < 0:
        raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    return value


def _check_host(host: object, name: str = "host") -> str:
    if not isinstance(host, str):
        raise TypeError(f"{name} must be a str, not {type(host).__name__}")
    if "\0" in host:
        raise ValueError(f"{name} must not contain NUL characters")
    return host


def _check_family(family: object) -> int | None:
    if family is None:
        return None
    if family not in (socket.AF_INET, socket.AF_INET6) or isinstance(family, bool):
        raise ValueError(f"family must be socket.AF_INET, socket.AF_INET6 or None, got {family!r}")
    return int(family)  # type: ignore[call-overload]


def _resolve(host: str, port: int, family: int | None, sotype: int, name: str = "host") -> tuple[int, str, int]:
    """Turn ``host`` into ``(family, ip_literal, scope_id)``, resolving a name once."""
    if host == "" or host == "*":
        if family == socket.AF_INET6:
            return socket.AF_INET6, "::", 0
        return socket.AF_INET, "0.0.0.0", 0
    if "%" not in host:
        # Fast path for literals: inet_pton is strict (no "1.2.3", no octal), unlike inet_aton.
        candidate = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            socket.inet_pton(candidate, host)
        except OSError:
            pass
        else:
            if family is not None and family != candidate:
                kind = "IPv6" if candidate == socket.AF_INET6 else "IPv4"
                raise ValueError(f"{name} {host!r} is an {kind} address, which does not match family {family!r}")
            return candidate, host, 0
    try:
        infos = socket.getaddrinfo(host, port, family or socket.AF_UNSPEC, sotype)
    except socket.gaierror as exc:
        raise ValueError(f"{name} {host!r} could not be resolved: {exc.strerror}") from exc
    for fam, _type, _proto, _canon, sockaddr in infos:
        if fam == socket.AF_INET:
            return fam, str(sockaddr[0]), 0
        if fam == socket.AF_INET6:
            return fam, str(sockaddr[0]).split("%", 1)[0], int(sockaddr[3])  # type: ignore[misc]
    raise ValueError(f"{name} {host!r} has no IPv4 or IPv6 address")


def _wrap(fd: int, family: int, sotype: int, timeout: float | None) -> socket.socket:
    proto = socket.IPPROTO_TCP if sotype == socket.SOCK_STREAM else socket.IPPROTO_UDP
    try:
        sock = socket.socket(family, sotype, proto, fileno=fd)
    except BaseException:
        _close_fd(fd)
        raise
    if timeout is not None:
        sock.settimeout(timeout)
    return sock


def _close_fd(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass


def _open(
    family: int,
    sotype: int,
    ip: str,
    port: int,
    scope_id: int,
    flags: int,
    backlog: int,
    *,
    protocol: str,
    host: str,
    multicast_group: str | None = None,
) -> int:
    try:
        return _twfix.open_socket(family, sotype, ip, port, scope_id, flags, backlog, multicast_group)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _address_in_use(exc, protocol, host, ip, port, family, flags) from None
        raise


def _address_in_use(
    exc: OSError, protocol: str, host: str, ip: str, port: int, family: int, flags: int
) -> AddressInUseError:
    """Build the explained error for a failed bind/listen."""
    from twfix import _explain

    return _explain.address_in_use(
        exc, protocol=protocol, host=host, ip=ip, port=port, family=family, flags=flags
    )


def reusable_udp(
    port: int = 0,
    host: str = "",
    *,
    reuse_port: bool = False,
    timeout: float | None = None,
    family: socket.AddressFamily | None = None,
    multicast_group: str | None = None,
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
            (``SO_REUSEADDR``), the one legitimate reason to share a UDP port between users.
            ``host`` should then be "" (or the group address itself).
    """
    port = _check_port(port)
    host = _check_host(host)
    timeout = _check_timeout(timeout)
    fam = _check_family(family)
    flags = _twfix.F_REUSE_PORT if reuse_port else 0
    if multicast_group is not None:
        multicast_group = _check_host(multicast_group, "multicast_group")
        group_family, group_ip, _ = _resolve(multicast_group, port, fam, socket.SOCK_DGRAM, "multicast_group")
        if not _is_multicast(group_family, group_ip):
            raise ValueError(f"multicast_group {multicast_group!r} is not a multicast address")
        fam = group_family
        multicast_group = group_ip
        flags |= _twfix.F_REUSE_ADDR
    family_, ip, scope_id = _resolve(host, port, fam, socket.SOCK_DGRAM)
    if family_ == socket.AF_INET6:
        flags |= _twfix.F_V6ONLY
    fd = _open(
        family_,
        socket.SOCK_DGRAM,
        ip,
        port,
        scope_id,
        flags,
        -1,
        protocol=_UDP,
        host=host,
        multicast_group=multicast_group,
    )
    return _wrap(fd, family_, socket.SOCK_DGRAM, timeout)


def _is_multicast(family: int, ip: str) -> bool:
    packed = socket.inet_pton(family, ip)
    if family == socket.AF_INET:
        return 224 <= packed[0] <= 239
    return packed[0] == 0xFF


def _default_backlog() -> int:
    return min(socket.SOMAXCONN, 128)


def reusable_tcp_server(
    port: int = 0,
    host: str = "",
    *,
    backlog: int | None = None,
    reuse_port: bool = False,
    dualstack_ipv6: bool = False,
    timeout: float | None = None,
    family: socket.AddressFamily | None = None,
) -> socket.socket:
    """Like :func:`socket.create_server`, but binds over the TIME-WAIT left by a previous server.

    On POSIX the listener gets ``SO_REUSEADDR``, so the next instance of this server can bind while
    connections of this one sit in TIME-WAIT (the flag is inherited by those TIME-WAIT sockets, which
    is what lets the next bind through). On Windows ``SO_EXCLUSIVEADDRUSE`` is set instead, because
    Windows' ``SO_REUSEADDR`` allows stealing a port in active use and Windows has no such TIME-WAIT
    bind restriction to lift.

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
    """
    port = _check_port(port)
    host = _check_host(host)
    timeout = _check_timeout(timeout)
    fam = _check_family(family)
    if backlog is None:
        backlog_ = _default_backlog()
    else:
        if isinstance(backlog, bool) or not isinstance(backlog, int):
            raise TypeError(f"backlog must be an int or None, not {type(backlog).__name__}")
        if backlog < 0:
            raise ValueError(f"backlog must be >= 0, got {backlog}")
        backlog_ = min(backlog, 2**31 - 1)
    if dualstack_ipv6:
        if not socket.has_dualstack_ipv6():
            raise ValueError("dualstack_ipv6 is not supported on this platform")
        if fam == socket.AF_INET:
            raise ValueError("dualstack_ipv6=True needs family AF_INET6, not AF_INET")
        fam = socket.AF_INET6
    family_, ip, scope_id = _resolve(host, port, fam, socket.SOCK_STREAM)
    flags = _twfix.F_EXCLUSIVE if _IS_WINDOWS else _twfix.F_REUSE_ADDR
    if reuse_port:
        flags |= _twfix.F_REUSE_PORT
    if family_ == socket.AF_INET6:
        flags |= _twfix.F_DUALSTACK if dualstack_ipv6 else _twfix.F_V6ONLY
    fd = _open(family_, socket.SOCK_STREAM, ip, port, scope_id, flags, backlog_, protocol=_TCP, host=host)
    return _wrap(fd, family_, socket.SOCK_STREAM, timeout)


def reusable_tcp_client(
    host: str,
    port: int,
    *,
    source_address: tuple[str, int] | None = None,
    timeout: float | None = None,
) -> socket.socket:
    """Like :func:`socket.create_connection`, but without burning ephemeral ports.

    When ``source_address`` names an address with port 0, ``IP_BIND_ADDRESS_NO_PORT`` defers the port
    choice to ``connect()``, so the same local port can serve different destinations instead of being
    reserved exclusively by ``bind()``. ``SO_REUSEADDR`` is never set: on a client it would only let an
    explicit source port collide with TIME-WAIT 4-tuples.

    Args:
        host: the server's address or name, resolved once (first usable address is tried).
        port: the server's port (1..65535).
        source_address: ``(host, port)`` to bind before connecting, or None.
        timeout: connect and I/O timeout passed to ``settimeout()``; None leaves the default.
    """
    host = _check_host(host)
    port = _check_port(port)
    if port == 0:
        raise ValueError("port must be in 1..65535 for a connection, got 0")
    timeout = _check_timeout(timeout)
    src_host: str | None = None
    src_port = 0
    if source_address is not None:
        if not isinstance(source_address, tuple) or len(source_address) != 2:
            raise TypeError("source_address must be a (host, port) tuple or None")
        src_host = _check_host(source_address[0], "source_address host")
        src_port = _check_port(source_address[1], "source_address port")
    if host == "":
        raise ValueError("host must name the server to connect to, not be empty")
    family, ip, scope_id = _resolve(host, port, None, socket.SOCK_STREAM)
    if src_host is not None:
        src_family, src_ip, src_scope = _resolve(src_host, src_port, family, socket.SOCK_STREAM, "source_address host")
        flags = _twfix.F_BIND_NO_PORT if src_port == 0 else 0
        if family == socket.AF_INET6:
            flags |= _twfix.F_V6ONLY
        fd = _open(src_family, socket.SOCK_STREAM, src_ip, src_port, src_scope, flags, -1, protocol=_TCP, host=src_host)
    else:
        fd = _twfix.open_socket(family, socket.SOCK_STREAM, "", 0, 0, _twfix.F_NO_BIND, -1, None)
    sock = _wrap(fd, family, socket.SOCK_STREAM, timeout)
    try:
        if family == socket.AF_INET6:
            sock.connect((ip, port, 0, scope_id))
        else:
            sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def make_reusable(sock: socket.socket, *, reuse_port: bool = False) -> socket.socket:
    """Apply twfix's safe reuse options to an existing, **not yet bound** socket; returns it.

    TCP sockets get ``SO_REUSEADDR`` (``SO_EXCLUSIVEADDRUSE`` on Windows); UDP sockets get nothing
    unless ``reuse_port=True`` (``SO_REUSEPORT``, same-user sharing). The options only matter at
    ``bind()`` time, so a bound socket raises :class:`ValueError` instead of silently doing nothing
    (the classic "``allow_reuse_address`` set after ``server_bind``" mistake).
    """
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if sock.fileno() < 0:
        raise ValueError("sock is closed")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"sock must be an AF_INET or AF_INET6 socket, not {sock.family!r}")
    sotype = sock.type & ~(getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0))
    if sotype not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        raise ValueError(f"sock must be a SOCK_STREAM or SOCK_DGRAM socket, not {sock.type!r}")
    bound = sock.getsockname()
    if bound[1] != 0:
        raise ValueError(
            f"sock is already bound to {_fmt_addr(bound)}: reuse options must be set before bind() "
            "to have any effect (set them first, then bind)"
        )
    flags = 0
    if sotype == socket.SOCK_STREAM:
        flags = _twfix.F_EXCLUSIVE if _IS_WINDOWS else _twfix.F_REUSE_ADDR
    if reuse_port:
        flags |= _twfix.F_REUSE_PORT
    _twfix.set_flags(sock.fileno(), int(sock.family), flags)
    return sock


def _fmt_addr(addr: tuple[object, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
