"""What a failing constructor costs, against one kernel walk of the table, in one run.

Run as root (it makes a private network namespace for itself; loopback traffic only):

    python benches/bench_conflict.py [--count 200000] [--repeat 20]

Goals (ratios measured in the same run):
  listener case    a constructor failing because a live listener holds the port costs the same with a full
                   table as with an empty one, and at most 0.1x one kernel walk of the full table (the
                   listen-only dump skips the established hash)
  TIME-WAIT case   a constructor failing because of TIME-WAIT costs at most 1.3x one kernel walk
  explain=False    the kernel's word only: the cost of a failing stdlib bind
"""

from __future__ import annotations

import argparse
import socket

import twfix
from _setup import best, populate, private_namespace, write_sysctl
from twfix import _twfix


def failing(port: int, **kwargs: object) -> None:
    try:
        twfix.reusable_tcp_server(port, "127.0.0.1", **kwargs).close()  # type: ignore[arg-type]
    except twfix.AddressInUseError:
        return
    raise SystemExit(f"port {port} was expected to be in use")


def stdlib_failing(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return


def time_wait_without_reuseaddr() -> int:
    """A port blocked only by TIME-WAIT of a server that did not set SO_REUSEADDR."""
    old = socket.socket()
    old.bind(("127.0.0.1", 0))
    old.listen()
    port = old.getsockname()[1]
    for _ in range(4):
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = old.accept()
        conn.close()
        client.recv(1)
        client.close()
    old.close()
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    private_namespace()
    write_sysctl("net.ipv4.tcp_max_tw_buckets", str(max(args.count * 2, 262144)))
    holder = twfix.reusable_tcp_server(0, "127.0.0.1")
    held = holder.getsockname()[1]
    walk = lambda: _twfix.netlink_discard("tcp", 0xFFFFFFFF, True)  # noqa: E731
    empty_walk = best(walk, args.repeat)
    empty_listener = best(lambda: failing(held), args.repeat)

    listeners = populate(args.count)
    tw_port = time_wait_without_reuseaddr()
    tw = twfix.summary().by_state.get(twfix.TcpState.TIME_WAIT, 0)
    full_walk = best(walk, args.repeat)
    full_listener = best(lambda: failing(held), args.repeat)
    full_tw = best(lambda: failing(tw_port), max(3, args.repeat // 4))
    quiet = best(lambda: failing(held, explain=False), args.repeat)
    stdlib = best(lambda: stdlib_failing(held), args.repeat)
    assert twfix.explain(tw_port, "127.0.0.1").cause == "time-wait-server"

    print(f"table: {tw} TIME-WAIT")
    rows = [
        ("one kernel walk, empty table", empty_walk),
        ("one kernel walk, full table", full_walk),
        ("failing constructor, listener, empty table", empty_listener),
        ("failing constructor, listener, full table", full_listener),
        ("failing constructor, TIME-WAIT, full table", full_tw),
        ("failing constructor, explain=False", quiet),
        ("failing stdlib bind", stdlib),
    ]
    for name, secs in rows:
        print(f"{name:<46} {secs * 1000:>10.3f} ms")
    goals = [
        ("listener: full / empty table", full_listener / empty_listener, "<=", 1.5),
        ("listener / one walk (full)", full_listener / full_walk, "<=", 0.1),
        ("TIME-WAIT / one walk (full)", full_tw / full_walk, "<=", 1.3),
    ]
    print()
    for name, value, op, goal in goals:
        print(f"{name:<32} {value:>8.3f}  {op} {goal}  {'ok' if value <= goal else 'MISSED'}")
    for s in [*listeners, holder]:
        s.close()


if __name__ == "__main__":
    main()
