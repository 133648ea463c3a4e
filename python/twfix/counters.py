"""The O(1) counters of a network namespace: the TCP line of ``/proc/net/sockstat`` (sockets in use,
orphans, TIME-WAIT) and the TcpExt counters of ``/proc/net/netstat``, whatever the table's size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twfix import _twfix
from twfix.netns import NetNamespace, current_inode

__all__ = ["TcpCounters", "parse_sockstat", "parse_tcpext", "tcp", "tcp_each"]


@dataclass(frozen=True)
class TcpCounters:
    """The TCP line of a namespace's /proc/net/sockstat: O(1) to read, whatever the table's size."""

    inuse: int
    orphan: int
    time_wait: int
    alloc: int


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def parse_sockstat(text: str) -> TcpCounters:
    """The TCP line of /proc/net/sockstat text (missing fields read as 0)."""
    values = dict.fromkeys(("inuse", "orphan", "tw", "alloc"), 0)
    for line in text.splitlines():
        if line.startswith("TCP:"):
            words = line.split()[1:]
            for key, value in zip(words[::2], words[1::2], strict=False):
                number = _number(value)
                if key in values and number is not None:
                    values[key] = number
    return TcpCounters(values["inuse"], values["orphan"], values["tw"], values["alloc"])


def parse_tcpext(text: str) -> dict[str, int]:
    """The TcpExt counters of /proc/net/netstat text (a header line of names, then a line of values)."""
    lines = text.splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:") and values.startswith("TcpExt:"):
            pairs = zip(head.split()[1:], values.split()[1:], strict=False)
            return {name: number for name, value in pairs if (number := _number(value)) is not None}
    return {}


def tcp_each(spaces: Sequence[NetNamespace]) -> list[TcpCounters | None]:
    """The sockstat counters of every namespace of ``spaces``, read by one thread that joins each in turn;
    None for one that could not be entered or read (gone meanwhile, not a namespace, not ours to enter)."""
    here = current_inode()
    paths = [None if ns.inode == here else ns.path for ns in spaces]
    try:
        texts = _twfix.read_proc_net_each(["sockstat"], paths)
    except OSError:  # no thread to be had (a pids limit): the caller's own namespace needs none
        return [tcp(ns) if path is None else None for ns, path in zip(spaces, paths, strict=True)]
    return [None if t is None else parse_sockstat(t[0] or "") for t in texts]


def tcp(ns: NetNamespace | None = None) -> TcpCounters:
    """The sockstat counters of ``ns`` (None: the caller's namespace), read from a thread inside it."""
    own = ns is None or ns.inode == current_inode()  # no thread needed to read the caller's own
    (text,) = _twfix.read_proc_net(["sockstat"], None if own or ns is None else ns.path)
    return parse_sockstat(text or "")
