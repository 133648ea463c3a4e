"""The knobs twfix knows (private): for each, its kind, its default (with the kernel version that set
it), what it does and does not control, whether it is per network namespace, its history, the advice, and
the values a write may take. The facts behind the defaults come from ``twfix.kernel`` where it holds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from twfix import kernel

__all__ = ["CATALOGUE", "Knob"]


@dataclass(frozen=True)
class Knob:
    kind: str  # "int", "range", "ports", "ints", "str"
    default: Any  # a value, None when it varies, or "ehash/2" style derivations (see _default)
    unit: str
    meaning: str
    not_controls: str
    per_netns: bool
    history: str
    advice: str
    bounds: tuple[int, int] | None = None  # accepted values for writes


CATALOGUE: Final[dict[str, Knob]] = {
    "net.ipv4.tcp_fin_timeout": Knob(
        "int",
        60,
        "s",
        "lifetime of orphaned FIN_WAIT_2 sockets (no longer held by any application)",
        "the length of TIME-WAIT (a fixed 60 s on Linux)",
        True,
        "per network namespace since 4.6",
        "leave at 60 unless orphaned FIN_WAIT_2 sockets pile up; lowering it does nothing for TIME-WAIT",
        (1, 2**31 - 1),
    ),
    "net.ipv4.tcp_tw_reuse": Knob(
        "int",
        2,
        "",
        "whether an outgoing connect() may take over a TIME-WAIT 4-tuple: 0 off, 1 all, 2 loopback only",
        "incoming connections, bind(), or TIME-WAIT length",
        True,
        "boolean until 4.18, which added 2 (loopback only) as the default; per namespace since 4.11",
        "1 helps clients that exhaust source ports toward remote servers (needs timestamps at both ends)",
        (0, 2),
    ),
    "net.ipv4.tcp_tw_reuse_delay": Knob(
        "int",
        1000,
        "ms",
        "minimum TIME-WAIT age before tcp_tw_reuse may take it over",
        "anything when tcp_tw_reuse does not apply",
        True,
        "added in 6.14; before, the delay was about 1 s with 1-s granularity",
        "keep the default; never below the peer's timestamp clock tick",
        (1, 60000),
    ),
    "net.ipv4.tcp_tw_recycle": Knob(
        "int",
        None,
        "",
        "(removed) expired TIME-WAIT early and dropped SYNs with older timestamps per remote host",
        "anything on current kernels: the knob no longer exists",
        True,
        "removed in Linux 4.12 (commit 4396e46187ca): it broke clients behind NAT, and from 4.10 everyone",
        "delete any sysctl.conf line setting it",
    ),
    "net.ipv4.tcp_max_tw_buckets": Knob(
        "int",
        "ehash/2",
        "sockets",
        "cap on TIME-WAIT plus orphaned FIN_WAIT2 mini-sockets; beyond it they are destroyed at once",
        "TIME-WAIT length",
        True,
        "per network namespace since 4.11; default half the TCP established hash",
        "never lower it to get rid of TIME-WAIT (excess sockets vanish silently, see TcpExt TCPTimeWaitOverflow)",
        (0, 2**31 - 1),
    ),
    "net.ipv4.tcp_timestamps": Knob(
        "int",
        1,
        "",
        "RFC 7323 timestamps: 0 off, 1 on with a random per-connection offset, 2 on without offset",
        "uptime exposure (value 1 randomises since 4.10)",
        True,
        "random offsets since 4.10",
        "keep 1: PAWS and every TIME-WAIT takeover need timestamps",
        (0, 2),
    ),
    "net.ipv4.ip_local_port_range": Knob(
        "range",
        kernel.DEFAULT_PORT_RANGE,
        "ports",
        "ephemeral ports used by connect() and bind(port 0)",
        "explicitly bound ports",
        True,
        "default 32768 60999 since 4.2 (even count); per network namespace",
        "keep bounds of different parity; widen it for clients with many concurrent connections per destination",
    ),
    "net.ipv4.ip_local_reserved_ports": Knob(
        "ports",
        [],
        "ports",
        "ports skipped by automatic assignment (connect(), bind(port 0))",
        "explicit bind()",
        True,
        "per network namespace",
        "list service ports that lie inside ip_local_port_range",
    ),
    "net.ipv4.ip_autobind_reuse": Knob(
        "int",
        0,
        "",
        "lets bind(port 0) share ports among SO_REUSEADDR sockets once the range is exhausted",
        "sockets without SO_REUSEADDR (ordinary connect() sockets)",
        True,
        "added in 5.7",
        "leave 0; use IP_BIND_ADDRESS_NO_PORT instead",
        (0, 1),
    ),
    "net.ipv4.ip_unprivileged_port_start": Knob(
        "int",
        kernel.UNPRIVILEGED_PORT_START,
        "port",
        "lowest port an unprivileged process may bind",
        "the ephemeral range, which must start at or above it",
        True,
        "added in 4.11",
        "leave 1024 unless unprivileged services must bind low ports",
        (0, 65536),
    ),
    "net.ipv4.tcp_syncookies": Knob(
        "int",
        1,
        "",
        "SYN-flood fallback: 0 off, 1 when a listener's SYN queue overflows, 2 always",
        "TIME-WAIT or connection closing in general",
        True,
        "",
        "keep 1; it is not a capacity tool and does nothing for TIME-WAIT",
        (0, 2),
    ),
    "net.core.somaxconn": Knob(
        "int",
        4096,
        "connections",
        "upper bound on the listen() backlog",
        "TIME-WAIT",
        True,
        "default 4096 since 5.4 (128 before)",
        "raise only for listeners that overflow (TcpExt ListenOverflows)",
        (0, 2**31 - 1),
    ),
    "net.ipv4.tcp_max_syn_backlog": Knob(
        "int",
        "max(128,ehash/128)",
        "requests",
        "per-listener limit of half-open (SYN_RECV) requests",
        "TIME-WAIT",
        True,
        "per network namespace since 4.11",
        "raise together with somaxconn for listeners under heavy connection rates",
        (0, 2**31 - 1),
    ),
    "net.ipv4.tcp_rfc1337": Knob(
        "int",
        0,
        "",
        "0: an in-window RST kills a TIME-WAIT (assassination); 1: such RSTs are ignored",
        "TIME-WAIT length",
        True,
        "",
        "1 follows RFC 1337; harmless for most hosts",
        (0, 1),
    ),
    "net.ipv4.tcp_max_orphans": Knob(
        "int",
        None,
        "sockets",
        "orphaned sockets (not held by any process) not yet in TIME-WAIT",
        "TIME-WAIT sockets",
        False,
        "host-wide: absent inside a child network namespace; default sized from memory",
        "raise only when the kernel logs 'too many orphaned sockets'",
        (0, 2**31 - 1),
    ),
    "net.ipv4.tcp_ehash_entries": Knob(
        "int",
        None,
        "buckets",
        "size of the TCP established hash (negative: shared with the initial namespace)",
        "anything directly: read-only; it sizes the tcp_max_tw_buckets and tcp_max_syn_backlog defaults",
        True,
        "added in 6.1",
        "information only",
    ),
    "net.ipv4.tcp_child_ehash_entries": Knob(
        "int",
        0,
        "buckets",
        "size of the established hash of namespaces created from this one from now on (0: they share the host's)",
        "the namespaces that exist already",
        True,
        "added in 6.1; each namespace has its own, read when a namespace is created from it",
        "set it before creating many busy containers, so that each gets its own hash",
    ),
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": Knob(
        "int",
        120,
        "s",
        "lifetime of a connection-tracking entry in TIME_WAIT",
        "the socket's TIME-WAIT",
        True,
        "present only with nf_conntrack loaded",
        "unrelated to socket TIME-WAIT; leave it",
        (0, 2**31 - 1),
    ),
}
