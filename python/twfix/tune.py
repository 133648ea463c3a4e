"""``twfix tune``: recommended sysctl changes for this host, printed, written or applied.

Recommendations come from the doctor's findings; each carries its reason. ``tcp_tw_recycle`` is never
recommended, and every value is checked against what the running kernel accepts before it is offered.
Nothing is written or changed unless :func:`write` or :func:`apply` is called.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from twfix.errors import TwfixError

__all__ = ["Change", "Plan", "Written", "apply", "plan", "write"]

MARKER: Final = "# Written by twfix tune."
_DEFAULT_RANGE: Final = (32768, 60999)


@dataclass(frozen=True)
class Change:
    name: str
    before: Any
    after: Any
    reason: str = ""


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
            lines.append(f"# running value: {_render(c.before)}")
            lines.append(f"{c.name} = {_render(c.after)}")
            lines.append("")
        return "\n".join(lines).rstrip("\n") + "\n"


@dataclass(frozen=True)
class Written:
    path: Path
    backup: Path | None


def _render(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, list):
        return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in value)
    return str(value)


def plan(*, root: str | os.PathLike[str] = "/") -> Plan:
    """Work out the recommended changes from the doctor's findings for this namespace."""
    from twfix import sysctl
    from twfix.doctor import doctor

    report = doctor(root=root)
    codes = {f.code for f in report.findings}
    changes: list[Change] = []

    def current(name: str) -> Any:
        try:
            return sysctl.get(name)
        except (LookupError, OSError):
            return None

    if "TW-REUSE-LOOPBACK-ONLY" in codes:
        changes.append(
            Change(
                "net.ipv4.tcp_tw_reuse",
                current("net.ipv4.tcp_tw_reuse"),
                1,
                "outgoing connections to non-loopback peers pile up in TIME-WAIT; 1 lets connect() take them over",
            )
        )
    if "TW-REUSE-NO-TIMESTAMPS" in codes:
        changes.append(
            Change("net.ipv4.tcp_timestamps", current("net.ipv4.tcp_timestamps"), 1, "tcp_tw_reuse needs timestamps")
        )
    if "TW-BUCKETS-ZERO" in codes or "CONF-TW-BUCKETS-LOWERED" in codes:
        ehash = current("net.ipv4.tcp_ehash_entries")
        if isinstance(ehash, int) and ehash:
            changes.append(
                Change(
                    "net.ipv4.tcp_max_tw_buckets",
                    current("net.ipv4.tcp_max_tw_buckets"),
                    abs(ehash) // 2,
                    "restore the kernel default (half the established hash); lowering it only destroys TIME-WAITs",
                )
            )
    rng = current("net.ipv4.ip_local_port_range")
    if rng and ("EPHEMERAL-SMALL" in codes or "EPHEMERAL-PARITY" in codes):
        lo, hi = min(rng[0], _DEFAULT_RANGE[0]), max(rng[1], _DEFAULT_RANGE[1])
        if lo % 2 == hi % 2:
            hi -= 1
        unpriv = current("net.ipv4.ip_unprivileged_port_start")
        if isinstance(unpriv, int):
            lo = max(lo, unpriv)
        changes.append(
            Change(
                "net.ipv4.ip_local_port_range",
                rng,
                (lo, hi),
                "a wider range with bounds of different parity (connect() and bind(0) each take one parity first)",
            )
        )
    listen = [f for f in report.findings if f.code == "LISTEN-IN-EPHEMERAL"]
    if listen:
        reserved = list(current("net.ipv4.ip_local_reserved_ports") or [])
        ports = listen[0].evidence.get("ports", [])
        merged = sorted(set(reserved) | {(p, p) for p in ports})
        changes.append(
            Change(
                "net.ipv4.ip_local_reserved_ports",
                reserved,
                merged,
                "keep outgoing connections off the ports of local services",
            )
        )
    for c in changes:
        sysctl.validate(c.name, c.after)
    return Plan(tuple(changes))


def write(p: Plan, path: str | os.PathLike[str]) -> Written:
    """Write the snippet atomically (temporary file, fsync, rename).

    Refuses to overwrite a file twfix did not write; keeps the previous version of one it did as
    ``PATH.bak``.
    """
    target = Path(os.fspath(path))
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    backup: Path | None = None
    if target.exists():
        try:
            head = target.read_text(errors="replace").splitlines()[:1]
        except OSError as exc:
            raise TwfixError(f"cannot read {target} to check who wrote it: {exc}") from exc
        if head != [MARKER]:
            raise FileExistsError(f"{target} exists and was not written by twfix tune; refusing to overwrite it")
        backup = target.with_name(target.name + ".bak")
        backup.write_bytes(target.read_bytes())
    data = p.snippet().encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent or Path("."), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return Written(target, backup)


def apply(p: Plan) -> list[Change]:
    """Set the planned values now (root only); returns before/after for each knob."""
    from twfix import sysctl

    if os.geteuid() != 0:
        raise PermissionError("twfix tune --apply changes kernel settings and must run as root")
    done = []
    for c in p.changes:
        before = sysctl._write(c.name, c.after)
        done.append(Change(c.name, before, sysctl.get(c.name), c.reason))
    return done
