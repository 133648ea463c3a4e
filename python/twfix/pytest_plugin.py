"""twfix's pytest plugin: bound sockets and race-free ports, leak guards, private network namespaces.

Active as soon as twfix is installed (a ``pytest11`` entry point). Importing it does nothing but define
fixtures and hooks; this is the only twfix module that imports pytest.

Fixtures:
    tcp_listener, udp_socket          a bound socket (loopback, a free port), closed after the test
    tcp_listener_factory, udp_socket_factory
                                      make several (``host="::1"`` for IPv6), all closed after the test
    twfix_tcp_port, twfix_udp_port    a port number reserved for the test (see twfix.ports)
    twfix_port_factory                ``twfix_port_factory("tcp"|"udp")`` -> another reserved port
    twfix_netns (also as netns)       the test runs in a fresh network namespace with loopback up

Options:
    --twfix-ports / ini ``twfix_ports = true``   pytest-asyncio's ``unused_*_port[_factory]`` and anyio's
                                                 ``free_*_port[_factory]`` fixtures come from twfix
    --twfix-leaks / ini ``twfix_leaks = true``   every test is leak-guarded (marker: ``twfix_no_leaks``)
"""

from __future__ import annotations

import os
import socket
import sys
import types
from collections.abc import Callable, Generator, Iterator
from typing import Any, Final, Literal

import pytest

import twfix
from twfix import _binds, _import_hook, _leaks, _private_netns
from twfix._private_netns import NetworkNamespace
from twfix._text import printable
from twfix.ports import PortPool

__all__ = ["BoundSocket", "NetworkNamespace"]

_POOL_KEY: Final = pytest.StashKey[PortPool]()
_BEFORE_KEY: Final = pytest.StashKey[tuple[set[int], int]]()
_LOG_KEY: Final = pytest.StashKey[_binds.BindLog]()
_REQUIRE_NETNS: Final = "TWFIX_REQUIRE_NETNS"


class BoundSocket(socket.socket):
    """A plain socket.socket, bound, with its address on the object (``.port``, ``.host``, ``.address``)."""

    @property
    def address(self) -> tuple[str, int]:
        ip, port = self.getsockname()[:2]
        return str(ip), int(port)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]


def _adopt(sock: socket.socket) -> BoundSocket:
    bound = BoundSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    return bound


# ------------------------------------------------------------------ options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("twfix", "twfix: race-free ports and socket leak guards")
    group.addoption(
        "--twfix-ports",
        action="store_true",
        default=None,
        help=_PORTS_HELP,
    )
    group.addoption(
        "--twfix-no-hold",
        action="store_true",
        default=False,
        help="do not hold reserved TCP ports in the kernel (for code that binds without SO_REUSEADDR; "
        "per test: the twfix_no_hold marker)",
    )
    group.addoption(
        "--twfix-leaks",
        action="store_true",
        default=None,
        help="fail every test that leaves sockets open (as the twfix_no_leaks marker does)",
    )
    parser.addini("twfix_ports", _PORTS_HELP, type="bool", default=False)
    parser.addini("twfix_hold", "hold reserved TCP ports in the kernel until teardown (default true)", "bool", True)
    parser.addini("twfix_leaks", "like --twfix-leaks", type="bool", default=False)


_PORTS_HELP: Final = (
    "serve the port fixtures unused_tcp_port, unused_udp_port (and _factory), free_tcp_port, free_udp_port "
    "(and _factory) and aiohttp_unused_port from twfix whoever defines them, and route portpicker."
    "pick_unused_port, aiohttp.test_utils.unused_port and ephemeral_port_reserve.reserve to it: ports never "
    "given to bind(0) or connect(), TCP ones held in the kernel until teardown; warns about port helpers it "
    "cannot reach"
)


