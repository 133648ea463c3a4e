"""Linux's rules for sockets and ports, as data: the one home of every kernel number twfix relies on.

No I/O here: what the running kernel says (its sysctls, its socket table) is read elsewhere; what the
kernel's source fixes (state numbers, defaults, timer constants, which parity automatic port assignment
searches first) lives here, and every other module asks this one.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BOUND_ONLY_STATES",
    "DEFAULT_PORT_RANGE",
    "KINDS",
    "ORPHAN_RETRIES_WHEN_ZERO",
    "ORPHAN_STATES",
    "PROTOCOLS",
    "RTO_MAX",
    "RTO_MIN",
    "TCP_STATES",
    "TIME_WAIT_SECONDS",
    "UNPRIVILEGED_PORT_START",
    "WALK_STATES",
    "PortRange",
    "bind_first",
    "connect_first",
    "orphan_give_up_seconds",
    "state_mask",
]

# (name, number in include/net/tcp_states.h, how `ss` spells it). UDP sockets report CLOSE (ss: UNCONN) or
# ESTABLISHED. NEW_SYN_RECV is a request socket, reported as SYN_RECV; BOUND_INACTIVE (Linux 6.8+) is a
# TCP socket bound but neither listening nor connected, which the kernel reports in state CLOSE.
TCP_STATES: Final[tuple[tuple[str, int, str], ...]] = (
    ("ESTABLISHED", 1, "estab"),
    ("SYN_SENT", 2, "syn-sent"),
    ("SYN_RECV", 3, "syn-recv"),
    ("FIN_WAIT1", 4, "fin-wait-1"),
    ("FIN_WAIT2", 5, "fin-wait-2"),
    ("TIME_WAIT", 6, "time-wait"),
    ("CLOSE", 7, "unconn"),
    ("CLOSE_WAIT", 8, "close-wait"),
    ("LAST_ACK", 9, "last-ack"),
    ("LISTEN", 10, "listen"),
    ("CLOSING", 11, "closing"),
    ("NEW_SYN_RECV", 12, "new-syn-recv"),
    ("BOUND_INACTIVE", 13, "bound-inactive"),
)


def state_mask(numbers: list[int] | tuple[int, ...]) -> int:
    """The inet_diag request bit mask of these state numbers."""
    mask = 0
    for n in numbers:
        mask |= 1 << n
    return mask


# A whole-table walk asks for states 0..11 without CLOSE: the established and listening hashes. CLOSE and
# BOUND_INACTIVE stand for bound-only sockets, and asking for them makes the kernel also walk the bind hash,
# which every namespace of the host shares (1.2-1.6x the walk, about 6 ms even in an empty namespace).
# BOUND_ONLY_STATES: TCP sockets bound but neither listening nor connected. From 6.8 the kernel reports them
# when asked for BOUND_INACTIVE, in state CLOSE; before 6.8 no request shows them (twfix.features probes it).
BOUND_ONLY_STATES: Final = state_mask((7, 13))
WALK_STATES: Final = state_mask(tuple(range(12))) & ~BOUND_ONLY_STATES

# States of a connection whose socket was closed while the kernel finishes the close: no process holds them.
ORPHAN_STATES: Final = frozenset({"FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK", "TIME_WAIT"})

# The kinds of socket twfix reads: name -> (protocol, address family or None for both), psutil's spelling.
KINDS: Final[dict[str, tuple[str, int | None]]] = {
    "tcp": ("tcp", None),
    "tcp4": ("tcp", socket.AF_INET),
    "tcp6": ("tcp", socket.AF_INET6),
    "udp": ("udp", None),
    "udp4": ("udp", socket.AF_INET),
    "udp6": ("udp", socket.AF_INET6),
}
# The protocols (what a port belongs to: a TCP port and a UDP port of one number are two ports).
PROTOCOLS: Final = ("tcp", "udp")

# ip_local_port_range's default since Linux 4.2 (bounds of different parity, as the kernel prefers).
DEFAULT_PORT_RANGE: Final = (32768, 60999)
# net.ipv4.ip_unprivileged_port_start's default: ports below it need CAP_NET_BIND_SERVICE.
UNPRIVILEGED_PORT_START: Final = 1024
# TCP_TIMEWAIT_LEN: a TIME-WAIT lasts 60 s, whatever tcp_fin_timeout says.
TIME_WAIT_SECONDS: Final = 60
# TCP_RTO_MIN and TCP_RTO_MAX, seconds.
RTO_MIN: Final = 0.2
RTO_MAX: Final = 120.0
# tcp_orphan_retries() in net/ipv4/tcp_timer.c: 0 means 8 for a peer that still answers.
ORPHAN_RETRIES_WHEN_ZERO: Final = 8


def connect_first(low: int, port: int) -> bool:
    """True for a port with the parity connect() searches first in a range starting at ``low`` (Linux 4.6+:
    __inet_hash_connect starts at the low parity; inet_csk_find_open_port, for bind(0), at the other)."""
    return port % 2 == low % 2


def bind_first(low: int, port: int) -> bool:
    """True for a port with the parity bind(0) searches first in a range starting at ``low``."""
    return not connect_first(low, port)


def orphan_give_up_seconds(retries: int) -> float:
    """tcp_model_timeout() as retransmits_timed_out() uses it for an orphan: the seconds ``retries``
    retransmissions take when each waits twice the last, from RTO_MIN up to RTO_MAX. The kernel gives up at
    the first retransmission timer that fires once this long has passed since the first retransmission."""
    thresh = 0
    while RTO_MIN * (2 << thresh) <= RTO_MAX:  # ilog2(RTO_MAX / RTO_MIN)
        thresh += 1
    if retries <= thresh:
        return ((2 << retries) - 1) * RTO_MIN
    return ((2 << thresh) - 1) * RTO_MIN + (retries - thresh) * RTO_MAX


# ---------------------------------------------------------------------------------------------- port settings


@dataclass(frozen=True)
class PortRange:
    """The ephemeral ports of a network namespace: ``ip_local_port_range`` minus ``ip_local_reserved_ports``.

    The one place of the rule "the kernel may hand this port to connect() or bind(0)": inside the range
    and not reserved (reserved ports are skipped by automatic assignment only; explicit binds ignore them).
    """

    low: int
    high: int
    reserved: tuple[tuple[int, int], ...] = ()

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    @property
    def reserved_inside(self) -> int:
        """How many ports of the range are reserved (overlapping reserved ranges counted once)."""
        clipped = sorted(
            (max(a, self.low), min(b, self.high)) for a, b in self.reserved if a <= self.high and b >= self.low
        )
        count, reach = 0, self.low - 1
        for a, b in clipped:
            if b > reach:
                count += b - max(a, reach + 1) + 1
                reach = b
        return count

    def _assigned(self) -> set[int]:
        ports = set(range(self.low, self.high + 1))
        for a, b in self.reserved:
            ports.difference_update(range(max(a, self.low), min(b, self.high) + 1))
        return ports

    @property
    def usable(self) -> int:
        """Ports automatic assignment can hand out: the range minus the reserved ports inside it."""
        return self.size - self.reserved_inside

    def contains(self, port: int) -> bool:
        return self.low <= port <= self.high

    def is_reserved(self, port: int) -> bool:
        return any(a <= port <= b for a, b in self.reserved)

    def assigns(self, port: int) -> bool:
        """True when connect() or bind(0) may be given ``port``: inside the range and not reserved."""
        return self.contains(port) and not self.is_reserved(port)

    def connect_first(self, port: int) -> bool:
        """True for a port of the range with the parity connect() searches first (the range's low parity);
        bind(0) searches the other parity first (:func:`connect_first`)."""
        return self.assigns(port) and connect_first(self.low, port)

    def bind_first(self, port: int) -> bool:
        """True for a port of the range with the parity bind(0) searches first (see :meth:`connect_first`)."""
        return self.assigns(port) and bind_first(self.low, port)

    def port_set(self) -> bytes:
        """The ports :meth:`assigns` accepts as a 65,536-bit map (bit ``p % 8`` of byte ``p // 8``), the
        form the native aggregation reads. Cached per value of the two knobs: building it costs about
        3 ms, which every snapshot would pay again."""
        return _port_set(self)

    def _port_set_uncached(self) -> bytes:
        bits = bytearray(8192)
        for p in self._assigned():
            if 0 <= p <= 65535:
                bits[p >> 3] |= 1 << (p & 7)
        return bytes(bits)


@functools.lru_cache(maxsize=16)
def _port_set(ports: PortRange) -> bytes:
    return ports._port_set_uncached()
