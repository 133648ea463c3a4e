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
from typing import Final

from twfix import sysctl
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


def plan(*, root: str | os.PathLike[str] = "/") -> Plan:
    """The recommended changes: the fixes the doctor's findings carry, worst finding first, one change
    per knob, and only changes that change something. Every value is checked against what the running
    kernel accepts before it is offered."""
    changes: dict[str, Change] = {}
    for finding in doctor(root=root).findings:
        for change in finding.fixes:
            if change.after != change.before and change.name not in changes:
                changes[change.name] = change
    for c in changes.values():
        sysctl.validate(c.name, c.after)
    return Plan(tuple(changes.values()))


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
    if os.geteuid() != 0:
        raise PermissionError("twfix tune --apply changes kernel settings and must run as root")
    done = []
    for c in p.changes:
        before = sysctl._write(c.name, c.after)
        done.append(Change(c.name, before, sysctl.get(c.name), c.reason))
    return done
