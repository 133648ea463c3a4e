"""Every doctor rule, built for real in a private network namespace: the finding appears, then disappears
once the situation is fixed. The experiments at the end back the advice the rules give."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS, listener_without_reuseaddr, run_unprivileged, settle, time_wait_pairs
from twfix.findings import Report, Severity


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    (tmp_path / "etc" / "sysctl.d").mkdir(parents=True)
    return tmp_path


def _codes(report: Report, at_least: Severity = Severity.INFO) -> set[str]:
    return {f.code for f in report.findings if f.severity.rank >= at_least.rank}


def test_report_shape(netns: NetNS, empty_root: Path) -> None:
    report = twfix.doctor(root=empty_root)
    assert report.ok, str(report)
    assert report.findings
    data = json.loads(report.to_json())
    assert data["schema"] == 1
    assert data["ok"] is True
    assert {"code", "severity", "title", "evidence", "advice", "fact"} <= set(data["findings"][0])
    text = str(report)
    assert "twfix doctor" in text
    assert "verdict: ok" in text
    assert "<table " in report._repr_html_()


def test_bad_root_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root"):
        twfix.doctor(root=tmp_path / "missing")


def test_tw_buckets_zero(netns: NetNS, empty_root: Path) -> None:
    default = netns.read_sysctl("net.ipv4.tcp_max_tw_buckets")
    netns.write_sysctl("net.ipv4.tcp_max_tw_buckets", "0")
    report = twfix.doctor(root=empty_root)
    assert "TW-BUCKETS-ZERO" in _codes(report, Severity.ERROR)
    assert not report.ok
    netns.write_sysctl("net.ipv4.tcp_max_tw_buckets", default)
    assert "TW-BUCKETS-ZERO" not in _codes(twfix.doctor(root=empty_root))


def test_tw_buckets_full_and_overflow(netns: NetNS, empty_root: Path) -> None:
    netns.write_sysctl("net.ipv4.tcp_max_tw_buckets", "5")
    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    with server:
        time_wait_pairs(server, 20, server_closes=True)
    report = twfix.doctor(root=empty_root)
    full = report.by_code("TW-BUCKETS-FULL")
    assert full, str(report)
    assert full[0].evidence["time_wait"] == 5
    assert full[0].evidence["TCPTimeWaitOverflow"] == 15  # the kernel destroyed the other 15 silently
    netns.write_sysctl("net.ipv4.tcp_max_tw_buckets", "1000")
    after = twfix.doctor(root=empty_root)
    assert "TW-BUCKETS-FULL" not in _codes(after)
    assert "TW-OVERFLOWED" in _codes(after)  # the counter remembers; reported as information


def test_ephemeral_small_parity_reserved(netns: NetNS, empty_root: Path) -> None:
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40998")
    netns.write_sysctl("net.ipv4.ip_local_reserved_ports", "40000-40009")
    codes = _codes(twfix.doctor(root=empty_root))
    assert {"EPHEMERAL-SMALL", "EPHEMERAL-PARITY", "EPHEMERAL-RESERVED"} <= codes
    netns.write_sysctl("net.ipv4.ip_local_port_range", "32768 60999")
    netns.write_sysctl("net.ipv4.ip_local_reserved_ports", "")
    codes = _codes(twfix.doctor(root=empty_root))
    assert not {"EPHEMERAL-SMALL", "EPHEMERAL-PARITY", "EPHEMERAL-RESERVED"} & codes


def test_headroom_per_destination(netns: NetNS, empty_root: Path) -> None:
    server = twfix.reusable_tcp_server(5000, "127.0.0.1")
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40003")
    clients = [socket.create_connection(("127.0.0.1", 5000)) for _ in range(4)]
    accepted = [server.accept()[0] for _ in clients]
    with pytest.raises(OSError) as info:  # the 4-tuple arithmetic, witnessed by the kernel
        socket.create_connection(("127.0.0.1", 5000))
    assert info.value.errno == errno.EADDRNOTAVAIL
    report = twfix.doctor(root=empty_root)
    headroom = report.by_code("EPHEMERAL-HEADROOM")
    assert headroom, str(report)
    assert headroom[0].severity == Severity.ERROR
    assert headroom[0].evidence["headroom"] == 0
    for s in accepted:  # server closes first: TIME-WAIT lands on port 5000, the client ports come back
        s.close()
    for c in clients:
        c.recv(1)
        c.close()
    server.close()
    settle(5000)
    assert "EPHEMERAL-HEADROOM" not in _codes(twfix.doctor(root=empty_root))


def test_timestamps_off_with_tw_reuse(netns: NetNS, empty_root: Path) -> None:
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    assert "TW-REUSE-NO-TIMESTAMPS" in _codes(twfix.doctor(root=empty_root), Severity.WARNING)
    netns.write_sysctl("net.ipv4.tcp_timestamps", "1")
    assert "TW-REUSE-NO-TIMESTAMPS" not in _codes(twfix.doctor(root=empty_root))


def _add_test_address(address: str) -> None:
    """An extra, non-loopback address on lo of the private namespace: a test host local to it."""
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)


def test_tw_reuse_loopback_only_with_outgoing_traffic(netns: NetNS, empty_root: Path) -> None:
    _add_test_address("10.123.0.1")
    # Under CI load once only 994 of 1000 TIME-WAITs were left (cause not pinned down): populate with a margin
    # above the threshold, with reuse off, and compare the evidence with ss rather than with the count made.
    netns.write_sysctl("net.ipv4.tcp_tw_reuse", "0")
    server = twfix.reusable_tcp_server(0, "10.123.0.1", backlog=512)
    with server:
        time_wait_pairs(server, 1100, server_closes=False)  # client-side TIME-WAIT toward 10.123.0.1
    netns.write_sysctl("net.ipv4.tcp_tw_reuse", "2")
    report = twfix.doctor(root=empty_root)
    found = report.by_code("TW-REUSE-LOOPBACK-ONLY")
    assert found, str(report)
    witness = subprocess.run(
        ["ss", "-tanH", "state", "time-wait", "dst", "10.123.0.1"], capture_output=True, text=True, check=True
    ).stdout
    assert found[0].evidence["outgoing_time_wait_non_loopback"] == len(witness.splitlines()) >= 1000
    netns.write_sysctl("net.ipv4.tcp_tw_reuse", "1")
    assert "TW-REUSE-LOOPBACK-ONLY" not in _codes(twfix.doctor(root=empty_root))


def test_listener_inside_ephemeral_range(netns: NetNS, empty_root: Path) -> None:
    with twfix.reusable_tcp_server(40000, "127.0.0.1"):
        found = twfix.doctor(root=empty_root).by_code("LISTEN-IN-EPHEMERAL")
        assert found
        assert 40000 in found[0].evidence["ports"]
        netns.write_sysctl("net.ipv4.ip_local_reserved_ports", "40000")
        assert "LISTEN-IN-EPHEMERAL" not in _codes(twfix.doctor(root=empty_root))


def _cap_default() -> int:
    """The kernel default of tcp_max_tw_buckets as twfix reads it (the kernel-fact tests check it)."""
    default = twfix.sysctl.read(["net.ipv4.tcp_max_tw_buckets"])["net.ipv4.tcp_max_tw_buckets"].default
    assert isinstance(default, int)
    return default


def test_folklore_in_sysctl_files(netns: NetNS, empty_root: Path) -> None:
    conf = empty_root / "etc" / "sysctl.conf"
    conf.write_text("# tuned by a blog post\nnet.ipv4.tcp_tw_recycle = 1\nnet.ipv4.tcp_tw_reuse=1\n")
    dropin = empty_root / "etc" / "sysctl.d" / "60-timewait.conf"
    # The folklore 5000 lowers the cap only where the established hash is above 10,000 buckets (RAM above
    # about 1.25 GB): 1 GB guests default to 4096. Half the default here lowers it on every machine.
    low = _cap_default() // 2
    dropin.write_text(
        "# reduce TIME_WAIT\nnet.ipv4.tcp_fin_timeout = 15\nnet/ipv4/tcp_syncookies = 1\n"
        f"net.ipv4.tcp_max_tw_buckets = {low}\n"
    )
    report = twfix.doctor(root=empty_root)
    recycle = report.by_code("CONF-TW-RECYCLE")
    assert recycle
    assert recycle[0].evidence == {"file": str(conf), "line": 2, "text": "net.ipv4.tcp_tw_recycle = 1"}
    fin = report.by_code("CONF-FIN-TIMEOUT")
    assert fin
    assert fin[0].evidence["line"] == 2
    assert f"{dropin}:2" in fin[0].title
    assert report.by_code("CONF-SYNCOOKIES")[0].evidence["line"] == 3
    assert report.by_code("CONF-TW-BUCKETS-LOWERED")[0].evidence["line"] == 4
    conf.write_text("net.ipv4.tcp_tw_reuse=1\n")
    dropin.unlink()
    codes = _codes(twfix.doctor(root=empty_root))
    assert not {c for c in codes if c.startswith("CONF-")}


def test_syncookies_alone_is_not_folklore(netns: NetNS, empty_root: Path) -> None:
    (empty_root / "etc" / "sysctl.d" / "10-syn.conf").write_text("net.ipv4.tcp_syncookies = 1\n")
    assert "CONF-SYNCOOKIES" not in _codes(twfix.doctor(root=empty_root))


# ------------------------------------------------------------------ experiments behind the advice


@pytest.mark.kernel
def test_fact_fin_timeout_does_not_shorten_time_wait(netns: NetNS) -> None:
    netns.write_sysctl("net.ipv4.tcp_fin_timeout", "3")
    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = server.getsockname()[1]
    with server:
        time_wait_pairs(server, 3, server_closes=True)
    tws = twfix.sockets("tcp", states=["TIME_WAIT"], port=port)
    assert len(tws) == 3
    assert all(e.expires is not None and e.expires > 50 for e in tws)  # still ~60 s, not 3 s


@pytest.mark.kernel
def test_fact_tw_recycle_is_gone(netns: NetNS) -> None:
    assert not Path("/proc/sys/net/ipv4/tcp_tw_recycle").exists()


@pytest.mark.kernel
def test_fact_tw_buckets_zero_means_no_time_wait(netns: NetNS) -> None:
    netns.write_sysctl("net.ipv4.tcp_max_tw_buckets", "0")
    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = server.getsockname()[1]
    with server:
        time_wait_pairs(server, 4, server_closes=True)
    assert twfix.sockets("tcp", states=["TIME_WAIT"], port=port) == []


def _exhaust_one_port(dest: tuple[str, int], server: socket.socket) -> None:
    """With a one-port range, make one client-side TIME-WAIT toward dest."""
    c = socket.create_connection(dest)
    a = server.accept()[0]
    c.close()
    a.recv(1)
    a.close()


@pytest.mark.kernel
@pytest.mark.parametrize(("reuse", "stamps", "expect_ok"), [(2, 1, False), (1, 1, True), (1, 0, False)])
def test_fact_tw_reuse_needs_non_loopback_opt_in_and_timestamps(
    netns: NetNS, reuse: int, stamps: int, expect_ok: bool
) -> None:
    _add_test_address("10.123.0.1")
    netns.write_sysctl("net.ipv4.tcp_timestamps", str(stamps))
    netns.write_sysctl("net.ipv4.tcp_tw_reuse", str(reuse))
    delay = Path("/proc/sys/net/ipv4/tcp_tw_reuse_delay").exists()  # 6.14+; before, a fixed ~1 s in 1-s steps
    if delay:
        netns.write_sysctl("net.ipv4.tcp_tw_reuse_delay", "1")
    server = twfix.reusable_tcp_server(5001, "10.123.0.1")
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40001 40001")
    with server:
        _exhaust_one_port(("10.123.0.1", 5001), server)
        time.sleep(0.05 if delay else 2.1)  # past tcp_tw_reuse_delay (1 ms), or the fixed second
        if expect_ok:
            socket.create_connection(("10.123.0.1", 5001)).close()
        else:
            with pytest.raises(OSError) as info:
                socket.create_connection(("10.123.0.1", 5001))
            assert info.value.errno == errno.EADDRNOTAVAIL


@pytest.mark.kernel
def test_fact_listener_in_range_loses_to_outgoing_connection(netns: NetNS) -> None:
    server = twfix.reusable_tcp_server(5002, "127.0.0.1")
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40002 40002")
    with server:
        c = socket.create_connection(("127.0.0.1", 5002))
        assert c.getsockname()[1] == 40002
        with pytest.raises(twfix.AddressInUseError) as info, c:
            twfix.reusable_tcp_server(40002, "127.0.0.1")
        explanation = info.value.explanation
        assert explanation is not None
        assert explanation.in_ephemeral_range
        assert "ephemeral range" in str(info.value)
        server.accept()[0].close()


@pytest.mark.kernel
def test_fact_parity_split(netns: NetNS) -> None:
    """connect() takes ports of the range's low parity first, bind(port 0) the other parity."""
    server = twfix.reusable_tcp_server(5003, "127.0.0.1", backlog=64)
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40199")
    held: list[socket.socket] = []
    with server:
        for _ in range(20):
            held.append(socket.create_connection(("127.0.0.1", 5003)))
        for _ in range(20):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        connect_ports = [s.getsockname()[1] for s in held[:20]]
        bind_ports = [s.getsockname()[1] for s in held[20:]]
        assert all(p % 2 == 0 for p in connect_ports), connect_ports
        assert all(p % 2 == 1 for p in bind_ports), bind_ports
        for s in held:
            s.close()


