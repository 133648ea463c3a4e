"""Per-port cost of twfix's port fixture against the usual helpers, in one run.

    pip install pytest-asyncio portpicker     # the peers; each is skipped with a note when missing
    python benches/bench_ports.py [--ports 2000] [--repeat 7]

Goal: a twfix port (reserve + release, race-free) costs at most 3x pytest-asyncio's ``unused_tcp_port``
(bind port 0, close, return the number: racy). portpicker's ``pick_unused_port`` is shown for reference.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from twfix.ports import PortPool


def per_port(fn: Callable[[], object], ports: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(ports):
            fn()
        best = min(best, (time.perf_counter() - t0) / ports)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    pool = PortPool()

    def twfix_port() -> None:
        pool.release(pool.reserve("tcp"))

    results: dict[str, float] = {}
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
    pool.close()
    for name, secs in results.items():
        print(f"{name:<34} {secs * 1e6:>9.2f} us per port")
    base = results.get("pytest-asyncio unused_tcp_port")
    if base:
        ratio = results["twfix port (reserve + release)"] / base
        print(f"\ntwfix / pytest-asyncio  {ratio:.2f}  <= 3  {'ok' if ratio <= 3 else 'MISSED'}")


if __name__ == "__main__":
    main()
