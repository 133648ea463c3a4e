"""The command line: main([...]) called directly, plus one subprocess smoke test."""

from __future__ import annotations

import io
import json
import os
import socket
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
        code, out, _ = run("sockets", "--json", "--sport", str(port))
        assert code == 0
        rows = json.loads(out)
        assert [r["state"] for r in rows] == ["LISTEN"]
        code, out, _ = run("who", str(port), "--json")
        assert code == 0
        assert os.getpid() in [h["pid"] for h in json.loads(out)["holders"]]
        code, out, _ = run("explain", str(port), "--host", "127.0.0.1")
        assert code == 1  # the bind would fail
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
    assert code == 1  # a named knob that does not exist
    assert "absent on this kernel" in out
    assert "does not exist" in err
    code, _, err = run("tune", "--write", "/nonexistent-dir/99-twfix.conf")
    assert code == 1
    assert "Traceback" not in err


# ------------------------------------------------------------------ the views (issue: CLI and notebooks)


def ss_count(*filters: str) -> int:
    out = subprocess.run(["ss", "-tanH", *filters], capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_who_lists_processes_first_and_counts_kernel_sockets(netns: NetNS) -> None:
    from tests.conftest import time_wait_pairs

    srv = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = srv.getsockname()[1]
    with srv:
        time_wait_pairs(srv, 300, server_closes=True)
        code, out, _ = run("who", str(port), "--connections")
        fast = run("who", str(port))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"pid {os.getpid()} ")  # the process first
    assert len(lines) < 10  # 300 TIME-WAITs collapsed into counts
    assert any("300 TIME_WAIT" in line and "peer 127.0.0.1" in line and "s left" in line for line in lines)
    # Without --connections the listener answers: its process, and a line saying what was not looked for.
    code, out, _ = fast
    assert code == 0
    assert out.startswith(f"pid {os.getpid()} ")
    assert "TIME_WAIT" not in out.replace("TIME-WAIT on this port not looked for", "")
    assert "--connections" in out
    code, out, _ = run("who", str(port), "--all")
    assert out.count("TIME_WAIT") == 300
    code, out, _ = run("who", "1")
    assert code == 1  # nothing holds it, as lsof and fuser say
    assert "nothing holds" in out


def test_summary_matches_ss(netns: NetNS) -> None:
    from tests.conftest import time_wait_pairs

    # tcp_tw_reuse=2 (the default) lets a later loopback connect() take over a client's TIME-WAIT once a
    # millisecond has passed: on a slow, busy host some of the 1,000 would vanish before they are counted.
    netns.sysctl("net.ipv4.tcp_tw_reuse", 0)
    server = twfix.reusable_tcp_server(0, "127.0.0.1", backlog=128)
    client_side = twfix.reusable_tcp_server(0, "127.0.0.1")
    udp = [twfix.reusable_udp(0, "127.0.0.1") for _ in range(7)]
    with server, client_side:
        time_wait_pairs(server, 2000, server_closes=True)
        time_wait_pairs(client_side, 1000, server_closes=False)
        pairs = [socket.create_connection(server.getsockname()) for _ in range(50)]
        accepted = [server.accept()[0] for _ in pairs]
        try:
            code, out, _ = run("summary")
            assert code == 0
            data = json.loads(run("summary", "--json")[1])
            for state, ss_state in (
                ("TIME_WAIT", "time-wait"),
                ("ESTABLISHED", "established"),
                ("LISTEN", "listening"),
            ):
                assert data["by_state"][state] == ss_count("state", ss_state), state
            assert data["by_state"]["TIME_WAIT"] == 3000
            assert data["time_wait_server_side"] == 2000
            assert "2000 server-side" in out
            assert "1000 client-side" in out
            ss_udp = subprocess.run(["ss", "-uanH"], capture_output=True, text=True, check=True).stdout
            assert json.loads(run("summary", "--udp", "--json")[1])["total"] == len(ss_udp.splitlines()) == 7
        finally:
            for s in pairs + accepted + udp:
                s.close()


