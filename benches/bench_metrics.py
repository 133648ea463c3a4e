"""What a metrics scrape costs against one kernel walk of the table, with many namespaces, in one run.

Run as root (it makes its namespaces itself, named twfix-bench-N, and deletes them; loopback only):

    pip install 'twfix[metrics]'
    python benches/bench_metrics.py [--namespaces 50] [--count 200000] [--seconds 100]

Goals (ratios to the floor, wall and CPU, each scrape between two runs of the floor, round after round):
  --all-netns scrape   <= 1.5x (counters for every namespace, one detailed walk)
  one-namespace scrape <= 1.3x
The floor is `_setup.raw_one_walk()` (written for the benchmark, not twfix's dump). Every namespace's dump
walks the host's one shared established hash, so the floor is measured once with the whole table in place.
TIME-WAIT lasts 60 s: the table holds what the populating loop makes within about a minute, so the count
reached is printed next to the count asked for.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import socket
import subprocess
import threading
import time

import twfix
from _setup import paired, private_namespace
from twfix import metrics

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def enter(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def populate_in(name: str, count: int, deadline: float, made: list[int]) -> None:
    """In this thread only: join `name`, bring lo up, make up to `count` server-side TIME-WAITs."""
    enter(name)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the child inherits this thread's namespace
    # /proc/sys/net follows the namespace of the thread that opens the file.
    with open("/proc/sys/net/ipv4/tcp_max_tw_buckets", "w") as f:
        f.write(f"{max(count * 2, 262144)}\n")
    srv = twfix.reusable_tcp_server(0, "127.0.0.1", backlog=1024)
    done = 0
    while done < count and time.monotonic() < deadline:
        batch = min(128, count - done)
        clients = [socket.create_connection(srv.getsockname()) for _ in range(batch)]
        for a in [srv.accept()[0] for _ in clients]:
            a.close()
        for c in clients:
            c.close()
        done += batch
    srv.close()
    made.append(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=100.0, help="populating stops after this long")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    private_namespace()  # the benchmark's own namespace, one more among them
    names = [f"twfix-bench-{i}" for i in range(args.namespaces)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        made: list[int] = []
        per = args.count // args.namespaces
        deadline = time.monotonic() + args.seconds
        t0 = time.monotonic()
        # Two workers at a time (two cores): each thread joins its own namespace.
        for i in range(0, len(names), 2):
            threads = [threading.Thread(target=populate_in, args=(n, per, deadline, made)) for n in names[i : i + 2]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        built = time.monotonic() - t0
        enter(names[0])  # the one-namespace scrape reads a busy namespace
        times = paired(
            {
                "scrape, one namespace": lambda: metrics.exposition(),
                "scrape, --all-netns (detail 1)": lambda: metrics.exposition(all_netns=True, detail=1),
            },
            args.repeat,
        )
        text = metrics.exposition(all_netns=True, detail=1)
        tw = sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("twfix_netns_tcp_time_wait{")
        )
        print(
            f"{args.namespaces} namespaces, {int(tw)} TIME-WAIT in all (asked {args.count}, made {sum(made)} "
            f"in {built:.0f} s; TIME-WAIT lasts 60 s)"
        )
        print(f"{'':<34} {'wall ms':>9} {'x floor':>8} {'CPU ms':>9} {'x floor':>8}")
        for label, r in times.items():
            print(f"{label:<34} {r.wall * 1e3:>9.1f} {r.wall_ratio:>8.2f} {r.cpu * 1e3:>9.1f} {r.cpu_ratio:>8.2f}")
        print("(ms: the best round; x floor: the median of the ratios to the floor run just before and after)\n")
        for label, goal in (("scrape, --all-netns (detail 1)", 1.5), ("scrape, one namespace", 1.3)):
            r = times[label]
            ok = "ok" if max(r.wall_ratio, r.cpu_ratio) <= goal else "MISSED"
            print(f"{label:<34} wall {r.wall_ratio:>5.2f}  CPU {r.cpu_ratio:>5.2f}  <= {goal}  {ok}")
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], check=False)


if __name__ == "__main__":
    main()
