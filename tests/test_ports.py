"""twfix.ports: ports held in the kernel, open-file-description locks, a private lock directory; real
servers of each kind binding a held port, and competitors that cannot take it."""

from __future__ import annotations

import asyncio
import errno
import http.server
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NetNS, run_unprivileged
from tests.test_frameworks import http_get, in_thread
from twfix import ports as ports_module
from twfix import sysctl
from twfix.ports import PortPool, PortsExhaustedError


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PortPool]:
    monkeypatch.setenv("TWFIX_PORTS_DIR", str(tmp_path / "locks"))
    made = PortPool()
    yield made
    made.close()


def plain_bind(port: int, host: str = "127.0.0.1") -> int:
    """errno of a bind without SO_REUSEADDR (0 when it succeeds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno or -1
    return 0


COMPETITOR = """
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as exc:
    print(exc.errno)
else:
    print(0)
"""


def test_a_held_port_refuses_plain_binds_of_anyone_and_accepts_reuseaddr_servers(pool: PortPool) -> None:
    port = pool.reserve("tcp")
    assert pool.holds(port)
    assert not sysctl.port_range().assigns(port)  # bind(0) and connect() are never given it
    assert plain_bind(port) == errno.EADDRINUSE
    assert plain_bind(port, "::1") == errno.EADDRINUSE
    other = subprocess.run([sys.executable, "-c", COMPETITOR, str(port)], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(errno.EADDRINUSE)
    nobody = run_unprivileged(COMPETITOR, str(port))
    assert nobody.stdout.strip() == str(errno.EADDRINUSE), nobody.stderr
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        with socket.create_server((host, port), family=family) as server:  # sets SO_REUSEADDR
            assert server.getsockname()[1] == port
            assert plain_bind(port) == errno.EADDRINUSE
    pool.release(port)
    assert not pool.holds(port)
    assert plain_bind(port) == 0


def test_hold_false_and_udp_ports_are_not_held(pool: PortPool) -> None:
    unheld = pool.reserve("tcp", hold=False)
    udp = pool.reserve("udp")
    assert not pool.holds(unheld)
    assert not pool.holds(udp)
    assert plain_bind(unheld) == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", udp))
    with pytest.raises(TypeError, match="hold"):
        pool.reserve("tcp", hold="yes")  # type: ignore[arg-type]


def test_two_pools_in_one_process_never_share_and_closing_one_keeps_the_other(pool: PortPool) -> None:
    second = PortPool()
    try:
        a = {pool.reserve("udp") for _ in range(200)}
        b = {second.reserve("udp") for _ in range(200)}
        assert not a & b  # UDP: only the locks keep them apart (nothing is held in the kernel)
        second.close()
        third = PortPool()
        try:
            assert not {third.reserve("udp") for _ in range(200)} & a  # the first pool's locks survived
        finally:
            third.close()
    finally:
        second.close()


def test_the_lock_lives_in_a_private_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWFIX_PORTS_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert ports_module.lock_directory() == str(tmp_path / "run" / "twfix")
    pool = PortPool()
    pool.reserve("udp")
    pool.close()
    st = os.stat(tmp_path / "run" / "twfix")
    assert st.st_mode & 0o777 == 0o700
    assert st.st_uid == os.geteuid()
    assert (tmp_path / "run" / "twfix" / "ports.lock").is_file()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ports_module.lock_directory() == str(tmp_path / "cache" / "twfix")


@pytest.mark.parametrize("how", ["foreign", "open", "symlink"])
def test_a_lock_directory_someone_else_could_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    target = tmp_path / "twfix"
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.mkdir()
        os.chmod(target, 0o777 if how == "open" else 0o700)
        if how == "foreign":
            os.chown(target, 65534, 65534)
    monkeypatch.setenv("TWFIX_PORTS_DIR", str(target))
    pool = PortPool()
    with pytest.raises(PermissionError, match="lock directory"):
        pool.reserve()
    pool.close()


def test_a_lock_file_planted_in_the_shared_temp_directory_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The old place, /tmp/twfix-ports-UID.lock, created first by another user, no longer matters."""
    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(shared, 0o1777)
    monkeypatch.setenv("TMPDIR", str(shared))
    planted = run_unprivileged(
        f"import os; os.close(os.open({str(shared / f'twfix-ports-{os.geteuid()}.lock')!r}, os.O_CREAT|os.O_RDWR))"
    )
    assert planted.returncode == 0, planted.stderr
    request.addfinalizer(lambda: shutil.rmtree(shared))
    monkeypatch.setenv("TWFIX_PORTS_DIR", str(tmp_path / "mine"))
    pool = PortPool()
    try:
        assert pool.reserve() > 0
    finally:
        pool.close()


