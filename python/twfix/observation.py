"""One observation of a network namespace, read lazily and at most once: its knobs (the whole catalogue in
one pass), one walk of its socket table, its /proc/net counters, the owners of its listeners, and the
sysctl files under a root. The doctor's rules read only this; the metrics collector hands it what it has
already read (the table, the knobs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from twfix import _twfix, counters, diag, owners, sysctl, sysctl_conf
from twfix.findings import Change
from twfix.kernel import PortRange

__all__ = ["TOP", "Observation"]

# Top ports and peers the snapshot keeps per state.
TOP: Final = 10

# Destinations the rules look at (the busiest first); the rest never reach Python.
_USAGE_LIMIT: Final = 100


class Observation:
    """What the rules read, gathered once per run: the catalogue of sysctls in one pass, and one walk
    of the socket table (aggregated natively) shared by every rule."""

    def __init__(
        self,
        root: Path,
        ns: str | None = None,
        table: diag.TableSnapshot | None = None,
        knobs: sysctl.SysctlTable | None = None,
    ) -> None:
        self.root = root
        self.ns = ns
        self.knobs = knobs if knobs is not None else sysctl.read(netns=ns)
        self._table = table
        self._tcpext: dict[str, int] | None = None
        self._proc_net: dict[str, str | None] | None = None
        self._owners: dict[int, tuple[owners.Process, ...]] | None = None

    def knob(self, name: str) -> Any:
        """Typed sysctl value, or None when the running kernel lacks it."""
        row = self.knobs.get(name)
        return row.value if row is not None and row.available else None

    def default(self, name: str) -> Any:
        """The kernel default of a knob (derived ones computed for this namespace), or None."""
        row = self.knobs.get(name)
        return row.default if row is not None else None

    @property
    def ports(self) -> PortRange | None:
        rng = self.knob("net.ipv4.ip_local_port_range")
        if rng is None:
            return None
        return sysctl.port_range_of(rng, self.knob("net.ipv4.ip_local_reserved_ports"))

    def table(self) -> diag.TableSnapshot:
        if self._table is None:
            self._table = diag.snapshot("tcp", top=TOP, ports=self.ports, netns=self.ns, usage_limit=_USAGE_LIMIT)
        return self._table

    def listener_owners(self) -> dict[int, tuple[owners.Process, ...]]:
        """The processes holding each listening socket of the table, found in one search of /proc that
        every rule shares."""
        if self._owners is None:
            self._owners, _denied = owners.owners_of((s.inode for s in self.table().listeners), self.ns)
        return self._owners

    def proc_net(self, name: str) -> str | None:
        """A /proc/net file of the namespace (read once, with the others, from a thread inside it)."""
        if self._proc_net is None:
            try:
                texts = _twfix.read_proc_net(["sockstat", "netstat"], self.ns)
            except OSError:
                texts = [None, None]
            self._proc_net = dict(zip(["sockstat", "netstat"], texts, strict=True))
        return self._proc_net.get(name)

    def sockstat_tw(self) -> int | None:
        text = self.proc_net("sockstat")
        return counters.parse_sockstat(text).time_wait if text is not None else None

    def tcpext(self) -> dict[str, int]:
        if self._tcpext is None:
            self._tcpext = counters.parse_tcpext(self.proc_net("netstat") or "")
        return self._tcpext

    def config_files(self) -> list[tuple[Path, OSError | None]]:
        return sysctl_conf.places(self.root)

    def change(self, name: str, after: Any, reason: str) -> tuple[Change, ...]:
        """The fix setting ``name`` to ``after``, or nothing when that is already its value."""
        before = self.knob(name)
        return () if before == after else (Change(name, before, after, reason),)