@pytest.mark.kernel
def test_fact_reserved_ports_only_stop_automatic_choice(netns: NetNS) -> None:
    server = twfix.reusable_tcp_server(5004, "127.0.0.1")
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40003")
    netns.write_sysctl("net.ipv4.ip_local_reserved_ports", "40000-40003")
    with server:
        with pytest.raises(OSError) as info:
            socket.create_connection(("127.0.0.1", 5004))
        assert info.value.errno == errno.EADDRNOTAVAIL
        with socket.socket() as explicit:
            explicit.bind(("127.0.0.1", 40001))  # explicit binds ignore the reservation


@pytest.mark.kernel
def test_fact_syncookies_do_not_touch_time_wait(netns: NetNS) -> None:
    netns.write_sysctl("net.ipv4.tcp_syncookies", "2")  # cookies for every SYN
    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = server.getsockname()[1]
    with server:
        time_wait_pairs(server, 5, server_closes=True)
    tws = twfix.sockets("tcp", states=["TIME_WAIT"], port=port)
    assert len(tws) == 5
    assert all(e.expires is not None and e.expires > 50 for e in tws)


@pytest.mark.kernel
def test_fact_tw_reuse_never_helps_bind(netns: NetNS) -> None:
    """tcp_tw_reuse is consulted by connect() only: a restart over TIME-WAIT of an old server without
    SO_REUSEADDR fails with every value of it."""
    netns.write_sysctl("net.ipv4.tcp_tw_reuse", "1")
    old, port = listener_without_reuseaddr()
    with old:
        time_wait_pairs(old, 2, server_closes=True)
    with pytest.raises(twfix.AddressInUseError):
        twfix.reusable_tcp_server(port, "127.0.0.1")


