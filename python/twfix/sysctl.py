"""Typed, explained reads of the kernel knobs that matter for TIME-WAIT and ports.

``get(name)`` returns a typed value; ``read()`` returns a :class:`SysctlTable` of the catalogue (every
knob of the project's reference cheat sheet) with value, kernel default, unit, meaning, what it does
*not* control, whether it is per network namespace, history and advice. ``netns=`` (a path such as
``/run/netns/NAME``) or ``pid=`` reads another network namespace from a short-lived thread, so the
caller's namespace never changes. twfix writes knobs only through ``twfix tune --apply``
(:func:`twfix.tune.apply`, which checks each value with :func:`validate`) and only catalogue knobs.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from twfix import _catalogue, _twfix, features
from twfix._args import namespace_path
from twfix._html import table
from twfix._text import printable
from twfix.errors import TwfixError
from twfix.kernel import PortRange

__all__ = [
    "PortRange",
    "Sysctl",
    "SysctlTable",
    "SysctlUnavailableError",
    "close_match",
    "full_name",
    "get",
    "is_int_text",
    "port_range",
    "port_range_of",
    "read",
    "render",
    "validate",
    "why_absent",
]

Value = int | str | tuple[int, ...] | list[tuple[int, int]]


class SysctlUnavailableError(TwfixError, LookupError):
    """The running kernel has no such knob (removed, not yet added, or host-only)."""


@dataclass(frozen=True)
class Sysctl:
    """One knob as read from the running kernel, with what it means."""

    name: str
    value: Value | None
    raw: str | None
    default: Value | None
    default_note: str
    unit: str
    meaning: str
    not_controls: str
    per_netns: bool
    available: bool
    history: str
    advice: str
    error: str | None = None

    @property
    def changed(self) -> bool:
        """True when the running value differs from the kernel default (False when either is unknown)."""
        return self.available and self.default is not None and self.value != self.default

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["changed"] = self.changed
        return d


class SysctlTable(Mapping[str, Sysctl]):
    """Rows by name (a read-only mapping) with text, JSON and HTML renderings."""

    def __init__(self, rows: Iterable[Sysctl]) -> None:
        self._rows = {r.name: r for r in rows}

    def __getitem__(self, name: str) -> Sysctl:
        return self._rows[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: row.to_dict() for name, row in self._rows.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=list)

    def to_records(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self._rows.values()]

    def __str__(self) -> str:
        lines = []
        for r in self._rows.values():
            value = (
                render(r.value) if r.available else f"(unreadable: {r.error})" if r.error else "(absent on this kernel)"
            )
            mark = " *" if r.changed else ""
            default = f" (default {render(r.default)})" if r.default is not None else ""
            lines.append(f"{r.name} = {value}{mark}{default}{' ' + r.unit if r.unit and r.available else ''}")
            if r.meaning:
                lines.append(f"    {r.meaning}")
            if r.not_controls:
                lines.append(f"    does not control: {r.not_controls}")
            if r.history:
                lines.append(f"    history: {r.history}")
            if r.advice:
                lines.append(f"    advice: {r.advice}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [
            (
                r.name,
                render(r.value) if r.available else "(absent)",
                render(r.default) if r.default is not None else "",
                r.meaning,
                r.advice,
            )
            for r in self._rows.values()
        ]
        return table("twfix-sysctl", "kernel settings", ("name", "value", "default", "meaning", "advice"), rows)


def render(value: object) -> str:
    """A value as sysctl.conf writes it: "32768 60999", "8080,9000-9010", "1" (text escaped)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, list):
        return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in value) if value else "(none)"
    return str(value)


def _key(name: object) -> str:
    """The canonical dotted key of a name (validated in Rust; raises ValueError for hostile names)."""
    if not isinstance(name, str):
        raise TypeError(f"sysctl name must be a str, not {type(name).__name__}")
    return _twfix.sysctl_key(name)[0]


# At most 20 digits: the widest integer a knob holds (u64); longer text is no number the kernel accepts.
_INT: Final = re.compile(r"-?[0-9]{1,20}", re.ASCII)
_PORTS: Final = re.compile(r"[0-9]+(?:-[0-9]+)?", re.ASCII)


