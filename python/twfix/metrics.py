"""Prometheus metrics for this host and every network namespace on it (``twfix metrics``).

The only module that imports prometheus_client (the ``metrics`` extra). Per scrape:

* every namespace (with ``all_netns``): the O(1) counters of its ``/proc/net/sockstat`` (TCP sockets in
  use, TIME-WAIT), labelled with its inode, its ``ip netns`` name, a representative process and its
  container id;
* the namespaces that get detail (the caller's own, or the ``detail`` busiest by TIME-WAIT): one walk of
  the table each (every walk covers the host's one shared established hash, so the count is kept small),
  giving sockets per state, TIME-WAIT per local port (top N plus "other"), ephemeral ports left per
  destination, the TIME-WAIT bucket usage, ``TCPTimeWaitOverflow``, key sysctls and the doctor's findings.

Collection is bounded: detail stops once ``budget`` seconds are spent, and ``twfix_collect_truncated``
says so. Each scrape collects afresh; scrapes of the server run in their own threads.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twfix import _safefile, _twfix, counters, diag, netns, sysctl
from twfix._args import check_count
from twfix._text import printable
from twfix.doctor import doctor
from twfix.netns import NetNamespace

__all__ = ["TwfixCollector", "exposition", "registry", "serve", "write_textfile"]

_NS_LABELS: Final = ["netns", "netns_name"]
# Key sysctls exported as twfix_sysctl_value{knob=...}; ranges as two knobs (.low, .high).
_KNOBS: Final = (
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_timestamps",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_ehash_entries",
    "net.ipv4.tcp_child_ehash_entries",
    "net.core.somaxconn",
)


@dataclass(frozen=True)
class _Detail:
    ns: NetNamespace
    counts: counters.TcpCounters
    table: diag.TableSnapshot
    knobs: sysctl.SysctlTable
    overflow: int
    findings: list[tuple[str, str]]


class TwfixCollector(Collector):
    """A prometheus_client collector: register it, and every scrape reads the kernel afresh."""

    def __init__(
        self,
        *,
        all_netns: bool = False,
        top: int = 10,
        detail: int = 1,
        budget: float = 10.0,
        root: str = "/",
        max_netns: int = 200,
    ) -> None:
        self.all_netns = all_netns
        self.top = check_count(top, "top")
        self.detail = check_count(detail, "detail")
        self.max_netns = check_count(max_netns, "max_netns")
        if not budget > 0:
            raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
        self.budget = float(budget)
        self.root = root

    def describe(self) -> list[Metric]:
        return []  # collected per scrape; nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        start = time.monotonic()
        spaces = netns.namespaces() if self.all_netns else [netns.current()]
        # One thread enters every namespace in turn (a thread per namespace cost 0.1 ms each).
        read = counters.tcp_each(spaces)
        counted = [(ns, counts) for ns, counts in zip(spaces, read, strict=True) if counts is not None]
        vanished = len(spaces) - len(counted)  # exited meanwhile, not ours to enter, or replaced by something else
        # Any local user can add namespaces: the series per scrape are capped, the busiest kept.
        counted.sort(key=lambda pair: -(pair[1].time_wait + pair[1].inuse))
        dropped = max(0, len(counted) - self.max_netns)
        counted = counted[: self.max_netns]
        yield from self._counters(counted)
        busiest = counted[: max(self.detail, 0 if self.all_netns else 1)]
        details = []
        truncated = False
        for ns, counts in busiest:
            if time.monotonic() - start > self.budget:
                truncated = True
                break
            try:
                details.append(self._detail(ns, counts))
            except (OSError, ValueError):
                vanished += 1
                continue
        yield from self._details(details)
        yield _gauge("twfix_namespaces", "Network namespaces seen by this scrape.", [], [((), len(counted) + dropped)])
        yield _gauge(
            "twfix_netns_truncated",
            "Namespaces left out of this scrape by the series cap (max_netns; the busiest are kept).",
            [],
            [((), dropped)],
        )
        yield _gauge(
            "twfix_netns_unreadable",
            "Namespaces that could not be read in this scrape (gone meanwhile, or not enterable).",
            [],
            [((), vanished)],
        )
        if self.all_netns:
            yield _gauge(
                "twfix_netns_bad_entries",
                "Entries of /run/netns that are no network namespace (left by removed ones): skipped.",
                [],
                [((), len(netns.bad_entries()))],
            )
        yield _gauge(
            "twfix_collect_truncated",
            "1 when the collection budget ran out before every detailed namespace was read.",
            [],
            [((), int(truncated))],
        )
        yield _gauge(
            "twfix_collect_duration_seconds",
            "Seconds this scrape spent reading the kernel.",
            [],
            [((), time.monotonic() - start)],
        )

    def _detail(self, ns: NetNamespace, counts: counters.TcpCounters) -> _Detail:
        path = None if ns.inode == netns.current_inode() else ns.path
        knobs = sysctl.read(netns=path)  # the whole catalogue, once: these series and the doctor share it
        rng = knobs["net.ipv4.ip_local_port_range"]
        ports = (
            sysctl.port_range_of(rng.value, knobs["net.ipv4.ip_local_reserved_ports"].value) if rng.available else None
        )
        table = diag.snapshot("tcp", top=self.top, ports=ports, netns=path, usage_limit=max(self.top, 100))
        report = doctor(root=self.root, netns=path, table=table, knobs=knobs)
        findings = [(f.code, str(f.severity)) for f in report.findings]
        return _Detail(ns, counts, table, knobs, _overflow(path), findings)

    def _counters(self, counted: list[tuple[NetNamespace, counters.TcpCounters]]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "twfix_netns_info",
            "A network namespace: its inode, ip-netns name, a representative process and its container id.",
            labels=[*_NS_LABELS, "pid", "program", "container_id"],
        )
        inuse = GaugeMetricFamily(
            "twfix_netns_tcp_sockets", "TCP sockets in use in the namespace (sockstat inuse).", labels=_NS_LABELS
        )
        tw = GaugeMetricFamily(
            "twfix_netns_tcp_time_wait",
            "TIME-WAIT sockets of the namespace (sockstat tw, what tcp_max_tw_buckets caps).",
            labels=_NS_LABELS,
        )
        for ns, counts in counted:
            labels = _ns_labels(ns)
            pid = str(ns.pids[0]) if ns.pids else ""
            info.add_metric([*labels, pid, printable(ns.program), ns.container], 1)
            inuse.add_metric(labels, counts.inuse)
            tw.add_metric(labels, counts.time_wait)
        yield from (info, inuse, tw)

    def _details(self, details: list[_Detail]) -> Iterator[Metric]:
        states = GaugeMetricFamily("twfix_tcp_sockets", "TCP sockets by state.", labels=[*_NS_LABELS, "state"])
        by_port = GaugeMetricFamily(
            "twfix_tcp_time_wait_by_local_port",
            f'TIME-WAIT sockets per local port: the top {self.top}, the rest as port="other".',
            labels=[*_NS_LABELS, "port"],
        )
        free = GaugeMetricFamily(
            "twfix_ephemeral_ports_free",
            "Source ports still free toward a destination (usable range minus in use and TIME-WAIT).",
            labels=[*_NS_LABELS, "local", "destination"],
        )
        usable = GaugeMetricFamily(
            "twfix_ephemeral_ports_usable",
            "Usable ephemeral ports (ip_local_port_range minus the reserved ports inside it).",
            labels=_NS_LABELS,
        )
        buckets = GaugeMetricFamily(
            "twfix_time_wait_bucket_usage_ratio",
            "TIME-WAIT sockets over tcp_max_tw_buckets (1 = the kernel destroys new ones at once).",
            labels=_NS_LABELS,
        )
        overflow = CounterMetricFamily(
            "twfix_tcp_time_wait_overflow",
            "TIME-WAIT sockets destroyed because tcp_max_tw_buckets was reached (TcpExt TCPTimeWaitOverflow).",
            labels=_NS_LABELS,
        )
        knobs = GaugeMetricFamily(
            "twfix_sysctl_value",
            "Key sysctls of the namespace (ranges as .low and .high).",
            labels=[*_NS_LABELS, "knob"],
        )
        findings = GaugeMetricFamily(
            "twfix_doctor_findings",
            "The doctor's findings by code and severity.",
            labels=[*_NS_LABELS, "code", "severity"],
        )
        for d in details:
            labels = _ns_labels(d.ns)
            summary = d.table.summary
            for state, n in summary.by_state.items():
                states.add_metric([*labels, str(state)], n)
            tw_total = summary.by_state.get(diag.TcpState.TIME_WAIT, 0)
            top = summary.top_local_ports.get(diag.TcpState.TIME_WAIT, [])[: self.top]
            for port, n in top:
                by_port.add_metric([*labels, str(port)], n)
            by_port.add_metric([*labels, "other"], tw_total - sum(n for _p, n in top))
            for u in sorted(d.table.usage, key=lambda u: u.headroom)[: self.top]:
                free.add_metric([*labels, u.local_ip, diag.format_endpoint(u.remote_ip, u.remote_port)], u.headroom)
            if d.table.ports is not None:
                usable.add_metric(labels, d.table.ports.usable)
            cap = d.knobs["net.ipv4.tcp_max_tw_buckets"].value
            if isinstance(cap, int) and cap > 0:
                buckets.add_metric(labels, d.counts.time_wait / cap)
            overflow.add_metric(labels, d.overflow)
            for name in _KNOBS:
                row = d.knobs.get(name)
                if row is None or not row.available:
                    continue
                if isinstance(row.value, int):
                    knobs.add_metric([*labels, name], row.value)
                elif isinstance(row.value, tuple) and len(row.value) == 2:
                    knobs.add_metric([*labels, f"{name}.low"], row.value[0])
                    knobs.add_metric([*labels, f"{name}.high"], row.value[1])
            seen: dict[tuple[str, str], int] = {}
            for code, severity in d.findings:
                seen[(code, severity)] = seen.get((code, severity), 0) + 1
            for (code, severity), n in sorted(seen.items()):
                findings.add_metric([*labels, code, severity], n)
        yield from (states, by_port, free, usable, buckets, overflow, knobs, findings)


def _ns_labels(ns: NetNamespace) -> list[str]:
    return [str(ns.inode), printable(ns.name or "")]


def _gauge(name: str, doc: str, labels: list[str], values: list[tuple[tuple[str, ...], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def _overflow(path: str | None) -> int:
    """TcpExt TCPTimeWaitOverflow of the namespace at ``path``."""
    (text,) = _twfix.read_proc_net(["netstat"], path)
    return counters.parse_tcpext(text or "").get("TCPTimeWaitOverflow", 0)


def registry(**options: object) -> CollectorRegistry:
    """A registry holding only twfix's collector (options as for :class:`TwfixCollector`)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(TwfixCollector(**options))  # type: ignore[arg-type]
    return reg


