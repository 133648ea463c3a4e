"""Verdicts in real situations, round two: client-side TIME-WAIT towards servers on ports of the range,
orphans whose ACKs are dropped, SO_REUSEPORT groups, listeners on ports the kernel may have chosen, and
the address order of reusable_tcp_servers. Real processes; `ss -e` and `ss -p` are the witnesses."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS, settle
from twfix import sysctl, tune

SERVER = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.recv(1)  # wait for the client's FIN: the client closes first
    conn.close()
"""

CLIENT = """
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(c.getsockname()[1], flush=True)
c.close()
"""


@contextmanager
def server(port: int) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def client_time_wait(server_port: int) -> int:
    """A client process connects and closes first; returns its source port (now in TIME-WAIT)."""
    out = subprocess.run([sys.executable, "-c", CLIENT, str(server_port)], capture_output=True, text=True, check=True)
    port = int(out.stdout)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if [e.state for e in twfix.sockets(port=port)] == [twfix.TcpState.TIME_WAIT]:
            return port
        time.sleep(0.01)
    raise AssertionError(f"no TIME-WAIT on port {port}")


def ss(*args: str) -> str:
    return subprocess.run(["ss", "-Htan", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("where", ["grpc-50051", "bind0"])
def test_client_side_time_wait_towards_a_server_on_a_port_of_the_range(netns: NetNS, where: str) -> None:
    ports = sysctl.port_range()
    with server(50051 if where == "grpc-50051" else 0) as (proc, port):
        assert ports.assigns(port)  # the case the old rule got wrong: the peer port lies in the range
        src = client_time_wait(port)
        witness = ss("state", "time-wait", "sport", "=", f":{src}")
        assert f"127.0.0.1:{port}" in witness  # ss: TIME-WAIT on the client's port, towards the server
        why = twfix.explain(src, "127.0.0.1")
        assert why.cause == "time-wait-client", why
        assert why.confidence == "certain"  # the peer is a live listener here
        assert "previous server" not in why.verdict
        assert not any("make the server set SO_REUSEADDR" in a for a in why.advice)
        assert any("ip_local_reserved_ports" in a for a in why.advice)
        assert any("SO_REUSEADDR on the server cannot help" in r for r in why.reasons)
        proc.kill()
        proc.wait()
        why = twfix.explain(src, "127.0.0.1")  # the server is gone: the parities decide
        assert why.cause == "time-wait-client", why
        assert why.confidence == "likely"
        assert any("parity" in r for r in why.reasons)


def test_server_side_time_wait_on_a_kernel_chosen_port_is_still_the_servers(netns: NetNS) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))  # bind(0): the parity connect() does not take first
    srv.listen()
    port = srv.getsockname()[1]
    assert sysctl.port_range().bind_first(port)
    c = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server closes first: TIME-WAIT on its own port
    c.recv(1)
    c.close()
    srv.close()
    settle(port)
    why = twfix.explain(port, "127.0.0.1")
    assert why.cause == "time-wait-server", why


# ------------------------------------------------------------------ orphans whose ACKs never come


def test_orphans_with_dropped_acks_get_the_kernels_rule_not_a_number(netns: NetNS) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.socket()
    cli.bind(("127.0.0.2", 0))
    cli.connect(("127.0.0.1", port))
    conn, _ = srv.accept()
    # Every packet from 127.0.0.2 now goes nowhere: the client's ACKs of the server's FIN are dropped.
    for command in (
        "ip rule add pref 100 lookup local",
        "ip rule del pref 0",
        "ip route add blackhole default table 200",
        "ip rule add pref 10 from 127.0.0.2 lookup 200",
    ):
        subprocess.run(command.split(), check=True)
    conn.close()
    srv.close()  # no process holds the connection any more: an orphan retransmitting its FIN
    try:
        verdicts = []
        for _ in range(2):
            time.sleep(1.5)
            (entry,) = twfix.sockets(states=["FIN_WAIT1"], port=port)
            witness = ss("-oe", "state", "fin-wait-1", "sport", "=", f":{port}")
            # ss leaves the time empty once the timer is overdue (a slow or emulated host): only the count matters
            found = re.search(r"timer:\(on,[^,]*,(\d+)\)", witness)
            assert found, witness
            assert abs(entry.retrans - int(found.group(1))) <= 1  # ss -e: the same retransmission count
            why = twfix.explain(port, "127.0.0.1")
            assert why.cause == "orphans"
            assert why.frees_in is None  # no number that the next call would contradict
            assert not re.search(r"about \d+ s left", str(why))
            assert any("cannot be known" in r and "102.2 s" in r for r in why.reasons)
            verdicts.append(why.verdict)
        assert verdicts[0] == verdicts[1]
    finally:
        cli.close()


