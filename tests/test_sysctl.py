"""twfix.sysctl against the kernel, with the `sysctl` command as the independent witness."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import NetNS, open_fds, run_unprivileged
from twfix import _twfix, sysctl, tune
from twfix.errors import TwfixError


def witness(name: str) -> str:
    out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, check=True).stdout
    return out.strip()


def test_values_match_sysctl_command(netns: NetNS) -> None:
    table = sysctl.read()
    assert len(table) >= 15
    present = [r for r in table.values() if r.available]
    assert present
    for row in present:
        assert row.raw is not None
        assert " ".join(row.raw.split()) == " ".join(witness(row.name).split()), row.name
        assert sysctl.get(row.name) == row.value


def test_fresh_namespace_has_kernel_defaults(netns: NetNS) -> None:
    table = sysctl.read()
    for row in table.values():
        if row.available and row.per_netns and row.default is not None:
            assert row.value == row.default, row.name
            assert not row.changed
    assert table["net.ipv4.tcp_max_tw_buckets"].default_note
    assert not table["net.ipv4.tcp_tw_recycle"].available
    assert not table["net.ipv4.tcp_max_orphans"].available  # host-only knob


def test_typed_values(netns: NetNS) -> None:
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40999")
    netns.write_sysctl("net.ipv4.ip_local_reserved_ports", "1,2-4,40010")
    assert sysctl.get("net.ipv4.ip_local_port_range") == (40000, 40999)
    # The kernel merges adjacent ranges when it prints them back: "1,2-4" reads as "1-4".
    assert sysctl.get("net/ipv4/ip_local_reserved_ports") == [(1, 4), (40010, 40010)]
    assert sysctl.get("net.ipv4.tcp_rmem") == tuple(int(x) for x in witness("net.ipv4.tcp_rmem").split())
    assert isinstance(sysctl.get("net.ipv4.tcp_congestion_control"), str)
    row = sysctl.read(["net.ipv4.ip_local_port_range"])["net.ipv4.ip_local_port_range"]
    assert row.changed
    assert "* (default 32768 60999)" in str(sysctl.read(["net.ipv4.ip_local_port_range"]))


def test_absent_knob_has_history() -> None:
    with pytest.raises(sysctl.SysctlUnavailableError, match=r"removed in Linux 4\.12") as info:
        sysctl.get("net.ipv4.tcp_tw_recycle")
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, TwfixError)
    with pytest.raises(LookupError, match="does not exist"):
        sysctl.get("net.ipv4.no_such_knob")


HOSTILE = [
    "../../etc/passwd",
    "/etc/passwd",
    "net..ipv4",
    "net.ipv4.tcp_tw_reuse\0",
    "net/ipv4/../../../etc",
    "",
    "net/ipv4/",
    "net.ipv4.*",
    "x" * 1000,
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_rejected(name: str) -> None:
    before = open_fds()
    with pytest.raises(ValueError, match="sysctl name"):
        sysctl.get(name)
    with pytest.raises(ValueError, match="sysctl name"):
        sysctl.read([name])
    assert open_fds() == before


def test_directory_and_wrong_types() -> None:
    with pytest.raises(ValueError, match="directory"):
        sysctl.get("net.ipv4")
    with pytest.raises(TypeError):
        sysctl.get(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pid"):
        sysctl.get("net.ipv4.tcp_tw_reuse", pid=-5)
    with pytest.raises(ValueError, match="not both"):
        sysctl.get("net.ipv4.tcp_tw_reuse", pid=1, netns="/proc/1/ns/net")


@pytest.fixture
def other_namespace() -> Iterator[int]:
    """A child process holding its own network namespace with tcp_fin_timeout=7."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with subprocess.Popen(["unshare", "-n", "sleep", "60"]) as child:
        try:
            for _ in range(200):
                if os.readlink(f"/proc/{child.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                    break
                threading.Event().wait(0.01)
            subprocess.run(
                ["nsenter", "-t", str(child.pid), "-n", "sysctl", "-q", "-w", "net.ipv4.tcp_fin_timeout=7"], check=True
            )
            yield child.pid
        finally:
            child.kill()


def test_read_other_namespace_by_pid_and_path(netns: NetNS, other_namespace: int) -> None:
    mine = os.readlink("/proc/self/ns/net")
    assert sysctl.get("net.ipv4.tcp_fin_timeout", pid=other_namespace) == 7
    assert sysctl.get("net.ipv4.tcp_fin_timeout", netns=f"/proc/{other_namespace}/ns/net") == 7
    assert sysctl.read(["net.ipv4.tcp_fin_timeout"], pid=other_namespace)["net.ipv4.tcp_fin_timeout"].changed
    # The caller (and its other threads) stayed where they were.
    assert sysctl.get("net.ipv4.tcp_fin_timeout") == 60
    assert os.readlink("/proc/self/ns/net") == mine
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(sysctl.get("net.ipv4.tcp_fin_timeout")))
    t.start()
    t.join()
    assert seen == [60]


def test_bad_namespaces(netns: NetNS, tmp_path: object) -> None:
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        sysctl.get("net.ipv4.tcp_fin_timeout", netns="/run/netns/definitely-missing")
    with pytest.raises(ValueError, match="not a network namespace"):
        sysctl.get("net.ipv4.tcp_fin_timeout", netns=f"/proc/{os.getpid()}/ns/uts")
    with pytest.raises(ProcessLookupError):
        sysctl.get("net.ipv4.tcp_fin_timeout", pid=2**22 + 12345)
    assert open_fds() == before


