"""Who holds a socket: processes from the /proc/PID/fd links (the native search), holders of a port,
and whether the kernel chose a listener's port. Process names and command lines are raw text from /proc:
every rendering escapes them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from twfix import _twfix, kernel
from twfix._args import check_kind, check_port, namespace_path
from twfix._html import table
from twfix._text import printable
from twfix.diag import Addr, SocketEntry, TcpState, format_endpoint, port_entries, sockets
from twfix.kernel import PortRange

__all__ = ["Holders", "PortHolder", "Process", "chosen_by_kernel", "holders_of", "owners_of", "who_holds"]


class Process(NamedTuple):
    """A process holding a socket. ``name`` and ``cmdline`` are raw text from /proc, chosen by whoever
    started the process: escape them before they reach a terminal."""

    pid: int
    name: str | None
    cmdline: tuple[str, ...]
    fd: int | None = None

    @property
    def label(self) -> str:
        """``pid 12 (nginx)``, the name escaped: the one way twfix names a process in text."""
        return f"pid {self.pid} ({printable(self.name)})"

    @property
    def command(self) -> str:
        """The command line, escaped, as one string."""
        return printable(" ".join(self.cmdline))


class PortHolder(NamedTuple):
    """A socket bound to the port, and the processes holding it (none for TIME-WAIT or unseen owners).

    A socket inherited across fork() is held by every process that has it open (a prefork server's
    master and workers): ``processes`` lists them all, ``pid``/``name``/``cmdline`` are the first.
    """

    state: TcpState
    laddr: Addr
    raddr: Addr | None
    uid: int
    inode: int
    pid: int | None = None
    name: str | None = None
    cmdline: tuple[str, ...] = ()
    processes: tuple[Process, ...] = ()

    @property
    def owned(self) -> bool:
        return self.pid is not None

    @property
    def orphan(self) -> bool:
        """A connection no process holds any more: the kernel is finishing its close (TIME-WAIT included)."""
        return self.inode == 0 and str(self.state) in kernel.ORPHAN_STATES

    def describe(self) -> str:
        """One line: state, addresses, and who holds it (every process, names escaped)."""
        peer = f" to {format_endpoint(*self.raddr)}" if self.raddr else ""
        if self.orphan:
            who = "no process: an orphaned connection the kernel is closing"
        elif self.processes:
            who = ", ".join(p.label for p in self.processes)
        else:
            who = f"a process not visible here (uid {self.uid})"
        return f"{self.state} {format_endpoint(*self.laddr)}{peer}, held by {who}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self._asdict(),
            "state": str(self.state),
            "processes": [p._asdict() for p in self.processes],
            "orphan": self.orphan,
        }


@dataclass(frozen=True)
class Holders:
    """Answer of :func:`who_holds`: the holders and a note on what could not be seen. ``complete`` is
    False when only the port's listeners were looked for (its connections and TIME-WAIT were not);
    ``unlisted`` then says so in words."""

    port: int
    kind: str
    holders: tuple[PortHolder, ...]
    denied: int = 0
    note: str | None = None
    complete: bool = True

    @property
    def unlisted(self) -> str | None:
        """What was not looked for, or None when every socket on the port is listed."""
        if self.complete:
            return None
        return (
            "only the listener(s) were looked for, not the port's connections, TIME-WAIT or bound-only sockets "
            "(listing them walks the whole table: who_holds(port, connections=True))"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "kind": self.kind,
            "holders": [h.to_dict() for h in self.holders],
            "denied": self.denied,
            "note": self.note,
            "complete": self.complete,
            "unlisted": self.unlisted,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {**h._asdict(), "state": str(h.state), "processes": [p._asdict() for p in h.processes]}
            for h in self.holders
        ]

    def kernel_owned(self) -> list[tuple[str, str, int]]:
        """The sockets no process holds (TIME-WAIT, orphans) grouped as the CLI groups them:
        (state, peer address, count), largest groups first."""
        groups: dict[tuple[str, str], int] = {}
        for h in self.holders:
            if h.inode == 0:
                key = (str(h.state), h.raddr.ip if h.raddr else "*")
                groups[key] = groups.get(key, 0) + 1
        return sorted(((s, peer, n) for (s, peer), n in groups.items()), key=lambda g: -g[2])

    def _repr_html_(self) -> str:
        rows = [
            (
                str(h.state),
                str(h.laddr),
                str(h.raddr) if h.raddr else "",
                ", ".join(str(p.pid) for p in h.processes),
                printable(h.name or ""),
                printable(" ".join(h.cmdline)),
            )
            for h in self.holders
            if h.inode != 0
        ]
        # Processes first, then kernel-owned sockets, grouped: a busy port has thousands of TIME-WAITs.
        rows.sort(key=lambda r: r[3] == "")
        rows += [
            (state, f"port {self.port}", f"{printable(peer)} ({n} sockets)", "", "(the kernel)", "")
            for state, peer, n in self.kernel_owned()
        ]
        said = "; ".join(n for n in (self.note, self.unlisted) if n)
        caption = f"{self.kind} port {self.port}" + (f" ({said})" if said else "")
        headers = ("state", "local", "remote", "pid", "program", "command")
        return table("twfix-holders", caption, headers, rows, total=len(rows))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's text rendering: the processes, then the kernel-owned sockets grouped."""
        lines = [f"{self.kind} port {self.port}:" if self.holders else f"nothing holds {self.kind} port {self.port}"]
        lines += [
            f"  {h.state!s:<12} {h.laddr}  " + ("; ".join(p.label for p in h.processes) or f"uid {h.uid}")
            for h in self.holders
            if h.inode != 0
        ]
        lines += [f"  {n:>7} {state:<11} peer {printable(peer)}" for state, peer, n in self.kernel_owned()]
        lines += [f"  note: {n}" for n in (self.note, self.unlisted) if n]
        printer.text("\n".join(lines))

    def __str__(self) -> str:
        if not self.holders:
            return f"nothing holds {self.kind} port {self.port}"
        lines = [f"{self.kind} port {self.port}:"]
        for h in self.holders:
            peer = f" -> {h.raddr}" if h.raddr else ""
            if h.state == TcpState.TIME_WAIT:
                who = "no process (TIME-WAIT belongs to the kernel)"
            elif h.processes:
                who = "; ".join(f"{p.label} uid {h.uid}: {p.command[:120]}" for p in h.processes)
            else:
                who = f"uid {h.uid}, process not visible"
            lines.append(f"  {h.state:<12} {h.laddr}{peer}  {who}")
        lines += [f"  note: {n}" for n in (self.note, self.unlisted) if n]
        return "\n".join(lines)

    def describe_processes(self) -> str:
        """Every process holding the port, one per line, safe to print."""
        seen: dict[int, Process] = {p.pid: p for h in self.holders for p in h.processes}
        return "\n".join(f"{p.label}: {p.command}" for p in seen.values())


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError:
        return None


