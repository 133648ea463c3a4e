"""``twfix.doctor()``: what is wrong with this host's TIME-WAIT and port situation, and what to change.

Each rule reads the running kernel (sysctls, the socket table, TcpExt counters) of the caller's network
namespace, plus the persistent configuration under ``/etc/sysctl.conf`` and ``/etc/sysctl.d``, and
yields findings with a stable code. The facts each rule rests on were checked against the kernel in a
private network namespace by the project's tests (tests/test_doctor.py).
"""

from __future__ import annotations

import enum
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from twfix._html import SEVERITY_COLOURS, table

__all__ = ["Finding", "Report", "Severity", "doctor"]


class Severity(enum.StrEnum):
    """How much a finding matters, in increasing order."""

    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK: Final = {Severity.OK: 0, Severity.INFO: 1, Severity.WARNING: 2, Severity.ERROR: 3}


@dataclass(frozen=True)
class Finding:
    """One observation: a stable ``code``, what was seen (``evidence``), what to do, and why."""

    code: str
    severity: Severity
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: str = ""
    fact: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": str(self.severity),
            "title": self.title,
            "evidence": self.evidence,
            "advice": self.advice,
            "fact": self.fact,
        }


@dataclass(frozen=True)
class Report:
    """The findings of one doctor run, worst first."""

    findings: tuple[Finding, ...]
    kernel: str = ""
    platform: str = ""

    @property
    def ok(self) -> bool:
        """True when no finding is a warning or an error."""
        return all(f.severity.rank < Severity.WARNING.rank for f in self.findings)

    @property
    def worst(self) -> Severity:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=Severity.OK)

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def reaches(self, threshold: Severity) -> bool:
        return any(f.severity.rank >= threshold.rank for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "ok": self.ok,
            "worst": str(self.worst),
            "kernel": self.kernel,
            "platform": self.platform,
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def render(self, *, colour: bool = False) -> str:
        marks = {Severity.OK: "ok", Severity.INFO: "info", Severity.WARNING: "WARN", Severity.ERROR: "ERROR"}
        colours = {Severity.OK: "32", Severity.INFO: "36", Severity.WARNING: "33", Severity.ERROR: "31"}
        lines = [f"twfix doctor: kernel {self.kernel or 'unknown'}, {len(self.findings)} findings"]
        for f in self.findings:
            mark = f"[{marks[f.severity]:>5}]"
            if colour:
                mark = f"\x1b[{colours[f.severity]}m{mark}\x1b[0m"
            lines.append(f"{mark} {f.code} {f.title}")
            if f.evidence:
                shown = ", ".join(f"{k}={_short(v)}" for k, v in f.evidence.items())
                lines.append(f"        seen: {shown}")
            if f.advice:
                lines.append(f"        advice: {f.advice}")
            if f.fact:
                lines.append(f"        because: {f.fact}")
        lines.append("verdict: " + ("ok" if self.ok else f"problems found (worst: {self.worst})"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def _repr_html_(self) -> str:
        rows = [
            (
                (str(f.severity), SEVERITY_COLOURS[str(f.severity)]),
                f.code,
                f.title,
                ", ".join(f"{k}={_short(v)}" for k, v in f.evidence.items()),
                f.advice,
            )
            for f in self.findings
        ]
        caption = f"twfix doctor: kernel {self.kernel or 'unknown'}, " + ("ok" if self.ok else f"worst: {self.worst}")
        return table("twfix-report", caption, ("severity", "code", "finding", "evidence", "advice"), rows)


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------- inputs


class _Host:
    """What the rules read, gathered once per run (and replaceable in one place)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Any] = {}

    def knob(self, name: str) -> Any:
        """Typed sysctl value, or None when the running kernel lacks it."""
        if name not in self._cache:
            from twfix import sysctl

            try:
                self._cache[name] = sysctl.get(name)
            except (LookupError, OSError):
                self._cache[name] = None
        return self._cache[name]

    def sockstat_tw(self) -> int | None:
        try:
            text = Path("/proc/net/sockstat").read_text()
        except OSError:
            return None
        m = re.search(r"^TCP:.*\btw (\d+)", text, re.M)
        return int(m.group(1)) if m else None

    def tcpext(self) -> dict[str, int]:
        if "tcpext" not in self._cache:
            counters: dict[str, int] = {}
            try:
                lines = Path("/proc/net/netstat").read_text().splitlines()
            except OSError:
                lines = []
            for head, values in zip(lines[::2], lines[1::2], strict=False):
                if head.startswith("TcpExt:") and values.startswith("TcpExt:"):
                    names, nums = head.split()[1:], values.split()[1:]
                    counters = {n: int(v) for n, v in zip(names, nums, strict=False) if v.lstrip("-").isdigit()}
            self._cache["tcpext"] = counters
        result: dict[str, int] = self._cache["tcpext"]
        return result

    def sockets(self, states: list[str]) -> list[Any]:
        key = "sockets:" + ",".join(states)
        if key not in self._cache:
            from twfix import diag

            self._cache[key] = diag.sockets("tcp", states=states)
        result: list[Any] = self._cache[key]
        return result

    def ephemeral(self) -> list[Any]:
        from twfix import diag

        return list(diag.ephemeral_usage())

    def config_files(self) -> list[Path]:
        files = []
        main = self.root / "etc" / "sysctl.conf"
        if main.is_file():
            files.append(main)
        for d in ("etc/sysctl.d", "run/sysctl.d", "usr/lib/sysctl.d", "lib/sysctl.d"):
            folder = self.root / d
            if folder.is_dir():
                files += sorted(p for p in folder.iterdir() if p.suffix == ".conf" and p.is_file())
        return files


Rule = Callable[[_Host], Iterable[Finding]]
_RULES: list[Rule] = []


def _rule(fn: Rule) -> Rule:
    _RULES.append(fn)
    return fn


# ---------------------------------------------------------------------------------------------- rules

_TW_FACT: Final = (
    "tcp_max_tw_buckets caps TIME-WAIT plus orphaned FIN_WAIT2 mini-sockets per network namespace; beyond it "
    "new TIME-WAITs are destroyed at once, with no log line, counted only in TcpExt TCPTimeWaitOverflow"
)


@_rule
def _time_wait_buckets(host: _Host) -> Iterator[Finding]:
    cap = host.knob("net.ipv4.tcp_max_tw_buckets")
    tw = host.sockstat_tw()
    overflow = host.tcpext().get("TCPTimeWaitOverflow", 0)
    if cap is None or tw is None:
        return
    evidence = {"time_wait": tw, "tcp_max_tw_buckets": cap, "TCPTimeWaitOverflow": overflow}
    if cap == 0:
        yield Finding(
            "TW-BUCKETS-ZERO",
            Severity.ERROR,
            "tcp_max_tw_buckets is 0: this namespace keeps no TIME-WAIT at all",
            evidence,
            "restore the kernel default (half the TCP established hash, 131072 on a 24 GiB host); never lower it "
            "to get rid of TIME-WAIT",
            _TW_FACT,
        )
    elif tw >= 0.8 * cap:
        yield Finding(
            "TW-BUCKETS-FULL",
            Severity.WARNING,
            f"TIME-WAIT sockets at {tw} of tcp_max_tw_buckets={cap}",
            evidence,
            "find the peer that closes first and reuse connections; raise tcp_max_tw_buckets rather than lower it",
            _TW_FACT,
        )
    else:
        yield Finding("TW-BUCKETS", Severity.OK, f"{tw} TIME-WAIT sockets, below tcp_max_tw_buckets={cap}", evidence)
    if overflow > 0:
        yield Finding(
            "TW-OVERFLOWED",
            Severity.INFO,
            f"{overflow} TIME-WAIT sockets were destroyed early since this namespace started (TCPTimeWaitOverflow)",
            evidence,
            "if tcp_max_tw_buckets was lowered on purpose, restore it; otherwise reduce active closes",
            _TW_FACT,
        )


@_rule
def _ephemeral_range(host: _Host) -> Iterator[Finding]:
    rng = host.knob("net.ipv4.ip_local_port_range")
    if not rng:
        return
    from twfix.diag import usable_ports

    lo, hi = rng
    size = hi - lo + 1
    reserved = host.knob("net.ipv4.ip_local_reserved_ports") or []
    usable = usable_ports(lo, hi, reserved)
    inside = size - usable
    evidence = {"ip_local_port_range": f"{lo} {hi}", "size": size, "reserved_inside": inside, "usable": usable}
    if usable < 10000:
        yield Finding(
            "EPHEMERAL-SMALL",
            Severity.WARNING,
            f"only {usable} usable ephemeral ports",
            evidence,
            "widen net.ipv4.ip_local_port_range (default 32768 60999); each destination address:port can take "
            "at most that many concurrent connections plus TIME-WAITs",
            "connect() needs a free (source IP, source port) per (destination IP, destination port); client-side "
            "TIME-WAIT holds its 4-tuple for 60 s",
        )
    else:
        yield Finding("EPHEMERAL-RANGE", Severity.OK, f"{usable} usable ephemeral ports ({lo}-{hi})", evidence)
    if lo % 2 == hi % 2 and size > 1:
        yield Finding(
            "EPHEMERAL-PARITY",
            Severity.WARNING,
            f"ip_local_port_range bounds {lo} and {hi} have the same parity",
            evidence,
            "make one bound even and the other odd (the default 32768 60999 does)",
            "connect() searches ports of the range's low parity first and bind(0) the other parity; equal parity "
            "makes the two halves unequal (the kernel warns 'prefer different parity')",
        )
    if inside:
        yield Finding(
            "EPHEMERAL-RESERVED",
            Severity.INFO,
            f"{inside} reserved ports lie inside the ephemeral range",
            evidence,
            "fine for service ports; each reserved port is one fewer for outgoing connections",
            "ip_local_reserved_ports keeps ports from automatic assignment only; explicit binds still work",
        )


@_rule
def _headroom(host: _Host) -> Iterator[Finding]:
    try:
        usage = host.ephemeral()
    except (OSError, NotImplementedError):
        return
    tight = [u for u in usage if u.capacity and u.headroom <= 0.1 * u.capacity]
    for u in sorted(tight, key=lambda u: u.headroom)[:5]:
        severity = Severity.ERROR if u.headroom <= 0 else Severity.WARNING
        yield Finding(
            "EPHEMERAL-HEADROOM",
            severity,
            f"{u.local_ip} -> {u.remote_ip}:{u.remote_port}: {u.headroom} of {u.capacity} source ports left",
            {"in_use": u.in_use, "time_wait": u.time_wait, "capacity": u.capacity, "headroom": u.headroom},
            "reuse connections (keep-alive) or let the server close first; add destination ports/addresses or "
            "source addresses; widen the range; tcp_tw_reuse=1 if timestamps are on at both ends",
            "connect() fails with EADDRNOTAVAIL once every source port toward one destination is in use or in "
            "TIME-WAIT",
        )


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


@_rule
def _tw_reuse(host: _Host) -> Iterator[Finding]:
    reuse = host.knob("net.ipv4.tcp_tw_reuse")
    stamps = host.knob("net.ipv4.tcp_timestamps")
    rng = host.knob("net.ipv4.ip_local_port_range")
    if reuse is None:
        return
    evidence: dict[str, Any] = {"tcp_tw_reuse": reuse, "tcp_timestamps": stamps}
    if reuse != 0 and stamps == 0:
        yield Finding(
            "TW-REUSE-NO-TIMESTAMPS",
            Severity.WARNING,
            "tcp_tw_reuse is on but tcp_timestamps=0, so it can never take over a TIME-WAIT",
            evidence,
            "set net.ipv4.tcp_timestamps=1 (random per-connection offsets since 4.10, so no uptime leak)",
            "a TIME-WAIT is only taken over when the old connection carried timestamps at both ends",
        )
    if reuse == 2 and rng:
        lo, hi = rng
        try:
            tws = host.sockets(["TIME_WAIT"])
            served = {s.laddr.port for s in host.sockets(["LISTEN"])}
        except (OSError, NotImplementedError):
            return
        # Client side: a local port from the ephemeral range that is not a listening port (a server's
        # own TIME-WAITs sit on its listening port and are not helped by tcp_tw_reuse).
        outgoing = [
            s
            for s in tws
            if lo <= s.laddr.port <= hi
            and s.laddr.port not in served
            and s.raddr is not None
            and not _is_loopback(s.raddr.ip)
        ]
        if len(outgoing) >= _OUTGOING_TW_THRESHOLD:
            evidence["outgoing_time_wait_non_loopback"] = len(outgoing)
            yield Finding(
                "TW-REUSE-LOOPBACK-ONLY",
                Severity.WARNING,
                f"{len(outgoing)} client-side TIME-WAITs toward non-loopback destinations, but tcp_tw_reuse=2 "
                "only reuses loopback ones",
                evidence,
                "set net.ipv4.tcp_tw_reuse=1 (outgoing connections only; safe with timestamps), or reuse connections",
                "tcp_tw_reuse=2 (the default since 4.18) applies to loopback only; it is consulted by connect() "
                "alone, never by bind() or incoming connections",
            )


_OUTGOING_TW_THRESHOLD: Final = 1000


@_rule
def _listeners_in_range(host: _Host) -> Iterator[Finding]:
    rng = host.knob("net.ipv4.ip_local_port_range")
    if not rng:
        return
    lo, hi = rng
    reserved = host.knob("net.ipv4.ip_local_reserved_ports") or []
    try:
        listening = host.sockets(["LISTEN"])
    except (OSError, NotImplementedError):
        return
    ports = sorted(
        {s.laddr.port for s in listening if lo <= s.laddr.port <= hi}
        - {p for a, b in reserved for p in range(a, b + 1) if lo <= p <= hi}
    )
    if ports:
        yield Finding(
            "LISTEN-IN-EPHEMERAL",
            Severity.WARNING,
            f"{len(ports)} listening port(s) inside the ephemeral range {lo}-{hi}: {_short(ports)}",
            {"ports": ports[:50]},
            "move the services below the range or add their ports to net.ipv4.ip_local_reserved_ports",
            "an outgoing connection may take such a port first; the service then fails to start with EADDRINUSE "
            "even with SO_REUSEADDR",
        )


_FOLKLORE: Final = {
    "net.ipv4.tcp_tw_recycle": (
        "CONF-TW-RECYCLE",
        Severity.WARNING,
        "sets tcp_tw_recycle, which was removed in Linux 4.12",
        "delete the line: the knob no longer exists (the write fails at boot) and while it existed it dropped "
        "connections from clients behind NAT",
        "tcp_tw_recycle was removed in 4.12 (commit 4396e46187ca); /proc/sys/net/ipv4/tcp_tw_recycle is absent",
    ),
    "net.ipv4.tcp_fin_timeout": (
        "CONF-FIN-TIMEOUT",
        Severity.INFO,
        "sets tcp_fin_timeout, which does not shorten TIME-WAIT",
        "keep it only if orphaned FIN_WAIT2 sockets are the problem; TIME-WAIT stays a fixed 60 s",
        "tcp_fin_timeout limits orphaned FIN_WAIT2 sockets only; TIME-WAIT is a compile-time 60 s",
    ),
    "net.ipv4.tcp_syncookies": (
        "CONF-SYNCOOKIES",
        Severity.INFO,
        "sets tcp_syncookies alongside TIME-WAIT tuning; syncookies do not affect TIME-WAIT",
        "syncookies are a SYN-flood fallback during the handshake; leave the default (1)",
        "syncookies change how a listener answers SYNs under queue overflow, not how connections close",
    ),
}
_TW_HINT: Final = re.compile(r"time[_ -]?wait|timewait|tw_(?:reuse|recycle|buckets)|fin_timeout", re.I)


def _config_lines(text: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, normalised key, value, raw line) of each assignment in a sysctl.d file."""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip().lstrip("-").replace("/", ".")
        yield n, key, value.strip(), raw


@_rule
def _folklore(host: _Host) -> Iterator[Finding]:
    for path in host.config_files():
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            yield Finding(
                "CONF-UNREADABLE",
                Severity.INFO,
                f"{path} could not be read: {exc.strerror or exc}",
                {"file": str(path), "errno": exc.errno},
                "run twfix doctor as root to check every sysctl file",
            )
            continue
        mentions_tw = bool(_TW_HINT.search(text))
        for n, key, value, raw in _config_lines(text):
            spec = _FOLKLORE.get(key)
            if spec is None:
                if key == "net.ipv4.tcp_max_tw_buckets" and value.isdigit():
                    current_default = _default_tw_buckets(host)
                    if current_default and int(value) < current_default:
                        yield Finding(
                            "CONF-TW-BUCKETS-LOWERED",
                            Severity.WARNING,
                            f"{path}:{n} lowers tcp_max_tw_buckets to {value}",
                            {"file": str(path), "line": n, "text": raw.strip()},
                            "remove the line; lowering the cap destroys TIME-WAITs silently instead of removing "
                            "their cause",
                            _TW_FACT,
                        )
                continue
            code, severity, title, advice, fact = spec
            if code == "CONF-SYNCOOKIES" and not mentions_tw:
                continue
            yield Finding(
                code,
                severity,
                f"{path}:{n} {title}",
                {"file": str(path), "line": n, "text": raw.strip()},
                advice,
                fact,
            )


def _default_tw_buckets(host: _Host) -> int | None:
    ehash = host.knob("net.ipv4.tcp_ehash_entries")
    if isinstance(ehash, int) and ehash != 0:
        return abs(ehash) // 2
    return None


# ---------------------------------------------------------------------------------------------- entry


def doctor(*, root: str | os.PathLike[str] = "/") -> Report:
    """Check this host's (this network namespace's) TIME-WAIT and port situation.

    Args:
        root: the file-system root whose ``etc/sysctl.conf`` and ``etc/sysctl.d`` are checked for
            folklore (tests pass a temporary tree).
    """
    root_path = Path(os.fspath(root))
    try:
        is_dir = root_path.is_dir()
    except OSError as exc:
        raise ValueError(f"root {str(root_path)!r} cannot be read: {exc.strerror}") from None
    if not is_dir:
        raise ValueError(f"root {str(root_path)!r} is not a directory")
    kernel = platform.release()
    if not sys.platform.startswith("linux"):
        finding = Finding(
            "PLATFORM",
            Severity.INFO,
            f"twfix doctor checks Linux kernels; unavailable on {sys.platform}",
            {"platform": sys.platform},
        )
        return Report((finding,), kernel, sys.platform)
    host = _Host(root_path)
    findings: list[Finding] = []
    for rule in _RULES:
        try:
            findings.extend(rule(host))
        except (OSError, NotImplementedError) as exc:
            findings.append(
                Finding("RULE-FAILED", Severity.INFO, f"{rule.__name__.strip('_')} could not run: {exc}", {})
            )
    findings.sort(key=lambda f: -f.severity.rank)
    return Report(tuple(findings), kernel, sys.platform)
