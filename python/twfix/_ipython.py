"""IPython magics (private): ``%load_ext twfix``, then ``%twfix doctor``, ``%twfix explain 8080``,
``%twfix watch 30``, ``%twfix summary``, ``%twfix who 8080``, ``%twfix sockets time-wait``,
``%twfix sysctl tcp_fin_timeout``. Each returns the rich result object, so the notebook renders it."""

from __future__ import annotations

import shlex
from typing import Any

from twfix import diag, sysctl
from twfix.conflict import explain
from twfix.doctor import doctor
from twfix.watch import watch

__all__ = ["load", "run"]

_USAGE = (
    "usage: %twfix doctor | summary | explain PORT [HOST] | who PORT | watch [SECONDS] | sockets [STATE ...] "
    "| sysctl [NAME ...]"
)


def run(line: str) -> Any:
    """The object a ``%twfix`` line stands for."""
    words = shlex.split(line)
    if not words:
        raise ValueError(_USAGE)
    command, args = words[0], words[1:]
    if command == "doctor":
        return doctor()
    if command == "summary":
        return diag.summary()
    if command == "explain" and 1 <= len(args) <= 2:
        return explain(int(args[0]), args[1] if len(args) > 1 else "")
    if command == "who" and len(args) == 1:
        return diag.who_holds(int(args[0]))
    if command == "watch" and len(args) <= 1:
        return watch(duration=float(args[0]) if args else 10.0)
    if command == "sockets":
        return diag.sockets(states=args or None)
    if command == "sysctl":
        return sysctl.read([sysctl.full_name(n) for n in args] or None)
    raise ValueError(_USAGE)


def load(ipython: Any) -> None:
    """Register the ``%twfix`` line magic."""
    ipython.register_magic_function(run, magic_kind="line", magic_name="twfix")