def _process(pid: int) -> Process:
    comm = _read(f"/proc/{pid}/comm")
    raw = _read(f"/proc/{pid}/cmdline")
    name = comm.decode(errors="replace").rstrip("\n") if comm else None
    cmd = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a) if raw else ()
    return Process(pid, name, cmd)


def who_holds(
    port: int,
    kind: str = "tcp",
    *,
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
    connections: bool = False,
) -> Holders:
    """The sockets bound to ``port`` with their owning processes (pid, name, command line, uid, state).

    A TCP port with a listener is answered by its listeners and every process holding them: a listen-only
    dump, which the kernel answers without walking the established hash, so the cost does not grow with
    the table. The port's connections, TIME-WAIT and bound-only sockets are then not looked for
    (``complete`` is False and ``unlisted`` says so); ``connections=True`` lists them too, at the cost of one
    walk of the whole table (the kernel has no index by local port). A port without a listener, and UDP,
    always get every socket.

    Maps socket inodes to every process holding them by reading /proc/PID/fd, the processes of the
    port's network namespace first. Without root, other users' processes cannot be inspected: their
    sockets are listed without an owner and ``note`` says so.
    """
    port = check_port(port)
    check_kind(kind, tuple(kernel.KINDS))
    if not isinstance(connections, bool):
        raise TypeError(f"connections must be True or False, not {type(connections).__name__}")
    ns = namespace_path(netns, pid)
    entries, complete = port_sockets(kind, port, ns, connections)
    return holders_of(entries, port, kind, ns, complete=complete)


