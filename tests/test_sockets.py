"""The reusable-socket constructors, against the real kernel in a private network namespace."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import textwrap

import pytest

import twfix
from tests.conftest import NetNS, open_fds, settle, unprivileged_python

SOL, REUSEADDR = socket.SOL_SOCKET, socket.SO_REUSEADDR
REUSEPORT = socket.SO_REUSEPORT
IP_BIND_ADDRESS_NO_PORT = 24


def _opt(sock: socket.socket, name: int, level: int = SOL) -> int:
    return sock.getsockopt(level, name)


def _time_wait_on_server_port(server: socket.socket, clients: int = 3) -> int:
    """Accept `clients` connections and close the server side first: TIME-WAIT lands on the server port."""
    host, port = server.getsockname()[:2]
    peers = [socket.create_connection((host, port)) for _ in range(clients)]
    accepted = [server.accept()[0] for _ in peers]
    for conn in accepted:
        conn.close()
    for peer in peers:
        assert peer.recv(1) == b""  # FIN received: the server side is now in FIN_WAIT2 -> TIME_WAIT
        peer.close()
    server.close()
    settle(port)
    return int(port)


def _ss_time_wait(port: int) -> int:
    out = subprocess.run(
        ["ss", "-H", "-tan", "state", "time-wait", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


# ---------------------------------------------------------------- the seed scenario (TCP restart)


def test_restart_over_time_wait(netns: NetNS) -> None:
    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = _time_wait_on_server_port(server)
    assert _ss_time_wait(port) == 3, "the scenario must really leave TIME-WAIT on the server port"

    plain = socket.socket()
    with plain, pytest.raises(OSError) as info:
        plain.bind(("127.0.0.1", port))
    assert info.value.errno == errno.EADDRINUSE

    again = twfix.reusable_tcp_server(port, "127.0.0.1")
    with again:
        assert again.getsockname() == ("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            conn, _ = again.accept()
            conn.sendall(b"ok")
            assert c.recv(2) == b"ok"
            conn.close()


def test_old_server_without_reuseaddr_is_explained(netns: NetNS) -> None:
    old = socket.socket()
    old.bind(("127.0.0.1", 0))
    old.listen()
    port = _time_wait_on_server_port(old)

    with pytest.raises(twfix.AddressInUseError) as info:
        twfix.reusable_tcp_server(port, "127.0.0.1")
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == errno.EADDRINUSE
    assert err.address == ("127.0.0.1", port)
    assert err.protocol == "tcp"
    text = str(err)
    assert f"127.0.0.1:{port}" in text
    assert "SO_REUSEADDR" in text
    assert "TIME-WAIT" in text
    assert "previous" in text or "old" in text
    # It says when the port frees: "in N s", with N at most the 60 s TIME-WAIT length.
    import re

    match = re.search(r"frees in (?:about )?(\d+) s", text)
    assert match, text
    assert 0 <= int(match.group(1)) <= 61


def test_wildcard_restart_and_ipv6(netns: NetNS) -> None:
    for host in ("", "::1", "::"):
        server = twfix.reusable_tcp_server(0, host)
        target = "127.0.0.1" if host == "" else "::1"
        port = server.getsockname()[1]
        peers = [socket.create_connection((target, port)) for _ in range(2)]
        for conn in [server.accept()[0] for _ in peers]:
            conn.close()
        for p in peers:
            p.recv(1)
            p.close()
        server.close()
        with twfix.reusable_tcp_server(port, host) as again:
            assert again.getsockname()[1] == port


def test_live_listener_conflict_is_address_in_use(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as first:
        port = first.getsockname()[1]
        with pytest.raises(twfix.AddressInUseError) as info:
            twfix.reusable_tcp_server(port, "127.0.0.1")
        assert info.value.errno == errno.EADDRINUSE
        assert str(info.value).startswith("Address already in use")
        # except OSError still works, as does the errno check people already have.
        with pytest.raises(OSError, match=r"127\.0\.0\.1"):
            twfix.reusable_tcp_server(port, "127.0.0.1")


def test_tcp_server_options(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as s:
        assert _opt(s, REUSEADDR) == 1
        assert _opt(s, REUSEPORT) == 0
        assert _opt(s, socket.SO_ACCEPTCONN) == 1
        assert not s.get_inheritable()
        assert s.family == socket.AF_INET
        assert s.type == socket.SOCK_STREAM
        assert s.gettimeout() is None
    with twfix.reusable_tcp_server(0, "127.0.0.1", reuse_port=True, backlog=5, timeout=2.5) as s:
        assert _opt(s, REUSEPORT) == 1
        assert s.gettimeout() == 2.5
    with twfix.reusable_tcp_server(0, "::1") as s6:
        assert s6.family == socket.AF_INET6
        assert _opt(s6, socket.IPV6_V6ONLY, socket.IPPROTO_IPV6) == 1
    with twfix.reusable_tcp_server(0, "", dualstack_ipv6=True) as ds:
        assert ds.family == socket.AF_INET6
        assert _opt(ds, socket.IPV6_V6ONLY, socket.IPPROTO_IPV6) == 0
        port = ds.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, addr = ds.accept()
            assert addr[0] == "::ffff:127.0.0.1"
            conn.close()


def test_reuse_port_shares_a_listener_only_when_asked(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1", reuse_port=True) as a:
        port = a.getsockname()[1]
        with twfix.reusable_tcp_server(port, "127.0.0.1", reuse_port=True) as b:
            assert b.getsockname()[1] == port
        with pytest.raises(twfix.AddressInUseError):
            twfix.reusable_tcp_server(port, "127.0.0.1")


def test_host_names_resolve_once(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "localhost") as s:
        assert s.getsockname()[0] in ("127.0.0.1", "::1")


# ---------------------------------------------------------------- UDP


def test_udp_rebind_after_close_and_refuses_sharing(netns: NetNS) -> None:
    first = twfix.reusable_udp(0, "127.0.0.1")
    port = first.getsockname()[1]
    assert _opt(first, REUSEADDR) == 0
    assert _opt(first, REUSEPORT) == 0
    with pytest.raises(twfix.AddressInUseError) as info:
        twfix.reusable_udp(port, "127.0.0.1")
    assert info.value.protocol == "udp"
    assert info.value.address == ("127.0.0.1", port)
    # Even a hand-made socket with SO_REUSEADDR cannot join: we did not set it.
    intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intruder.setsockopt(SOL, REUSEADDR, 1)
    with intruder, pytest.raises(OSError) as err:
        intruder.bind(("127.0.0.1", port))
    assert err.value.errno == errno.EADDRINUSE
    first.close()
    with twfix.reusable_udp(port, "127.0.0.1", timeout=1) as again:  # (a): right after close
        assert again.getsockname() == ("127.0.0.1", port)
        assert again.gettimeout() == 1


def test_udp_reuse_port_same_user(netns: NetNS) -> None:
    a = twfix.reusable_udp(0, "127.0.0.1", reuse_port=True)
    port = a.getsockname()[1]
    b = twfix.reusable_udp(port, "127.0.0.1", reuse_port=True)
    with a, b:
        assert _opt(a, REUSEPORT) == _opt(b, REUSEPORT) == 1
        assert _opt(a, REUSEADDR) == 0
        received = 0
        for i in range(64):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                tx.sendto(b"%d" % i, ("127.0.0.1", port))
        for s in (a, b):
            s.settimeout(0.2)
            try:
                while True:
                    s.recv(16)
                    received += 1
            except TimeoutError:
                pass
        assert received == 64


_INTRUDER = textwrap.dedent(
    """
    import errno, json, socket, sys
    port = int(sys.argv[1]); results = {}
    for name, opts in (("reuseaddr", [socket.SO_REUSEADDR]), ("reuseport", [socket.SO_REUSEPORT]),
                       ("both", [socket.SO_REUSEADDR, socket.SO_REUSEPORT])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for o in opts:
            s.setsockopt(socket.SOL_SOCKET, o, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            results[name] = e.errno
            s.close()
            continue
        s.settimeout(0.5)
        got = 0
        print(json.dumps({"bound": name}), flush=True)
        sys.stdin.readline()
        try:
            while True:
                s.recv(16); got += 1
        except OSError:
            pass
        results[name] = "stole %d" % got
        s.close()
    print(json.dumps(results), flush=True)
    """
)


def _run_intruder(port: int) -> dict[str, object]:
    """Run the intruder as uid 65534 in this namespace; feed datagrams whenever it manages to bind."""
    import json

    python, _ = unprivileged_python()
    with subprocess.Popen(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", python, "-c", _INTRUDER, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("intruder died")
            msg = json.loads(line)
            if "bound" not in msg:
                return dict(msg)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                for _ in range(10):
                    tx.sendto(b"secret", ("127.0.0.1", port))
            proc.stdin.write("\n")
            proc.stdin.flush()


def test_udp_other_user_cannot_join(netns: NetNS) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch uid")
    # Control: the classic SO_REUSEADDR recipe lets another user steal the datagrams.
    classic = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    classic.setsockopt(SOL, REUSEADDR, 1)
    classic.bind(("127.0.0.1", 0))
    with classic:
        result = _run_intruder(classic.getsockname()[1])
        assert str(result["reuseaddr"]).startswith("stole"), result
        assert result["reuseaddr"] != "stole 0", result

    for kwargs in ({}, {"reuse_port": True}):
        owner = twfix.reusable_udp(0, "127.0.0.1", **kwargs)  # type: ignore[arg-type]
        with owner:
            port = owner.getsockname()[1]
            result = _run_intruder(port)
            assert result == {"reuseaddr": errno.EADDRINUSE, "reuseport": errno.EADDRINUSE, "both": errno.EADDRINUSE}
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                tx.sendto(b"mine", ("127.0.0.1", port))
            owner.settimeout(2)
            assert owner.recv(16) == b"mine"


def test_udp_multicast_receivers_share_the_group_port(netns: NetNS) -> None:
    subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=True)
    subprocess.run(["ip", "route", "add", "239.0.0.0/8", "dev", "lo"], check=True)
    a = twfix.reusable_udp(0, multicast_group="239.7.7.7", timeout=2)
    port = a.getsockname()[1]
    b = twfix.reusable_udp(port, multicast_group="239.7.7.7", timeout=2)
    with a, b, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        assert _opt(a, REUSEADDR) == 1
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.sendto(b"group", ("239.7.7.7", port))
        assert a.recv(16) == b"group"
        assert b.recv(16) == b"group"
    with pytest.raises(ValueError, match="multicast_group"):
        twfix.reusable_udp(0, multicast_group="10.0.0.1")


def test_udp_ipv6(netns: NetNS) -> None:
    with twfix.reusable_udp(0, "::1") as s:
        assert s.family == socket.AF_INET6
        assert _opt(s, socket.IPV6_V6ONLY, socket.IPPROTO_IPV6) == 1
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"six", ("::1", s.getsockname()[1]))
        s.settimeout(2)
        assert s.recv(8) == b"six"


# ---------------------------------------------------------------- clients


def test_client_with_source_address_does_not_reserve_a_port(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as srv:
        port = srv.getsockname()[1]
        c = twfix.reusable_tcp_client("127.0.0.1", port, source_address=("127.0.0.1", 0), timeout=5)
        with c:
            assert _opt(c, IP_BIND_ADDRESS_NO_PORT, socket.IPPROTO_IP) == 1
            assert _opt(c, REUSEADDR) == 0
            assert c.getpeername() == ("127.0.0.1", port)
            assert c.gettimeout() == 5
            srv.accept()[0].close()
        plain = twfix.reusable_tcp_client("127.0.0.1", port)
        with plain:
            assert _opt(plain, REUSEADDR) == 0
            assert _opt(plain, IP_BIND_ADDRESS_NO_PORT, socket.IPPROTO_IP) == 0
            srv.accept()[0].close()


def test_bind_address_no_port_shares_source_ports_across_destinations(netns: NetNS) -> None:
    """With a 4-port range, IP_BIND_ADDRESS_NO_PORT lets 4 connections go to each of two servers."""
    servers = [twfix.reusable_tcp_server(0, "127.0.0.1", backlog=16) for _ in range(2)]  # before narrowing
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40003")
    held: list[socket.socket] = []
    try:
        for srv in servers:
            for _ in range(4):
                held.append(
                    twfix.reusable_tcp_client("127.0.0.1", srv.getsockname()[1], source_address=("127.0.0.1", 0))
                )
        assert len(held) == 8
        assert {c.getsockname()[1] for c in held} <= set(range(40000, 40004))
        # The 9th connection to a destination finds no free 4-tuple: EADDRNOTAVAIL, not a bind error.
        with pytest.raises(OSError) as info:
            twfix.reusable_tcp_client("127.0.0.1", servers[0].getsockname()[1], source_address=("127.0.0.1", 0))
        assert info.value.errno == errno.EADDRNOTAVAIL
    finally:
        for s in held + servers:
            s.close()


def test_client_ipv6_and_refused(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "::1") as srv:
        with twfix.reusable_tcp_client("::1", srv.getsockname()[1], source_address=("::1", 0)) as c:
            assert c.family == socket.AF_INET6
            srv.accept()[0].close()
        port = srv.getsockname()[1]
    before = open_fds()
    with pytest.raises(ConnectionRefusedError):
        twfix.reusable_tcp_client("::1", port)
    assert open_fds() == before


# ---------------------------------------------------------------- make_reusable


def test_make_reusable_before_and_after_bind(netns: NetNS) -> None:
    tcp = socket.socket()
    with tcp:
        assert twfix.make_reusable(tcp) is tcp
        assert _opt(tcp, REUSEADDR) == 1
        tcp.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match=r"before bind\(\)"):
            twfix.make_reusable(tcp)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        twfix.make_reusable(udp)
        assert _opt(udp, REUSEADDR) == 0
        twfix.make_reusable(udp, reuse_port=True)
        assert _opt(udp, REUSEPORT) == 1
    with pytest.raises(TypeError):
        twfix.make_reusable("not a socket")  # type: ignore[arg-type]
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        twfix.make_reusable(closed)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix, pytest.raises(ValueError, match="AF_INET"):
        twfix.make_reusable(unix)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw, pytest.raises(ValueError):
        twfix.make_reusable(raw)


# ---------------------------------------------------------------- asyncio


def test_asyncio_accepts_the_sockets(netns: NetNS) -> None:
    async def main() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, sock=twfix.reusable_tcp_server(0, "127.0.0.1"))
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(sock=twfix.reusable_tcp_client("127.0.0.1", port))
        writer.write(b"ping\n")
        echoed = await reader.readline()
        writer.close()
        server.close()
        await server.wait_closed()

        got: asyncio.Future[bytes] = loop.create_future()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                got.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Proto, sock=twfix.reusable_udp(0, "127.0.0.1"))
        udp_port = transport.get_extra_info("sockname")[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"dgram", ("127.0.0.1", udp_port))
        data = await asyncio.wait_for(got, 5)
        transport.close()
        return echoed, data

    assert asyncio.run(main()) == (b"ping\n", b"dgram")


# ---------------------------------------------------------------- bad input


BAD_CALLS = [
    (lambda: twfix.reusable_udp(-1), ValueError, "port"),
    (lambda: twfix.reusable_udp(65536), ValueError, "port"),
    (lambda: twfix.reusable_udp(True), TypeError, "port"),  # type: ignore[arg-type]
    (lambda: twfix.reusable_udp(1.5), TypeError, "port"),  # type: ignore[arg-type]
    (lambda: twfix.reusable_udp("80"), TypeError, "port"),  # type: ignore[arg-type]
    (lambda: twfix.reusable_udp(0, "300.1.1.1"), ValueError, "host"),
    (lambda: twfix.reusable_udp(0, "no such host.invalid"), ValueError, "host"),
    (lambda: twfix.reusable_udp(0, "\0"), ValueError, "host"),
    (lambda: twfix.reusable_udp(0, 127), TypeError, "host"),  # type: ignore[arg-type]
    (lambda: twfix.reusable_udp(0, "127.0.0.1", family=socket.AF_INET6), ValueError, "family"),
    (lambda: twfix.reusable_udp(0, "::1", family=socket.AF_INET), ValueError, "family"),
    (lambda: twfix.reusable_udp(0, family=socket.AF_UNIX), ValueError, "family"),
    (lambda: twfix.reusable_udp(0, timeout=-1), ValueError, "timeout"),
    (lambda: twfix.reusable_udp(0, timeout=float("nan")), ValueError, "timeout"),
    (lambda: twfix.reusable_udp(0, timeout="1"), TypeError, "timeout"),  # type: ignore[arg-type]
    (lambda: twfix.reusable_tcp_server(0, backlog=-1), ValueError, "backlog"),
    (lambda: twfix.reusable_tcp_server(0, backlog=1.0), TypeError, "backlog"),  # type: ignore[arg-type]
    (lambda: twfix.reusable_tcp_server(0, "127.0.0.1", dualstack_ipv6=True), ValueError, "family"),
    (lambda: twfix.reusable_tcp_server(0, family=socket.AF_INET, dualstack_ipv6=True), ValueError, "dualstack"),
    (lambda: twfix.reusable_tcp_client("127.0.0.1", 0), ValueError, "port"),
    (lambda: twfix.reusable_tcp_client("", 80), ValueError, "host"),
    (lambda: twfix.reusable_tcp_client("127.0.0.1", 80, source_address="x"), TypeError, "source_address"),  # type: ignore[arg-type]
    (lambda: twfix.reusable_tcp_client("127.0.0.1", 80, source_address=("::1", 0)), ValueError, "source_address"),
    (lambda: twfix.reusable_tcp_client("127.0.0.1", 80, source_address=("127.0.0.1", 70000)), ValueError, "port"),
]


@pytest.mark.parametrize(("call", "exc", "word"), BAD_CALLS)
def test_bad_input_is_named(call, exc, word) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=word):
        call()


def test_failing_calls_leak_no_descriptors(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as holder, twfix.reusable_udp(0, "127.0.0.1") as uholder:
        tport, uport = holder.getsockname()[1], uholder.getsockname()[1]
        before = open_fds()
        for i in range(10_000):
            kind = i % 4
            try:
                if kind == 0:
                    twfix.reusable_tcp_server(tport, "127.0.0.1")
                elif kind == 1:
                    twfix.reusable_udp(uport, "127.0.0.1")
                elif kind == 2:
                    twfix.reusable_udp(0, "300.0.0.1")
                else:
                    twfix.reusable_tcp_client("127.0.0.1", 1, timeout=1)
            except (OSError, ValueError):
                pass
        assert open_fds() == before


def test_native_surface_rejects_garbage() -> None:
    from twfix import _twfix

    with socket.socket() as s:
        fd = s.fileno()
        with pytest.raises(ValueError, match="family"):
            _twfix.bind_socket(fd, 12345, socket.SOCK_STREAM, "127.0.0.1", 0, 0, 0, -1)
        with pytest.raises(ValueError, match="IP address"):
            _twfix.bind_socket(fd, socket.AF_INET, socket.SOCK_STREAM, "x" * 10_000, 0, 0, 0, -1)
        with pytest.raises(ValueError, match="flag"):
            _twfix.bind_socket(fd, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0, 0, 1 << 30, -1)
        with pytest.raises(OverflowError):
            _twfix.bind_socket(fd, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 70000, 0, 0, -1)
        assert s.fileno() == fd  # still open and owned by the Python object
    for bad in (-1, 2**31 - 1):
        with pytest.raises((ValueError, OSError)) as info:
            _twfix.make_reusable(bad, 0)
        assert isinstance(info.value, ValueError) or info.value.errno == errno.EBADF
    with pytest.raises(OSError) as err:
        _twfix.bind_socket(99999, socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0, 0, _twfix.F_REUSE_ADDR, -1)
    assert err.value.errno == errno.EBADF


def test_client_tries_every_address_of_a_name(netns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with an IPv6 and an IPv4 address reaches a server listening on either of them."""
    real = socket.getaddrinfo

    def both(host: str, port: int, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        if host != "both.test":
            return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    for host in ("127.0.0.1", "::1"):
        with twfix.reusable_tcp_server(0, host) as srv:
            port = srv.getsockname()[1]
            with twfix.reusable_tcp_client("both.test", port, timeout=5) as c:
                assert c.getpeername()[0] == host
                srv.accept()[0].close()
    before = open_fds()
    with pytest.raises(ConnectionRefusedError):
        twfix.reusable_tcp_client("both.test", 1)
    assert open_fds() == before
