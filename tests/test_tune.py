"""twfix tune: the plan, atomic writes that never clobber foreign files, and root-only apply."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS, run_unprivileged
from twfix import tune


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "etc" / "sysctl.d").mkdir(parents=True)
    return tmp_path / "root"


def test_plan_and_write(netns: NetNS, empty_root: Path, tmp_path: Path) -> None:
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40998")
    plan = tune.plan(root=empty_root)
    names = {c.name: c.after for c in plan.changes}
    assert names["net.ipv4.tcp_timestamps"] == 1
    lo, hi = names["net.ipv4.ip_local_port_range"]
    assert lo % 2 != hi % 2
    assert hi - lo + 1 >= 28232
    assert "tcp_tw_recycle" not in plan.snippet()

    target = tmp_path / "99-twfix.conf"
    written = tune.write(plan, target)
    assert written.backup is None
    assert target.read_text() == plan.snippet()
    again = tune.write(plan, target)  # our own file: replaced, previous kept
    assert again.backup == tmp_path / "99-twfix.conf.bak"
    assert again.backup.read_text() == plan.snippet()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".99-twfix")]  # no temporary left behind

    foreign = tmp_path / "10-admin.conf"
    foreign.write_text("net.core.somaxconn = 1024\n")
    with pytest.raises(FileExistsError, match="not written by twfix"):
        tune.write(plan, foreign)
    assert foreign.read_text() == "net.core.somaxconn = 1024\n"
    with pytest.raises(IsADirectoryError):
        tune.write(plan, tmp_path)


def test_every_listener_inside_the_range_is_reserved(netns: NetNS, empty_root: Path) -> None:
    """Regression: tune reserved only the first 50 ports, taken from the doctor's shortened display.
    Only ports a service fixes are reserved: not the ones bind(0) handed out (a Jupyter kernel has five)."""
    assert netns.read_sysctl("net.ipv4.ip_local_port_range").split() == ["32768", "60999"]
    fixed = [40100 + 2 * i for i in range(60)]  # the parity connect() takes: never a bind(0) choice
    listeners = [twfix.reusable_tcp_server(p, "127.0.0.1") for p in fixed]
    chosen = [twfix.reusable_tcp_server(0, "127.0.0.1") for _ in range(5)]
    named = subprocess.Popen(  # an odd port, but its command line names it: a service's fixed port
        [
            sys.executable,
            "-c",
            "import sys,time,twfix\ns=twfix.reusable_tcp_server(int(sys.argv[2]),'127.0.0.1')\n"
            "print(1, flush=True)\ntime.sleep(60)",
            "--port",
            "40301",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert named.stdout is not None
        named.stdout.readline()
        report = twfix.doctor(root=empty_root)
        (finding,) = report.by_code("LISTEN-IN-EPHEMERAL")
        assert finding.evidence["ports"] == [*fixed, 40301]
        assert f"pid {named.pid}" in finding.evidence["owners"][40301][0]
        (kernel_chosen,) = report.by_code("LISTEN-EPHEMERAL-CHOSEN")
        assert kernel_chosen.evidence["ports"] == sorted(s.getsockname()[1] for s in chosen)
        changes = {c.name: c for c in tune.plan(root=empty_root).changes}
        reserved = changes["net.ipv4.ip_local_reserved_ports"]
        assert reserved.before == []
        assert reserved.after == [(p, p) for p in [*fixed, 40301]]
        assert "net.ipv4.ip_local_port_range" not in changes  # nothing to change there: never a no-op change
    finally:
        named.kill()
        named.communicate()
        for s in listeners + chosen:
            s.close()


def test_apply_sets_values_in_this_namespace(netns: NetNS, empty_root: Path) -> None:
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    changes = tune.apply(tune.plan(root=empty_root))
    assert [(c.name, c.before, c.after) for c in changes] == [("net.ipv4.tcp_timestamps", 0, 1)]
    assert netns.read_sysctl("net.ipv4.tcp_timestamps") == "1"


def test_apply_needs_root(netns: NetNS) -> None:
    script = (
        "import sys\n"
        "from twfix import tune\n"
        "try:\n"
        "    tune.apply(tune.Plan((tune.Change('net.ipv4.tcp_timestamps', 0, 1),)))\n"
        "except PermissionError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = run_unprivileged(script)
    assert "refused: " in proc.stdout, proc.stderr
    assert "root" in proc.stdout
    assert netns.read_sysctl("net.ipv4.tcp_timestamps") == "1"


def test_snippet_is_accepted_by_the_kernel(netns: NetNS, empty_root: Path, tmp_path: Path) -> None:
    """The independent witness: `sysctl -p` loads the written snippet in this namespace without error."""
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40998")
    with twfix_server(40500):
        plan = tune.plan(root=empty_root)
    assert {c.name for c in plan.changes} >= {
        "net.ipv4.tcp_timestamps",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_local_reserved_ports",
    }
    target = tmp_path / "99-twfix.conf"
    tune.write(plan, target)
    proc = subprocess.run(["sysctl", "-p", str(target)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert netns.read_sysctl("net.ipv4.tcp_timestamps") == "1"
    assert "40500" in netns.read_sysctl("net.ipv4.ip_local_reserved_ports")


def twfix_server(port: int) -> socket.socket:
    return twfix.reusable_tcp_server(port, "127.0.0.1")


def test_cli_apply_prints_before_and_after(netns: NetNS, empty_root: Path) -> None:
    import io

    from twfix.cli import main

    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    out = io.StringIO()
    assert main(["tune", "--apply", "--root", str(empty_root)], out=out, err=io.StringIO()) == 0
    assert "changed net.ipv4.tcp_timestamps from 0 to 1" in out.getvalue()
    assert netns.read_sysctl("net.ipv4.tcp_timestamps") == "1"
    out = io.StringIO()  # applied: the plan is now empty, and says so
    assert main(["tune", "--apply", "--root", str(empty_root)], out=out, err=io.StringIO()) == 0
    assert out.getvalue() == "nothing to change: the running values are fine\n"
    out = io.StringIO()
    assert main(["tune", "--root", str(empty_root)], out=out, err=io.StringIO()) == 0
    assert "nothing to change" in out.getvalue()
