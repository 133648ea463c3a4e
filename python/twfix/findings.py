"""The doctor's results as data: a finding (a stable code, a severity, what was seen, what to do, why,
and the sysctl changes that fix it) and the report of one run. No I/O; ``twfix.doctor`` makes them and
``twfix tune`` applies their fixes."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Final

from twfix._html import SEVERITY_COLOURS, table
from twfix._text import printable
from twfix.features import Feature

__all__ = ["Change", "Finding", "Report", "Severity", "short"]


class Severity(enum.StrEnum):
    """How much a finding matters, in increasing order."""

    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK: Final = {Severity.OK: 0, Severity.INFO: 1, Severity.WARNING: 2, Severity.ERROR: 3}


@dataclass(frozen=True)
class Change:
    """A sysctl change that fixes a finding: the running value and the one to set, with the reason."""

    name: str
    before: Any
    after: Any
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before, "after": self.after, "reason": self.reason}


@dataclass(frozen=True)
class Finding:
    """One observation: a stable ``code``, what was seen (``evidence``, structured data), what to do,
    why, and the sysctl changes that fix it (``fixes``, what ``twfix tune`` proposes)."""

    code: str
    severity: Severity
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: str = ""
    fact: str = ""
    fixes: tuple[Change, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": str(self.severity),
            "title": self.title,
            "evidence": self.evidence,
            "advice": self.advice,
            "fact": self.fact,
            "fixes": [c.to_dict() for c in self.fixes],
        }


@dataclass(frozen=True)
class Report:
    """The findings of one doctor run, worst first."""

    findings: tuple[Finding, ...]
    kernel: str = ""
    platform: str = ""
    features: tuple[Feature, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no finding is a warning or an error."""
        return all(f.severity.rank < Severity.WARNING.rank for f in self.findings)

    @property
    def worst(self) -> Severity:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=Severity.OK)

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def reaches(self, threshold: Severity) -> bool:
        return any(f.severity.rank >= threshold.rank for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "ok": self.ok,
            "worst": str(self.worst),
            "kernel": self.kernel,
            "platform": self.platform,
            "findings": [f.to_dict() for f in self.findings],
            "kernel_features": [f.to_dict() for f in self.features],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def render(self, *, colour: bool = False) -> str:
        marks = {Severity.OK: "ok", Severity.INFO: "info", Severity.WARNING: "WARN", Severity.ERROR: "ERROR"}
        colours = {Severity.OK: "32", Severity.INFO: "36", Severity.WARNING: "33", Severity.ERROR: "31"}
        lines = [f"twfix doctor: kernel {self.kernel or 'unknown'}, {len(self.findings)} findings"]
        for f in self.findings:
            mark = f"[{marks[f.severity]:>5}]"
            if colour:
                mark = f"\x1b[{colours[f.severity]}m{mark}\x1b[0m"
            lines.append(f"{mark} {f.code} {printable(f.title)}")
            if f.evidence:
                shown = ", ".join(f"{k}={short(v)}" for k, v in f.evidence.items())
                lines.append(f"        seen: {shown}")
            if f.advice:
                lines.append(f"        advice: {printable(f.advice)}")
            if f.fact:
                lines.append(f"        because: {f.fact}")
        if self.features:
            lines.append("kernel features used:")
            lines.extend(f"        {feature}" for feature in self.features)
        lines.append("verdict: " + ("ok" if self.ok else f"problems found (worst: {self.worst})"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def to_records(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.findings]

    def _repr_html_(self) -> str:
        rows = [
            (
                (str(f.severity), SEVERITY_COLOURS[str(f.severity)]),
                f.code,
                f.title,
                ", ".join(f"{k}={short(v)}" for k, v in f.evidence.items()),
                f.advice,
            )
            for f in self.findings
        ]
        caption = f"twfix doctor: kernel {self.kernel or 'unknown'}, " + ("ok" if self.ok else f"worst: {self.worst}")
        headers = ("severity", "code", "finding", "evidence", "advice")
        colour = SEVERITY_COLOURS[str(self.worst)]
        return table("twfix-report", caption, headers, rows, total=len(rows), caption_colour=colour)


def short(value: object) -> str:
    """``value`` escaped and cut to 80 characters, for one-line renderings of evidence."""
    text = printable(value)
    return text if len(text) <= 80 else text[:77] + "..."
