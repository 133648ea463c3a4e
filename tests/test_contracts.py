"""The public surface: every exported name exists, and the main calls return the documented types."""

from __future__ import annotations

import inspect
import socket

import twfix
from tests.conftest import NetNS


def test_all_names_exist_and_are_sorted() -> None:
    assert sorted(twfix.__all__) == twfix.__all__
    for name in twfix.__all__:
        assert hasattr(twfix, name), name


def test_errors_hierarchy() -> None:
    assert issubclass(twfix.AddressInUseError, OSError)
    assert issubclass(twfix.AddressInUseError, twfix.TwfixError)
    assert issubclass(twfix.UnsupportedPlatformError, NotImplementedError)
    assert issubclass(twfix.sysctl.SysctlUnavailableError, LookupError)
    err = twfix.AddressInUseError("Address already in use: x", address=("127.0.0.1", 1), protocol="tcp")
    assert err.errno == 98
    assert str(err) == "Address already in use: x"
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (again.errno, again.address, again.protocol, str(again)) == (98, ("127.0.0.1", 1), "tcp", str(err))


def test_constructor_signatures_mirror_the_stdlib() -> None:
    params = inspect.signature(twfix.reusable_tcp_server).parameters
    assert list(params)[:2] == ["port", "host"]
    for name in ("backlog", "reuse_port", "dualstack_ipv6", "timeout"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "source_address" in inspect.signature(twfix.reusable_tcp_client).parameters
    assert "Like socket.create_server" in (twfix.reusable_tcp_server.__doc__ or "")


def test_return_types(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "127.0.0.1") as s:
        assert type(s) is socket.socket
        port = s.getsockname()[1]
        entries = twfix.sockets(port=port)
        assert all(isinstance(e, twfix.SocketEntry) for e in entries)
        assert isinstance(entries[0].state, twfix.TcpState)
        assert isinstance(entries[0].laddr, twfix.Addr)
        assert isinstance(entries[0].family, socket.AddressFamily)
        assert isinstance(twfix.summary(), twfix.SocketSummary)
        assert isinstance(twfix.who_holds(port), twfix.Holders)
        assert isinstance(twfix.explain(port), twfix.Explanation)
        assert isinstance(twfix.ephemeral_usage(), list)
    assert isinstance(twfix.doctor(), twfix.Report)
    assert isinstance(twfix.sysctl.read(), twfix.sysctl.SysctlTable)
    with twfix.reusable_udp(0, "127.0.0.1") as u:
        assert type(u) is socket.socket


def test_notebook_renderings_escape_hostile_text(netns: NetNS) -> None:
    """Every HTML rendering escapes what it shows: a program name, a title, a caption."""
    from twfix.diag import TcpState
    from twfix.findings import Finding, Report, Severity
    from twfix.owners import Holders, PortHolder

    evil = "<img src=x onerror=alert(1)>"
    holder = PortHolder(TcpState.LISTEN, twfix.Addr("127.0.0.1", 1), None, 0, 1, 42, evil, (evil,))
    report = Report((Finding("X", Severity.ERROR, evil, {evil: evil}, evil, evil),), kernel=evil)
    summary = twfix.summary()
    pages = [Holders(1, "tcp", (holder,), 0, evil)._repr_html_(), report._repr_html_(), summary._repr_html_()]
    for page in pages:
        assert "<img" not in page
        assert "<table " in page
    assert "&lt;img" in pages[0]
    assert "&lt;img" in pages[1]
