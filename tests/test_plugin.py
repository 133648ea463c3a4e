"""The pytest plugin, driven through pytester (fixtures, markers, options, failure messages)."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from twfix import sysctl
from twfix.ports import PortPool

pytest_plugins = ["pytester"]

INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


@pytest.fixture(autouse=True)
def _inner_ini(request: pytest.FixtureRequest) -> None:
    """The inner pytest runs get an ini file, as a real project has (pytest-asyncio warns without one)."""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester").makeini(INI)


def test_bound_socket_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket

        def test_listener(tcp_listener):
            assert tcp_listener.port > 0 and tcp_listener.host == "127.0.0.1"
            with socket.create_connection(("127.0.0.1", tcp_listener.port)) as c:
                conn, _ = tcp_listener.accept()
                conn.close()

        def test_udp(udp_socket):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", udp_socket.address)
            assert udp_socket.recv(1) == b"x"

        def test_factories(tcp_listener_factory, udp_socket_factory):
            a, b = tcp_listener_factory(), tcp_listener_factory()
            six = tcp_listener_factory("::1")
            assert six.family == socket.AF_INET6 and six.host == "::1"
            assert len({a.port, b.port, six.port}) == 3
            assert udp_socket_factory("::1").family == socket.AF_INET6
            test_factories.made = [a, b, six]

        def test_closed_after(tcp_listener_factory):
            assert all(s.fileno() == -1 for s in test_factories.made)
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=4)


def test_port_fixtures_are_outside_the_ephemeral_range(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket
        from twfix import sysctl

        def test_ports(twfix_tcp_port, twfix_udp_port, twfix_port_factory):
            ports = sysctl.port_range()
            more = [twfix_port_factory("tcp") for _ in range(5)] + [twfix_port_factory("udp")]
            every = [twfix_tcp_port, twfix_udp_port, *more]
            assert len(set(every)) == len(every)
            assert not any(ports.assigns(p) for p in every)  # bind(0) and connect() never get these
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                with socket.create_server((host, twfix_tcp_port), family=family):  # SO_REUSEADDR: binds
                    pass
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.bind((host, twfix_udp_port))  # UDP ports are not held

        def test_held(twfix_tcp_port):
            with socket.socket() as s:
                s.bind(("127.0.0.1", twfix_tcp_port))  # no SO_REUSEADDR: the hold refuses it
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*twfix: why the address was in use*",
            "*port * is held for this test by twfix*without SO_REUSEADDR*",
            "*@pytest.mark.twfix_no_hold*hold=False*--twfix-no-hold*",
        ]
    )
    # No twfix frame in the traceback of the failing bind: the plugin only listens (an audit hook).
    assert "pytest_plugin.py" not in result.stdout.str()


@pytest.mark.parametrize("how", ["marker", "option", "ini", "argument"])
def test_opting_out_of_the_hold(pytester: pytest.Pytester, how: str) -> None:
    mark = "@pytest.mark.twfix_no_hold\n" if how == "marker" else ""
    port = "twfix_port_factory('tcp', hold=False)" if how == "argument" else "twfix_tcp_port"
    pytester.makepyfile(
        f"import pytest, socket\n{mark}def test_plain(twfix_tcp_port, twfix_port_factory):\n"
        f"    with socket.socket() as s:\n        s.bind(('127.0.0.1', {port}))\n"
    )
    if how == "ini":
        pytester.makeini(INI + "twfix_hold = false\n")
    result = pytester.runpytest(*(["--twfix-no-hold"] if how == "option" else []))
    result.assert_outcomes(passed=1)


def test_bind_close_return_races_and_the_pool_does_not() -> None:
    """The usual helper's port is handed to the next bind(0) as readily as to the caller; a pool port is not."""
    busy: list[socket.socket] = []
    try:
        for _ in range(3000):  # another test (or worker) holding many kernel-chosen ports
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            busy.append(s)
        chosen = {s.getsockname()[1] for s in busy}

        def bind_close_return() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return int(s.getsockname()[1])

        # Rebind the helper's ports the way the competitor does (bind(0)): some collide with the ports the
        # helper handed out, because both come from the same kernel pool.
        helper_ports = {bind_close_return() for _ in range(3000)}
        competitor = []
        for _ in range(3000):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            competitor.append(s)
        busy += competitor
        taken = helper_ports & {s.getsockname()[1] for s in competitor}
        assert taken, "the race did not show: every helper port escaped the competitor"
        pool = PortPool()
        try:
            ours = {pool.reserve() for _ in range(200)}
        finally:
            pool.close()
        assert not ours & (chosen | {s.getsockname()[1] for s in competitor})
        ports = sysctl.port_range()
        assert not any(ports.assigns(p) for p in ours)
    finally:
        for s in busy:
            s.close()


