"""``twfix.watch()``: the socket table sampled over time (counts per state, TIME-WAIT rate, top ports).

A progress bar shows in terminals and notebooks when tqdm is installed (``pip install 'twfix[notebook]'``);
Ctrl-C stops the watch and keeps what it has; ``.plot()`` draws it with matplotlib (same extra).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from twfix import diag
from twfix._args import check_count, check_seconds, namespace_path
from twfix._html import table

__all__ = ["Sample", "Watch", "watch"]


@dataclass(frozen=True)
class Sample:
    """One look at the table: seconds since the start, counts per state, the top TIME-WAIT local ports."""

    at: float
    by_state: dict[str, int]
    top_time_wait_ports: list[tuple[int, int]] = field(default_factory=list)

    @property
    def time_wait(self) -> int:
        return self.by_state.get("TIME_WAIT", 0)


@dataclass
class Watch:
    """The samples of one :func:`watch`; ``interrupted`` when Ctrl-C ended it early."""

    kind: str
    interval: float
    samples: list[Sample] = field(default_factory=list)
    interrupted: bool = False

    def time_wait_rate(self) -> list[float]:
        """TIME-WAIT change per second between consecutive samples (first sample: 0)."""
        rates = [0.0]
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            span = b.at - a.at
            rates.append((b.time_wait - a.time_wait) / span if span > 0 else 0.0)
        return rates[: len(self.samples)]

    def states(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.samples:
            seen.update(dict.fromkeys(s.by_state))
        return list(seen)

    def to_records(self) -> list[dict[str, Any]]:
        """One record per sample: ``at``, a column per state, ``time_wait_rate`` (pandas-ready)."""
        states = self.states()
        return [
            {"at": round(s.at, 3), **{st: s.by_state.get(st, 0) for st in states}, "time_wait_rate": round(r, 2)}
            for s, r in zip(self.samples, self.time_wait_rate(), strict=True)
        ]

    def plot(self, ax: Any = None) -> Any:
        """Counts per state over time, and the TIME-WAIT rate on a second axis; returns the matplotlib Axes."""
        try:
            import matplotlib.pyplot as plt  # optional extra: twfix[notebook]
        except ImportError as exc:
            raise ImportError("Watch.plot() needs matplotlib: pip install 'twfix[notebook]'") from exc
        if ax is None:
            _fig, ax = plt.subplots(figsize=(8, 4))
        at = [s.at for s in self.samples]
        for state in self.states():
            ax.plot(at, [s.by_state.get(state, 0) for s in self.samples], label=state)
        ax.set_xlabel("seconds")
        ax.set_ylabel(f"{self.kind} sockets")
        rate = ax.twinx()
        rate.plot(at, self.time_wait_rate(), linestyle="--", color="grey", label="TIME-WAIT per s")
        rate.set_ylabel("TIME-WAIT change per second")
        lines, labels = ax.get_legend_handles_labels()
        more, more_labels = rate.get_legend_handles_labels()
        ax.legend(lines + more, labels + more_labels, loc="upper left")  # one legend, the rate line included
        ax.set_title(f"twfix.watch: {len(self.samples)} samples every {self.interval:g} s")
        return ax

    def __str__(self) -> str:
        if not self.samples:
            return "no samples"
        last = self.samples[-1]
        peak = max(s.time_wait for s in self.samples)
        rate = max(self.time_wait_rate())
        note = " (stopped early)" if self.interrupted else ""
        return (
            f"{len(self.samples)} samples over {last.at:.1f} s{note}: TIME-WAIT now {last.time_wait}, peak {peak}, "
            f"fastest growth {rate:.1f}/s; now " + ", ".join(f"{k} {v}" for k, v in last.by_state.items())
        )

    def _repr_html_(self) -> str:
        records = self.to_records()
        headers = list(records[0]) if records else ["at"]
        rows = ([str(r[h]) for h in headers] for r in records)  # oldest first, as the plot reads
        return table("twfix-watch", str(self), headers, rows, total=len(records))


def _progress(total: int, enabled: bool | None) -> AbstractContextManager[Any]:
    if enabled is False:
        return nullcontext(None)
    try:
        from tqdm.auto import tqdm  # optional extra: twfix[notebook]; auto picks the notebook widget
    except ImportError:
        return nullcontext(None)
    bar: AbstractContextManager[Any] = tqdm(total=total, unit="sample", desc="twfix.watch", leave=True)
    return bar


def watch(
    interval: float = 1.0,
    duration: float = 60.0,
    *,
    kind: str = "tcp",
    top: int = 5,
    progress: bool | None = None,
    netns: str | os.PathLike[str] | None = None,
    pid: int | None = None,
) -> Watch:
    """Sample the socket table every ``interval`` seconds for ``duration`` seconds (Ctrl-C stops early
    and keeps the samples). ``progress=None`` shows a bar when tqdm is installed; False never."""
    interval = check_seconds(interval, "interval")
    duration = check_seconds(duration, "duration")
    if interval <= 0:
        raise ValueError("interval must be above 0 seconds")
    top = check_count(top, "top")
    ns = namespace_path(netns, pid)
    count = int(duration // interval) + 1
    result = Watch(kind, float(interval))
    start = time.monotonic()
    with _progress(count, progress) as bar:
        try:
            for i in _ticks(start, interval, count):
                s = diag.summary(kind, top=top, netns=ns)
                result.samples.append(
                    Sample(
                        time.monotonic() - start,
                        {str(k): v for k, v in s.by_state.items()},
                        list(s.top_local_ports.get(diag.TcpState.TIME_WAIT, [])),
                    )
                )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(time_wait=result.samples[-1].time_wait, refresh=False)
                del i
        except KeyboardInterrupt:
            result.interrupted = True
    return result


def _ticks(start: float, interval: float, count: int) -> Iterator[int]:
    """Sleep until each tick (start, start + interval, ...): no drift from the sampling time."""
    for i in range(count):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i
