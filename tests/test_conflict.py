"""twfix.explain and the explanation carried by AddressInUseError, case by case on the real kernel."""

from __future__ import annotations

import json
import os
import socket

import pytest

import twfix
from tests.conftest import NetNS, listener_without_reuseaddr, run_unprivileged, time_wait_pairs


def test_free_port(netns: NetNS) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    why = twfix.explain(port, "127.0.0.1")
    assert why.can_bind
    assert why.can_bind_with_reuse
    assert "free" in why.verdict
    assert twfix.explain(0).can_bind


def test_time_wait_with_reuseaddr_needs_only_the_option(netns: NetNS) -> None:
    server = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = server.getsockname()[1]
    with server:
        time_wait_pairs(server, 4, server_closes=True)
    why = twfix.explain(port, "127.0.0.1")
    assert not why.can_bind
    assert why.can_bind_with_reuse
    assert why.time_wait == 4
    assert why.time_wait_reuseaddr is True
    assert why.frees_in is not None
    assert 50 < why.frees_in <= 60
    assert "SO_REUSEADDR" in why.verdict
    data = json.loads(why.to_json())
    assert data["time_wait"] == 4


def test_time_wait_without_reuseaddr(netns: NetNS) -> None:
    old, port = listener_without_reuseaddr()
    with old:
        time_wait_pairs(old, 2, server_closes=True)
    why = twfix.explain(port, "0.0.0.0")  # the wildcard overlaps the TIME-WAITs' 127.0.0.1
    assert not why.can_bind_with_reuse
    assert why.time_wait_reuseaddr is False
    assert "did not set SO_REUSEADDR" in why.verdict


def test_dual_stack_listener_blocks_ipv4_wildcard(netns: NetNS) -> None:
    with twfix.reusable_tcp_server(0, "", dualstack_ipv6=True) as ds:
        port = ds.getsockname()[1]
        why = twfix.explain(port, "0.0.0.0")
        assert not why.can_bind
        assert why.holders
        assert why.holders[0].laddr == ("::", port)
        assert why.holders[0].pid == os.getpid()
        assert "overlapping [::]" in why.verdict
        # A v6-only listener does not conflict with IPv4.
    with twfix.reusable_tcp_server(0, "::") as v6only:
        assert twfix.explain(v6only.getsockname()[1], "0.0.0.0").can_bind


def test_udp_holder_and_reuse_port(netns: NetNS) -> None:
    with twfix.reusable_udp(0, "127.0.0.1", reuse_port=True) as u:
        port = u.getsockname()[1]
        why = twfix.explain(port, "127.0.0.1", kind="udp")
        assert not why.can_bind
        assert why.can_bind_with_reuse  # same user, SO_REUSEPORT on both
        assert why.holders[0].state == "CLOSE"  # one name everywhere: sockets() says CLOSE too
        assert "SO_REUSEPORT" in " ".join(why.reasons)


def test_reserved_port_is_reported(netns: NetNS) -> None:
    netns.write_sysctl("net.ipv4.ip_local_reserved_ports", "45000")
    with twfix.reusable_tcp_server(45000, "127.0.0.1"):
        why = twfix.explain(45000, "127.0.0.1")
        assert why.reserved
        assert "ip_local_reserved_ports" in str(why)


def test_privileged_port_as_unprivileged_user(netns: NetNS) -> None:
    script = (
        "import json, twfix\n"
        "w = twfix.explain(80, '127.0.0.1')\n"
        "print(json.dumps([w.privileged, w.can_bind, w.verdict]))\n"
    )
    proc = run_unprivileged(script)
    assert proc.returncode == 0, proc.stderr
    privileged, can_bind, verdict = json.loads(proc.stdout)
    assert privileged is True
    assert can_bind is False
    assert "CAP_NET_BIND_SERVICE" in verdict


def test_address_not_on_host(netns: NetNS) -> None:
    why = twfix.explain(8080, "192.0.2.7")  # TEST-NET-1: never configured here; nothing is sent
    assert not why.can_bind
    assert "not an address of this host" in why.verdict


def test_explanation_html_escapes(netns: NetNS) -> None:
    why = twfix.explain(0)
    forged = type(why)(why.kind, "<h>", why.address, "<script>x</script>", True, True, ("<b>",), ("&",))
    page = forged._repr_html_()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "&amp;" in page


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="port"):
        twfix.explain(-1)
    with pytest.raises(TypeError, match="host"):
        twfix.explain(80, host=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        twfix.explain(80, kind="raw")
