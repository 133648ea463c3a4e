"""Socket-table speed and memory against the kernel's own cost and the usual tools, in one run.

Run as root (it makes a private network namespace for itself; loopback traffic only):

    pip install psutil            # optional peer; skipped with a note when missing
    python benches/bench_diag.py [--count 200000] [--repeat 5]
    python benches/bench_diag.py --count 1000000 --servers 256    # the 1M-socket variant

Goals, printed as ratios measured in the same run:
  summary()                    <= 1.15x the one-walk TCP dump that only receives and discards (the
                               kernel's own cost, `_setup.raw_one_walk`, written here and not by twfix;
                               twfix's per-family dumps, as `ss` makes them, are shown too)
  doctor()                     <= 1.5x that one-walk dump, peak memory within 5 MB of summary()'s
  summary()                    >= 20x faster than psutil.net_connections(kind="tcp"), >= 5x than `ss -tan`
  sockets(states=[TIME_WAIT])  >= 5x faster than psutil (filtered to TIME_WAIT)
  who_holds(port, connections=True) >= 5x faster than `lsof -i :PORT` (both list every socket on the port)
  summary() peak memory        < 10 MB above the interpreter's baseline, for netlink and for the
                               /proc/net fallback (source="proc")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import twfix
from _setup import best, populate, private_namespace, raw_one_walk, write_sysctl
from twfix import _twfix


def run_cmd(argv: list[str]) -> Callable[[], object]:
    return lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def peak_memory(call: str) -> float:
    """MB by which `call` raises the peak RSS of a fresh interpreter that already imported twfix.

    The peak (VmHWM) is reset through /proc/self/clear_refs just before the call, so the figure is the
    call's own high-water mark above the resident baseline.
    """
    code = (
        "import twfix\n"
        "twfix.sockets(port=1)\n"  # warm the import and the native module
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = status('VmRSS:')\n"
        f"s = {call}\n"
        "print((status('VmHWM:') - base) / 1024, 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--processes", type=int, default=200)
    parser.add_argument("--servers", type=int, default=32, help="listening ports to spread the table over")
    args = parser.parse_args()

    private_namespace()
    write_sysctl("net.ipv4.tcp_max_tw_buckets", str(max(args.count * 2, 262144)))
    t0 = time.perf_counter()
    listeners = populate(args.count, args.servers)
    built = time.perf_counter() - t0
    summary = twfix.summary()
    tw = summary.by_state.get(twfix.TcpState.TIME_WAIT, 0)
    print(
        f"table: {summary.total} TCP sockets, {tw} TIME-WAIT (built in {built:.1f} s); machine: {os.cpu_count()} cpus"
    )

    results: dict[str, float] = {}
    results["kernel dump (netlink, discard)"] = best(lambda: _twfix.netlink_discard("tcp", 0xF7F), args.repeat)
    results["kernel dump, one walk"] = best(raw_one_walk, args.repeat)  # the independent floor (_setup.py)
    results["twfix.summary()"] = best(twfix.summary, args.repeat)
    results["twfix.doctor()"] = best(twfix.doctor, args.repeat)
    results["twfix.sockets(TIME_WAIT)"] = best(lambda: twfix.sockets(states=["TIME_WAIT"]), args.repeat)
    results["ss -tan"] = best(run_cmd(["ss", "-tan"]), args.repeat)
    try:
        import psutil
    except ImportError:
        psutil = None
        print("psutil is not installed: its comparisons are skipped (pip install psutil)")
    if psutil is not None:
        results["psutil.net_connections(tcp)"] = best(
            lambda: psutil.net_connections(kind="tcp"), max(2, args.repeat // 2)
        )
        results["psutil, TIME_WAIT only"] = best(
            lambda: [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_TIME_WAIT],
            max(2, args.repeat // 2),
        )

    port = listeners[0].getsockname()[1]
    sleepers = [subprocess.Popen(["sleep", "120"]) for _ in range(args.processes)]
    try:
        # lsof lists every socket on the port, so the listing twfix offers for that: connections=True.
        results["twfix.who_holds(port)"] = best(lambda: twfix.who_holds(port, connections=True), args.repeat)
        results["lsof -i :PORT"] = best(run_cmd(["lsof", "-n", "-P", f"-i:{port}"]), max(2, args.repeat // 2))
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    mem = peak_memory("twfix.summary()")
    mem_doctor = peak_memory("twfix.doctor()")
    mem_proc = peak_memory("twfix.summary(source='proc')")

    print(f"\n{'measurement':<32} {'best s':>10} {'per socket us':>14}")
    for name, secs in results.items():
        print(f"{name:<32} {secs:>10.4f} {secs / max(summary.total, 1) * 1e6:>14.3f}")

    def ratio(a: str, b: str) -> float | None:
        return results[a] / results[b] if a in results and b in results else None

    goals = [
        ("summary / per-family dumps", ratio("twfix.summary()", "kernel dump (netlink, discard)"), "<=", 1.15),
        ("summary / one-walk dump", ratio("twfix.summary()", "kernel dump, one walk"), "<=", 1.15),
        ("doctor / one-walk dump", ratio("twfix.doctor()", "kernel dump, one walk"), "<=", 1.5),
        ("psutil / summary", ratio("psutil.net_connections(tcp)", "twfix.summary()"), ">=", 20),
        ("ss -tan / summary", ratio("ss -tan", "twfix.summary()"), ">=", 5),
        ("psutil TW / sockets(TW)", ratio("psutil, TIME_WAIT only", "twfix.sockets(TIME_WAIT)"), ">=", 5),
        ("lsof / who_holds", ratio("lsof -i :PORT", "twfix.who_holds(port)"), ">=", 5),
    ]
    print(f"\n{'ratio':<28} {'value':>8}  goal")
    for name, value, op, goal in goals:
        if value is None:
            print(f"{name:<28} {'n/a':>8}  {op} {goal}")
            continue
        ok = value <= goal if op == "<=" else value >= goal
        print(f"{name:<28} {value:>8.2f}  {op} {goal}  {'ok' if ok else 'MISSED'}")
    print(f"{'summary() peak memory MB':<28} {mem:>8.2f}  < 10  {'ok' if mem < 10 else 'MISSED'}")
    extra = mem_doctor - mem
    print(f"{'doctor() - summary() MB':<28} {extra:>8.2f}  <= 5  {'ok' if extra <= 5 else 'MISSED'}")
    print(f"{'summary(proc) peak MB':<28} {mem_proc:>8.2f}  < 10  {'ok' if mem_proc < 10 else 'MISSED'}")
    print(
        json.dumps(
            {
                "sockets": summary.total,
                "time_wait": tw,
                "seconds": results,
                "peak_mb": {"summary": mem, "doctor": mem_doctor, "summary_proc": mem_proc},
            }
        )
    )
    for s in listeners:
        s.close()


if __name__ == "__main__":
    main()