def test_unreadable_sysctl_file_is_a_finding(netns: NetNS) -> None:
    import shutil
    import tempfile

    empty_root = Path(tempfile.mkdtemp(prefix="twfix-root-"))  # pytest's own tmp dirs are private to root
    try:
        _run_unreadable_case(empty_root)
    finally:
        shutil.rmtree(empty_root)


def _run_unreadable_case(empty_root: Path) -> None:
    (empty_root / "etc" / "sysctl.d").mkdir(parents=True)
    secret = empty_root / "etc" / "sysctl.d" / "50-secret.conf"
    secret.write_text("net.ipv4.tcp_tw_recycle = 1\n")
    secret.chmod(0o600)
    for p in (empty_root, empty_root / "etc", empty_root / "etc" / "sysctl.d"):
        p.chmod(0o755)
    script = (
        "import json, sys, twfix\nr = twfix.doctor(root=sys.argv[1])\nprint(json.dumps([f.code for f in r.findings]))\n"
    )
    proc = run_unprivileged(script, str(empty_root))
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout)
    assert "CONF-UNREADABLE" in codes
    assert "CONF-TW-RECYCLE" not in codes
    secret.chmod(0o644)  # fixed: now readable, so the finding goes and the file is checked
    codes = json.loads(run_unprivileged(script, str(empty_root)).stdout)
    assert "CONF-UNREADABLE" not in codes
    assert "CONF-TW-RECYCLE" in codes