def _flag(config: pytest.Config, name: str) -> bool:
    value = config.getoption(f"--twfix-{name}")
    return bool(value) if value is not None else bool(config.getini(f"twfix_{name}"))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Route the port helpers before the first conftest.py imports them by name."""
    option = getattr(early_config.known_args_namespace, "twfix_ports", None)
    if option or (option is None and early_config.getini("twfix_ports")):
        _route_helpers(early_config)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "twfix_no_leaks: fail the test if it leaves listening sockets or socket descriptors open"
    )
    config.addinivalue_line(
        "markers",
        f"{_HOLD_MARK}: the test's reserved TCP ports are not held in the kernel (for code that binds them "
        "without SO_REUSEADDR; anything may then take them first)",
    )
    _binds.watch()
    if _flag(config, "ports"):
        # The names must exist even where no plugin defines them; pytest_fixture_setup serves the values.
        config.pluginmanager.register(_port_fixture_names(), "twfix-port-overrides")
        config.pluginmanager.register(_Unreached(), "twfix-unreached-helpers")
        _route_helpers(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    for module, name, original in config.stash.get(_ROUTED_KEY, []):
        setattr(module, name, original)
    if _ROUTED_KEY in config.stash:
        del config.stash[_ROUTED_KEY]
    pool = config.stash.get(_POOL_KEY, None)
    if pool is not None:
        pool.close()
        del config.stash[_POOL_KEY]


def _pool(config: pytest.Config) -> PortPool:
    pool = config.stash.get(_POOL_KEY, None)
    if pool is None:
        pool = config.stash[_POOL_KEY] = PortPool()
    return pool


# ------------------------------------------------------------------ sockets


def _sockets(constructor: Callable[..., socket.socket]) -> Iterator[Callable[..., BoundSocket]]:
    """A factory of bound sockets made by ``constructor(0, host, **options)``, all closed afterwards."""
    made: list[socket.socket] = []

    def make(host: str = "127.0.0.1", **options: Any) -> BoundSocket:
        sock = _adopt(constructor(0, host, **options))
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()


@pytest.fixture
def tcp_listener_factory() -> Iterator[Callable[..., BoundSocket]]:
    """Make listening sockets (``factory(host="127.0.0.1", **reusable_tcp_server_options)``); all are
    closed after the test. Nothing can take their port: they hold it from the start."""
    yield from _sockets(twfix.reusable_tcp_server)


@pytest.fixture
def udp_socket_factory() -> Iterator[Callable[..., BoundSocket]]:
    """Make bound UDP sockets (``factory(host="127.0.0.1", **reusable_udp_options)``), closed after the test."""
    yield from _sockets(twfix.reusable_udp)


@pytest.fixture
def tcp_listener(tcp_listener_factory: Callable[..., BoundSocket]) -> BoundSocket:
    """A listening TCP socket on 127.0.0.1 and a free port (``tcp_listener.port``)."""
    return tcp_listener_factory()


@pytest.fixture
def udp_socket(udp_socket_factory: Callable[..., BoundSocket]) -> BoundSocket:
    """A bound UDP socket on 127.0.0.1 and a free port (``udp_socket.port``)."""
    return udp_socket_factory()


# ------------------------------------------------------------------ port numbers

# pytest-asyncio's and anyio's port fixtures, and aiohttp's: name -> (kind, factory?). With the opt-in they
# are served by twfix whoever defines them (a plugin, a conftest.py copy, a test module).
_SERVED: Final[dict[str, tuple[str, bool]]] = {
    **{f"{prefix}_{kind}_port": (kind, False) for prefix in ("unused", "free") for kind in ("tcp", "udp")},
    **{f"{prefix}_{kind}_port_factory": (kind, True) for prefix in ("unused", "free") for kind in ("tcp", "udp")},
    "aiohttp_unused_port": ("tcp", True),
}
_HOLD_MARK: Final = "twfix_no_hold"


class _Ports:
    """Ports reserved for one scope, released at its end."""

    def __init__(self, pool: PortPool, hold: bool) -> None:
        self._pool = pool
        self._hold = hold
        self._mine: list[int] = []

    def __call__(self, kind: str = "tcp", *, hold: bool | None = None) -> int:
        port = self._pool.reserve(kind, hold=self._hold if hold is None else hold)
        self._mine.append(port)
        return port

    def release(self) -> None:
        for port in self._mine:
            self._pool.release(port)
        self._mine.clear()


def _hold(request: pytest.FixtureRequest) -> bool:
    """Whether TCP ports handed to this request are held in the kernel (see twfix.ports)."""
    if request.node.get_closest_marker(_HOLD_MARK) is not None:
        return False
    return _config_hold(request.config)


def _one_port(request: pytest.FixtureRequest, kind: str) -> Iterator[int]:
    ports = _Ports(_pool(request.config), _hold(request))
    yield ports(kind)
    ports.release()


@pytest.fixture(scope="session")
def twfix_port_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., int]]:
    """``twfix_port_factory("tcp" | "udp", hold=None)``: another reserved port, held until the end of the
    session (``hold=False``: not held in the kernel, for code that binds without SO_REUSEADDR)."""
    ports = _Ports(_pool(request.config), _hold(request))
    yield ports
    ports.release()


@pytest.fixture
def twfix_tcp_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP port reserved for this test and held in the kernel until its teardown: a server that sets
    SO_REUSEADDR binds it, nothing else can (marker ``twfix_no_hold`` for code that binds without it)."""
    yield from _one_port(request, "tcp")


