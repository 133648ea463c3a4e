"""What an address-conflict explanation holds and how it reads: the holders of a port (with every process
holding each socket), listeners in other namespaces, and the :class:`Explanation` itself. Data and
renderings only; ``twfix.conflict`` and ``twfix.verdicts`` make them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from twfix._html import SEVERITY_COLOURS, table
from twfix._text import printable
from twfix.owners import PortHolder, Process

__all__ = ["Explanation", "Holder", "NamespaceHolder", "process_list"]


# The one record of a socket in a port's way, as who_holds() gives it (owners.PortHolder): an explanation's
# holders are the same objects, under the name the explanation has always used.
Holder = PortHolder


def process_list(processes: tuple[Process, ...] | list[Process]) -> str:
    """``pid 12 (name), pid 13 (name)``, with names escaped: they are chosen by whoever ran the process."""
    return ", ".join(p.label for p in processes)


@dataclass(frozen=True)
class NamespaceHolder:
    """A listener on the port in another network namespace of this host (a container, an ``ip netns``)."""

    netns: str
    laddr: tuple[str, int]
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Explanation:
    """Whether binding ``host:port`` would succeed now, with and without reuse options, and why.

    ``verdict`` is one line; ``reasons`` and ``advice`` expand it. ``can_bind`` is the result of a
    plain bind, ``can_bind_with_reuse`` of a bind with twfix's options (SO_REUSEADDR for TCP,
    SO_REUSEPORT for UDP), both probed on the live kernel (for UDP next to a live socket the reuse
    probe is not made, and ``can_bind_with_reuse`` is False). ``cause`` is a stable code for the
    situation and ``confidence`` says how sure the verdict is ("certain", or "likely" where the kernel
    keeps no record of the answer, such as which side a TIME-WAIT came from).
    """

    kind: str
    host: str
    address: tuple[str, int]
    verdict: str
    can_bind: bool
    can_bind_with_reuse: bool
    reasons: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()
    holders: tuple[Holder, ...] = ()
    time_wait: int = 0
    time_wait_reuseaddr: bool | None = None
    frees_in: float | None = None
    in_ephemeral_range: bool = False
    reserved: bool = False
    privileged: bool = False
    incomplete: str | None = field(default=None)
    cause: str = ""
    confidence: str = "certain"
    dualstack: bool = False
    elsewhere: tuple[NamespaceHolder, ...] = ()

    def __str__(self) -> str:
        return "\n".join([printable(self.verdict), *self.detail_lines()])

    def detail_lines(self) -> list[str]:
        """The reasons and the advice as printed under the verdict (escaped): the one rendering that both
        ``str()`` and the constructors' AddressInUseError message use."""
        return [f"  - {printable(r)}" for r in self.reasons] + [f"  > {printable(a)}" for a in self.advice]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["holders"] = [h.to_dict() for h in self.holders]  # records of their own, not bare tuples
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def _repr_html_(self) -> str:
        ok = self.can_bind or self.can_bind_with_reuse
        rows = [(("reason", SEVERITY_COLOURS["info"]), r) for r in self.reasons]
        rows += [(("advice", SEVERITY_COLOURS["ok"]), a) for a in self.advice]
        colour = SEVERITY_COLOURS["ok" if ok else "error"]
        return table("twfix-explanation", self.verdict, ("", ""), rows, caption_colour=colour)
