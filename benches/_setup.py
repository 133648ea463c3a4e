"""Shared set-up of the benchmarks: a private network namespace, a populated table, best-of timing."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

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


_NETLINK_SOCK_DIAG = 4
_TCPDIAG_GETSOCK = 18
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST_DUMP = 0x1 | 0x300


def raw_one_walk(states: int = 0xFFF) -> int:
    """The floor, written here and not by twfix: one TCPDIAG_GETSOCK dump (both families in one walk of
    the established hash) for ``states``, received and discarded. Returns the bytes received.

    0xFFF asks for TCP states 0..11, as `ss` does without BOUND_INACTIVE (bit 13 would add a walk of the
    bind hash, which every namespace of the host shares). Each datagram's last 20 bytes are checked for
    the NLMSG_DONE message of this request; nothing else is parsed."""
    seq = 0x7E57
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    with sock:
        header = struct.pack("=IHHII", 16 + 60, _TCPDIAG_GETSOCK, _NLM_F_REQUEST_DUMP, seq, 0)
        sock.send(header + struct.pack("=BBBB", socket.AF_INET, 0, 0, 0) + bytes(48) + struct.pack("=II", states, 0))
        buf = bytearray(1 << 16)
        received = 0
        while True:
            n = sock.recv_into(buf)
            received += n
            if n >= 16 and struct.unpack_from("=H", buf, 4)[0] == _NLMSG_ERROR:
                raise OSError("the kernel refused the dump request")
            if n >= 20:
                length, kind, _flags, got = struct.unpack_from("=IHHI", buf, n - 20)
                if length == 20 and kind == _NLMSG_DONE and got == seq:
                    return received


FLOOR = "floor: raw one walk (0xFFF)"


class Paired(NamedTuple):
    """Best wall and CPU seconds of a measurement, and its median ratios to the floor measured just before
    and just after it in the same round."""

    wall: float
    cpu: float
    wall_ratio: float
    cpu_ratio: float


def _clock(fn: Callable[[], object]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def paired(
    fns: dict[str, Callable[[], object]], rounds: int, floor: Callable[[], object] = raw_one_walk
) -> dict[str, Paired]:
    """Each function between two runs of the floor, round after round: its ratio is taken against the mean of
    its two neighbours. A table of TIME-WAIT shrinks while it is measured (every socket leaves 60 s after it
    came; at 900,000 sockets that is thousands per second), so only adjacent measurements compare."""
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    wall_ratios: dict[str, list[float]] = {name: [] for name in fns}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in fns}
    floors: list[tuple[float, float]] = []
    for _ in range(rounds):
        before = _clock(floor)
        floors.append(before)
        for name, fn in fns.items():
            wall, cpu = _clock(fn)
            after = _clock(floor)
            floors.append(after)
            walls[name].append(wall)
            cpus[name].append(cpu)
            wall_ratios[name].append(wall / ((before[0] + after[0]) / 2))
            cpu_ratios[name].append(cpu / max((before[1] + after[1]) / 2, 1e-9))
            before = after
    best_floor = Paired(min(w for w, _ in floors), min(c for _, c in floors), 1.0, 1.0)
    return {FLOOR: best_floor} | {
        name: Paired(
            min(walls[name]), min(cpus[name]), statistics.median(wall_ratios[name]), statistics.median(cpu_ratios[name])
        )
        for name in fns
    }


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of each function, the functions run one after the other in every round; CPU
    is user+system of the whole process, every thread included (time.process_time)."""
    best_of = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = _clock(fn)
            best_of[name] = (min(best_of[name][0], wall), min(best_of[name][1], cpu))
    return best_of


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
