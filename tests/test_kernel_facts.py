"""Experiments on the running kernel that check twfix.kernel's facts (the kernel is the oracle): if one
fails, the kernel differs from what twfix assumes, and twfix.kernel is where to look."""

from __future__ import annotations

import socket

import twfix
from tests.conftest import NetNS, time_wait_pairs
from twfix import _twfix, kernel, sysctl


def test_a_fresh_namespace_has_the_defaults_twfix_assumes(netns: NetNS) -> None:
    assert sysctl.get("net.ipv4.ip_local_port_range") == kernel.DEFAULT_PORT_RANGE
    assert sysctl.get("net.ipv4.ip_unprivileged_port_start") == kernel.UNPRIVILEGED_PORT_START
    assert sysctl.get("net.ipv4.tcp_orphan_retries") == 0  # which tcp_orphan_retries() reads as 8


def test_connect_and_bind0_search_opposite_parities_first(netns: NetNS) -> None:
    netns.sysctl("net.ipv4.ip_local_port_range", (40000, 40099))
    with socket.create_server(("127.0.0.1", 8080)) as srv:
        clients = [socket.create_connection(("127.0.0.1", 8080)) for _ in range(20)]
        bound = []
        for _ in range(20):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            bound.append(s)
        try:
            assert all(kernel.connect_first(40000, c.getsockname()[1]) for c in clients)
            assert all(kernel.bind_first(40000, s.getsockname()[1]) for s in bound)
        finally:
            for s in [*clients, *bound]:
                s.close()
            srv.close()


def test_time_wait_lasts_time_wait_seconds(netns: NetNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        time_wait_pairs(srv, 1, server_closes=True)
    (entry,) = twfix.sockets(states=["TIME_WAIT"])
    assert entry.expires is not None
    assert kernel.TIME_WAIT_SECONDS - 5 < entry.expires <= kernel.TIME_WAIT_SECONDS


def test_a_whole_table_walk_leaves_bound_only_sockets_out(netns: NetNS) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        walked = _twfix.netlink_discard("tcp", kernel.WALK_STATES, True)
        asked = _twfix.netlink_discard("tcp", kernel.state_mask((13,)), True)
        assert (walked, asked) == (0, 1)


def test_the_orphan_give_up_time_follows_tcp_model_timeout() -> None:
    assert round(kernel.orphan_give_up_seconds(8), 1) == 102.2  # (2**9 - 1) * 200 ms
    assert round(kernel.orphan_give_up_seconds(15), 1) == round(1023 * 0.2 + 6 * 120, 1)  # linear past 2**9