def port_sockets(kind: str, port: int, ns: str | None, connections: bool) -> tuple[list[SocketEntry], bool]:
    """The sockets :func:`who_holds` answers with, and whether they are all of the port's."""
    proto, family = kernel.KINDS[kind]
    if proto == "tcp" and not connections:
        listening = [e for e in port_entries(proto, port, [TcpState.LISTEN], ns) if family in (None, e.family)]
        if listening:
            return listening, False
    # A question about one port: every state, bound-only sockets included.
    return list(sockets(kind, port=port, netns=ns)), True


def owners_of(inodes: Iterable[int], ns: str | None = None) -> tuple[dict[int, tuple[Process, ...]], int]:
    """Every process holding each socket inode, and how many processes could not be inspected.

    The processes of the sockets' network namespace (``ns``, a path; None: the caller's) are searched
    first; processes with more than 4,096 descriptors and those of other namespaces only while a socket
    still has no owner."""
    owners, denied, _skipped, _fds = _owners(inodes, ns)
    return owners, denied


def _owners(
    inodes: Iterable[int], ns: str | None, uids: Iterable[int] = ()
) -> tuple[dict[int, tuple[Process, ...]], int, int, int]:
    """:func:`owners_of`, plus the processes of the namespace left unsearched and their descriptors.
    ``uids``: the sockets' users. Other users' processes with more than 64 descriptors are searched only
    when they descend from a holder (workers that dropped privileges, a socket-activated service) or
    while a socket has no owner."""
    try:
        inode: int | None = os.stat(ns or "/proc/thread-self/ns/net").st_ino
    except OSError:
        inode = None
    triples, denied, skipped, skipped_fds = _twfix.socket_owners([i for i in inodes if i], inode, sorted(set(uids)))
    processes = {pid: _process(pid) for pid in sorted({pid for _inode, pid, _fd in triples})}
    held: dict[int, list[Process]] = {}
    for inode, pid, fd in triples:
        held.setdefault(inode, []).append(processes[pid]._replace(fd=fd))
    return {inode: tuple(procs) for inode, procs in held.items()}, denied, skipped, skipped_fds


def chosen_by_kernel(ports: PortRange, port: int, processes: Iterable[Process]) -> bool:
    """Was ``port`` most likely handed out by bind(0) rather than chosen by a service? The one rule the
    doctor and the explanations share: it lies in the range with the parity bind(0) searches first, and no
    holder names it on its command line (``--port 8080``, ``:8080``, ``port=8080``). A service that reads
    its port from a configuration file looks the same; the answer is a likelihood."""
    if not ports.bind_first(port):
        return False
    pattern = re.compile(rf"(?<![0-9]){port}(?![0-9])")
    return not any(pattern.search(arg) for p in processes for arg in p.cmdline)


def holders_of(
    entries: list[SocketEntry], port: int, kind: str, ns: str | None = None, *, complete: bool = True
) -> Holders:
    """Attach owning processes to socket entries (shared by who_holds and the conflict explanation).
    ``complete``: False when ``entries`` are the port's listeners only."""
    owners, denied, skipped, skipped_fds = _owners((e.inode for e in entries), ns, (e.uid for e in entries if e.inode))
    holders = []
    for e in entries:
        procs = owners.get(e.inode, ()) if e.inode else ()
        first = procs[0] if procs else None
        holders.append(
            PortHolder(
                e.state,
                e.laddr,
                e.raddr,
                e.uid,
                e.inode,
                first.pid if first else None,
                first.name if first else None,
                first.cmdline if first else (),
                procs,
            )
        )
    unseen = [h for h in holders if h.inode and h.pid is None]
    note = None
    if unseen and denied:
        note = (
            f"{len(unseen)} socket(s) have no visible owner: {denied} process(es) of other users could not be "
            "inspected (run as root to see them)"
        )
    elif unseen:
        note = (
            f"{len(unseen)} socket(s) are held by processes not visible here: a socket that exists has a live "
            "owner, so it runs outside this PID namespace (a container sharing this network namespace, or "
            "twfix itself in one) or /proc hides it (hidepid); run `ss -tulpn` or `lsof -i :PORT` where that "
            "process is visible, usually on the host"
        )
    elif skipped:
        note = (
            f"{skipped} process(es) of this namespace holding more than 4096 descriptors ({skipped_fds} in all) "
            "were not searched once every socket had an owner: other holders of a shared socket among them "
            "are not listed"
        )
    return Holders(port, kind, tuple(holders), denied, note, complete)