def test_pools_never_share_a_port_across_threads_and_processes(tmp_path: Path) -> None:
    code = (
        "import json, sys\nfrom twfix.ports import PortPool\n"
        "pool = PortPool()\nports = [pool.reserve() for _ in range(300)]\n"
        "print(json.dumps(ports), flush=True)\nsys.stdin.readline()\n"
    )
    others = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        held = []
        for proc in others:
            assert proc.stdout is not None
            held.append(set(json.loads(proc.stdout.readline())))
        pool = PortPool()
        mine = []
        lock = threading.Lock()

        def grab() -> None:
            for _ in range(100):
                port = pool.reserve()
                with lock:
                    mine.append(port)

        threads = [threading.Thread(target=grab) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(mine)) == len(mine) == 300
        assert not set(mine) & held[0]
        assert not set(mine) & held[1]
        assert not held[0] & held[1]
        pool.close()
    finally:
        for proc in others:
            proc.communicate("done\n", timeout=30)


XDIST_SUITE = """
import json, os, time
import pytest

@pytest.mark.parametrize("i", range(400))
def test_port(i, twfix_tcp_port):
    start = time.monotonic()
    time.sleep(0.001)
    with open(os.environ["TWFIX_PORT_LOG"], "a") as f:
        f.write(json.dumps([twfix_tcp_port, start, time.monotonic()]) + "\\n")
"""


def _overlaps(log: Path) -> list[tuple[int, float, float]]:
    uses = sorted(tuple(json.loads(line)) for line in log.read_text().splitlines())
    # The same port held by two tests at once (the list is sorted by port, then start time).
    return [b for a, b in itertools.pairwise(uses) if a[0] == b[0] and b[1] < a[2]]


def test_xdist_workers_never_share_a_port(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 workers, 400 port-fixture uses, 10 times, with pytest-asyncio and anyio installed alongside."""
    pytest.importorskip("xdist")
    pytester.makepyfile(XDIST_SUITE)
    for run in range(10):
        log = tmp_path / f"ports-{run}.log"
        monkeypatch.setenv("TWFIX_PORT_LOG", str(log))
        result = pytester.runpytest_subprocess("-n", "2", "-q", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=400)
        assert len(log.read_text().splitlines()) == 400
        assert _overlaps(log) == []
    # Two separate pytest runs on the same host at once, one of them with two workers.
    log = tmp_path / "ports.log"
    monkeypatch.setenv("TWFIX_PORT_LOG", str(log))
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pytester.path)]
    procs = [
        subprocess.Popen([*run, "-n", "2"], stdout=subprocess.DEVNULL),
        subprocess.Popen(run, stdout=subprocess.DEVNULL),
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 800
    assert _overlaps(log) == []


OVERRIDE_SUITE = """
import pytest
from twfix import sysctl

PORTS = sysctl.port_range()

def test_asyncio_names(unused_tcp_port, unused_udp_port, unused_tcp_port_factory, unused_udp_port_factory):
    every = [unused_tcp_port, unused_udp_port, unused_tcp_port_factory(), unused_udp_port_factory()]
    assert all(isinstance(p, int) for p in every)
    print("ASYNCIO", *(PORTS.assigns(p) for p in every))

def test_anyio_names(free_tcp_port, free_udp_port, free_tcp_port_factory, free_udp_port_factory):
    every = [free_tcp_port, free_udp_port, free_tcp_port_factory(), free_udp_port_factory()]
    print("ANYIO", *(PORTS.assigns(p) for p in every))

def test_twfix_names_coexist(twfix_tcp_port, unused_tcp_port, free_tcp_port):
    assert len({twfix_tcp_port, unused_tcp_port, free_tcp_port}) == 3
"""


@pytest.mark.parametrize("how", ["default", "flag", "ini"])
def test_opt_in_override_of_asyncio_and_anyio_fixtures(pytester: pytest.Pytester, how: str) -> None:
    pytest.importorskip("pytest_asyncio")
    pytest.importorskip("anyio")
    pytester.makepyfile(OVERRIDE_SUITE)
    args = ["-s", "-p", "no:randomly"]
    if how == "flag":
        args.append("--twfix-ports")
    if how == "ini":
        pytester.makeini(INI + "twfix_ports = true\n")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    # Their helpers take ports from bind(0), inside the ephemeral range; twfix's never are.
    expected = "True" if how == "default" else "False"
    assert f"ASYNCIO {expected} {expected} {expected} {expected}" in out
    assert f"ANYIO {expected} {expected} {expected} {expected}" in out


def test_twfix_netns_fixture(pytester: pytest.Pytester) -> None:
    before = sysctl.get("net.ipv4.tcp_tw_reuse")
    pytester.makepyfile(
        """
        import os, socket
        from twfix import sysctl

        def test_private(twfix_netns):
            twfix_netns.sysctl("net.ipv4.tcp_tw_reuse", 0)
            twfix_netns.sysctl("net.ipv4.ip_local_port_range", (40000, 40009))
            assert sysctl.get("net.ipv4.tcp_tw_reuse") == 0
            assert sysctl.port_range().size == 10
            with socket.create_server(("127.0.0.1", 0)) as s:  # loopback is up
                socket.create_connection(s.getsockname()).close()

        def test_only_net_knobs(netns):  # the short name
            import pytest
            with pytest.raises(ValueError, match="network knob"):
                netns.sysctl("kernel.hostname", "x")
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)
    assert sysctl.get("net.ipv4.tcp_tw_reuse") == before  # this namespace never moved


