"""Hardening of the surfaces added last: the exporter (textfile, server, labels, series), stale entries of
/run/netns, configuration values too large for an int, the input edges left, and a UDP explain that never
binds the port it is asked about. Attacks come from uid 65534 where the attacker is another user."""

from __future__ import annotations

import io
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS, run_unprivileged, unprivileged_python
from twfix import cli, netns, watch
from twfix._ipython import run as magic

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from twfix import metrics  # noqa: E402


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()


def values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


# ------------------------------------------------------------------ 1. the textfile, written like tune --write


def test_textfile_never_follows_the_predictable_temporary_name(tmp_path: Path) -> None:
    """prometheus_client wrote PATH.<pid>.<thread id> with a plain open: a link planted there made root
    overwrite its target."""
    out = tmp_path / "twfix.prom"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, f"{out}.{os.getpid()}.{threading.current_thread().ident}")
    metrics.write_textfile(out)
    assert victim.read_text() == "precious\n"
    text = out.read_text()
    assert text.startswith(metrics.MARKER + "\n")
    assert values(text, "twfix_namespaces")  # the exposition parser skips the marker comment
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    metrics.write_textfile(out)  # its own file is replaced
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["twfix.prom", "victim"]


def test_textfile_refuses_links_foreign_files_and_open_directories(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "link.prom"
    link.symlink_to(victim)
    code, _out, err = run_cli("metrics", "--textfile", str(link))
    assert code != 0
    assert "symbolic link" in err
    foreign = tmp_path / "foreign.prom"
    foreign.write_text("mine\n")
    code, _out, err = run_cli("metrics", "--textfile", str(foreign))
    assert code != 0
    assert "not written by twfix metrics" in err
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # what an attacker can write in
    code, _out, err = run_cli("metrics", "--textfile", str(shared / "twfix.prom"))
    assert code != 0
    assert "writable by other users" in err
    assert victim.read_text() == "precious\n"
    assert foreign.read_text() == "mine\n"
    assert list(shared.iterdir()) == []


# ------------------------------------------------------------------ 2. /run/netns entries that are no namespace


@pytest.fixture
def stale_run_netns() -> Iterator[list[str]]:
    """An empty file (what a removed namespace leaves), a FIFO, a directory and a non-UTF-8 name."""
    os.makedirs("/run/netns", exist_ok=True)
    tag = f"twfix-stale-{os.getpid()}"
    made = [f"/run/netns/{tag}-empty", f"/run/netns/{tag}-fifo", f"/run/netns/{tag}-dir"]
    Path(made[0]).touch()
    os.mkfifo(made[1])
    os.mkdir(made[2])
    raw = os.fsencode(f"/run/netns/{tag}-") + b"\xff\x1b[31m"
    with open(raw, "w"):
        pass
    made.append(os.fsdecode(raw))
    try:
        yield made
    finally:
        for path in made:
            if os.path.isdir(path):
                os.rmdir(path)
            else:
                os.unlink(path)


def test_stale_run_netns_entries_are_skipped_and_reported(stale_run_netns: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to write /run/netns")
    for command in (["metrics", "--all-netns"], ["doctor", "--all-netns"], ["summary", "--all-netns"]):
        code, out, err = run_cli(*command)
        assert code in (0, 1), (command, err)
        assert "is not a network namespace" not in err
        if command[0] == "metrics":
            assert values(out, "twfix_netns_bad_entries")[0][1] >= 4
        else:
            assert out.count("skipped:") >= 4
            assert "\x1b" not in out
    assert twfix.explain(5353, kind="udp").cause  # it looks at other namespaces too
    names = {b.name for b in netns.bad_entries()}
    assert {os.path.basename(p) for p in stale_run_netns[:3]} <= names
    assert any(n.endswith("\\udcff\\x1b[31m") for n in names)
    assert all(ns.path not in stale_run_netns for ns in netns.namespaces())


def test_a_namespace_that_vanishes_during_a_scrape_is_counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Listed, then gone or replaced before it is read: an ip-netns entry removed meanwhile, and one whose
    file is now an ordinary file. The scrape counts them and still reads the rest."""
    real = netns.namespaces
    plain = tmp_path / "replaced"
    plain.write_text("")
    gone = [
        netns.NetNamespace(inode=1, path=str(tmp_path / "removed"), name="removed"),
        netns.NetNamespace(inode=2, path=str(plain), name="replaced"),
    ]
    listed = real()
    monkeypatch.setattr(netns, "namespaces", lambda: [*listed, *gone])
    text = metrics.exposition(all_netns=True)
    unreadable = values(text, "twfix_netns_unreadable")[0][1]
    assert 2 <= unreadable <= 2 + len(listed)  # other tests' namespaces may go meanwhile too
    series = values(text, "twfix_netns_tcp_time_wait")
    assert len(series) == values(text, "twfix_namespaces")[0][1] == len(listed) + 2 - unreadable
    assert any(str(netns.current_inode()) in str(labels) for labels, _ in series)  # ours is still read


# ------------------------------------------------------------------ 3. the server under a connection flood

FLOOD = """
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        s.close()
        continue
    held.append(s)
print(len(held), flush=True)
time.sleep(float(sys.argv[3]))
"""


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as answer:
        return str(answer.read().decode())


def test_the_exporter_serves_scrapes_beside_1100_idle_connections_of_another_user(netns: NetNS) -> None:
    server = metrics.serve("127.0.0.1", 0)
    port = server.server_port
    try:
        flood = subprocess.Popen(
            [
                "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                unprivileged_python()[0], "-c", FLOOD, str(port), "1100", "20",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert flood.stdout is not None
            opened = int(flood.stdout.readline())
            assert opened > 1000  # the kernel accepted them all (backlog and idle drops)
            fds_before = len(os.listdir("/proc/self/fd"))
            for _ in range(5):
                assert values(_scrape(port), "twfix_namespaces")
            assert len(os.listdir("/proc/self/fd")) < fds_before + 100
        finally:
            flood.kill()
            flood.communicate()
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ 4. and 5. labels and series


HOSTILE_COMM = "\x1bx\x07\u202e"


def test_hostile_process_names_from_an_unprivileged_namespace_are_escaped() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to see other namespaces")
    child = subprocess.Popen(
        [
            "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "unshare", "-Urn",
            shutil.which("python3", path="/usr/bin:/bin") or sys.executable, "-c",
            f"open('/proc/self/comm', 'w').write({HOSTILE_COMM!r}); print('ready', flush=True); import time; "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            pytest.skip("unprivileged user namespaces are disabled here")
        code, out, _err = run_cli("metrics", "--all-netns", "--max-netns", "100000")
        assert code == 0
        assert not any(ch in out for ch in "\x1b\x07\u202e")
        programs = [labels["program"] for labels, _v in values(out, "twfix_netns_info")]
        assert "\\x1bx\\x07\\u202e" in programs
    finally:
        child.kill()
        child.communicate()


def test_series_are_capped_busiest_first() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to see other namespaces")
    children = [
        subprocess.Popen(["unshare", "-n", "sleep", "60"]) for _ in range(4)
    ]  # four more namespaces, from processes
    try:
        deadline = time.monotonic() + 10
        while len(netns.namespaces()) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        text = metrics.exposition(all_netns=True, max_netns=2, detail=0)
        assert len(values(text, "twfix_netns_info")) == 2
        seen = values(text, "twfix_namespaces")[0][1]
        assert values(text, "twfix_netns_truncated")[0][1] == seen - 2 >= 3
    finally:
        for c in children:
            c.kill()
            c.wait()


# ------------------------------------------------------------------ 6. a 5,000-digit value in a config file


def test_a_huge_number_in_sysctl_conf_is_a_finding(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "sysctl.d"
    conf.mkdir(parents=True)
    (conf / "99-big.conf").write_text("net.ipv4.tcp_max_tw_buckets = " + "9" * 5000 + "\n")
    report = twfix.doctor(root=str(tmp_path))
    assert "CONF-BAD-VALUE" in [f.code for f in report.findings]
    code, out, _err = run_cli("metrics", "--root", str(tmp_path))
    assert code == 0
    assert any(labels["code"] == "CONF-BAD-VALUE" for labels, _v in values(out, "twfix_doctor_findings"))


# ------------------------------------------------------------------ 7. input edges


@pytest.mark.parametrize("timeout", [1e300, 10**20, 10**400, math.inf])
def test_huge_timeouts_are_value_errors(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        twfix.reusable_udp(0, "127.0.0.1", timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be"):
        twfix.reusable_tcp_server(0, "127.0.0.1", timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be"):
        twfix.reusable_tcp_client("127.0.0.1", 9, timeout=timeout)


@pytest.mark.parametrize("argv", [["--interval", "1e300", "--duration", "1e300"], ["--duration", "1e300"]])
def test_extreme_watch_arguments_are_usage_errors(argv: list[str]) -> None:
    code, _out, err = run_cli("watch", *argv)
    assert code == 2
    assert "at most" in err
    assert "Traceback" not in err
    with pytest.raises(ValueError, match="at most"):
        watch(interval=1e300, duration=1e300)


@pytest.mark.parametrize("port", ["\u0668\u0660", "\uff18\uff10", "+80", " 80"])
def test_ports_are_ascii_digits(port: str) -> None:
    code, _out, err = run_cli("who", port)
    assert code == 2
    assert "ASCII digits" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("doctor now", "unexpected 'now'"),
        ("explain 80 ::1 extra", "unexpected 'extra'"),
        ("explain eighty", "PORT must be a number"),
        ("who ٨٠", "PORT must be a number"),
        ("watch soon", "SECONDS must be a number"),
        ("frobnicate", "unknown command"),
    ],
)
def test_magics_name_the_argument(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        magic(line)


@pytest.mark.parametrize("host", ["1.2.3", "0x7f.1", "2130706433", "127.1", "0177.0.0.1"])
def test_shorthand_ipv4_forms_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="shorthand IPv4"):
        twfix.reusable_tcp_server(0, host)
    with pytest.raises(ValueError, match="shorthand IPv4"):
        twfix.explain(8080, host)


def test_a_surrogate_in_a_host_is_a_value_error() -> None:
    for call in (lambda: twfix.reusable_udp(0, "a\udcffb"), lambda: twfix.explain(80, "a\udcffb")):
        with pytest.raises(ValueError, match="not valid text"):
            call()


# ------------------------------------------------------------------ 8. explain(kind="udp") binds nothing


def test_udp_explain_never_binds_the_port_it_is_asked_about(netns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Free, held (by a plain socket, by a reuseport pair), on another address: the verdicts come from the
    table and the holders' own options; the only probe is a bind of port 0 with IP_BIND_ADDRESS_NO_PORT,
    which takes no port at all. (Naming the holders still reads /proc/PID/fd links, which keeps a closing
    socket alive for microseconds, as `ss -p`, lsof and fuser do.)"""
    from twfix import conflict

    probed: list[int] = []
    real = conflict._twfix.probe_bind

    def recording(family: int, sotype: int, ip: str, port: int, flags: int, ns: str | None) -> int:
        if sotype == socket.SOCK_DGRAM:
            probed.append(port)
            assert port == 0
            assert flags & conflict._twfix.F_BIND_NO_PORT
        return real(family, sotype, ip, port, flags, ns)

    monkeypatch.setattr(conflict._twfix, "probe_bind", recording)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert twfix.explain(port, "127.0.0.1", "udp").cause == "free"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", port))
        assert not twfix.explain(port, "127.0.0.1", "udp").can_bind
        assert not twfix.explain(port, "", "udp").can_bind
        assert twfix.explain(port, "::1", "udp").can_bind  # another family: no overlap
    pair = [twfix.reusable_udp(port, "127.0.0.1", reuse_port=True) for _ in range(2)]
    try:
        answer = twfix.explain(port, "127.0.0.1", "udp")
        assert not answer.can_bind
        assert answer.can_bind_with_reuse  # read from the holders' options, not probed
    finally:
        for sock in pair:
            sock.close()
    assert probed  # the port-0 probes ran
    assert set(probed) == {0}


def test_udp_explain_still_knows_privilege_and_foreign_addresses(netns: NetNS) -> None:
    probe = textwrap.dedent(
        """
        import twfix
        print(twfix.explain(80, "127.0.0.1", "udp").cause, twfix.explain(5353, "192.0.2.7", "udp").cause)
        """
    )
    result = run_unprivileged(probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["privileged", "not-local"]


def test_all_netns_as_another_user_reads_what_it_may_and_says_no_raw_errors() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a named namespace")
    name = f"twfix-nonroot-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (["doctor", "--all-netns", "--detail", "5"], ["summary", "--all-netns", "--detail", "5"]):
            result = run_unprivileged("import sys; from twfix.cli import main; sys.exit(main(sys.argv[1:]))", *command)
            assert result.returncode in (0, 1), result.stderr
            assert "Operation not permitted" not in result.stderr + result.stdout
            assert "Traceback" not in result.stderr
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
