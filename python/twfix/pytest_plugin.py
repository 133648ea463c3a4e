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

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import struct
import traceback
import types
from collections.abc import Callable, Generator, Iterator
from typing import Any, Final

import pytest

import twfix
from twfix import _twfix
from twfix.netns import counters as namespace_counters  # `netns` is a fixture of this module
from twfix.ports import PortPool

__all__ = ["BoundSocket", "NetworkNamespace"]

_POOL_KEY: Final = pytest.StashKey[PortPool]()
_CREATED_KEY: Final = pytest.StashKey[dict[int, list[str]]]()
_CONFLICT_KEY: Final = pytest.StashKey[list[str]]()
_BEFORE_KEY: Final = pytest.StashKey[tuple[set[int], int]]()
_CLONE_NEWNET: Final = 0x40000000
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
        help="serve pytest-asyncio's unused_*_port and anyio's free_*_port fixtures from twfix (race-free)",
    )
    group.addoption(
        "--twfix-leaks",
        action="store_true",
        default=None,
        help="fail every test that leaves sockets open (as the twfix_no_leaks marker does)",
    )
    parser.addini("twfix_ports", "like --twfix-ports", type="bool", default=False)
    parser.addini("twfix_leaks", "like --twfix-leaks", type="bool", default=False)


def _flag(config: pytest.Config, name: str) -> bool:
    value = config.getoption(f"--twfix-{name}")
    return bool(value) if value is not None else bool(config.getini(f"twfix_{name}"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "twfix_no_leaks: fail the test if it leaves listening sockets or socket descriptors open"
    )
    if _flag(config, "ports"):
        # Registered now, after every entry-point plugin: these definitions win over theirs.
        config.pluginmanager.register(_port_overrides(), "twfix-port-overrides")


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(_POOL_KEY, None)
    if pool is not None:
        pool.close()


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


class _Ports:
    """Ports reserved for one scope, released at its end."""

    def __init__(self, pool: PortPool) -> None:
        self._pool = pool
        self._mine: list[int] = []

    def __call__(self, kind: str = "tcp") -> int:
        port = self._pool.reserve(kind)
        self._mine.append(port)
        return port

    def release(self) -> None:
        for port in self._mine:
            self._pool.release(port)
        self._mine.clear()


def _one_port(request: pytest.FixtureRequest, kind: str) -> Iterator[int]:
    ports = _Ports(_pool(request.config))
    yield ports(kind)
    ports.release()


@pytest.fixture(scope="session")
def twfix_port_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., int]]:
    """``twfix_port_factory("tcp" | "udp")``: another reserved port, held until the end of the session."""
    ports = _Ports(_pool(request.config))
    yield ports
    ports.release()


@pytest.fixture
def twfix_tcp_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP port reserved for this test: free now, and no other test, worker or pytest run gets it."""
    yield from _one_port(request, "tcp")


@pytest.fixture
def twfix_udp_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A UDP port reserved for this test (see ``twfix_tcp_port``)."""
    yield from _one_port(request, "udp")


def _port_overrides() -> types.ModuleType:
    """pytest-asyncio's ``unused_*`` and anyio's ``free_*`` port fixtures, served race-free
    (``--twfix-ports``), with their scopes: each port fixture gets its own port, the factories last the
    session."""
    plugin = types.ModuleType("twfix-port-overrides")

    def port(kind: str) -> Callable[[pytest.FixtureRequest], Iterator[int]]:
        def fixture(request: pytest.FixtureRequest) -> Iterator[int]:
            yield from _one_port(request, kind)

        return fixture

    def factory(kind: str) -> Callable[[Callable[..., int]], Callable[[], int]]:
        def fixture(twfix_port_factory: Callable[..., int]) -> Callable[[], int]:
            return lambda: twfix_port_factory(kind)

        return fixture

    for prefix in ("unused", "free"):
        for kind in ("tcp", "udp"):
            name = f"{prefix}_{kind}_port"
            setattr(plugin, name, pytest.fixture(name=name)(port(kind)))
            setattr(plugin, f"{name}_factory", pytest.fixture(scope="session", name=f"{name}_factory")(factory(kind)))
    return plugin


# ------------------------------------------------------------------ network namespaces


class NetworkNamespace:
    """The private network namespace a test runs in; its sysctls start at kernel defaults."""

    def sysctl(self, name: str, value: object) -> None:
        """Set a knob in this namespace only (any knob under /proc/sys/net): ``netns.sysctl(
        "net.ipv4.tcp_tw_reuse", 0)``, ``netns.sysctl("net.ipv4.ip_local_port_range", (40000, 40009))``."""
        text = " ".join(str(v) for v in value) if isinstance(value, tuple | list) else str(value)
        self.write_sysctl(name, text)

    def write_sysctl(self, name: str, text: str) -> None:
        path = _twfix.sysctl_key(name)[1]
        if not path.startswith("/proc/sys/net/"):
            raise ValueError(f"{name} is not a per-namespace network knob (/proc/sys/net/...)")
        with open(path, "w") as f:
            f.write(text + "\n")  # an empty string alone would never reach the kernel

    def read_sysctl(self, name: str) -> str:
        with open(_twfix.sysctl_key(name)[1]) as f:
            return f.read().strip()


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) to create a private network namespace"
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "no network namespaces here"
    return None


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, struct.pack("16sH14x", b"lo", 0)))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


