"""The raw native surface (twfix._twfix): every entry point refuses bad input with a Python exception,
keeps errno on OS errors, and returns the plain types the stub declares."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from tests.conftest import NetNS
from twfix import _twfix


def test_probe_bind_returns_the_errno(netns: NetNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        assert _twfix.probe_bind(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", port, 0) == errno.EADDRINUSE
        free = _twfix.probe_bind(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0, _twfix.F_BIND_NO_PORT)
        assert free == 0
    assert _twfix.probe_bind(socket.AF_INET, socket.SOCK_STREAM, "192.0.2.1", 0, 0) == errno.EADDRNOTAVAIL
    with pytest.raises(ValueError, match="not an IP address"):
        _twfix.probe_bind(socket.AF_INET, socket.SOCK_STREAM, "localhost", 0, 0)
    with pytest.raises(ValueError, match="flag"):
        _twfix.probe_bind(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0, 1 << 20)


def test_sysctl_names_and_reads() -> None:
    assert _twfix.sysctl_key("net.ipv4.tcp_fin_timeout") == (
        "net.ipv4.tcp_fin_timeout",
        "/proc/sys/net/ipv4/tcp_fin_timeout",
    )
    ((key, raw, error),) = _twfix.read_sysctls(["net.ipv4.tcp_fin_timeout"])
    assert key == "net.ipv4.tcp_fin_timeout"
    assert raw is not None
    assert raw.strip().isdigit()
    assert error is None
    with pytest.raises(ValueError):
        _twfix.sysctl_key("../../etc/passwd")


def test_dumps_and_owners(netns: NetNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        assert _twfix.netlink_discard("tcp", 1 << 10, True) == 1  # the listener, nothing else here
        ((family, ip, got),) = _twfix.listeners_in("tcp", port)
        assert (family, ip, got) == (socket.AF_INET, "127.0.0.1", port)
        inode = os.fstat(srv.fileno()).st_ino
        found, denied, skipped, skipped_fds = _twfix.socket_owners([inode])
        assert (inode, os.getpid(), srv.fileno()) in found
        assert denied == 0
        # Left out once the owner is known: only processes over 4,096 descriptors (another test's, under xdist).
        assert skipped_fds >= skipped * 4097
    with pytest.raises(ValueError):
        _twfix.netlink_discard("sctp", 0)


def test_proc_net_names_are_checked() -> None:
    (text,) = _twfix.read_proc_net(["sockstat"])
    assert text is not None
    assert text.startswith("sockets:")
    for bad in ("../stat", "", ".hidden"):
        with pytest.raises(ValueError, match="/proc/net file name"):
            _twfix.read_proc_net([bad])


def test_rename_at_keeps_errno(tmp_path: object) -> None:
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError) as info:
            _twfix.rename_at(fd, "missing", "other")
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(fd)