@pytest.fixture
def twfix_udp_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A UDP port reserved for this test (see ``twfix.ports`` for what protects a UDP port)."""
    yield from _one_port(request, "udp")


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> object | None:
    """With ``--twfix-ports``, the value of every served port fixture comes from twfix, whichever plugin,
    conftest.py or module defines it (pytest prefers a conftest's definition to a plugin's, so defining
    fixtures of the same name could never reach those)."""
    served = _SERVED.get(fixturedef.argname)
    if served is None or not _flag(request.config, "ports"):
        return None
    kind, factory = served
    ports = _Ports(_pool(request.config), _hold(request))
    value: object = (lambda: ports(kind)) if factory else ports(kind)
    fixturedef.addfinalizer(ports.release)
    fixturedef.cached_result = (value, fixturedef.cache_key(request), None)  # type: ignore[arg-type]
    return value


def _port_fixture_names() -> types.ModuleType:
    """Definitions of the served names for suites where no plugin defines them (pytest-asyncio, anyio or
    aiohttp's plugin not installed): port fixtures per test, factories per session, as those plugins have
    them. Their values come from :func:`pytest_fixture_setup`."""
    plugin = types.ModuleType("twfix-port-overrides")

    def define(name: str, scope: Literal["session", "function"]) -> None:
        def fixture() -> None:
            raise RuntimeError(f"{name} is served by twfix's pytest_fixture_setup")  # pragma: no cover

        setattr(plugin, name, pytest.fixture(scope=scope, name=name)(fixture))

    for name, (_kind, factory) in _SERVED.items():
        define(name, "session" if factory and name != "aiohttp_unused_port" else "function")
    return plugin


# Free-port helpers that tests call directly: (module, function). Routed to the pool under --twfix-ports
# where installed; each port is released at the end of the test that asked for it (or of the session).
_HELPERS: Final = (
    ("portpicker", "pick_unused_port"),
    ("aiohttp.test_utils", "unused_port"),
    ("ephemeral_port_reserve", "reserve"),
)
_ROUTED_KEY: Final = pytest.StashKey[list[tuple[types.ModuleType, str, Any]]]()
_SESSION_PORTS_KEY: Final = pytest.StashKey["_Ports"]()


def _route_helpers(config: pytest.Config) -> None:
    """Route each helper now if its module is imported, else the moment it is (importing aiohttp alone
    costs about 0.2 s per process, so nothing is imported on the suite's behalf)."""
    if _ROUTED_KEY in config.stash:
        return
    routed: list[tuple[types.ModuleType, str, Any]] = []
    config.stash[_ROUTED_KEY] = routed

    def route(module: types.ModuleType) -> None:
        function = dict(_HELPERS)[module.__name__]
        original = getattr(module, function, None)
        if original is None or getattr(original, "_twfix_routed", False):
            return

        def routed_helper(*_args: Any, **_kwargs: Any) -> int:
            log = _binds.current()
            if log is not None and log.ports is not None:
                return log.ports("tcp")
            ports = config.stash.get(_SESSION_PORTS_KEY, None)
            if ports is None:
                ports = config.stash[_SESSION_PORTS_KEY] = _Ports(_pool(config), _config_hold(config))
            return ports("tcp")

        routed_helper.__name__ = function
        routed_helper.__doc__ = f"{module.__name__}.{function}, routed to twfix's port pool by --twfix-ports."
        routed_helper._twfix_routed = True  # type: ignore[attr-defined]
        setattr(module, function, routed_helper)
        routed.append((module, function, original))

    waiting: dict[str, Callable[[types.ModuleType], None]] = {}
    for module_name, _function in _HELPERS:
        module = sys.modules.get(module_name)
        if module is not None:
            route(module)
        else:
            waiting[module_name] = route
    if waiting:
        finder = _import_hook.RouteOnImport(waiting)
        sys.meta_path.insert(0, finder)
        config.add_cleanup(lambda: sys.meta_path.remove(finder) if finder in sys.meta_path else None)


def _config_hold(config: pytest.Config) -> bool:
    return not config.getoption("--twfix-no-hold", False) and bool(config.getini("twfix_hold"))


# ------------------------------------------------------------------ network namespaces


@pytest.fixture
def twfix_netns() -> Iterator[NetworkNamespace]:
    """Run the test in a fresh network namespace with loopback up; the thread's namespace is restored
    afterwards. Skips (fails, with TWFIX_REQUIRE_NETNS=1) where namespaces cannot be created."""
    required = os.environ.get(_REQUIRE_NETNS, "") not in ("", "0")
    reason = _private_netns.unavailable()
    if reason is not None:
        if required:
            pytest.fail(f"{_REQUIRE_NETNS} is set but {reason}")
        pytest.skip(reason)
    try:
        original = _private_netns.enter()
    except OSError as exc:
        if required:
            pytest.fail(f"{_REQUIRE_NETNS} is set but unshare(CLONE_NEWNET) failed: {exc.strerror}")
        pytest.skip(f"cannot create a network namespace: {exc.strerror}")
    try:
        yield NetworkNamespace()
    finally:
        _private_netns.leave(original)


@pytest.fixture
def netns(twfix_netns: NetworkNamespace) -> NetworkNamespace:
    """``twfix_netns`` under its short name (a project's own ``netns`` fixture takes precedence)."""
    return twfix_netns


# ------------------------------------------------------------------ leak guard and conflict reports


def _guarded(item: pytest.Item) -> bool:
    return _flag(item.config, "leaks") or item.get_closest_marker("twfix_no_leaks") is not None


# ------------------------------------------------------------------ what the test's process binds


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    log = _binds.BindLog(_guarded(item), _flag(item.config, "ports"))
    ports = _Ports(_pool(item.config), _config_hold(item.config)) if log.opted_in else None
    log.ports = ports
    item.stash[_LOG_KEY] = log
    previous = _binds.set_current(log)
    try:
        return (yield)
    finally:
        _binds.set_current(previous)
        if ports is not None:
            ports.release()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    if _guarded(item):
        item.stash[_BEFORE_KEY] = (set(_leaks.socket_fds()), _leaks.time_wait_count())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    result = yield
    before = item.stash.get(_BEFORE_KEY, None)
    if before is None:
        return result
    fds_before, tw_before = before
    leaked = {fd: inode for fd, inode in _leaks.socket_fds().items() if fd not in fds_before}
    log = item.stash.get(_LOG_KEY, None)
    created = log.creation_sites() if log is not None else {}
    tw = _leaks.time_wait_count() - tw_before
    if tw > 0:
        item.add_report_section("teardown", "twfix", f"{tw} TIME-WAIT socket(s) created by this test")
    if leaked:
        raise pytest.fail.Exception(_leaks.leak_report(leaked, created), pytrace=False)
    return result


# ------------------------------------------------------------------ reports


def _explanations(item: pytest.Item, log: _binds.BindLog) -> list[str]:
    pool = item.config.stash.get(_POOL_KEY, None)
    texts: list[str] = []
    free: list[str] = []
    for sotype, host, port, reuse in log.failed_binds():
        kind = "udp" if sotype == socket.SOCK_DGRAM else "tcp"
        if kind == "tcp" and not reuse and pool is not None and pool.holds(port):
            texts.append(
                f"port {port} is held for this test by twfix (a bound socket with SO_REUSEADDR, so that nothing "
                f"else takes it), and the code bound {host or '*'}:{port} without SO_REUSEADDR, which only a "
                "free port accepts.\n"
                "  > set SO_REUSEADDR before bind() (socket.create_server and asyncio, uvicorn, aiohttp, "
                "tornado do), or let twfix hand out unheld ports: mark the test @pytest.mark.twfix_no_hold, "
                "ask twfix_port_factory(..., hold=False), or run with --twfix-no-hold (ini: twfix_hold = false)"
            )
            continue
        try:
            explanation = twfix.explain(port, host, kind)
        except (OSError, ValueError, TypeError):
            continue
        if explanation.can_bind:
            free.append(f"{kind} {host or '*'}:{port}")
        else:
            texts.append(str(explanation))
    if not texts and free:
        texts.append(f"free now (what held them has gone since): {', '.join(free)}")
    return texts


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    log = item.stash.get(_LOG_KEY, None)
    if call.excinfo is not None and call.when in ("setup", "call"):
        exc = call.excinfo.value
        texts = []
        if isinstance(exc, twfix.AddressInUseError) and exc.explanation is not None:
            texts.append(str(exc.explanation))
        elif log is not None and (
            _binds.in_use(exc) or any(_binds.IN_USE_TEXT.search(content) for _name, content in report.sections)
        ):
            texts.extend(_explanations(item, log))
        if texts:
            report.sections.append(("twfix: why the address was in use", "\n\n".join(texts)))
    if call.when == "teardown" and log is not None and log.unreached:
        report.user_properties.extend(("twfix_unreached", [where, note]) for where, note in log.unreached.items())
    return report


class _Unreached:
    """Collects the helper notes of every report (xdist workers' too) and prints each once per run."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}  # location -> the first note about it

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == "twfix_unreached" and isinstance(value, list | tuple) and len(value) == 2:
                self.notes.setdefault(str(value[0]), str(value[1]))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.notes:
            terminalreporter.write_sep("=", "twfix: port helpers --twfix-ports cannot reach", yellow=True)
            for note in self.notes.values():
                terminalreporter.write_line(printable(note))
