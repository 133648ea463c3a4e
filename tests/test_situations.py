"""Explanations in real situations: real child processes, real kernel state, `ss` as the witness.

Each test builds one situation an address conflict comes from (in a private network namespace) and
checks the verdict, the cause, every holder pid and the advice.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import twfix
from tests.conftest import NetNS, listener_without_reuseaddr, settle, time_wait_pairs
from twfix import features


class Child:
    """A Python child process that prints one line (its result) when its situation is ready."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline().strip()
        if not self.line:
            self.proc.kill()
            raise AssertionError(f"child failed: {self.proc.communicate(timeout=10)[1]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=20)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.stop(signal.SIGKILL)


def ss_pids(port: int, *, udp: bool = False) -> set[int]:
    """The pids `ss -p` names for the listening sockets on `port` (the independent witness)."""
    flag = "-ulnpH" if udp else "-tlnpH"
    out = subprocess.run(["ss", flag, f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


PREFORK = """
import os, signal, sys, time, twfix
srv = twfix.reusable_tcp_server(0, "127.0.0.1")
workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    workers.append(pid)
print(srv.getsockname()[1], *workers, flush=True)
signal.signal(signal.SIGTERM, lambda *a: ([os.kill(w, signal.SIGKILL) for w in workers], sys.exit(0)))
time.sleep(120)
"""


def test_prefork_server_lists_master_and_workers(netns: NetNS, children: list[Child]) -> None:
    child = Child(PREFORK)
    children.append(child)
    port, *workers = map(int, child.line.split())
    expected = {child.pid, *workers}
    assert ss_pids(port) == expected  # the witness sees three processes on one socket
    why = twfix.explain(port, "127.0.0.1")
    assert why.cause == "listener"
    assert not why.can_bind
    assert {p.pid for p in why.holders[0].processes} == expected
    assert all(f"pid {pid}" in why.verdict for pid in expected)
    assert {p.pid for p in twfix.who_holds(port).holders[0].processes} == expected
    with pytest.raises(twfix.AddressInUseError) as caught:
        twfix.reusable_tcp_server(port, "127.0.0.1")
    assert caught.value.explanation is not None
    assert {p.pid for p in caught.value.explanation.holders[0].processes} == expected
    os.kill(child.pid, signal.SIGKILL)  # the master dies: the workers still hold the socket
    child.proc.wait(timeout=10)
    assert {p.pid for p in twfix.explain(port, "127.0.0.1").holders[0].processes} == set(workers)
    for w in workers:
        os.kill(w, signal.SIGKILL)


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import gunicorn"], check=False).returncode != 0,
    reason="gunicorn is not installed (pip install '.[test]')",
)
def test_gunicorn_master_and_workers(netns: NetNS, tmp_path, children: list[Child]) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "app.py").write_text(
        "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}", "app:app"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while len(ss_pids(port)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        witness = ss_pids(port)
        assert len(witness) == 3  # master and two workers
        assert proc.pid in witness
        why = twfix.explain(port, "127.0.0.1")
        assert why.cause == "listener"
        assert {p.pid for p in why.holders[0].processes} == witness
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_v6only_listener_is_not_blamed_for_an_ipv4_time_wait(netns: NetNS) -> None:
    old, port = listener_without_reuseaddr()
    time_wait_pairs(old, 2, server_closes=True)
    old.close()
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::", port))
    v6.listen()
    with v6:
        out = subprocess.run(["ss", "-tlneH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
        assert "v6only:1" in out  # the witness reports the flag twfix reads
        (entry,) = twfix.sockets("tcp6", states=["LISTEN"], port=port)
        assert entry.v6only is True
        why = twfix.explain(port, "127.0.0.1")
        assert why.cause == "time-wait-server", why
        assert why.holders == ()  # the v6-only listener never conflicts with IPv4
        assert why.time_wait == 2
        assert not any("stop the process" in a for a in why.advice)


def test_dualstack_bind_against_an_ipv4_listener(netns: NetNS, children: list[Child]) -> None:
    child = Child(
        "import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',0))\ns.listen()\n"
        "print(s.getsockname()[1], flush=True)\ntime.sleep(120)"
    )
    children.append(child)
    port = int(child.line)
    assert twfix.explain(port, "::").can_bind  # a v6-only bind does not overlap IPv4
    why = twfix.explain(port, "::", dualstack_ipv6=True)
    assert not why.can_bind
    assert why.cause == "listener"
    assert why.dualstack
    assert [p.pid for p in why.holders[0].processes] == [child.pid]
    with pytest.raises(twfix.AddressInUseError) as caught:
        twfix.reusable_tcp_server(port, "::", dualstack_ipv6=True)
    assert "free" not in str(caught.value)
    assert caught.value.explanation is not None
    assert caught.value.explanation.cause == "listener"
    assert f"pid {child.pid}" in str(caught.value)


KILLED_SERVER = """
import socket, sys, time, twfix
srv = twfix.reusable_tcp_server(0, "127.0.0.1")
port = srv.getsockname()[1]
print(port, flush=True)
conns = [srv.accept()[0] for _ in range(int(sys.argv[1]))]
for c in conns:
    c.close()   # FIN sent; the clients never close: FIN_WAIT2 here
print("closed", flush=True)
time.sleep(120)
"""


def test_killed_server_leaves_orphans(netns: NetNS) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SERVER, "3"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    assert proc.stdout.readline().strip() == "closed"
    proc.kill()
    proc.communicate(timeout=10)
    try:
        deadline = time.monotonic() + 5  # the peers' ACKs move FIN_WAIT1 to FIN_WAIT2 in softirq time
        while len(orphans := twfix.sockets(states=["FIN_WAIT2"], port=port)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(orphans) == 3, twfix.sockets(port=port)
        assert all(e.inode == 0 for e in orphans)  # no process owns them
        why = twfix.explain(port, "127.0.0.1")
        assert why.cause == "orphans", why
        assert why.can_bind_with_reuse  # they carry the killed listener's SO_REUSEADDR
        assert not why.can_bind
        assert all(h.orphan for h in why.holders)
        assert not any(h.processes for h in why.holders)
        assert "unknown process" not in str(why)
        assert "took it from the ephemeral range" not in why.verdict
        assert any("tcp_fin_timeout" in r for r in why.reasons)
        assert why.frees_in is not None
        assert 0 < why.frees_in <= 60
        twfix.reusable_tcp_server(port, "127.0.0.1").close()  # the advice holds: a reuse bind succeeds
    finally:
        for c in clients:
            c.close()


STUCK_SERVER = """
import socket, sys, time, twfix
srv = twfix.reusable_tcp_server(0, "127.0.0.1")
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setblocking(False)
try:
    while True:
        conn.send(b"x" * 65536)  # the client never reads: its window closes, data stays queued here
except BlockingIOError:
    pass
conn.close()  # the FIN waits behind the queued data: FIN_WAIT1
print("closed", flush=True)
time.sleep(120)
"""


def test_killed_server_leaves_fin_wait1_orphans(netns: NetNS) -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUCK_SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        assert proc.stdout.readline().strip() == "closed"
        proc.kill()
        proc.communicate(timeout=10)
        (orphan,) = twfix.sockets(states=["FIN_WAIT1"], port=port)
        assert orphan.inode == 0
        why = twfix.explain(port, "127.0.0.1")
        assert why.cause == "orphans", why
        assert why.holders[0].state == "FIN_WAIT1"
        assert any("tcp_orphan_retries" in r for r in why.reasons)
        assert why.can_bind_with_reuse
        assert "unknown process" not in str(why)
    finally:
        client.close()


def test_client_side_time_wait_is_told_apart(netns: NetNS) -> None:
    server = twfix.reusable_tcp_server(8080, "127.0.0.1")  # a service port below the ephemeral range
    with server:
        client = socket.create_connection(("127.0.0.1", 8080))
        src = client.getsockname()[1]
        conn, _ = server.accept()
        client.close()  # the client closes first: TIME-WAIT on its ephemeral source port
        conn.recv(1)
        conn.close()
        settle(src)
        assert [e.state for e in twfix.sockets(port=src)] == [twfix.TcpState.TIME_WAIT]
        assert src % 2 == 0  # connect() takes the range's even ports first
        why = twfix.explain(src, "127.0.0.1")
        assert why.cause == "time-wait-client", why
        assert why.confidence == "certain"  # the peer, 127.0.0.1:8080, is a live listener here
        assert "did not set SO_REUSEADDR" not in str(why)
        assert any("ip_local_reserved_ports" in a for a in why.advice)
    why = twfix.explain(src, "127.0.0.1")  # the server is gone: only the range and the parities tell
    assert why.cause == "time-wait-client", why
    assert why.confidence == "likely"
    # The contrast: a server's own TIME-WAIT on a port outside the range.
    old, port = listener_without_reuseaddr()
    with old:
        time_wait_pairs(old, 2, server_closes=True)
    why = twfix.explain(port, "127.0.0.1")
    assert why.cause == "time-wait-server"
    assert any("SO_REUSEADDR" in a for a in why.advice)


def test_owner_in_another_pid_namespace(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as srv:
        port = srv.getsockname()[1]
        script = f"import twfix; print(twfix.explain({port}, '127.0.0.1'))"
        # twfix in a container with host networking: its own PID namespace and /proc, this network.
        out = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    assert "may have exited" not in out
    assert "outside this PID namespace" in out
    assert "ss -tulpn" in out


def test_listener_in_another_network_namespace(netns: NetNS) -> None:
    from tests.conftest import listener_in_named_netns

    with listener_in_named_netns("twfix-test", host="0.0.0.0") as (name, child, port):
        why = twfix.explain(port, "0.0.0.0")
        assert why.can_bind
        assert why.cause == "free"
        (other,) = why.elsewhere
        assert name in other.netns
        assert child.pid in other.pids
        assert other.laddr == ("0.0.0.0", port)
        assert any(name in r for r in why.reasons)


def test_udp_overlap_is_explained_with_udp_rules(netns: NetNS) -> None:
    with twfix.reusable_udp(0, "0.0.0.0") as u:
        port = u.getsockname()[1]
        why = twfix.explain(port, "127.0.0.1", kind="udp")
    assert why.cause == "listener"
    text = "\n".join(why.reasons)
    assert "refuses the overlap even with SO_REUSEADDR" not in text
    assert "both set SO_REUSEADDR" in text
    assert why.holders[0].state == "CLOSE"  # one name for an unconnected UDP socket, as sockets() says


def test_probing_never_takes_a_datagram_from_a_live_service(netns: NetNS) -> None:
    """A UDP SO_REUSEPORT service: explain() and failing constructors must not join its group."""
    service = twfix.reusable_udp(0, "127.0.0.1", reuse_port=True)
    port = service.getsockname()[1]
    service.settimeout(0.5)
    received = []

    def receive() -> None:
        try:
            while True:
                received.append(service.recv(64))
        except OSError:
            return

    reader = threading.Thread(target=receive)
    reader.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    try:
        for i in range(150):
            why = twfix.explain(port, "127.0.0.1", kind="udp")
            assert why.can_bind_with_reuse  # read from the service's own options, not probed
            with pytest.raises(twfix.AddressInUseError):
                twfix.reusable_udp(port, "127.0.0.1")
            for _ in range(4):
                sender.sendto(b"%d" % i, ("127.0.0.1", port))
                sent += 1
    finally:
        sender.close()
        reader.join(timeout=10)
        service.close()
    assert len(received) == sent


@pytest.mark.kernel
def test_bound_inactive_sockets_agree_across_filters(netns: NetNS) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    with s:
        if not features.bound_inactive():  # before 6.8 nothing shows it: the answers must say so
            with pytest.warns(twfix.KernelCannotTellWarning, match="6.8"):
                assert twfix.sockets(states=["bound-inactive"], port=port) == []
            why = twfix.explain(port, "127.0.0.1")
            assert why.cause == "unknown"
            assert any("Linux 6.8" in r for r in why.reasons), why
            return
        for states in (None, ["BOUND_INACTIVE"], ["CLOSE"], ["bound-inactive"]):
            assert [e.state for e in twfix.sockets(states=states, port=port)] == [twfix.TcpState.BOUND_INACTIVE]
        # A whole-table walk leaves bound-only sockets out (asking for them walks the host's bind hash too).
        assert twfix.TcpState.BOUND_INACTIVE not in twfix.summary().by_state
        assert twfix.TcpState.BOUND_INACTIVE not in {e.state for e in twfix.sockets()}
        assert twfix.sockets(port=port, source="proc") == []  # /proc/net/tcp does not list them (documented)
        why = twfix.explain(port, "127.0.0.1")
        assert why.cause == "bound"
        assert [p.pid for p in why.holders[0].processes] == [os.getpid()]


def test_localhost_binds_like_the_stdlib(netns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def hosts_with_ipv6_first(host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        if host == "localhost":  # the usual /etc/hosts: ::1 listed before 127.0.0.1
            out = []
            if family in (0, socket.AF_INET6):
                out.append((socket.AF_INET6, type, 6, "", ("::1", port, 0, 0)))
            if family in (0, socket.AF_INET):
                out.append((socket.AF_INET, type, 6, "", ("127.0.0.1", port)))
            return out
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", hosts_with_ipv6_first)
    with twfix.reusable_tcp_server(0, "localhost") as srv:
        assert srv.family == socket.AF_INET
        socket.create_connection(("127.0.0.1", srv.getsockname()[1])).close()
    servers = twfix.reusable_tcp_servers(0, "localhost")
    try:
        assert sorted(s.family for s in servers) == [socket.AF_INET, socket.AF_INET6]
        port = servers[0].getsockname()[1]
        assert {s.getsockname()[1] for s in servers} == {port}
        for addr in ("127.0.0.1", "::1"):  # like tornado's bind_sockets: both answer
            socket.create_connection((addr, port), timeout=5).close()
    finally:
        for s in servers:
            s.close()


def test_transient_resolution_failure_stays_an_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    def again(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", again)
    with pytest.raises(socket.gaierror) as caught:
        twfix.reusable_tcp_server(0, "db.internal")
    assert isinstance(caught.value, OSError)
    assert caught.value.errno == socket.EAI_AGAIN
    with pytest.raises(OSError):
        twfix.reusable_tcp_client("db.internal", 5432)


def test_out_of_range_numbers_name_the_argument(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1", backlog=2**31) as srv:  # clamped, like the kernel does
        assert srv.getsockname()[1]
    with pytest.raises(ValueError, match="timeout"):
        twfix.reusable_tcp_server(0, "127.0.0.1", timeout=float("inf"))
    with pytest.raises(ValueError, match="timeout"):
        twfix.reusable_udp(0, "127.0.0.1", timeout=float("nan"))
    assert twfix.summary(top=2**64).total >= 0


def test_explain_false_keeps_the_kernels_word(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as srv:
        port = srv.getsockname()[1]
        with pytest.raises(twfix.AddressInUseError) as caught:
            twfix.reusable_tcp_server(port, "127.0.0.1", explain=False)
    assert caught.value.explanation is None
    assert caught.value.errno == errno.EADDRINUSE


def test_multicast_receiver_takes_no_unicast(netns: NetNS) -> None:
    subprocess.run(["ip", "route", "add", "239.0.0.0/8", "dev", "lo"], check=True)
    receiver = twfix.reusable_udp(0, multicast_group="239.1.2.3", timeout=0.5)
    port = receiver.getsockname()[1]
    with receiver, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        assert receiver.getsockname()[0] == "239.1.2.3"  # bound to the group, not the wildcard
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sender.sendto(b"unicast", ("127.0.0.1", port))
        sender.sendto(b"group", ("239.1.2.3", port))
        assert receiver.recv(64) == b"group"  # the unicast datagram never reached it
    with pytest.raises(ValueError, match="group address itself"):
        twfix.reusable_udp(0, "127.0.0.1", multicast_group="239.1.2.3")