@pytest.fixture
def twfix_netns() -> Iterator[NetworkNamespace]:
    """Run the test in a fresh network namespace with loopback up; the thread's namespace is restored
    afterwards. Skips (fails, with TWFIX_REQUIRE_NETNS=1) where namespaces cannot be created."""
    required = os.environ.get(_REQUIRE_NETNS, "") not in ("", "0")
    reason = _unavailable()
    if reason is not None:
        if required:
            pytest.fail(f"{_REQUIRE_NETNS} is set but {reason}")
        pytest.skip(reason)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:
            why = os.strerror(ctypes.get_errno())
            if required:
                pytest.fail(f"{_REQUIRE_NETNS} is set but unshare(CLONE_NEWNET) failed: {why}")
            pytest.skip(f"cannot create a network namespace: {why}")
        try:
            _loopback_up()
            yield NetworkNamespace()
        finally:
            if libc.setns(original, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's original network namespace failed")
    finally:
        os.close(original)


@pytest.fixture
def netns(twfix_netns: NetworkNamespace) -> NetworkNamespace:
    """``twfix_netns`` under its short name (a project's own ``netns`` fixture takes precedence)."""
    return twfix_netns


# ------------------------------------------------------------------ leak guard and conflict reports


def _socket_fds() -> dict[int, int]:
    """This process's socket descriptors: fd -> inode."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(name)] = int(target[8:-1])
    return found


def _guarded(item: pytest.Item) -> bool:
    return _flag(item.config, "leaks") or item.get_closest_marker("twfix_no_leaks") is not None


_original_init = socket.socket.__init__
_original_bind = socket.socket.bind


def _install_tracers(item: pytest.Item, record_creation: bool) -> Callable[[], None]:
    """Record where each socket of the test is created, and explain an EADDRINUSE bind when it happens."""
    created: dict[int, list[str]] = item.stash.setdefault(_CREATED_KEY, {})
    conflicts: list[str] = item.stash.setdefault(_CONFLICT_KEY, [])

    def traced_init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        _original_init(self, *args, **kwargs)
        if record_creation:
            created[self.fileno()] = traceback.format_stack(limit=6)[:-1]

    def explained_bind(self: socket.socket, address: Any) -> None:
        try:
            _original_bind(self, address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and self.family in (socket.AF_INET, socket.AF_INET6):
                kind = "udp" if self.type == socket.SOCK_DGRAM else "tcp"
                with contextlib.suppress(OSError, ValueError, TypeError):
                    conflicts.append(str(twfix.explain(int(address[1]), str(address[0]), kind)))
            raise

    socket.socket.__init__ = traced_init  # type: ignore[method-assign]
    socket.socket.bind = explained_bind  # type: ignore[method-assign,assignment]

    def restore() -> None:
        socket.socket.__init__ = _original_init  # type: ignore[method-assign]
        socket.socket.bind = _original_bind  # type: ignore[method-assign]

    return restore


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    guarded = _guarded(item)
    if guarded:
        item.stash[_BEFORE_KEY] = (set(_socket_fds()), _time_wait_count())
    restore = _install_tracers(item, guarded)
    try:
        return (yield)
    finally:
        restore()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    result = yield
    before = item.stash.get(_BEFORE_KEY, None)
    if before is None:
        return result
    fds_before, tw_before = before
    leaked = {fd: inode for fd, inode in _socket_fds().items() if fd not in fds_before}
    created = item.stash.get(_CREATED_KEY, {})
    tw = _time_wait_count() - tw_before
    if tw > 0:
        item.add_report_section("teardown", "twfix", f"{tw} TIME-WAIT socket(s) created by this test")
    if leaked:
        raise pytest.fail.Exception(_leak_report(leaked, created), pytrace=False)
    return result


def _time_wait_count() -> int:
    """TIME-WAIT of the test's namespace from sockstat: O(1), where a dump would walk the whole table."""
    try:
        return namespace_counters().time_wait
    except OSError:
        return 0


def _leak_report(leaked: dict[int, int], created: dict[int, list[str]]) -> str:
    by_inode: dict[int, twfix.SocketEntry] = {}
    for kind in ("tcp", "udp"):
        try:
            for entry in twfix.sockets(kind):
                by_inode[entry.inode] = entry
        except OSError:
            pass
    lines = [f"twfix: the test left {len(leaked)} socket(s) open:"]
    for fd, inode in sorted(leaked.items()):
        found = by_inode.get(inode)
        what = "socket"
        if found is not None:
            what = f"{found.state} {found.laddr}" + (f" -> {found.raddr}" if found.raddr else "")
        lines.append(f"  fd {fd}: {what}")
        for frame in created.get(fd, [])[-2:]:
            lines.extend("    " + line for line in frame.rstrip().splitlines())
    return "\n".join(lines)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if call.when == "call" and call.excinfo is not None:
        exc = call.excinfo.value
        texts = []
        if isinstance(exc, twfix.AddressInUseError) and exc.explanation is not None:
            texts.append(str(exc.explanation))
        elif isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            conflicts: list[str] = item.stash.get(_CONFLICT_KEY, [])
            texts.extend(conflicts)
        if texts:
            report.sections.append(("twfix: why the address was in use", "\n\n".join(texts)))
    return report