def test_validate_and_set(netns: NetNS) -> None:
    assert sysctl.validate("net.ipv4.tcp_tw_reuse", 1) == "1"
    assert sysctl.validate("net.ipv4.ip_local_port_range", (40000, 60999)) == "40000 60999"
    assert sysctl.validate("net.ipv4.ip_local_reserved_ports", [(5000, 5000), (6000, 6010)]) == "5000,6000-6010"
    for name, value, word in [
        ("net.ipv4.tcp_tw_reuse", 3, r"0\.\.2"),
        ("net.ipv4.tcp_tw_reuse", True, "int"),
        ("net.ipv4.tcp_tw_reuse_delay", 0, r"1\.\.60000"),
        ("net.ipv4.ip_local_port_range", (500, 60999), "ip_unprivileged_port_start"),
        ("net.ipv4.ip_local_port_range", (50000, 40000), "low <= high"),
        ("net.ipv4.tcp_tw_recycle", 1, "removed"),
        ("kernel.hostname", "x", "not one of the knobs"),
        ("net.ipv4.tcp_ehash_entries", 5, "read-only"),
    ]:
        with pytest.raises(ValueError, match=word):
            sysctl.validate(name, value)
    assert tune._set("net.ipv4.tcp_tw_reuse", 1) == 2
    assert witness("net.ipv4.tcp_tw_reuse") == "1"
    with pytest.raises(ValueError, match="not one of the knobs"):
        tune._set("kernel.hostname", "evil")


def test_set_needs_root(netns: NetNS) -> None:
    script = (
        "from twfix import tune\n"
        "try:\n"
        "    tune._set('net.ipv4.tcp_tw_reuse', 1)\n"
        "except PermissionError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = run_unprivileged(script)
    assert "refused: setting net.ipv4.tcp_tw_reuse needs root" in proc.stdout, proc.stderr
    assert witness("net.ipv4.tcp_tw_reuse") == "2"


def test_renderings_escape_hostile_text() -> None:
    row = sysctl.Sysctl(
        "net.x", "<script>alert(1)</script>", "<b>", None, "", "", "<i>m</i>", "", True, True, "", "&advice"
    )
    page = sysctl.SysctlTable([row])._repr_html_()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "&amp;advice" in page
    assert sysctl.SysctlTable([row]).to_json()


def test_native_surface() -> None:
    assert _twfix.sysctl_key("net/ipv4/tcp_tw_reuse") == ("net.ipv4.tcp_tw_reuse", "/proc/sys/net/ipv4/tcp_tw_reuse")
    assert _twfix.read_sysctls(["net/ipv4/tcp_tw_recycle"]) == [("net.ipv4.tcp_tw_recycle", None, None)]
    with pytest.raises(ValueError, match="sysctl name"):
        _twfix.write_sysctl("../x", "1")


def test_names_with_a_dot_inside_a_segment_read_the_same_knob(netns: NetNS) -> None:
    """Regression: read() lost the dot of `veth.100` on its way to Rust and back, and called the knob absent."""
    subprocess.run(["ip", "link", "add", "name", "veth.100", "type", "veth", "peer", "name", "p0"], check=True)
    slashed = "net/ipv4/conf/veth.100/rp_filter"
    dotted = "net.ipv4.conf.veth/100.rp_filter"  # sysctl(8)'s spelling of the same knob
    expected = int(witness(dotted))
    assert sysctl.get(slashed) == sysctl.get(dotted) == expected
    table = sysctl.read([slashed, dotted])
    assert list(table) == [dotted]  # one canonical key
    assert table[dotted].available
    assert table[dotted].value == expected


def test_port_range_is_the_one_rule(netns: NetNS) -> None:
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40009")
    netns.write_sysctl("net.ipv4.ip_local_reserved_ports", "40002-40003,40003,50000")
    ports = sysctl.port_range()
    assert (ports.low, ports.high, ports.size, ports.reserved_inside, ports.usable) == (40000, 40009, 10, 2, 8)
    assert [ports.assigns(p) for p in (40000, 40002, 50000)] == [True, False, False]
    assert (ports.is_reserved(50000), ports.contains(50000)) == (True, False)
    bits = ports.port_set()
    assert [p for p in range(65536) if bits[p >> 3] >> (p & 7) & 1] == [
        p for p in range(40000, 40010) if ports.assigns(p)
    ]


def test_reserved_inside_counts_the_union_of_the_ranges_inside() -> None:
    """Counted from the intervals (no set of 28,000 ports per call): the same as counting port by port."""
    import random

    rng = random.Random(15)
    for _ in range(500):
        low = rng.randint(1, 60000)
        high = rng.randint(low, 65535)
        reserved = tuple(
            (a, a + rng.randint(0, 800)) for a in (rng.randint(1, 65000) for _ in range(rng.randint(0, 6)))
        )
        ports = sysctl.PortRange(low, high, reserved)
        by_port = sum(1 for p in range(low, high + 1) if ports.is_reserved(p))
        assert ports.reserved_inside == by_port
        assert ports.usable == ports.size - by_port
