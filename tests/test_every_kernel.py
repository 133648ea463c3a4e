"""The main jobs, run as a user runs them (the `twfix` command, a real child process holding the port), with
`ss` as the witness. Marked ``kernel``: `.ci/kernels` runs these inside every kernel of the matrix."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NetNS, time_wait_pairs

pytestmark = pytest.mark.kernel

TWFIX = [sys.executable, "-m", "twfix"]


def twfix(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*TWFIX, *argv], capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def ss(*argv: str) -> list[str]:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    return subprocess.run(["ss", "-H", *argv], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.fixture
def server(netns: NetNS) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A server in a child process listening on 127.0.0.1 without SO_REUSEADDR, as many forget to."""
    code = (
        "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
        "print(s.getsockname()[1], flush=True)\ntime.sleep(120)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        yield child, int(child.stdout.readline())
    finally:
        child.kill()
        child.communicate()


def test_doctor_runs_and_names_the_kernel_features(netns: NetNS, tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = twfix("doctor", "--json", "--root", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["kernel"] == os.uname().release
    assert {f["name"] for f in report["kernel_features"]} >= {"tcp_tw_reuse_delay"}


def test_summary_and_sockets_agree_with_ss(netns: NetNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        time_wait_pairs(srv, 5, server_closes=True)
        summary = json.loads(twfix("summary", "--json").stdout)
        assert summary["by_state"].get("TIME_WAIT") == len(ss("-tan", "state", "time-wait")) == 5
        assert summary["by_state"].get("LISTEN") == len(ss("-tln")) == 1
        rows = json.loads(twfix("sockets", "--json", "--state", "time-wait").stdout)
        assert len(rows) == 5


def test_who_names_the_process(server: tuple[subprocess.Popen[str], int]) -> None:
    child, port = server
    done = twfix("who", str(port), "--json")
    assert done.returncode == 0, done.stderr
    pids = {p["pid"] for h in json.loads(done.stdout)["holders"] for p in h["processes"]}
    assert child.pid in pids


def test_a_live_listener_conflict_is_explained(server: tuple[subprocess.Popen[str], int]) -> None:
    child, port = server
    done = twfix("explain", str(port), "--host", "127.0.0.1", "--json")
    why = json.loads(done.stdout)
    assert why["cause"] == "listener", why
    assert child.pid in {p["pid"] for h in why["holders"] for p in h["processes"]}


@pytest.mark.parametrize("server_reuse", [False, True])
def test_a_time_wait_conflict_is_explained(netns: NetNS, server_reuse: bool) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(server_reuse))
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    time_wait_pairs(srv, 2, server_closes=True)
    srv.close()
    why = json.loads(twfix("explain", str(port), "--host", "127.0.0.1", "--json").stdout)
    assert why["cause"] == ("time-wait" if server_reuse else "time-wait-server"), why
    # A TIME-WAIT yields to a SO_REUSEADDR bind only when the old listener had the flag too (inherited).
    assert why["can_bind_with_reuse"] is server_reuse
    with socket.socket() as again:  # the witness: the reuse bind the verdict promises, or refuses
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if server_reuse:
            again.bind(("127.0.0.1", port))
        else:
            with pytest.raises(OSError):
                again.bind(("127.0.0.1", port))
