"""A neighbour on the same host: churns the ephemeral ports (bind(0), held a few milliseconds) and binds
explicit port numbers of a given span (a portpicker user, a hard-coded port, another user's suite), each
held a few milliseconds. Runs until killed, at most ``--seconds``."""

import argparse
import socket
import time

parser = argparse.ArgumentParser()
parser.add_argument("--ephemeral", type=int, default=0, help="bind(0) sockets held at once")
parser.add_argument("--explicit", default="", help="LOW-HIGH: explicit port numbers to bind")
parser.add_argument("--seconds", type=float, default=300)
args = parser.parse_args()
low, _, high = args.explicit.partition("-")
explicit = range(int(low), int(high) + 1) if low else range(0)
deadline = time.monotonic() + args.seconds
print("ready", flush=True)
while time.monotonic() < deadline:
    held = []
    for _ in range(args.ephemeral):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", 0))
            held.append(s)
        except OSError:
            s.close()
    for port in explicit:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            held.append(s)
        except OSError:
            s.close()
    time.sleep(0.004)
    for s in held:
        s.close()
    time.sleep(0.001)