def test_another_users_pool_never_gets_a_held_port(netns: NetNS, pool: PortPool) -> None:
    """Ten candidate ports (20000-20009, reserved); we hold five, uid 65534's own pool gets the other five."""
    netns.sysctl("net.ipv4.ip_local_port_range", (1024, 65535))
    netns.sysctl("net.ipv4.ip_local_reserved_ports", "20000-20009")
    mine = {pool.reserve("tcp") for _ in range(5)}
    assert mine <= set(range(20000, 20010))
    theirs = run_unprivileged(
        textwrap.dedent(
            """
            import json, os, tempfile
            os.environ["TWFIX_PORTS_DIR"] = tempfile.mkdtemp()
            from twfix.ports import PortPool, PortsExhaustedError
            pool, got = PortPool(), []
            try:
                while True:
                    got.append(pool.reserve("tcp"))
            except PortsExhaustedError:
                print(json.dumps(got))
            """
        )
    )
    assert theirs.returncode == 0, theirs.stderr
    assert set(eval(theirs.stdout)) == set(range(20000, 20010)) - mine
    assert pool.reserve("udp") in set(range(20000, 20010)) - mine  # UDP: our own locks are the only guard


# ------------------------------------------------------------------ real servers on a held port

APP = """
async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

def wsgi(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""

AIOHTTP = """
import sys
from aiohttp import web
async def hello(request):
    return web.Response(text="ok")
app = web.Application()
app.router.add_get("/", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def _commands(port: int, app_dir: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "uvicorn": [
            py,
            "-m",
            "uvicorn",
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "app:app",
        ],
        "gunicorn": [py, "-m", "gunicorn", "--chdir", str(app_dir), "-b", f"127.0.0.1:{port}", "app:wsgi"],
        "aiohttp": [py, "-c", AIOHTTP, str(port)],
        "http.server": [py, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(app_dir)],
    }


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn", "aiohttp", "http.server"])
def test_real_servers_bind_a_held_port(netns: NetNS, pool: PortPool, tmp_path: Path, server: str) -> None:
    (tmp_path / "app.py").write_text(APP)
    port = pool.reserve("tcp")
    proc = subprocess.Popen(_commands(port, tmp_path)[server], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        http_get(port, attempts=150)
        assert plain_bind(port) == errno.EADDRINUSE
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert b"Address already in use" not in err


def test_asyncio_tornado_and_create_server_bind_a_held_port(netns: NetNS, pool: PortPool) -> None:
    tornado_web = pytest.importorskip("tornado.web")

    async def serve() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", pool.reserve("tcp"))
        server.close()
        await server.wait_closed()
        app = tornado_web.Application([])
        listening = app.listen(pool.reserve("tcp"), "127.0.0.1")
        listening.stop()

    asyncio.run(serve())
    with socket.create_server(("", pool.reserve("tcp")), family=socket.AF_INET6, dualstack_ipv6=True):
        pass


def test_a_server_that_binds_without_reuseaddr_needs_an_unheld_port(netns: NetNS, pool: PortPool) -> None:
    """socketserver.TCPServer leaves allow_reuse_address False: a held port refuses it, an unheld one not."""
    with pytest.raises(OSError) as info:
        socketserver.TCPServer(("127.0.0.1", pool.reserve("tcp")), socketserver.BaseRequestHandler)
    assert info.value.errno == errno.EADDRINUSE
    port = pool.reserve("tcp", hold=False)
    with http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler) as served:
        thread = in_thread(served.serve_forever)
        try:
            with socketserver.TCPServer(
                ("127.0.0.1", pool.reserve("tcp", hold=False)), socketserver.BaseRequestHandler
            ):
                pass
        finally:
            served.shutdown()
            thread.join(timeout=10)


COMPETITOR_SCRIPT = Path(__file__).parent / "field" / "competitor.py"


def _race(pool: PortPool, hold: bool, tries: int = 40) -> tuple[int, int]:
    """(failed binds, successful tries) of tries that reserve a port, spend 3 ms on set-up as a test does,
    then bind it with socket.create_server, while a competitor process binds every port it can of the ten
    candidates explicitly (no SO_REUSEADDR), holds them 4 ms, lets go for 1 ms and starts again."""
    competitor = subprocess.Popen(
        [sys.executable, str(COMPETITOR_SCRIPT), "--explicit", "20000-20009", "--seconds", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    failures = done = 0
    try:
        assert competitor.stdout is not None
        assert competitor.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while done < tries and time.monotonic() < deadline:
            try:
                port = pool.reserve("tcp", hold=hold)
            except PortsExhaustedError:
                continue  # the competitor had every candidate at that instant
            time.sleep(0.003)
            try:
                socket.create_server(("127.0.0.1", port)).close()
            except OSError:
                failures += 1
            pool.release(port)
            done += 1
    finally:
        competitor.kill()
        competitor.communicate()
    return failures, done


def test_explicit_binders_cannot_take_held_ports(netns: NetNS, pool: PortPool) -> None:
    """A competitor binding port numbers explicitly (portpicker-style, outside the ephemeral range) takes
    unheld ports between the reservation and the test's bind; held ones never."""
    netns.sysctl("net.ipv4.ip_local_port_range", (1024, 65535))
    netns.sysctl("net.ipv4.ip_local_reserved_ports", "20000-20009")
    unheld_failures, unheld_done = _race(pool, hold=False)
    held_failures, held_done = _race(pool, hold=True)
    assert unheld_done == held_done == 40
    assert unheld_failures > 0, "the race did not show without the hold"
    assert held_failures == 0
