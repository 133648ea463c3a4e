"""The command line: main([...]) called directly, plus one subprocess smoke test."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS
from twfix.cli import main


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    (tmp_path / "etc" / "sysctl.d").mkdir(parents=True)
    return tmp_path


def test_usage_errors_exit_2() -> None:
    assert run()[0] == 2
    code, _, err = run("frobnicate")
    assert code == 2
    assert "invalid choice" in err
    code, _, err = run("doctor", "--fail-on", "maybe")
    assert code == 2
    assert "--fail-on" in err
    code, _, err = run("who", "70000")
    assert code == 2
    assert "0..65535" in err
    code, _, err = run("who", "http")
    assert code == 2
    assert "integer" in err


def test_version() -> None:
    code, out, _ = run("--version")
    assert code == 0
    assert twfix.__version__ in out


def test_doctor_exit_codes_and_json(netns: NetNS, empty_root: Path) -> None:
    code, out, _ = run("doctor", "--root", str(empty_root))
    assert code == 0, out
    assert "\x1b[" not in out  # no colour when not on a terminal
    code, out, _ = run("doctor", "--json", "--root", str(empty_root))
    data = json.loads(out)
    assert code == 0
    assert data["ok"] is True
    (empty_root / "etc" / "sysctl.conf").write_text("net.ipv4.tcp_fin_timeout = 10\n")  # info only
    assert run("doctor", "--root", str(empty_root))[0] == 0
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")  # a warning
    assert run("doctor", "--root", str(empty_root))[0] == 1
    assert run("doctor", "--fail-on", "error", "--root", str(empty_root))[0] == 0
    netns.write_sysctl("net.ipv4.tcp_max_tw_buckets", "0")  # an error
    assert run("doctor", "--fail-on", "error", "--root", str(empty_root))[0] == 1


def test_sysctl_command(netns: NetNS) -> None:
    code, out, _ = run("sysctl", "net.ipv4.tcp_tw_reuse", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["net.ipv4.tcp_tw_reuse"]["value"] == 2
    code, _, err = run("sysctl", "../../etc/passwd")
    assert code == 2
    assert "Traceback" not in err
    code, out, _ = run("sysctl")
    assert code == 0
    assert "tcp_fin_timeout" in out


def test_sockets_who_explain(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as srv:
        port = srv.getsockname()[1]
        code, out, _ = run("sockets", "--json", "--port", str(port))
        assert code == 0
        rows = json.loads(out)
        assert [r["state"] for r in rows] == ["LISTEN"]
        code, out, _ = run("who", str(port), "--json")
        assert code == 0
        assert os.getpid() in [h["pid"] for h in json.loads(out)["holders"]]
        code, out, _ = run("explain", str(port), "--host", "127.0.0.1")
        assert code == 0
        assert "live listener" in out
        code, out, _ = run("explain", str(port), "--udp", "--json")
        assert json.loads(out)["can_bind"] is True


def test_tune_prints_without_changing_anything(netns: NetNS, empty_root: Path) -> None:
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    code, out, _ = run("tune", "--root", str(empty_root))
    assert code == 0
    assert "net.ipv4.tcp_timestamps = 1" in out
    assert "tcp_tw_recycle" not in out
    assert netns.read_sysctl("net.ipv4.tcp_timestamps") == "0"


def test_subprocess_smoke(netns: NetNS, empty_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twfix", "doctor", "--json", "--root", str(empty_root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schema"] == 1


def test_colour_only_on_a_terminal(netns: NetNS, empty_root: Path) -> None:
    import pty

    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            code = main(["doctor", "--root", str(empty_root)], out=tty, err=io.StringIO())
        assert code == 0
        shown = os.read(master, 65536).decode()
        assert "\x1b[32m" in shown
    finally:
        os.close(master)
        os.close(slave)


def test_unknown_names_never_traceback(netns: NetNS) -> None:
    code, out, err = run("sysctl", "net.ipv4.no_such_knob")
    assert code == 0
    assert "absent on this kernel" in out
    code, _, err = run("tune", "--write", "/nonexistent-dir/99-twfix.conf")
    assert code == 1
    assert "Traceback" not in err