def parse(name: str, raw: str) -> Value:
    """Turn the text of a knob into its typed value: ints only from ASCII digits (``²`` is not a number);
    text that does not have the knob's shape is returned as the str it is."""
    knob = _catalogue.CATALOGUE.get(name)
    kind = knob.kind if knob else None
    if kind == "ports":
        chunks = [c for c in raw.replace(" ", "").split(",") if c]
        if all(_PORTS.fullmatch(c) for c in chunks):
            ranges = []
            for chunk in chunks:
                lo, _, hi = chunk.partition("-")
                ranges.append((int(lo), int(hi or lo)))
            return ranges
        return raw
    tokens = raw.split()
    if tokens and all(_INT.fullmatch(t) for t in tokens):
        if kind == "range" or len(tokens) > 1:
            return tuple(int(t) for t in tokens)
        return int(tokens[0])
    return raw


def is_int_text(text: str) -> bool:
    """True for an optionally signed run of ASCII digits (what the kernel's integer knobs accept)."""
    return _INT.fullmatch(text.strip()) is not None


def _missing(name: str) -> SysctlUnavailableError:
    knob = _catalogue.CATALOGUE.get(name)
    history = f": {knob.history}" if knob and knob.history else ""
    where = " (host-only: absent inside a child network namespace)" if knob and not knob.per_netns else ""
    return SysctlUnavailableError(f"{name} does not exist on this kernel{where}{history}")


def get(name: str, *, netns: str | os.PathLike[str] | None = None, pid: int | None = None) -> Value:
    """The typed value of one knob (int, tuple of ints, list of port ranges, or str).

    Raises SysctlUnavailableError (a LookupError) when the running kernel lacks it, with its history.
    """
    if not isinstance(name, str):
        raise TypeError(f"sysctl name must be a str, not {type(name).__name__}")
    ((key, raw, error),) = _twfix.read_sysctls([name], namespace_path(netns, pid))
    if error is not None:
        raise OSError(error[0], error[1])
    if raw is None:
        raise _missing(key)
    return parse(key, raw)


