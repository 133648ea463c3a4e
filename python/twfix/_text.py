"""Text from other processes and from files, made safe for a terminal, a log or an exception (private).

Process names, command lines and config lines are chosen by whoever wrote them: escape sequences, BEL,
newlines or bidi overrides in them must never reach a terminal raw. Structured fields (``to_dict()``)
keep the raw value; every rendering goes through :func:`printable`.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    """``text`` with every non-printable character (C0 and C1 controls, DEL, Unicode format characters
    such as bidi overrides, line separators) written as ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)
