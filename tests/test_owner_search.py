"""The owner search looks where owners are first: the socket's own namespace, ordinary processes; big
processes and other namespaces only while an owner is missing, and it says what it left out."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import twfix
from tests.conftest import NetNS

# Holds `n` descriptors (duplicates of /dev/null) and, with "listen", a listener on a free port.
HOLDER = """
import os, resource, socket, sys, ctypes
n, listen, leave = int(sys.argv[1]), sys.argv[2] == "listen", sys.argv[3] == "leave"
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
null = os.open("/dev/null", os.O_RDONLY)
fds = [os.dup(null) for _ in range(n)]
s = socket.create_server(("127.0.0.1", 0)) if listen else None
if leave:  # keep the socket, move to a namespace of its own (setns after creation, as some tools do)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.unshare(0x40000000) == 0
print(s.getsockname()[1] if s else 0, flush=True)
sys.stdin.readline()
"""


@contextmanager
def holder(fds: int, listen: bool = False, leave: bool = False) -> Iterator[tuple[int, int]]:
    args = [sys.executable, "-c", HOLDER, str(fds), "listen" if listen else "none", "leave" if leave else "stay"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.pid, int(proc.stdout.readline())
    finally:
        proc.communicate("done\n", timeout=30)


def test_a_big_process_is_left_out_once_the_owner_is_found_and_said_so(netns: NetNS) -> None:
    with holder(0, listen=True) as (small, port), holder(6000) as (_big, _):
        found = twfix.who_holds(port)
        assert [h.pid for h in found.holders] == [small]
        assert found.note is not None
        assert "more than 4096 descriptors" in found.note


def test_a_big_process_that_is_the_only_owner_is_still_found(netns: NetNS) -> None:
    with holder(6000, listen=True) as (big, port):
        found = twfix.who_holds(port)
        assert [h.pid for h in found.holders] == [big]
        assert found.note is None


def test_an_owner_that_moved_to_another_namespace_is_found(netns: NetNS) -> None:
    with holder(0, listen=True, leave=True) as (moved, port):
        found = twfix.who_holds(port)
        assert [h.pid for h in found.holders] == [moved]
        why = twfix.explain(port, "127.0.0.1")
        assert f"pid {moved}" in why.verdict


# A root master whose forked worker drops to uid 65534, keeps the listener and opens 200 descriptors (as
# nginx's workers do; a socket-activated service under systemd looks the same: a child of the holder).
PREFORK = """
import ctypes, os, socket, sys
s = socket.create_server(("127.0.0.1", 0))
pid = os.fork()
if pid == 0:
    os.setgid(65534)
    os.setuid(65534)
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0, as setuid() leaves it where suid_dumpable=0
    null = os.open("/dev/null", os.O_RDONLY)
    fds = [os.dup(null) for _ in range(200)]
    print(s.getsockname()[1], os.getpid(), flush=True)
sys.stdin.readline()
"""


def test_other_users_busy_processes_wait_but_a_dropped_privilege_worker_is_found(netns: NetNS) -> None:
    """Processes of other users than the socket's are searched first only while small: an unrelated
    500-descriptor process of uid 65534 is not read once the owner is known; a 200-descriptor worker that
    inherited the listener after setuid() is found through its parent, a holder."""
    crowd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", HOLDER]
    other = subprocess.Popen([*crowd, "500", "none", "stay"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    master = subprocess.Popen([sys.executable, "-c", PREFORK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        assert master.stdout is not None
        assert other.stdout.readline().strip() == "0"
        port, worker = map(int, master.stdout.readline().split())
        found = twfix.who_holds(port)
        assert {p.pid for p in found.holders[0].processes} == {master.pid, worker}
        assert found.note is None  # nothing that could hold it was left out
        # Not dumpable: the files inside /proc/PID turn to root, the directory keeps the process's user (which
        # is what the search reads to tell users apart).
        assert (os.stat(f"/proc/{worker}").st_uid, os.stat(f"/proc/{worker}/fd").st_uid) == (65534, 0)
    finally:
        other.communicate("done\n", timeout=30)
        master.communicate("done\n", timeout=30)