def _default(knob: _catalogue.Knob, ehash: int | None) -> tuple[Value | None, str]:
    """The kernel default of a knob; the derived ones are computed from the established hash size."""
    if knob.default == "ehash/2":
        return (abs(ehash) // 2, "half the TCP established hash") if ehash else (None, "half the TCP established hash")
    if knob.default == "max(128,ehash/128)":
        note = "max(128, established hash / 128)"
        return (max(128, abs(ehash) // 128), note) if ehash else (None, note)
    return knob.default, ""


def _derived(name: str) -> bool:
    knob = _catalogue.CATALOGUE.get(name)
    return knob is not None and isinstance(knob.default, str) and "ehash" in knob.default


def read(
    names: Iterable[str] | None = None,
    *,
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> SysctlTable:
    """A table of the catalogue (or of ``names``), read in one pass."""
    if isinstance(names, str):
        names = [names]
    wanted = list(_catalogue.CATALOGUE) if names is None else list(names)
    for n in wanted:
        if not isinstance(n, str):
            raise TypeError(f"sysctl name must be a str, not {type(n).__name__}")
    knobs = _twfix.read_sysctls([*wanted, _EHASH], namespace_path(netns, pid))
    ehash_raw, ehash_error = knobs[-1][1], knobs[-1][2]
    ehash = int(ehash_raw) if ehash_raw and is_int_text(ehash_raw) else None
    if ehash_raw is None and ehash_error is None and any(_derived(n) for n, _r, _e in knobs[:-1]):
        ehash = features.established_hash()[0]  # before 6.1 one hash, shared by all, and no file shows it
    rows = []
    for name, raw, error in knobs[:-1]:
        knob = _catalogue.CATALOGUE.get(name) or _catalogue.Knob("", None, "", "", "", True, "", "")
        default, note = _default(knob, ehash)
        rows.append(
            Sysctl(
                name,
                parse(name, raw) if raw is not None else None,
                raw,
                default,
                note,
                knob.unit,
                knob.meaning,
                knob.not_controls,
                knob.per_netns,
                raw is not None,
                knob.history,
                knob.advice,
                error[1] if error is not None else None,
            )
        )
    return SysctlTable(rows)


def full_name(name: str) -> str:
    """``name`` as given when it is a full name (dotted or slashed); a short one (``tcp_fin_timeout``) as the
    catalogue knob it stands for. Raises LookupError for an unknown short name, with close matches."""
    if "." in name or "/" in name:
        return name
    matches = [k for k in _catalogue.CATALOGUE if k.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    close = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in _catalogue.CATALOGUE], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; give the full name (net.ipv4.NAME)"
    raise LookupError(f"unknown knob {name!r}{hint}")


def close_match(name: str) -> str | None:
    """The catalogue knob closest to ``name`` that this kernel has (for "did you mean"), or None."""
    present = [key for key, raw, _error in _twfix.read_sysctls(list(_catalogue.CATALOGUE)) if raw is not None]
    close = difflib.get_close_matches(name, present, n=1)
    return close[0] if close and close[0] != name else None


def why_absent(name: str) -> str:
    """Why the knob ``name`` is not on this kernel: a catalogue knob's history (added in, removed in,
    host-only), or a "did you mean" naming only a knob the kernel has."""
    if name in _catalogue.CATALOGUE:
        return str(_missing(name))
    close = close_match(name)
    return f"{name} does not exist on this kernel" + (f" (did you mean {close}?)" if close else "")


def validate(name: str, value: object) -> str:
    """Check a value for a catalogue knob; returns the text to write. Raises ValueError naming the problem."""
    key = _key(name)
    knob = _catalogue.CATALOGUE.get(key)
    if knob is None:
        raise ValueError(f"{key} is not one of the knobs twfix manages; refusing to write it")
    if key == "net.ipv4.tcp_tw_recycle":
        raise ValueError("tcp_tw_recycle was removed in Linux 4.12 and is never written")
    if knob.kind == "range":
        if not (isinstance(value, tuple | list) and len(value) == 2 and all(_is_int(v) for v in value)):
            raise ValueError(f"{key} takes a (low, high) pair of ints, got {value!r}")
        lo, hi = value
        start = get("net.ipv4.ip_unprivileged_port_start") if key.startswith("net.ipv4.ip_local") else 1
        if not (isinstance(start, int) and start <= lo <= hi <= 65535 and lo >= 1):
            raise ValueError(f"{key} needs ip_unprivileged_port_start ({start}) <= low <= high <= 65535, got {value!r}")
        return f"{lo} {hi}"
    if knob.kind == "ports":
        if not isinstance(value, list | tuple) or not all(
            isinstance(r, tuple | list)
            and len(r) == 2
            and all(_is_int(p) and 0 <= p <= 65535 for p in r)
            and r[0] <= r[1]
            for r in value
        ):
            raise ValueError(f"{key} takes a list of (low, high) port ranges, got {value!r}")
        return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in value)
    if not _is_int(value):
        raise ValueError(f"{key} takes an int, got {value!r}")
    assert isinstance(value, int)
    if knob.bounds is None:
        raise ValueError(f"{key} is read-only")
    lo, hi = knob.bounds
    if not lo <= value <= hi:
        raise ValueError(f"{key} accepts {lo}..{hi}, got {value}")
    return str(value)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_EHASH: Final = "net.ipv4.tcp_ehash_entries"
_RANGE: Final = "net.ipv4.ip_local_port_range"
_RESERVED: Final = "net.ipv4.ip_local_reserved_ports"


def port_range(*, netns: str | os.PathLike[str] | None = None, pid: int | None = None) -> PortRange:
    """The ephemeral range and reserved ports of this (or another) network namespace, read in one pass."""
    pairs = {key: raw for key, raw, _error in _twfix.read_sysctls([_RANGE, _RESERVED], namespace_path(netns, pid))}
    return port_range_of(
        parse(_RANGE, pairs[_RANGE]) if pairs[_RANGE] is not None else None,
        parse(_RESERVED, pairs[_RESERVED]) if pairs[_RESERVED] is not None else None,
    )


def port_range_of(rng: Value | None, reserved: Value | None) -> PortRange:
    """A :class:`PortRange` from the typed values of the two knobs (as :func:`get` returns them)."""
    if not (isinstance(rng, tuple) and len(rng) == 2):
        raise ValueError(f"unexpected {_RANGE} value {rng!r}")
    ranges = tuple((int(a), int(b)) for a, b in reserved) if isinstance(reserved, list) else ()
    return PortRange(int(rng[0]), int(rng[1]), ranges)
