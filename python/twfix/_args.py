"""Argument checks and host resolution shared by every entry point (private).

Each check raises TypeError for a value of the wrong type and ValueError naming the argument for a
value out of range, before anything reaches the native layer. Host names are resolved once per call
and never cached; literal addresses are cached after one strict ``inet_pton`` check.
"""

from __future__ import annotations

import math
import operator
import os
import re
import socket
from typing import Final

__all__ = [
    "FAMILY_NAMES",
    "Resolved",
    "cached_literal",
    "check_backlog",
    "check_bind",
    "check_count",
    "check_family",
    "check_host",
    "check_kind",
    "check_port",
    "check_seconds",
    "check_timeout",
    "namespace_path",
    "parse_literal",
    "resolve",
    "resolve_all",
]

# (family, IP literal without scope, scope id)
Resolved = tuple[int, str, int]

FAMILY_NAMES: Final[dict[int, str]] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
# listen() takes a C int; larger values mean "as many as the kernel allows" (it caps at somaxconn).
MAX_BACKLOG: Final = 2**31 - 1
# The longest wait twfix accepts: socket timeouts, sleeps and deadlines all overflow the platform's time_t
# (an OverflowError from the stdlib) somewhere above 9e9 s; 1e9 s (about 31 years) is "forever" anyway.
MAX_SECONDS: Final = 1e9
# Counts such as ``top=`` are clamped here: no table has more distinct entries.
MAX_COUNT: Final = 2**32
# Resolution failures that say nothing about the argument: the caller may retry (stdlib gaierror kept).
_TRANSIENT_EAI: Final = {
    getattr(socket, name) for name in ("EAI_AGAIN", "EAI_MEMORY", "EAI_SYSTEM") if hasattr(socket, name)
}


def check_port(port: object, name: str = "port") -> int:
    if isinstance(port, bool) or not hasattr(port, "__index__"):
        raise TypeError(f"{name} must be an int, not {type(port).__name__}")
    value = operator.index(port)
    if not 0 <= value <= 65535:
        raise ValueError(f"{name} must be in 0..65535, got {value}")
    return value


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    if timeout is None:
        return None
    return check_seconds(timeout, name, none_hint=" (None blocks)")


def check_seconds(value: object, name: str, *, none_hint: str = "") -> float:
    """A finite, non-negative number of seconds no larger than :data:`MAX_SECONDS`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a number of seconds{' or None' if none_hint else ''}, not {type(value).__name__}"
        )
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds) or seconds < 0 or math.isinf(seconds):
        raise ValueError(f"{name} must be a finite, non-negative number of seconds{none_hint}, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:.0f} seconds (about 31 years){none_hint}, got {value!r}")
    return seconds


def check_host(host: object, name: str = "host") -> str:
    if not isinstance(host, str):
        raise TypeError(f"{name} must be a str, not {type(host).__name__}")
    if "\0" in host:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        host.encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"{name} {host!r} is not valid text (it holds a lone surrogate, as undecodable bytes give)"
        ) from None
    return host


def check_family(family: object) -> int:
    if family not in (socket.AF_INET, socket.AF_INET6) or isinstance(family, bool):
        raise ValueError(f"family must be socket.AF_INET, socket.AF_INET6 or None, got {family!r}")
    return socket.AF_INET if family == socket.AF_INET else socket.AF_INET6


def check_backlog(backlog: object) -> int:
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int or None, not {type(backlog).__name__}")
    if backlog < 0:
        raise ValueError(f"backlog must be >= 0, got {backlog}")
    return min(backlog, MAX_BACKLOG)


def check_count(value: object, name: str) -> int:
    """A non-negative int such as ``top=``; huge values are clamped, not an OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return min(value, MAX_COUNT)


def check_bind(
    port: object, host: object, timeout: object, family: object
) -> tuple[int, str, float | None, int | None]:
    """The arguments every bind-side constructor shares. The common case (an int port, a str host, no
    timeout or family) costs three type tests, which keeps the constructors as cheap as the stdlib."""
    if type(port) is not int or not 0 <= port <= 65535:
        port = check_port(port)
    if type(host) is not str:
        host = check_host(host)
    return (
        port,
        host,
        None if timeout is None else check_timeout(timeout),
        None if family is None else check_family(family),
    )


def namespace_path(netns: str | os.PathLike[str] | None, pid: int | None) -> str | None:
    """The network namespace to read: a path (``/run/netns/NAME``), a process's (``pid``), or None for
    the caller's own."""
    if netns is not None and pid is not None:
        raise ValueError("pass netns= or pid=, not both")
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"pid must be a positive int, got {pid!r}")
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessLookupError(f"no process with pid {pid}")
        return f"/proc/{pid}/ns/net"
    if netns is not None:
        path = os.fspath(netns)
        if not isinstance(path, str) or not path:
            raise ValueError(f"netns must be a path to a network namespace, got {netns!r}")
        return path
    return None


