"""IPython magics (private): ``%load_ext twfix``, then ``%twfix doctor``, ``%twfix explain 8080``,
``%twfix watch 30``, ``%twfix summary``, ``%twfix who 8080``, ``%twfix sockets time-wait``,
``%twfix sysctl tcp_fin_timeout``. Each returns the rich result object, so the notebook renders it."""

from __future__ import annotations

import shlex
from typing import Any, Final

from twfix import diag, owners, sysctl
from twfix._text import printable
from twfix.conflict import explain
from twfix.doctor import doctor
from twfix.watch import watch

__all__ = ["load", "run"]

_USAGE = (
    "usage: %twfix doctor | summary | explain PORT [HOST] | who PORT | watch [SECONDS] | sockets [STATE ...] "
    "| sysctl [NAME ...]"
)


_ARITY: Final = {
    "doctor": (0, 0, ""),
    "summary": (0, 0, ""),
    "explain": (1, 2, "PORT [HOST]"),
    "who": (1, 1, "PORT"),
    "watch": (0, 1, "[SECONDS]"),
}


def _port(text: str, command: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ValueError(f"%twfix {command}: PORT must be a number in 0..65535, got {printable(text)!r}")
    return int(text)


def run(line: str) -> Any:
    """The object a ``%twfix`` line stands for; a wrong line is a ValueError naming what is wrong."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ValueError(f"%twfix: {exc} in {printable(line)!r}") from None
    if not words:
        raise ValueError(_USAGE)
    command, args = words[0], words[1:]
    if command in _ARITY:
        low, high, usage = _ARITY[command]
        if not low <= len(args) <= high:
            extra = f"; unexpected {' '.join(map(printable, args[high:]))!r}" if len(args) > high else ""
            raise ValueError(f"usage: %twfix {command} {usage}".rstrip() + extra)
    if command == "doctor":
        return doctor()
    if command == "summary":
        return diag.summary()
    if command == "explain":
        return explain(_port(args[0], command), args[1] if len(args) > 1 else "")
    if command == "who":
        return owners.who_holds(_port(args[0], command))
    if command == "watch":
        try:
            seconds = float(args[0]) if args else 10.0
        except ValueError:
            raise ValueError(f"%twfix watch: SECONDS must be a number, got {printable(args[0])!r}") from None
        return watch(duration=seconds)
    if command == "sockets":
        return diag.sockets(states=args or None)
    if command == "sysctl":
        return sysctl.read([sysctl.full_name(n) for n in args] or None)
    raise ValueError(f"%twfix: unknown command {printable(command)!r}; {_USAGE}")


def load(ipython: Any) -> None:
    """Register the ``%twfix`` line magic."""
    ipython.register_magic_function(run, magic_kind="line", magic_name="twfix")
