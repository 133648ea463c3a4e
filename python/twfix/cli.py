"""The ``twfix`` command line: doctor, summary, sockets, who, explain, wait, sysctl, tune.

``main(argv)`` returns the exit status instead of exiting. Exit status of every command: 2 for a usage
error (with that subcommand's usage on stderr); otherwise

* ``doctor``: 0 when no finding reaches ``--fail-on`` (default: warning), 1 when one does;
* ``explain``: 0 when a bind would succeed now, 1 when it would not;
* ``wait``: 0 once a bind would succeed, 1 on timeout;
* ``who``: 0 when something holds the port, 1 when nothing does (as ``lsof`` and ``fuser``);
* ``sysctl``: 0, or 1 when a named knob does not exist on this kernel;
* ``summary``, ``sockets``, ``watch``, ``tune``, ``metrics``: 0;
* any command: 1 when the kernel or a file refused what it needed (the reason on stderr), 130 on Ctrl-C.

Errors go to stderr as one line, never a traceback. Colour only on a terminal, never with ``NO_COLOR``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shutil
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, TextIO

import twfix
from twfix import _cli_args, counters, diag, netns, owners, sysctl, tune
from twfix._args import namespace_path
from twfix._text import printable
from twfix.conflict import Explanation, explain
from twfix.diag import SocketEntry
from twfix.doctor import doctor, namespace_findings
from twfix.errors import KernelCannotTellWarning, TwfixError
from twfix.findings import Severity
from twfix.watch import watch


def _colour(stream: TextIO) -> bool:
    return _isatty(stream) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):
        return False


def _width(stream: TextIO) -> int | None:
    """The terminal's width when writing to one; None (no wrapping) for pipes and files."""
    return shutil.get_terminal_size((100, 24)).columns if _isatty(stream) else None


def _write(out: TextIO, text: str) -> None:
    """Write lines, wrapped to the terminal's width (continuations indented like their line)."""
    width = _width(out)
    for line in text.splitlines():
        if width is None or len(line) <= width:
            out.write(line + "\n")
            continue
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        out.write(textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False) + "\n")