def test_twfix_netns_skips_with_a_reason_without_root(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TWFIX_REQUIRE_NETNS", raising=False)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    pytester.makepyfile("def test_x(twfix_netns):\n    pass\n")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs root*network namespace*"])


LEAKY = """
import socket
import pytest

LEAKED = []

@pytest.mark.twfix_no_leaks
def test_leaks_a_listener():
    KEEP = socket.create_server(("127.0.0.1", 0))
    LEAKED.append(KEEP)

@pytest.mark.twfix_no_leaks
def test_clean(tcp_listener):
    with socket.create_connection(("127.0.0.1", tcp_listener.port)) as c:
        a, _ = tcp_listener.accept()
        a.close()

def test_unmarked_leak():
    LEAKED.append(socket.socket())
"""

# The leaks are closed once the inner session is over, after every check saw them.
LEAKY_CONFTEST = """
import sys

def pytest_sessionfinish(session):
    for module in list(sys.modules.values()):
        for sock in getattr(module, "LEAKED", []):
            sock.close()
"""


def test_leak_guard_marker_and_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY)
    pytester.makeconftest(LEAKY_CONFTEST)
    result = pytester.runpytest("-p", "no:randomly", "-rA")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*the test left 1 socket(s) open*",
            "*fd *: LISTEN 127.0.0.1:*",
            "*test_leak_guard_marker_and_option.py*, line 8, in test_leaks_a_listener",
            "*KEEP = socket.create_server*",
        ]
    )
    result.stdout.fnmatch_lines(["*TIME-WAIT socket(s) created by this test*"])
    result = pytester.runpytest("-p", "no:randomly", "--twfix-leaks")
    result.assert_outcomes(passed=3, errors=2)  # the option guards the unmarked test too


def test_address_conflict_is_explained_in_the_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket

        def test_stdlib_conflict(tcp_listener):
            with socket.socket() as s:
                s.bind(("127.0.0.1", tcp_listener.port))

        def test_twfix_conflict(tcp_listener):
            import twfix
            twfix.reusable_tcp_server(tcp_listener.port, "127.0.0.1")
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert out.count("twfix: why the address was in use") == 2
    assert "is in use by a live listener" in out