def check_kind(kind: object, allowed: tuple[str, ...], name: str = "kind") -> str:
    if not isinstance(kind, str):
        raise TypeError(f"{name} must be a str, not {type(kind).__name__}")
    if kind not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {kind!r}")
    return kind


# Literal hosts (and "") resolve to themselves; caching that check keeps the constructors as cheap as
# the stdlib sequence. Names are never cached: they are resolved once per call.
_LITERALS: dict[tuple[str, int | None], Resolved] = {}
_LITERALS_MAX: Final = 1024


def cached_literal(host: str, family: int | None) -> Resolved | None:
    """The cached resolution of a literal host, if it was seen before (the constructors' fast path)."""
    return _LITERALS.get((host, family))


# What inet_aton (and so getaddrinfo) takes as an IPv4 address besides dotted quads: 1 to 4 parts, each
# decimal, octal (leading 0) or hex (0x): "1.2.3" is 1.2.0.3, "0x7f.1" is 127.0.0.1, "2130706433" too.
_LOOSE_IPV4: Final = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+)){0,3}\.?")


def parse_literal(host: str, family: int | None, name: str = "host") -> Resolved | None:
    """``host`` as an IP literal ("" and "*" are the wildcard of ``family``), or None for a name."""
    if host == "" or host == "*":
        if family == socket.AF_INET6:
            return socket.AF_INET6, "::", 0
        return socket.AF_INET, "0.0.0.0", 0
    if not host.isascii():
        check_host(host, name)  # a name (IDN), unless it cannot even be encoded
        return None
    if "%" in host or "\0" in host:
        return None  # scoped IPv6 literals go through getaddrinfo, which knows interface names
    # inet_pton is strict (no "1.2.3", no octal), unlike inet_aton.
    candidate = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(candidate, host)
    except OSError:
        if _LOOSE_IPV4.fullmatch(host):
            raise ValueError(
                f"{name} {host!r} is a shorthand IPv4 form (inet_aton's: fewer parts, hex or octal) that names "
                "another address than it seems; write the four decimal parts"
            ) from None
        return None
    if family is not None and family != candidate:
        raise ValueError(
            f"{name} {host!r} is an {FAMILY_NAMES[candidate]} address, which does not match family {family!r}"
        )
    return candidate, host, 0


def resolve_all(host: str, port: int, family: int | None, sotype: int, name: str = "host") -> list[Resolved]:
    """Every address of ``host`` (a literal, or a name resolved once), in getaddrinfo's order.

    A name that does not resolve is a ValueError naming the argument; a transient failure (EAI_AGAIN)
    stays the stdlib's ``socket.gaierror`` (an OSError), so retry loops keep working.
    """
    literal = parse_literal(host, family, name)
    if literal is not None:
        return [literal]
    if "\0" in host:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        infos = socket.getaddrinfo(host, port, family or socket.AF_UNSPEC, sotype)
    except socket.gaierror as exc:
        if exc.errno in _TRANSIENT_EAI:
            raise
        raise ValueError(f"{name} {host!r} could not be resolved: {exc.strerror}") from exc
    except UnicodeError as exc:
        raise ValueError(f"{name} {host!r} could not be resolved: {exc}") from exc
    out: list[Resolved] = []
    for fam, _type, _proto, _canon, sockaddr in infos:
        entry: Resolved | None = None
        if fam == socket.AF_INET:
            entry = (socket.AF_INET, str(sockaddr[0]), 0)
        elif fam == socket.AF_INET6:
            entry = (socket.AF_INET6, str(sockaddr[0]).split("%", 1)[0], int(sockaddr[3]))  # type: ignore[misc]
        if entry is not None and entry not in out:
            out.append(entry)
    if not out:
        raise ValueError(f"{name} {host!r} has no {'matching ' if family else ''}IPv4 or IPv6 address")
    return out


def resolve(host: str, port: int, family: int | None, sotype: int, name: str = "host") -> Resolved:
    """``host`` as one address, like the stdlib's bind(): the first IPv4 address of a name when it has
    one (``localhost`` is 127.0.0.1 even where /etc/hosts lists ``::1`` first), else its first address."""
    hit = _LITERALS.get((host, family))
    if hit is not None:
        return hit
    literal = parse_literal(host, family, name)
    if literal is not None:
        if len(_LITERALS) < _LITERALS_MAX:
            _LITERALS[(host, family)] = literal
        return literal
    found = resolve_all(host, port, family, sotype, name)
    return next((r for r in found if r[0] == socket.AF_INET), found[0])
