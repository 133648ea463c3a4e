"""The command line's grammar: the argparse parser of every twfix command, with usage errors that print
the subcommand's own usage and suggest a command for a typo, and the argument types (ports as ASCII digits,
IP literals). Private to ``twfix.cli``."""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import re
from collections.abc import Sequence
from typing import Any, Final, cast

from twfix._text import printable

__all__ = ["Parser", "UsageError", "build_parser", "ip_arg", "port_arg", "reserve_arg"]


class UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(f"{parser.prog}: error: {message}")
        self.parser = parser


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        # "invalid choice: 'doctr'": say which command was meant (argparse does so itself only from 3.12).
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = [c.strip().strip("'") for c in found.group(2).split(",")]
            close = difflib.get_close_matches(found.group(1), choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        raise UsageError(self, message)


def _all_netns_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all-netns", action="store_true", help="every network namespace of the host (root)")
    p.add_argument(
        "--detail",
        type=int,
        default=3,
        metavar="N",
        help="with --all-netns: the N busiest namespaces get a full report (3); the rest, counters",
    )


def _namespace_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--netns", metavar="PATH", help="read another network namespace (e.g. /run/netns/NAME)")
    where.add_argument("--pid", type=int, metavar="PID", help="read the network namespace of process PID")


COMMANDS: Final = ("doctor", "summary", "sockets", "who", "explain", "wait", "watch", "metrics", "sysctl", "tune")


class _Skipped:
    """Stands in for the parser of a command the command line does not name: its options are not built."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        pass

    def add_mutually_exclusive_group(self, **kwargs: object) -> _Skipped:
        return self


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given arguments that start with a command, only that command's parser is
    built (each costs about 0.3 ms, most of it argparse asking gettext for translations); otherwise
    (``--help``, ``-V``, a typo) all of them."""
    # Only when the command comes first: `twfix -h who` is the top-level help, which lists every command.
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = Parser(prog="twfix", description="TIME-WAIT, port and address-reuse diagnostics for Linux.")
    parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return cast(argparse.ArgumentParser, _Skipped())
        return sub.add_parser(name, help=helptext)

    p = command("doctor", "check this host's TIME-WAIT and port situation")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.add_argument(
        "--fail-on",
        choices=("warning", "error"),
        default="warning",
        help="exit 1 when a finding reaches this severity (default: warning)",
    )
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)
    _all_netns_options(p)
    _namespace_options(p)

    p = command("summary", "counts by state, top ports and peers, TIME-WAIT ages (like ss -s)")
    p.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    p.add_argument("--top", type=int, default=5, metavar="N", help="ports and peers shown per state (default 5)")
    p.add_argument("--json", action="store_true")
    _all_netns_options(p)
    _namespace_options(p)

    p = command("sockets", "list sockets (like ss), with filters")
    p.add_argument("-u", "--udp", action="store_true", help="UDP instead of TCP")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const="4", help="IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const="6", help="IPv6 only")
    p.add_argument("-l", "--listening", action="store_true", help="listening (TCP) or unconnected (UDP) only")
    p.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help="filter by state, ss names accepted (estab, time-wait, close-wait, syn-sent, unconn, ...); repeatable",
    )
    p.add_argument("--sport", type=port_arg, metavar="PORT", help="local port")
    p.add_argument("--dport", type=port_arg, metavar="PORT", help="peer port")
    p.add_argument("--src", type=ip_arg, metavar="IP", help="local address")
    p.add_argument("--dst", type=ip_arg, metavar="IP", help="peer address")
    p.add_argument("-p", "--processes", action="store_true", help="show the processes holding each socket")
    p.add_argument("--count", action="store_true", help="print only the number of matching sockets")
    p.add_argument("--json", action="store_true")
    _namespace_options(p)

    p = command("who", "who holds a port: processes first, kernel-owned sockets counted")
    p.add_argument("port", type=port_arg)
    p.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    p.add_argument(
        "--connections",
        action="store_true",
        help="on a port with a listener, count its connections and TIME-WAIT too (walks the whole table)",
    )
    p.add_argument("--all", action="store_true", help="list every socket, one per line (implies --connections)")
    p.add_argument("--json", action="store_true")
    _namespace_options(p)

    for name, helptext in (
        ("explain", "why a bind of PORT fails (exit 0: it would succeed)"),
        ("wait", "wait until a bind of PORT would succeed (for restart scripts and CI)"),
    ):
        p = command(name, helptext)
        p.add_argument("port", type=port_arg)
        p.add_argument("--host", default="", help="the local address (default: the IPv4 wildcard)")
        p.add_argument("--udp", action="store_true", help="UDP instead of TCP")
        p.add_argument("--dualstack", action="store_true", help="one IPv6 socket that also accepts IPv4")
        if name == "explain":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds (60)")
            p.add_argument(
                "--reuse",
                action="store_true",
                help="a bind with SO_REUSEADDR (SO_REUSEPORT for UDP) is enough, as twfix.reusable_tcp_server does",
            )
        _namespace_options(p)

    p = command("watch", "sample counts per state, the TIME-WAIT rate and top ports over time")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between samples (1)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds to watch (60)")
    p.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    p.add_argument("--json", action="store_true", help="the samples as JSON records at the end")
    _namespace_options(p)

    p = command("metrics", "Prometheus metrics for this namespace, or every one on the host")
    p.add_argument("--all-netns", action="store_true", help="every network namespace of the host (root)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="ports and destinations per namespace (10)")
    p.add_argument(
        "--detail",
        type=int,
        default=1,
        metavar="N",
        help="namespaces (busiest by TIME-WAIT) that get a full table walk (1); the rest get counters",
    )
    p.add_argument("--budget", type=float, default=10.0, metavar="S", help="seconds a collection may take (10)")
    p.add_argument(
        "--max-netns",
        type=int,
        default=200,
        metavar="N",
        help="namespaces per scrape, busiest first (200); the rest are counted in twfix_netns_truncated",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--textfile", metavar="PATH", help="write atomically for node_exporter's textfile collector")
    out.add_argument("--serve", metavar="[HOST:]PORT", help="serve /metrics (HOST defaults to 127.0.0.1)")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)

    p = command("sysctl", "the kernel knobs that matter, with explanations")
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="full (net.ipv4.tcp_fin_timeout) or short (tcp_fin_timeout)"
    )
    p.add_argument("--json", action="store_true")
    _namespace_options(p)

    p = command("tune", "print (or write, or apply) recommended sysctl changes")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write the snippet to PATH atomically")
    group.add_argument("--apply", action="store_true", help="set the values now (root only)")
    p.add_argument(
        "--reserve",
        nargs="+",
        type=reserve_arg,
        metavar="PORT",
        help="also reserve these ports (or 'all' listeners the plan leaves out as kernel-chosen) in "
        "ip_local_reserved_ports",
    )
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)
    _namespace_options(p)
    parser.subcommands = dict(sub.choices)  # type: ignore[attr-defined]  # each one's usage for its errors
    return parser


def port_arg(text: str) -> int:
    if not (text.isascii() and text.isdigit()):  # int() also takes "٨٠" (Arabic-Indic 80) and " 80"
        raise argparse.ArgumentTypeError(f"port must be an integer in 0..65535 (ASCII digits), got {printable(text)!r}")
    value = int(text, 10)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def reserve_arg(text: str) -> int | str:
    return "all" if text == "all" else port_arg(text)


def ip_arg(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