def test_plugin_import_is_cheap_and_side_effect_free() -> None:
    code = (
        "import socket, sys\nbind, init = socket.socket.bind, socket.socket.__init__\nimport twfix\n"
        "assert 'pytest' not in sys.modules and 'twfix.pytest_plugin' not in sys.modules\n"
        "import twfix.pytest_plugin\nassert socket.socket.bind is bind and socket.socket.__init__ is init\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # No other twfix module imports pytest.
    package = Path(twfix_dir())
    importers = sorted(p.name for p in package.glob("*.py") if "import pytest" in p.read_text())
    assert importers == ["pytest_plugin.py"]


def twfix_dir() -> str:
    import twfix

    return str(Path(twfix.__file__).parent)


# ------------------------------------------------------------------ reaching the fixture whoever defines it

# Three lines copied from pytest-asyncio into a project's conftest.py, as real suites do.
OWN_FIXTURE_CONFTEST = """
import contextlib, socket
import pytest

@pytest.fixture
def unused_tcp_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.fixture(scope="session")
def unused_tcp_port_factory():
    def factory():
        with contextlib.closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return factory
"""

OWN_FIXTURE_SUITE = """
import asyncio
from twfix import sysctl

def test_server(unused_tcp_port, unused_tcp_port_factory):
    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", unused_tcp_port)
        other = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", unused_tcp_port_factory())
        for s in (server, other):
            s.close()
            await s.wait_closed()
    asyncio.run(main())
    print("ASSIGNABLE", sysctl.port_range().assigns(unused_tcp_port))
"""


@pytest.mark.parametrize("opt_in", [False, True])
def test_a_conftest_copy_of_the_fixture_is_served_by_twfix(pytester: pytest.Pytester, opt_in: bool) -> None:
    pytester.makeconftest(OWN_FIXTURE_CONFTEST)
    pytester.makepyfile(OWN_FIXTURE_SUITE)
    result = pytester.runpytest("-s", *(["--twfix-ports"] if opt_in else []))
    result.assert_outcomes(passed=1)
    # The conftest's bind(0) copy gives ports inside the ephemeral range; twfix's never are.
    result.stdout.fnmatch_lines([f"*ASSIGNABLE {not opt_in}"])


HELPER_SUITE = """
import socket
import aiohttp.test_utils
import ephemeral_port_reserve
import portpicker
from portpicker import pick_unused_port
from twfix import sysctl

def test_helpers(aiohttp_unused_port):
    ports = [pick_unused_port(), portpicker.pick_unused_port(), aiohttp.test_utils.unused_port(),
             ephemeral_port_reserve.reserve(), aiohttp_unused_port(), IMPORTED_IN_CONFTEST()]
    assert len(set(ports)) == 6
    print("ASSIGNABLE", *(sysctl.port_range().assigns(p) for p in ports))
    for port in ports:
        socket.create_server(("127.0.0.1", port)).close()
"""


def test_port_helper_functions_are_routed(pytester: pytest.Pytester) -> None:
    """portpicker, aiohttp's unused_port and ephemeral_port_reserve, even imported by name in a conftest."""
    for module in ("aiohttp", "portpicker", "ephemeral_port_reserve"):
        pytest.importorskip(module)
    pytester.makeconftest(
        "import builtins\nfrom portpicker import pick_unused_port as IMPORTED\n"
        "builtins.IMPORTED_IN_CONFTEST = IMPORTED\npytest_plugins = ['aiohttp.pytest_plugin']\n"
    )
    pytester.makepyfile(HELPER_SUITE)
    pytester.makeini("[pytest]\n")  # aiohttp's plugin instead of pytest-asyncio's
    result = pytester.runpytest_subprocess("-s", "--twfix-ports", "-p", "no:asyncio")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*ASSIGNABLE False False False False False False"])


UNREACHED_SUITE = """
import socket
import pytest

def get_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.mark.parametrize("i", range(4))
def test_server(i):
    with socket.create_server(("127.0.0.1", get_free_port())):
        pass
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_helper_twfix_cannot_reach_is_named_once(pytester: pytest.Pytester, workers: int) -> None:
    pytester.makepyfile(UNREACHED_SUITE)
    args = ["--twfix-ports", *(["-n", str(workers)] if workers else [])]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    assert out.count("a free-port helper twfix cannot reach") == 1
    result.stdout.fnmatch_lines(
        [
            "*port helpers --twfix-ports cannot reach*",
            "*test_a_helper_twfix_cannot_reach_is_named_once.py:6 (get_free_port)*",
        ]
    )
    # Without the opt-in twfix stays silent.
    assert "cannot reach" not in pytester.runpytest_subprocess().stdout.str()


WRAPPED_SUITE = """
import logging, socket, subprocess, sys
import pytest

HOLDER = (
    "import socket, sys, time\\ns = socket.create_server(('127.0.0.1', 0))\\n"
    "print(s.getsockname()[1], flush=True)\\ntime.sleep(60)"
)

@pytest.fixture
def busy_port():
    child = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    yield int(child.stdout.readline())
    child.kill()
    child.communicate()

def serve(port):
    try:
        socket.create_server(("127.0.0.1", port))
    except OSError as exc:
        logging.getLogger("app").error("could not start: %s", exc)
        sys.exit(1)

def test_system_exit(busy_port):
    serve(busy_port)

class StartupError(Exception):
    pass

def test_wrapped(busy_port):
    try:
        socket.create_server(("127.0.0.1", busy_port))
    except OSError:
        raise StartupError("the server did not start") from None

@pytest.fixture
def server(busy_port):
    serve(busy_port)

def test_in_a_fixture(server):
    pass
"""


def test_explanations_survive_wrapping(pytester: pytest.Pytester) -> None:
    """A SystemExit after a log line, an exception whose context is the EADDRINUSE, a failing fixture."""
    pytester.makepyfile(WRAPPED_SUITE)
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=2, errors=1)
    out = result.stdout.str()
    assert out.count("twfix: why the address was in use") == 3
    assert out.count("is in use by a live listener") >= 3
    result.stdout.fnmatch_lines(["*pid *python*"])


def test_the_ini_options_say_what_they_do(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--twfix-ports*", "*--twfix-no-hold*", "*twfix_ports (bool)*", "*twfix_hold (bool)*"])
    ini_help = result.stdout.str().split("twfix_ports (bool)")[1]
    assert "unused_tcp_port" in ini_help.split("twfix_hold")[0]
