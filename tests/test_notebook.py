"""The example notebook runs in a real Jupyter kernel, and every result shows as HTML or an image."""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS
from twfix import cli

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "twfix.ipynb"


@pytest.mark.parametrize("situation", ["clean", "warning"])
def test_example_notebook_renders_every_result(netns: NetNS, situation: str) -> None:
    """An example shows results, whatever they are: also on a host where the doctor warns."""
    if situation == "warning":
        netns.sysctl("net.ipv4.tcp_tw_reuse", 1)
        netns.sysctl("net.ipv4.tcp_timestamps", 0)  # tcp_tw_reuse without timestamps: a warning
        assert not twfix.doctor().ok
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    rich = {"text/html", "image/png"}
    for cell in nb.cells:
        if cell.cell_type != "code" or "print(" in cell.source or "%load_ext" in cell.source:
            continue
        kinds = {kind for out in cell.outputs for kind in out.get("data", {})}
        assert kinds & rich, f"no HTML or image for {cell.source!r}: {cell.outputs}"
    records = json.loads(nb.cells[-1].outputs[0]["text"])
    assert {"at", "time_wait_rate"} <= set(records[0])


def test_every_result_type_renders_html(netns: NetNS) -> None:
    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = server.getsockname()[1]
    with server:
        results = [
            twfix.doctor(),
            twfix.summary(),
            twfix.sockets(),
            twfix.ephemeral_usage(),
            twfix.who_holds(port),
            twfix.explain(port, "127.0.0.1"),
            twfix.sysctl.read(),
            twfix.diag.snapshot(ports=twfix.sysctl.port_range()),
            twfix.watch(interval=0.05, duration=0.1, progress=False),
        ]
    for result in results:
        page = result._repr_html_()
        assert "text-align:left" in page, type(result)
    for result in (results[0], results[1], results[2], results[3], results[4], results[6], results[8]):
        assert isinstance(result.to_records(), list)  # type: ignore[attr-defined]


def IPython_pretty(obj: object) -> str:
    pretty = pytest.importorskip("IPython.lib.pretty")
    return str(pretty.pretty(obj))


def test_long_tables_are_cut(netns: NetNS) -> None:
    from tests.conftest import time_wait_pairs

    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    with server:
        time_wait_pairs(server, 300, server_closes=True)
        port = server.getsockname()[1]
        page = twfix.who_holds(port, connections=True)._repr_html_()
        listing = twfix.sockets(port=port)
    # who_holds groups the kernel's sockets as the CLI does: the listener, then one row for 300 TIME-WAITs.
    assert page.count("<tr>") < 6
    assert "(300 sockets)" in page
    html = listing._repr_html_()
    assert html.count("<tr>") < 60
    assert "251 more" in html  # 301 rows: 50 shown
    text = IPython_pretty(listing)
    assert "... 281 more" in text  # the text rendering is cut too (20 rows)
    assert len(text) < 3000


def test_watch_stops_on_ctrl_c_and_keeps_its_samples(netns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    watch_module = importlib.import_module("twfix.watch")  # twfix.watch is the function
    real = watch_module.diag.summary
    calls = []

    def interrupted_third_time(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(watch_module.diag, "summary", interrupted_third_time)
    w = twfix.watch(interval=0.01, duration=10, progress=False)
    assert w.interrupted
    assert len(w.samples) == 2
    assert "stopped early" in str(w)
    calls.clear()
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["watch", "--interval", "0.01", "--duration", "10"], out=out, err=err) == 130  # as Ctrl-C
    assert "stopped early" in out.getvalue()
    with pytest.raises(ValueError, match="interval"):
        twfix.watch(interval=0)
    with pytest.raises(ValueError, match="duration"):
        twfix.watch(duration=float("inf"))


def test_watch_plot_and_cli(netns: NetNS) -> None:
    pytest.importorskip("matplotlib")
    import io

    import matplotlib

    from twfix.cli import main

    matplotlib.use("Agg")
    w = twfix.watch(interval=0.05, duration=0.2, progress=False)
    ax = w.plot()
    assert ax.get_xlabel() == "seconds"
    assert "TIME-WAIT per s" in [t.get_text() for t in ax.get_legend().get_texts()]  # the rate line too
    html = w._repr_html_()
    first, last = (f">{round(s.at, 3)}<" for s in (w.samples[0], w.samples[-1]))
    assert html.index(first) < html.index(last)  # oldest first, as the plot reads
    out = io.StringIO()
    assert main(["watch", "--interval", "0.05", "--duration", "0.1"], out=out, err=io.StringIO()) == 0
    assert "samples over" in out.getvalue()


def test_magics() -> None:
    from twfix import _ipython

    class Shell:
        def __init__(self) -> None:
            self.registered: dict[str, object] = {}

        def register_magic_function(self, fn: object, magic_kind: str, magic_name: str) -> None:
            self.registered[magic_name] = fn

    shell = Shell()
    twfix.load_ipython_extension(shell)
    assert shell.registered["twfix"] is _ipython.run
    assert isinstance(_ipython.run("doctor"), twfix.Report)
    assert isinstance(_ipython.run("explain 1 127.0.0.1"), twfix.Explanation)
    assert isinstance(_ipython.run("sysctl tcp_fin_timeout"), twfix.sysctl.SysctlTable)
    with pytest.raises(ValueError, match="usage"):
        _ipython.run("nonsense")
