"""``twfix tune``: recommended sysctl changes for this host, printed, written or applied.

Recommendations come from the doctor's findings; each carries its reason. ``tcp_tw_recycle`` is never
recommended, and every value is checked against what the running kernel accepts before it is offered.
Nothing is written or changed unless :func:`write` or :func:`apply` is called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from twfix import _safefile, _twfix, sysctl
from twfix.doctor import Change, doctor
from twfix.errors import TwfixError

__all__ = ["Change", "Plan", "Written", "apply", "plan", "write"]

MARKER: Final = "# Written by twfix tune."


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]

    def snippet(self) -> str:
        lines = [
            MARKER,
            "# Recommended TIME-WAIT and port settings for this host; see `twfix doctor` for the findings.",
            "# These knobs are per network namespace: a container gets kernel defaults, not these values.",
            "",
        ]
        if not self.changes:
            lines.append("# Nothing to change: the running values are fine.")
        for c in self.changes:
            lines.append(f"# {c.reason}" if c.reason else "#")
            lines.append(f"# running value: {sysctl.render(c.before)}")
            lines.append(f"{c.name} = {sysctl.render(c.after)}")
            lines.append("")
        return "\n".join(lines).rstrip("\n") + "\n"


@dataclass(frozen=True)
class Written:
    path: Path
    backup: Path | None


def plan(
    *,
    root: str | os.PathLike[str] = "/",
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> Plan:
    """The recommended changes: the fixes the doctor's findings carry, worst finding first, one change
    per knob, and only changes that change something. Every value is checked against what the running
    kernel accepts before it is offered. ``netns``/``pid``: plan for another network namespace."""
    changes: dict[str, Change] = {}
    for finding in doctor(root=root, netns=netns, pid=pid).findings:
        for change in finding.fixes:
            if change.after != change.before and change.name not in changes:
                changes[change.name] = change
    for c in changes.values():
        sysctl.validate(c.name, c.after)
    return Plan(tuple(changes.values()))


def write(p: Plan, path: str | os.PathLike[str]) -> Written:
    """Write the snippet atomically, never replacing a file twfix did not write (see
    :func:`twfix._safefile.replace`); the previous version of a file twfix wrote is kept as ``PATH.bak``.
    Load it now with ``sysctl -p PATH`` (at boot, systemd-sysctl reads /etc/sysctl.d)."""
    target, backup = _safefile.replace(
        path, p.snippet().encode(), MARKER, writer="twfix tune", example="/etc/sysctl.d/99-twfix.conf", keep_backup=True
    )
    return Written(target, backup)


def apply(p: Plan) -> list[Change]:
    """Set the planned values now (root only), all or none: when one write fails, the knobs already
    changed are set back, and the error says what happened. Returns before/after for each knob."""
    if os.geteuid() != 0:
        raise PermissionError("twfix tune --apply changes kernel settings and must run as root")
    done: list[Change] = []
    for c in p.changes:
        try:
            before = _set(c.name, c.after)
        except (OSError, ValueError) as exc:
            restored, failed = _roll_back(done)
            detail = f"; set back {', '.join(restored)}" if restored else ""
            if failed:
                detail += f"; could NOT set back {', '.join(failed)}"
            raise TwfixError(f"could not set {c.name} to {sysctl.render(c.after)}: {exc}{detail}") from exc
        done.append(Change(c.name, before, sysctl.get(c.name), c.reason))
    return done


def _set(name: str, value: object) -> object:
    """Set a catalogue knob in the caller's network namespace (root only); returns the previous value.
    The one place twfix writes a sysctl: every value goes through :func:`twfix.sysctl.validate` first."""
    text = sysctl.validate(name, value)
    if os.geteuid() != 0:
        raise PermissionError(f"setting {name} needs root")
    key, _path = _twfix.sysctl_key(name)
    before = _twfix.write_sysctl(name, text)
    return sysctl.parse(key, before) if before is not None else None


def _roll_back(done: list[Change]) -> tuple[list[str], list[str]]:
    restored, failed = [], []
    for c in reversed(done):
        try:
            _set(c.name, c.before)
            restored.append(f"{c.name} = {sysctl.render(c.before)}")
        except (OSError, ValueError) as exc:
            failed.append(f"{c.name} ({exc})")
    return restored, failed