def test_server_side_time_wait_is_not_outgoing_traffic(netns: NetNS, empty_root: Path) -> None:
    """A server inside the ephemeral range whose own closes leave TIME-WAIT is not a tcp_tw_reuse case."""
    _add_test_address("10.123.0.1")
    server = twfix.reusable_tcp_server(40500, "10.123.0.1", backlog=512)
    with server:
        time_wait_pairs(server, 1000, server_closes=True)
        assert "TW-REUSE-LOOPBACK-ONLY" not in _codes(twfix.doctor(root=empty_root))


def test_busy_namespaces_sharing_the_hash_are_explained() -> None:
    from twfix.counters import TcpCounters
    from twfix.doctor import namespace_findings
    from twfix.netns import NetNamespace

    a, b, quiet = (NetNamespace(i, f"/run/netns/n{i}", f"n{i}") for i in (1, 2, 3))
    counted = [(a, TcpCounters(10, 0, 5000, 10)), (b, TcpCounters(2000, 0, 0, 2000)), (quiet, TcpCounters(1, 0, 0, 1))]
    (finding,) = namespace_findings(counted, child_ehash=0)
    assert finding.code == "NETNS-SHARED-EHASH"
    assert [n["name"] for n in finding.evidence["busy_namespaces"]] == ["n1", "n2"]
    assert "tcp_child_ehash_entries" in finding.advice
    assert namespace_findings(counted, child_ehash=4096) == []  # per-namespace hashes already
    assert namespace_findings(counted[:1], child_ehash=0) == []  # one busy namespace shares with nobody