def _dump(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _ns(args: argparse.Namespace) -> dict[str, Any]:
    return {"netns": getattr(args, "netns", None), "pid": getattr(args, "pid", None)}


def _busiest(detail: int) -> list[tuple[netns.NetNamespace, counters.TcpCounters]]:
    """Every namespace with its counters, busiest first (``--all-netns``); ``detail`` must be >= 0."""
    if detail < 0:
        raise ValueError(f"--detail must be >= 0, got {detail}")
    counted = []
    for ns in netns.namespaces():
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile, or no longer a namespace
            counted.append((ns, counters.tcp(ns)))
    return sorted(counted, key=lambda pair: -(pair[1].time_wait + pair[1].inuse))


def _namespace_table(counted: list[tuple[netns.NetNamespace, counters.TcpCounters]], out: TextIO) -> None:
    rows = [["Namespace", "Process", "TCP in use", "TIME-WAIT", ""]]
    for ns, c in counted:
        who = f"{ns.pids[0]}/{printable(ns.program)}" if ns.pids else ""
        rows.append([printable(ns.label), who, str(c.inuse), str(c.time_wait), ns.container[:12]])
    _table(rows, out)
    for bad in netns.bad_entries():
        _write(out, f"note: /run/netns/{bad.name} skipped: {bad.reason}")


def _per_namespace(counted: list[tuple[netns.NetNamespace, counters.TcpCounters]], read: Any, out: TextIO) -> list[Any]:
    """``read(ns)`` for each namespace; one that vanished meanwhile is noted and skipped."""
    results = []
    for ns, _c in counted:
        try:
            results.append((ns, read(ns)))
        except PermissionError:
            _write(out, f"note: {printable(ns.label)} was not read: entering another namespace needs root")
        except (OSError, ValueError) as exc:
            _write(out, f"note: {printable(ns.label)} could not be read (gone meanwhile?): {printable(exc)}")
    return results


def _path(ns: netns.NetNamespace) -> str | None:
    """Where to read ``ns`` from: None for the caller's own (no setns needed, so no privilege either)."""
    return None if ns.inode == netns.current_inode() else ns.path


def _cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    if args.all_netns:
        counted = _busiest(args.detail)
        child = sysctl.read(["net.ipv4.tcp_child_ehash_entries"])["net.ipv4.tcp_child_ehash_entries"].value
        host_findings = namespace_findings(counted, child if isinstance(child, int) else None)
        reports = _per_namespace(counted[: args.detail], lambda ns: doctor(root=args.root, netns=_path(ns)), sys.stderr)
        if args.json:
            _dump(
                {
                    "namespaces": [{"netns": ns.inode, "name": ns.name, **r.to_dict()} for ns, r in reports],
                    "host": [f.to_dict() for f in host_findings],
                    "skipped": [{"name": b.name, "reason": b.reason} for b in netns.bad_entries()],
                },
                out,
            )
        else:
            _namespace_table(counted, out)
            for finding in host_findings:
                _write(out, f"[ info] {finding.code} {finding.title}\n        advice: {finding.advice}")
            for ns, r in reports:
                out.write(f"\n== {printable(ns.label)}\n")
                _write(out, r.render(colour=_colour(out)))
        worst = [r for _ns, r in reports if r.reaches(Severity(args.fail_on))]
        return 1 if worst else 0
    report = doctor(root=args.root, **_ns(args))
    if args.json:
        _dump(report.to_dict(), out)
    else:
        _write(out, report.render(colour=_colour(out)))
    return 1 if report.reaches(Severity(args.fail_on)) else 0


def _cmd_summary(args: argparse.Namespace, out: TextIO) -> int:
    if args.all_netns:
        counted = _busiest(args.detail)
        if args.json:
            rows = []
            for i, (ns, c) in enumerate(counted):
                row: dict[str, Any] = {
                    "netns": ns.inode,
                    "name": ns.name,
                    "pids": list(ns.pids),
                    "tcp_inuse": c.inuse,
                    "time_wait": c.time_wait,
                }
                if i < args.detail:
                    row["summary"] = diag.summary("udp" if args.udp else "tcp", top=args.top, netns=_path(ns)).to_dict()
                rows.append(row)
            _dump(rows, out)
            return 0
        _namespace_table(counted, out)
        kind = "udp" if args.udp else "tcp"
        read = lambda ns: diag.summary(kind, top=args.top, netns=_path(ns))  # noqa: E731
        for ns, summary in _per_namespace(counted[: args.detail], read, out):
            out.write(f"\n== {printable(ns.label)}\n")
            _print_summary(summary, args.top, out)
        return 0
    s = diag.summary("udp" if args.udp else "tcp", top=args.top, **_ns(args))
    if args.json:
        _dump(s.to_dict(), out)
        return 0
    _print_summary(s, args.top, out)
    return 0


def _print_summary(s: diag.SocketSummary, top: int, out: TextIO) -> None:
    _write(out, s.render(top))


def _matches(e: SocketEntry, args: argparse.Namespace) -> bool:
    if args.dport is not None and (e.raddr is None or e.raddr.port != args.dport):
        return False
    if args.src is not None and e.laddr.ip != args.src:
        return False
    return args.dst is None or (e.raddr is not None and e.raddr.ip == args.dst)


def _table(rows: list[list[str]], out: TextIO) -> None:
    """Left-aligned columns, the last one cut to the terminal's width."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    width = _width(out)
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        line = line.rstrip()
        out.write((line[: width - 1] + "…" if width and len(line) > width else line) + "\n")


def _cmd_sockets(args: argparse.Namespace, out: TextIO) -> int:
    kind = ("udp" if args.udp else "tcp") + (args.family or "")
    states = list(args.state or [])
    if args.listening:
        states.append("CLOSE" if args.udp else "LISTEN")
    entries = diag.sockets(kind, states=states or None, port=args.sport, **_ns(args))
    entries = diag.SocketList(e for e in entries if _matches(e, args))
    if args.count:
        out.write(f"{len(entries)}\n")
        return 0
    held: dict[int, tuple[owners.Process, ...]] = {}
    if args.processes:
        held, _denied = owners.owners_of(e.inode for e in entries)
    if args.json:
        rows = []
        for e in entries:
            d = e.to_dict()
            if args.processes:
                d["processes"] = [p._asdict() for p in held.get(e.inode, ())]
            rows.append(d)
        _dump(rows, out)
        return 0
    table = [["State", "Local", "Peer", "Uid", "Timer", "Process" if args.processes else ""]]
    for e in entries:
        procs = held.get(e.inode, ())
        table.append(
            [
                str(e.state),
                str(e.laddr),
                str(e.raddr) if e.raddr else "*",
                str(e.uid),
                f"{e.expires:.1f}s" if e.expires is not None else "",
                ", ".join(f"{p.pid}/{printable(p.name)}" for p in procs) if args.processes else "",
            ]
        )
    _table(table, out)
    return 0


def _cmd_who(args: argparse.Namespace, out: TextIO) -> int:
    kind = "udp" if args.udp else "tcp"
    ns = namespace_path(args.netns, args.pid)
    entries, complete = owners.port_sockets(kind, args.port, ns, args.connections or args.all)
    holders = owners.holders_of(entries, args.port, kind, ns, complete=complete)  # entries: the timers below
    if args.json:
        _dump(holders.to_dict(), out)
        return 0 if holders.holders else 1
    if not holders.holders:
        other = "tcp" if args.udp else "udp"
        held = diag.sockets(other, port=args.port, **_ns(args))
        command = "twfix who --udp" if other == "udp" else "twfix who"
        hint = f" ({len(held)} {other} socket(s) hold it: {command} {args.port})"
        out.write(f"nothing holds {kind} port {args.port}{hint if held else ''}\n")
        return 1
    if args.all:
        _write(out, str(holders))
        return 0
    lines = []
    processes: dict[int, tuple[owners.Process, set[str]]] = {}
    for h in holders.holders:
        for p in h.processes:
            processes.setdefault(p.pid, (p, set()))[1].add(f"{h.state} {h.laddr}")
    for _pid, (p, socks) in sorted(processes.items()):
        lines.append(f"{p.label}: {p.command}")
        lines.append(f"    {', '.join(sorted(socks))}")
    for h in holders.holders:
        if h.inode and not h.processes:
            lines.append(f"uid {h.uid}, process not visible: {h.state} {h.laddr}")
    kernel: dict[tuple[str, str], list[float]] = {}  # TIME-WAIT and orphans: the kernel's, not a process's
    for e in entries:
        if e.inode == 0:
            kernel.setdefault((str(e.state), e.raddr.ip if e.raddr else "*"), []).append(e.expires or 0.0)
    if kernel:
        lines.append(f"kernel-owned, no process ({sum(map(len, kernel.values()))}; --all lists them one by one):")
        for (state, peer), left in sorted(kernel.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"    {len(left):>7} {state:<11} peer {peer}  {min(left):.0f}-{max(left):.0f} s left")
    if holders.note:
        lines.append(f"note: {holders.note}")
    if not holders.complete:
        lines.append("connections and TIME-WAIT on this port not looked for (a listener holds it): --connections")
        lines.append("counts them, --all lists them (either walks the whole socket table)")
    _write(out, "\n".join(lines))
    return 0


def _cmd_explain(args: argparse.Namespace, out: TextIO) -> int:
    why = _explain(args)
    if args.json:
        _dump(why.to_dict(), out)
    else:
        _write(out, str(why))
    return 0 if why.can_bind else 1


def _explain(args: argparse.Namespace) -> Explanation:
    return explain(args.port, args.host, kind="udp" if args.udp else "tcp", dualstack_ipv6=args.dualstack, **_ns(args))


def _cmd_wait(args: argparse.Namespace, out: TextIO) -> int:
    if not 0 <= args.timeout <= 86400:
        raise ValueError(f"--timeout must be between 0 and 86400 seconds, got {args.timeout}")
    deadline = time.monotonic() + args.timeout
    tty = out.isatty()
    said: tuple[object, ...] | None = None  # what the last line said: the cause and who, not the countdown
    while True:
        why = _explain(args)
        if why.can_bind or (args.reuse and why.can_bind_with_reuse):
            done = f"{'' if said is None else chr(10) if tty else ''}free: a bind would succeed now\n"
            out.write(done)
            return 0
        left = deadline - time.monotonic()
        state = (why.cause, tuple(h.inode for h in why.holders), why.time_wait > 0)
        if tty:  # one status line, rewritten in place (its countdown moves every tick)
            out.write(f"\r\x1b[Kwaiting: {printable(why.verdict)}")
            out.flush()
        elif state != said:  # a pipe or a log: one line per change of situation
            out.write(f"waiting: {printable(why.verdict)}\n")
            out.flush()
        said = state
        if left <= 0:
            out.write(f"{chr(10) if tty else ''}timed out after {args.timeout:g} s\n")
            return 1
        time.sleep(min(0.5, left, max(0.05, why.frees_in or 0.5)))


def _cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    result = watch(args.interval, args.duration, kind="udp" if args.udp else "tcp", progress=False, **_ns(args))
    stopped = 130 if result.interrupted else 0  # Ctrl-C: the samples so far, and the shell's status for SIGINT
    if args.json:
        _dump(result.to_records(), out)
        return stopped
    rates = result.time_wait_rate()
    for sample, rate in zip(result.samples, rates, strict=True):
        counts = ", ".join(f"{k} {v}" for k, v in sample.by_state.items()) or "no sockets"
        out.write(f"{sample.at:7.1f} s  {counts}  (TIME-WAIT {rate:+.1f}/s)\n")
    out.write(str(result) + "\n")
    return stopped


def _cmd_metrics(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from twfix import metrics  # the optional extra: twfix[metrics]
    except ImportError as exc:
        raise TwfixError("needs prometheus_client: pip install 'twfix[metrics]'") from exc
    options: dict[str, Any] = {
        "all_netns": args.all_netns,
        "top": args.top,
        "detail": args.detail,
        "budget": args.budget,
        "root": args.root,
        "max_netns": args.max_netns,
    }
    if args.textfile is not None:
        metrics.write_textfile(args.textfile, **options)
        return 0
    if args.serve is not None:
        host, _, port = args.serve.rpartition(":")
        try:
            number = _cli_args.port_arg(port)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--serve {printable(args.serve)!r}: {exc}") from None
        shown = host.strip("[]") or "127.0.0.1"
        try:
            server = metrics.serve(shown, number, **options)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            why = explain(number, shown)  # the busy port explained, as every twfix bind is
            advice = f"; {why.advice[0]}" if why.advice else ""
            raise TwfixError(f"--serve {args.serve}: {why.verdict}{advice}") from None
        out.write(f"serving /metrics on {diag.format_endpoint(shown, server.server_port)}\n")
        out.flush()
        try:
            while True:
                time.sleep(3600)
        finally:
            server.shutdown()
    out.write(metrics.exposition(**options))
    return 0


def _cmd_sysctl(args: argparse.Namespace, out: TextIO) -> int:
    names = [sysctl.full_name(n) for n in args.names] if args.names else None
    table = sysctl.read(names, **_ns(args))
    if args.json:
        _dump(table.to_dict(), out)
    else:
        _write(out, str(table))
    missing = [r.name for r in table.values() if not r.available and r.error is None]
    if names is not None and missing:
        raise LookupError("; ".join(sysctl.why_absent(name) for name in missing))
    return 0


def _cmd_tune(args: argparse.Namespace, out: TextIO) -> int:
    if args.apply and (args.netns or args.pid):
        raise ValueError("--apply sets knobs in this namespace only; run it inside the other one (nsenter)")
    reserve: list[int] | Literal["all"] = []
    if args.reserve and "all" in args.reserve:
        if len(args.reserve) > 1:
            raise ValueError("--reserve takes port numbers or the single word 'all', not both")
        reserve = "all"
    elif args.reserve:
        reserve = list(args.reserve)
    plan = tune.plan(root=args.root, reserve=reserve, **_ns(args))
    if args.write is not None:
        written = tune.write(plan, args.write)
        out.write(
            f"wrote {written.path}" + (f" (previous version kept as {written.backup})" if written.backup else "") + "\n"
        )
        out.write(f"load it now with: sysctl -p {written.path} (at boot, systemd-sysctl reads /etc/sysctl.d)\n")
        return 0
    if args.apply:
        if not plan.changes:
            out.write("nothing to change: the running values are fine\n")
            return 0
        for change in tune.apply(plan):
            before, after = sysctl.render(change.before), sysctl.render(change.after)
            out.write(f"changed {change.name} from {before} to {after}\n")
        return 0
    if not plan.changes and not plan.left_out:
        out.write("# nothing to change: the running values are fine\n")
        return 0
    out.write(plan.snippet())
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "doctor": _cmd_doctor,
    "summary": _cmd_summary,
    "sockets": _cmd_sockets,
    "who": _cmd_who,
    "explain": _cmd_explain,
    "wait": _cmd_wait,
    "watch": _cmd_watch,
    "metrics": _cmd_metrics,
    "sysctl": _cmd_sysctl,
    "tune": _cmd_tune,
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
    parser = _cli_args.build_parser(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # an option the subcommand does not know: its own usage, not the top-level one
            subcommands: dict[str, argparse.ArgumentParser] = getattr(parser, "subcommands", {})
            subcommands.get(getattr(args, "command", None) or "", parser).error(
                f"unrecognized arguments: {' '.join(extra)}"
            )
    except _cli_args.UsageError as exc:
        exc.parser.print_usage(err)  # the subcommand's own usage
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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KernelCannotTellWarning)
            status = _COMMANDS[args.command](args, out)
        out.flush()
        for w in caught:  # the kernel's limits become notes on stderr; any other warning is shown as usual
            if not issubclass(w.category, KernelCannotTellWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        for note in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, KernelCannotTellWarning)):
            err.write(f"twfix {args.command}: note: {printable(note)}\n")
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
