"""Per-port cost of twfix's port fixture against the usual helpers, in one run.

    pip install pytest-asyncio portpicker     # the peers; each is skipped with a note when missing
    python benches/bench_ports.py [--ports 2000] [--repeat 7]

Goal: a twfix port (reserve + release, race-free; a TCP port is held in the kernel by a bound socket
until released) costs at most 3x pytest-asyncio's ``unused_tcp_port`` (bind port 0, close, return the
number: racy), in wall and in CPU time. An unheld port (``hold=False``) and portpicker's
``pick_unused_port`` are shown for reference.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from twfix.ports import PortPool


def per_port(fn: Callable[[], object], ports: int, repeat: int) -> tuple[float, float]:
    """Best (wall, CPU) seconds per call over ``repeat`` rounds of ``ports`` calls."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(ports):
            fn()
        wall = min(wall, (time.perf_counter() - t0) / ports)
        cpu = min(cpu, (time.process_time() - c0) / ports)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    pool = PortPool()

    def twfix_port() -> None:
        pool.release(pool.reserve("tcp"))

    def twfix_unheld() -> None:
        pool.release(pool.reserve("tcp", hold=False))

    results: dict[str, tuple[float, float]] = {}
    try:
        import socket

        from pytest_asyncio.plugin import _unused_port  # what unused_tcp_port calls

        results["pytest-asyncio unused_tcp_port"] = per_port(
            lambda: _unused_port(socket.SOCK_STREAM), args.ports, args.repeat
        )
    except ImportError:
        print("pytest-asyncio is not installed: skipped")
    try:
        import portpicker

        # portpicker checks TCP and UDP and may ask a portserver; bounded to fewer ports (it is slower).
        results["portpicker pick_unused_port"] = per_port(
            portpicker.pick_unused_port, max(50, args.ports // 10), max(3, args.repeat // 2)
        )
    except ImportError:
        print("portpicker is not installed: skipped")
    results["twfix port (reserve + release)"] = per_port(twfix_port, args.ports, args.repeat)
    results["twfix unheld (hold=False)"] = per_port(twfix_unheld, args.ports, args.repeat)
    pool.close()
    print(f"{'':<34} {'wall us':>9} {'CPU us':>9}  per port")
    for name, (wall, cpu) in results.items():
        print(f"{name:<34} {wall * 1e6:>9.2f} {cpu * 1e6:>9.2f}")
    base = results.get("pytest-asyncio unused_tcp_port")
    if base:
        ours = results["twfix port (reserve + release)"]
        for i, what in enumerate(("wall", "CPU")):
            ratio = ours[i] / base[i]
            print(f"twfix / pytest-asyncio ({what})  {ratio:.2f}  <= 3  {'ok' if ratio <= 3 else 'MISSED'}")


if __name__ == "__main__":
    main()