def test_sockets_view(netns: NetNS) -> None:
    from tests.conftest import time_wait_pairs

    srv = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = srv.getsockname()[1]
    with srv:
        time_wait_pairs(srv, 5, server_closes=True)
        code, out, _ = run("sockets", "-p", "-l")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split() == ["State", "Local", "Peer", "Uid", "Timer", "Process"]
        assert len(rows) == 1
        assert f"{os.getpid()}/" in rows[0]
        assert rows[0].index("127.0.0.1") == header.index("Local")  # aligned columns
        for name in ("time-wait", "TIME_WAIT", "TIME-WAIT"):
            assert run("sockets", "--state", name, "--count")[1].strip() == str(ss_count("state", "time-wait"))
        assert run("sockets", "--state", "estab", "--count")[1].strip() == "0"
        assert run("sockets", "--sport", str(port), "--count")[1].strip() == "6"
        assert run("sockets", "--dport", str(port), "--count")[1].strip() == "0"
        assert run("sockets", "--src", "127.0.0.1", "--count")[1].strip() == "6"
        assert run("sockets", "-6", "--count")[1].strip() == "0"
        assert run("sockets", "--dst", "::1", "--count")[1].strip() == "0"
        code, _, err = run("sockets", "--state", "nonsense")
        assert code == 2
        assert "unknown socket state" in err
    with twfix.reusable_udp(0, "127.0.0.1"):
        assert run("sockets", "-u", "--state", "unconn", "--count")[1].strip() == "1"


def test_explain_exit_status_and_wait(netns: NetNS) -> None:
    import threading

    from tests.conftest import listener_without_reuseaddr, time_wait_pairs

    assert run("explain", "45000")[0] == 0
    srv = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = srv.getsockname()[1]
    assert run("explain", str(port), "--host", "127.0.0.1")[0] == 1
    threading.Timer(0.5, srv.close).start()
    code, out, _ = run("wait", str(port), "--host", "127.0.0.1", "--timeout", "10")
    assert code == 0
    assert out.startswith("waiting: ")
    assert "live listener" in out
    old, port = listener_without_reuseaddr()
    with old:
        time_wait_pairs(old, 2, server_closes=True)
    code, out, _ = run("wait", str(port), "--host", "127.0.0.1", "--timeout", "2.5")
    assert code == 1  # TIME-WAIT of a server without SO_REUSEADDR lasts 60 s
    assert out.count("waiting: ") == 1  # a pipe gets one line per change, not one per second
    assert out.count("frees in about") == 1
    assert "timed out" in out

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    assert main(["wait", str(port), "--host", "127.0.0.1", "--timeout", "1.2"], out=term, err=io.StringIO()) == 1
    shown = term.getvalue()
    assert shown.count("\r\x1b[Kwaiting: ") >= 2  # one status line, rewritten in place
    assert shown.count("\n") == 2  # the status line's end, then the last word
    assert shown.endswith("s\ntimed out after 1.2 s\n")
    srv2 = twfix.reusable_tcp_server(0, "127.0.0.1")
    with srv2:
        time_wait_pairs(srv2, 2, server_closes=True)
        port2 = srv2.getsockname()[1]
    assert run("wait", str(port2), "--host", "127.0.0.1", "--timeout", "0.5")[0] == 1
    assert run("wait", str(port2), "--host", "127.0.0.1", "--timeout", "5", "--reuse")[0] == 0


def test_sysctl_short_names_and_suggestions(netns: NetNS) -> None:
    code, out, _ = run("sysctl", "tcp_fin_timeout")
    assert code == 0
    assert out.startswith("net.ipv4.tcp_fin_timeout = ")
    code, _, err = run("sysctl", "tcp_fin_timout")
    assert code == 1
    assert "did you mean tcp_fin_timeout" in err


