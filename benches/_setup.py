"""Shared set-up of the benchmarks: a private network namespace, a populated table, best-of timing."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct
import sys
import time
from collections.abc import Callable

import twfix

CLONE_NEWNET = 0x40000000


def private_namespace() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit(f"unshare(CLONE_NEWNET) failed ({os.strerror(ctypes.get_errno())}): run as root")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), 0x8913, req))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"lo", flags | 1))


def write_sysctl(name: str, value: str) -> None:
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(value + "\n")


def populate(count: int, servers: int = 32, seconds: float = 120) -> list[socket.socket]:
    """About `count` server-side TIME-WAIT sockets spread over `servers` listening ports (bounded loop)."""
    listeners = [twfix.reusable_tcp_server(0, "127.0.0.1", backlog=1024) for _ in range(servers)]
    deadline = time.monotonic() + seconds
    made = 0
    while made < count and time.monotonic() < deadline:
        for srv in listeners:
            addr = srv.getsockname()
            batch = min(256, count - made)
            if batch <= 0:
                break
            clients = [socket.create_connection(addr) for _ in range(batch)]
            accepted = [srv.accept()[0] for _ in clients]
            for a in accepted:
                a.close()
            for c in clients:
                c.close()
            made += batch
    return listeners


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