def exposition(**options: object) -> str:
    """The metrics in the Prometheus text exposition format."""
    return generate_latest(registry(**options)).decode()


MARKER: Final = "# Written by twfix metrics."
# A textfile for node_exporter: a few MB with hundreds of namespaces; anything larger is not twfix's.
_MAX_TEXTFILE: Final = 256 << 20


def write_textfile(path: str | os.PathLike[str], **options: object) -> None:
    """Write the metrics for node_exporter's textfile collector, as ``tune --write`` writes (see
    ``twfix._safefile``): a fresh temporary file in the directory, swapped in atomically, never through a
    symbolic link, never replacing a file twfix metrics did not write, in no directory other users can
    write. The first line is a comment naming the writer (the exposition format ignores it)."""
    data = (MARKER + "\n" + exposition(**options)).encode()
    _safefile.replace(
        path,
        data,
        MARKER,
        writer="twfix metrics",
        example="/var/lib/node_exporter/twfix.prom",
        keep_backup=False,
        max_size=_MAX_TEXTFILE,
    )


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A WSGI server with a bounded number of connections, each held a bounded time.

    prometheus_client's own server takes every connection on its own thread for as long as the client
    likes: about 1,020 idle connections from any local user exhaust the usual descriptor limit, and the
    accept loop then spins. Here at most ``max_connections`` are open; when a new one arrives at the cap,
    the oldest connection that has not yet sent a whole request is dropped (an idle or slow client), so
    a scrape always gets in; and a silent connection is closed after ``idle_timeout`` seconds."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops SYNs (1 s retransmits) as soon as a burst arrives
    max_connections = 64
    idle_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: collections.OrderedDict[socket.socket, bool] = collections.OrderedDict()  # -> busy
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)  # out of descriptors: wait instead of spinning on the readable listener
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            if len(self._open) >= self.max_connections:
                idle = next((s for s, busy in self._open.items() if not busy), None)
                if idle is not None:
                    del self._open[idle]
                    with contextlib.suppress(OSError):
                        idle.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and ends
            if len(self._open) >= self.max_connections:
                self.shutdown_request(request)  # every slot is serving a scrape
                return
            self._open[request] = False
        super().process_request(request, client_address)

    def mark_busy(self, request: socket.socket) -> None:
        with self._open_lock:
            if request in self._open:
                self._open[request] = True

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a dropped or timed-out client is no error of the exporter


class _Handler(WSGIRequestHandler):
    timeout = _BoundedServer.idle_timeout  # applied to every read of the connection

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok and isinstance(self.server, _BoundedServer):
            self.server.mark_busy(self.connection)
        return ok

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(host: str = "127.0.0.1", port: int = 9647, **options: object) -> WSGIServer:
    """Serve ``/metrics`` on ``host:port`` (loopback by default) from a background thread; every scrape
    collects afresh in its own thread, at most 64 connections are open at once (idle ones are dropped
    first, and closed after 10 s of silence). Returns the server (``server.server_port``,
    ``server.shutdown()``)."""

    class Server(_BoundedServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), _Handler)
    server.set_app(make_wsgi_app(registry(**options)))
    threading.Thread(target=server.serve_forever, daemon=True, name="twfix-metrics").start()
    return server
