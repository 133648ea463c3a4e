"""The ``twfix`` command line: ``doctor``, ``sysctl``, ``tune``, ``sockets``, ``who``, ``explain``.

``main(argv)`` returns the exit status: 0 when nothing reaches the threshold (doctor) or on success,
1 when something does, 2 on a usage error. Errors are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import twfix
from twfix import diag, sysctl, tune
from twfix._text import printable
from twfix.conflict import explain
from twfix.doctor import Severity, doctor
from twfix.errors import TwfixError


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise _UsageError(f"{self.prog}: error: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="twfix", description="TIME-WAIT, port and address-reuse diagnostics for Linux.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("doctor", help="check this host's TIME-WAIT and port situation")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.add_argument(
        "--fail-on",
        choices=("warning", "error"),
        default="warning",
        help="exit 1 when a finding reaches this severity (default: warning)",
    )
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)

    p = sub.add_parser("sysctl", help="the kernel knobs that matter, with explanations")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tune", help="print (or write, or apply) recommended sysctl changes")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write the snippet to PATH atomically")
    group.add_argument("--apply", action="store_true", help="set the values now (root only)")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)

    for name, helptext in (("sockets", "list sockets"), ("who", "who holds a port"), ("explain", "why a bind fails")):
        p = sub.add_parser(name, help=helptext)
        if name != "sockets":
            p.add_argument("port", type=_port_arg)
        if name == "explain":
            p.add_argument("--host", default="")
        if name == "sockets":
            p.add_argument("--state", action="append", metavar="STATE", help="filter by state (repeatable)")
            p.add_argument("--port", type=_port_arg)
        p.add_argument("--json", action="store_true")
        p.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    return parser


def _port_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def _colour(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _dump(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    report = doctor(root=args.root)
    if args.json:
        _dump(report.to_dict(), out)
    else:
        out.write(report.render(colour=_colour(out)) + "\n")
    return 1 if report.reaches(Severity(args.fail_on)) else 0


def _cmd_sysctl(args: argparse.Namespace, out: TextIO) -> int:
    table = sysctl.read(args.names or None)
    if args.json:
        _dump(table.to_dict(), out)
    else:
        out.write(str(table) + "\n")
    return 0


def _cmd_tune(args: argparse.Namespace, out: TextIO) -> int:
    plan = tune.plan(root=args.root)
    if args.write is not None:
        written = tune.write(plan, args.write)
        out.write(
            f"wrote {written.path}" + (f" (previous version kept as {written.backup})" if written.backup else "") + "\n"
        )
        return 0
    if args.apply:
        for change in tune.apply(plan):
            out.write(f"{change.name}: {change.before} -> {change.after}\n")
        return 0
    out.write(plan.snippet())
    return 0


def _cmd_sockets(args: argparse.Namespace, out: TextIO) -> int:
    entries = diag.sockets("udp" if args.udp else "tcp", states=args.state, port=args.port)
    if args.json:
        _dump([e.to_dict() for e in entries], out)
        return 0
    for e in entries:
        raddr = str(e.raddr) if e.raddr else "*"
        expires = f" {e.expires:.1f}s" if e.expires is not None else ""
        out.write(f"{e.state:<13} {e.laddr!s:<28} {raddr:<28} uid={e.uid}{expires}\n")
    return 0


def _cmd_who(args: argparse.Namespace, out: TextIO) -> int:
    holders = diag.who_holds(args.port, kind="udp" if args.udp else "tcp")
    if args.json:
        _dump(holders.to_dict(), out)
    else:
        out.write(str(holders) + "\n")
    return 0


def _cmd_explain(args: argparse.Namespace, out: TextIO) -> int:
    explanation = explain(args.port, args.host, kind="udp" if args.udp else "tcp")
    if args.json:
        _dump(explanation.to_dict(), out)
    else:
        out.write(str(explanation) + "\n")
    return 0


_COMMANDS = {
    "doctor": _cmd_doctor,
    "sysctl": _cmd_sysctl,
    "tune": _cmd_tune,
    "sockets": _cmd_sockets,
    "who": _cmd_who,
    "explain": _cmd_explain,
}


def _tolerant(stream: TextIO | None) -> TextIO | None:
    """Characters the stream's encoding cannot show are written as escapes, not raised as errors
    (a non-ASCII command line of another process on an ASCII terminal is not the user's mistake)."""
    if isinstance(stream, io.TextIOWrapper):
        with contextlib.suppress(ValueError, io.UnsupportedOperation):  # a closed stream is dealt with below
            stream.reconfigure(errors="backslashreplace")
    return stream


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status instead of exiting.

    Exit status: 0 success, 1 the command's own negative answer or an error while running it, 2 a usage
    error. Output that cannot be written (a closed standard output, a reader that went away as in
    ``twfix sockets | head``) ends the command quietly, never with a traceback.
    """
    out = _tolerant(out or sys.stdout)
    err = _tolerant(err or sys.stderr) or io.StringIO()
    if out is None or out.closed:
        err.write("twfix: standard output is closed; nothing to write to\n")
        return 1
    try:
        return _run(argv, out, err)
    except BrokenPipeError:
        _silence(out)
        return 0


def _silence(out: TextIO) -> None:
    """After a reader went away: point the descriptor at /dev/null so the interpreter's final flush of
    the same pipe does not raise again (as the Python documentation recommends for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)


def _run(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        parser.print_usage(err)
        err.write(f"{exc}\n")
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.version:
        out.write(f"twfix {twfix.__version__}\n")
        return 0
    if args.command is None:
        parser.print_help(err)
        return 2
    try:
        status = _COMMANDS[args.command](args, out)
        out.flush()
        return status
    except BrokenPipeError:
        raise
    except (ValueError, TypeError) as exc:
        err.write(f"twfix {args.command}: error: {printable(exc)}\n")
        return 2
    except (TwfixError, OSError, LookupError, NotImplementedError) as exc:
        err.write(f"twfix {args.command}: {printable(exc)}\n")
        return 1
    except KeyboardInterrupt:
        return 130