# ------------------------------------------------------------------ SO_REUSEPORT groups

MEMBER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
time.sleep(60)
"""


def test_a_reuseport_group_is_named_whole_with_how_to_join(netns: NetNS) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    members = [
        subprocess.Popen([sys.executable, "-c", MEMBER, str(port)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        for m in members:
            assert m.stdout is not None
            assert m.stdout.readline().strip() == "ready"
        why = twfix.explain(port, "127.0.0.1")
        assert why.cause == "listener"
        pids = {m.pid for m in members}
        named = {int(p) for p in re.findall(r"pid (\d+)", why.verdict)}
        assert named == pids
        witness = subprocess.run(["ss", "-Htlnp", "sport", "=", f":{port}"], capture_output=True, text=True).stdout
        assert {int(p) for p in re.findall(r"pid=(\d+)", witness)} == pids  # ss -p: the same members
        assert any("SO_REUSEPORT group" in r for r in why.reasons)
        assert any("reuse_port=True" in a and "same effective user" in a for a in why.advice)
        with twfix.reusable_tcp_server(port, "127.0.0.1", reuse_port=True):  # joining does succeed
            pass
    finally:
        for m in members:
            m.kill()
            m.communicate()


# ------------------------------------------------------------------ tune and ports the kernel may have chosen

SIXTY = """
import json, socket, sys, time
ports = json.load(open(sys.argv[1]))  # the ports come from a configuration file, not the command line
held = [socket.create_server(("127.0.0.1", p)) for p in ports]
print("ready", flush=True)
time.sleep(60)
"""


def test_tune_says_which_listeners_it_leaves_out_and_reserves_them_on_request(netns: NetNS, tmp_path: Path) -> None:
    ports = list(range(40000, 40060))
    config = tmp_path / "ports.json"
    config.write_text(str(ports))
    service = subprocess.Popen([sys.executable, "-c", SIXTY, str(config)], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        assert service.stdout.readline().strip() == "ready"
        plan = tune.plan()
        (change,) = [c for c in plan.changes if c.name == "net.ipv4.ip_local_reserved_ports"]
        even = {p for p in ports if p % 2 == 0}
        assert {a for a, _b in change.after} == even
        assert {p for p, _why in plan.left_out} == set(ports) - even
        assert all("bind(0)" in why for _p, why in plan.left_out)
        assert "not reserved: listener on 40001" in plan.snippet()
        everything = tune.plan(reserve="all")
        (change,) = [c for c in everything.changes if c.name == "net.ipv4.ip_local_reserved_ports"]
        assert {a for a, _b in change.after} == set(ports)
        assert everything.left_out == ()
        one = tune.plan(reserve=[40001])
        assert 40001 not in {p for p, _w in one.left_out}
    finally:
        service.kill()
        service.communicate()


# ------------------------------------------------------------------ address order like tornado


def test_reusable_tcp_servers_put_ipv4_first_like_tornado(netns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    netutil = pytest.importorskip("tornado.netutil")
    real = socket.getaddrinfo

    def ipv6_first(host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        if host == "localhost":  # the usual /etc/hosts: ::1 listed before 127.0.0.1
            found = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]
            return [*found, (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    theirs = netutil.bind_sockets(0, "localhost")
    ours = twfix.reusable_tcp_servers(0, "localhost")
    try:
        assert [s.family for s in ours] == [s.family for s in theirs] == [socket.AF_INET, socket.AF_INET6]
        assert ours[0].getsockname()[0] == "127.0.0.1"
    finally:
        for s in (*theirs, *ours):
            s.close()


def test_explain_and_the_doctor_agree_on_a_bind0_listener(netns: NetNS) -> None:
    """One rule decides whether the kernel chose a listener's port: explain no longer warns about what the
    doctor calls fine (LISTEN-EPHEMERAL-CHOSEN)."""
    with twfix.reusable_tcp_server(0, "127.0.0.1") as srv:
        port = srv.getsockname()[1]
        codes = {f.code for f in twfix.doctor().findings}
        assert "LISTEN-EPHEMERAL-CHOSEN" in codes
        assert "LISTEN-IN-EPHEMERAL" not in codes
        why = twfix.explain(port, "127.0.0.1")
        assert not any("where outgoing connections may take it" in r for r in why.reasons)
        assert any("most likely the kernel chose it" in r for r in why.reasons)
