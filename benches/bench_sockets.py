"""Constructor cost against the hand-written stdlib sequence, measured in the same run.

Run: unshare -n sh -c "ip link set lo up && python benches/bench_sockets.py"
Goal (issue: foundation): each constructor at most 1.2x the stdlib's time per socket.
Each variant creates, binds and closes a socket; the stdlib variants do exactly what the
constructor replaces (socket, setsockopt, bind, listen where applicable).
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Callable

import twfix

SOL, REUSEADDR = socket.SOL_SOCKET, socket.SO_REUSEADDR


def stdlib_udp() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.close()


def twfix_udp() -> None:
    twfix.reusable_udp(0, "127.0.0.1").close()


def stdlib_tcp_server() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(SOL, REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    s.close()


def twfix_tcp_server() -> None:
    twfix.reusable_tcp_server(0, "127.0.0.1").close()


def stdlib_tcp6_server() -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(SOL, REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::1", 0))
    s.listen(128)
    s.close()


def twfix_tcp6_server() -> None:
    twfix.reusable_tcp_server(0, "::1").close()


def stdlib_make_reusable() -> None:
    s = socket.socket()
    s.setsockopt(SOL, REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.close()


def twfix_make_reusable() -> None:
    s = twfix.make_reusable(socket.socket())
    s.bind(("127.0.0.1", 0))
    s.close()


def per_call(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(pairs: list[tuple[str, Callable[[], None], Callable[[], None]]], n: int, rounds: int) -> None:
    print(f"{'constructor':<22} {'stdlib us':>10} {'twfix us':>10} {'ratio':>7}  goal <= 1.20")
    for name, base, ours in pairs:
        base_t, ours_t = [], []
        for _ in range(rounds):  # interleave to cancel drift
            base_t.append(per_call(base, n))
            ours_t.append(per_call(ours, n))
        # The minimum is the least noisy estimate of the cost (other load only ever adds time).
        b, o = min(base_t), min(ours_t)
        verdict = "ok" if o / b <= 1.2 else "SLOWER THAN GOAL"
        print(f"{name:<22} {b * 1e6:>10.2f} {o * 1e6:>10.2f} {o / b:>7.2f}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    pairs = [
        ("reusable_udp", stdlib_udp, twfix_udp),
        ("reusable_tcp_server", stdlib_tcp_server, twfix_tcp_server),
        ("reusable_tcp_server v6", stdlib_tcp6_server, twfix_tcp6_server),
        ("make_reusable", stdlib_make_reusable, twfix_make_reusable),
    ]
    for _, base, ours in pairs:  # warm up
        per_call(base, 200)
        per_call(ours, 200)
    measure(pairs, args.calls, args.rounds)


if __name__ == "__main__":
    main()