def test_namespace_options_read_a_container(netns: NetNS) -> None:
    from tests.conftest import listener_in_named_netns

    with listener_in_named_netns("twfix-cli") as (name, child, port):
        assert run("sockets", "-l", "--count")[1].strip() == "0"  # nothing here
        assert run("sockets", "-l", "--count", "--netns", f"/run/netns/{name}")[1].strip() == "1"
        assert run("sockets", "-l", "--count", "--pid", str(child.pid))[1].strip() == "1"
        code, out, _ = run("who", str(port), "--netns", f"/run/netns/{name}")
        assert code == 0
        assert f"pid {child.pid}" in out
        assert run("explain", str(port), "--host", "127.0.0.1", "--pid", str(child.pid))[0] == 1
        assert run("explain", str(port), "--host", "127.0.0.1")[0] == 0
        data = json.loads(run("summary", "--json", "--pid", str(child.pid))[1])
        assert data["by_state"] == {"LISTEN": 1}
        report = json.loads(run("doctor", "--json", "--pid", str(child.pid), "--fail-on", "error")[1])
        assert report["schema"] == 1
        assert run("sysctl", "tcp_tw_reuse", "--netns", f"/run/netns/{name}")[0] == 0


def test_conventions(netns: NetNS) -> None:
    assert run("-V")[1].startswith("twfix ")
    code, out, err = run("who")
    assert code == 2
    assert err.startswith("usage: twfix who")  # the subcommand's own usage
    assert out == ""
    code, _, err = run("who", "70000")
    assert code == 2
    assert "0..65535" in err


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["doctor", "--fail-on", "error"], 0),
        (["summary"], 0),
        (["sockets", "--count"], 0),
        (["who", "1"], 1),
        (["explain", "1", "--host", "127.0.0.1"], 0),
        (["wait", "1", "--host", "127.0.0.1", "--timeout", "1"], 0),
        (["watch", "--interval", "0.1", "--duration", "0.1"], 0),
        (["metrics"], 0),
        (["sysctl", "tcp_fin_timeout"], 0),
        (["tune"], 0),
        (["-V"], 0),
    ],
)
def test_each_command_in_a_subprocess(netns: NetNS, argv: list[str], status: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twfix", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_mistyped_command_gets_a_suggestion_and_a_bad_option_the_subcommands_usage() -> None:
    code, _, err = run("doctr")
    assert code == 2
    assert "did you mean 'doctor'?" in err
    code, _, err = run("doctor", "--bogus")
    assert code == 2
    assert err.startswith("usage: twfix doctor")
    assert "unrecognized arguments: --bogus" in err


def test_who_on_a_udp_only_port_suggests_udp(netns: NetNS) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        code, out, _ = run("who", str(port))
        assert code == 1
        assert f"twfix who --udp {port}" in out


def test_tune_write_says_how_to_load_the_file(tmp_path: Path) -> None:
    target = tmp_path / "99-twfix.conf"
    code, out, _ = run("tune", "--write", str(target))
    assert code == 0
    assert f"sysctl -p {target}" in out


def test_metrics_serve_on_a_busy_port_is_explained(netns: NetNS) -> None:
    pytest.importorskip("prometheus_client")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code, _, err = run("metrics", "--serve", str(port))
        assert code == 1
        assert "is in use by a live listener" in err
        assert f"pid {os.getpid()}" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["who", "80", "--connections"],
        ["doctor", "--json", "--fail-on", "error"],
        ["sockets", "-4", "--state", "time-wait", "--sport", "80"],
        ["explain", "80", "--host", "127.0.0.1"],
        ["wait", "80", "--timeout", "1", "--reuse"],
        ["metrics", "--all-netns", "--detail", "2"],
        ["tune", "--reserve", "all"],
    ],
)
def test_a_parser_built_for_one_command_parses_as_the_whole_one(argv: list[str]) -> None:
    from twfix import _cli_args, cli

    assert set(_cli_args.COMMANDS) == set(cli._COMMANDS)
    one = _cli_args.build_parser(argv)
    assert list(one.subcommands) == [argv[0]]  # type: ignore[attr-defined]
    assert one.parse_args(argv) == _cli_args.build_parser().parse_args(argv)
    for first in (["--help"], ["-h", argv[0]], ["bogus", argv[0]]):
        assert len(_cli_args.build_parser(first).subcommands) == len(_cli_args.COMMANDS)  # type: ignore[attr-defined]
