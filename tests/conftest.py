"""Shared fixtures: private network namespaces (the test oracle is the real kernel)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from twfix.pytest_plugin import NetworkNamespace

# The `netns` fixture is twfix's own (its pytest plugin): a fresh, private network namespace with `lo` up,
# failing instead of skipping when TWFIX_REQUIRE_NETNS is set, as in CI.
NetNS = NetworkNamespace

# A real-style project run by tests/field/test_realsuite.py, never collected as part of this suite.
collect_ignore = ["field/realsuite"]

# With TWFIX_REQUIRE_EXTRAS=1 (set by .ci/run), a test extra that fails to import fails the tests that
# need it instead of skipping them: CI cannot go green with a dependency silently missing.
if os.environ.get("TWFIX_REQUIRE_EXTRAS", "") not in ("", "0"):

    def _required(modname: str, *_args: object, **_kwargs: object) -> types.ModuleType:
        return importlib.import_module(modname)

    pytest.importorskip = _required  # type: ignore[assignment]


LISTENER_CHILD = (
    "import socket, sys, time\ns = socket.create_server((sys.argv[1], 0))\n"
    "print(s.getsockname()[1], flush=True)\ntime.sleep(120)"
)


@contextlib.contextmanager
def listener_in_named_netns(prefix: str, host: str = "127.0.0.1") -> Iterator[tuple[str, subprocess.Popen[str], int]]:
    """A named network namespace (`ip netns add`) with loopback up and a child listening on `host` in it:
    yields (name, child, port); the child and the namespace are gone afterwards."""
    name = f"{prefix}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        child = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", LISTENER_CHILD, host], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            yield name, child, int(child.stdout.readline())
        finally:
            child.kill()
            child.communicate()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def time_wait_pairs(server: socket.socket, count: int, *, server_closes: bool) -> None:
    """Open `count` connections to `server` and close them; the side that closes first gets TIME-WAIT.

    server_closes=True leaves TIME-WAIT on the server's port; False leaves it on the clients' ephemeral
    ports (client-side TIME-WAIT, the kind that exhausts source ports).
    """
    family = server.family
    addr = server.getsockname()[:2]
    done = 0
    while done < count:
        batch = min(64, count - done)  # below any listen backlog, so connect() never waits
        clients = []
        for _ in range(batch):
            c = socket.socket(family, socket.SOCK_STREAM)
            c.connect(addr)
            clients.append(c)
        accepted = [server.accept()[0] for _ in clients]
        first, second = (accepted, clients) if server_closes else (clients, accepted)
        for s in first:
            s.close()
        for s in second:
            s.recv(1)  # wait for the FIN so the close order is certain
            s.close()
        done += batch
    settle(addr[1])


# /proc/net/tcp state codes of a close under way: FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING.
_CLOSING = frozenset({"04", "05", "08", "09", "0B"})


def settle(port: int, timeout: float = 20.0) -> None:
    """Wait (at most `timeout` s) until no TCP socket on `port` is half-way through a close.

    Loopback hands the last FIN and ACK to a softirq; on a host whose cores are busy, ksoftirqd runs it
    late, so a test that counts TIME-WAIT right after close() can see a few sockets still in FIN_WAIT2
    or LAST_ACK. Read from /proc (not twfix) so the tests' witness stays independent.
    """
    deadline = time.monotonic() + timeout
    while closing_on_port(port) and time.monotonic() < deadline:
        time.sleep(0.01)


def closing_on_port(port: int) -> int:
    """How many TCP sockets (either family) with `port` at either end are half-way through a close."""
    hexport = f":{port:04X}"
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(name) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if fields[3] in _CLOSING and (fields[1].endswith(hexport) or fields[2].endswith(hexport)):
                    count += 1
    return count


def listener_without_reuseaddr(host: str = "127.0.0.1", port: int = 0) -> tuple[socket.socket, int]:
    """A listener set up the way most servers forget to: no SO_REUSEADDR. Returns it and its port."""
    old = socket.socket()
    old.bind((host, port))
    old.listen()
    return old, old.getsockname()[1]


@functools.cache
def unprivileged_python() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) that uid 65534 can use wherever the checkout and its venv live.

    The venv's interpreter may sit behind a directory only root can enter (pyenv under /root), and the
    checkout itself may be private, so twfix is copied to a world-readable temporary directory and the
    first interpreter that can import it from there as uid 65534 is used.
    """
    import twfix

    root = tempfile.mkdtemp(prefix="twfix-nobody-")
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(Path(twfix.__file__).parent, Path(root) / "twfix", ignore=shutil.ignore_patterns("__pycache__"))
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o755 if name.endswith(".so") else 0o644)
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [*_NOBODY, python, "-c", "import twfix"],
            env=dict(os.environ, PYTHONPATH=root),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return python, root
    raise RuntimeError("no Python interpreter can import twfix as uid 65534")


_NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def run_unprivileged(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet as uid/gid 65534 (nobody) in the current network namespace, with twfix importable."""
    python, path = unprivileged_python()
    return subprocess.run(
        [*_NOBODY, python, "-c", script, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=path),
        timeout=60,
        check=False,
    )
