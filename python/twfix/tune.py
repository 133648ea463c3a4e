"""``twfix tune``: recommended sysctl changes for this host, printed, written or applied.

Recommendations come from the doctor's findings; each carries its reason. ``tcp_tw_recycle`` is never
recommended, and every value is checked against what the running kernel accepts before it is offered.
Nothing is written or changed unless :func:`write` or :func:`apply` is called.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from twfix import _safefile, _twfix, sysctl
from twfix._args import check_port
from twfix.doctor import doctor
from twfix.errors import TwfixError
from twfix.findings import Change

__all__ = ["Change", "Plan", "Written", "apply", "plan", "write"]

MARKER: Final = "# Written by twfix tune."


@dataclass(frozen=True)
class Plan:
    """The changes, and the listeners inside the ephemeral range whose ports the plan does not reserve
    (``left_out``: port -> why), which ``plan(reserve=...)`` can include."""

    changes: tuple[Change, ...]
    left_out: tuple[tuple[int, str], ...] = ()

    def snippet(self) -> str:
        lines = [
            MARKER,
            "# Recommended TIME-WAIT and port settings for this host; see `twfix doctor` for the findings.",
            "# These knobs are per network namespace: a container gets kernel defaults, not these values.",
            "",
        ]
        for port, why in self.left_out:
            lines.append(f"# not reserved: listener on {port}: {why}")
        if self.left_out:
            lines.append("# include them with `twfix tune --reserve PORT ...` (or `--reserve all`)")
            lines.append("")
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


_RESERVED: Final = "net.ipv4.ip_local_reserved_ports"
_KERNEL_CHOSEN: Final = (
    "its port has the parity bind(0) takes first and its owner's command line does not name it, so the kernel "
    "probably chose it (a test server, a notebook kernel); a service whose port comes from its configuration "
    "looks the same"
)


def plan(
    *,
    root: str | os.PathLike[str] = "/",
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
    reserve: Iterable[int] | Literal["all"] = (),
) -> Plan:
    """The recommended changes: the fixes the doctor's findings carry, worst finding first, one change
    per knob, and only changes that change something. Every value is checked against what the running
    kernel accepts before it is offered. ``netns``/``pid``: plan for another network namespace.

    Listeners inside the ephemeral range on ports the kernel probably chose (bind(0)) are not reserved
    but listed in ``Plan.left_out``; ``reserve`` adds ports to ``ip_local_reserved_ports`` anyway: some
    of them, any other port, or ``"all"`` of the left-out ones."""
    wanted = set() if reserve == "all" else {check_port(p, "reserve") for p in reserve}
    changes: dict[str, Change] = {}
    left_out: dict[int, str] = {}
    report = doctor(root=root, netns=netns, pid=pid)
    for finding in report.findings:
        if finding.code == "LISTEN-EPHEMERAL-CHOSEN":
            left_out.update(dict.fromkeys(finding.evidence.get("ports", ()), _KERNEL_CHOSEN))
        for change in finding.fixes:
            if change.after != change.before and change.name not in changes:
                changes[change.name] = change
    if reserve == "all":
        wanted = set(left_out)
    if wanted:
        current = changes[_RESERVED].after if _RESERVED in changes else sysctl.get(_RESERVED, netns=netns, pid=pid)
        ranges = list(current) if isinstance(current, list) else []
        after = sorted(set(ranges) | {(p, p) for p in wanted})
        if after != ranges:
            chosen = ", ".join(map(str, sorted(wanted)))
            reason = f"keep outgoing connections off the ports you chose to reserve: {chosen}"
            base = changes.get(_RESERVED)
            changes[_RESERVED] = Change(
                _RESERVED, base.before if base else current, after, f"{base.reason}; {reason}" if base else reason
            )
        for port in wanted:
            left_out.pop(port, None)
    for c in changes.values():
        sysctl.validate(c.name, c.after)
    return Plan(tuple(changes.values()), tuple(sorted(left_out.items())))


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
