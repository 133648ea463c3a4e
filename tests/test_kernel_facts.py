"""Experiments on the running kernel that check twfix.kernel's facts (the kernel is the oracle): if one
fails, the kernel differs from what twfix assumes, and twfix.kernel is where to look.

Marked ``kernel``: `.ci/kernels` runs them inside every kernel of the matrix (5.10 to the newest). A fact
that only some kernels have is checked against what twfix.features probed, never against a version.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess

import pytest

import twfix
from tests.conftest import NetNS, time_wait_pairs
from twfix import _catalogue, _twfix, features, kernel, sysctl

pytestmark = pytest.mark.kernel


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
        # From 6.8 asking for BOUND_INACTIVE shows it; before, nothing does, and the probe must say so.
        assert (walked, asked) == (0, 1 if features.bound_inactive() else 0)


def test_a_new_namespace_caps_time_wait_at_half_the_established_hash() -> None:
    names = ["net.ipv4.tcp_max_tw_buckets", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_ehash_entries"]
    try:
        fresh = dict(_twfix.fresh_netns_sysctls(names))
    except PermissionError:
        pytest.skip("needs root to create a network namespace")
    buckets, backlog = int(fresh[names[0]] or 0), int(fresh[names[1]] or 0)
    ehash, _how = features.established_hash()
    assert ehash == 2 * buckets  # the probe twfix uses where tcp_ehash_entries is missing (before 6.1)
    ((_key, child, _error),) = _twfix.read_sysctls(["net.ipv4.tcp_child_ehash_entries"])  # None before 6.1
    if child not in (None, "0"):
        return  # a new namespace gets a hash of its own: nothing more to compare
    if fresh[names[2]] is not None:
        assert abs(int(fresh[names[2]])) == ehash  # 6.1+: a new namespace shares the host's hash
    assert backlog == max(128, ehash // 128)
    boot = _boot_log_hash()
    if boot is not None:
        assert ehash == boot  # the size the kernel logged when it allocated the hash at boot


def _boot_log_hash() -> int | None:
    """The established hash size from the boot log ("TCP established hash table entries: N"), if readable."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"TCP established hash table entries: (\d+)", log)
    return int(found.group(1)) if found else None


def test_per_namespace_knobs_exist_in_a_new_namespace_and_host_only_ones_do_not() -> None:
    names = list(_catalogue.CATALOGUE)
    try:
        fresh = dict(_twfix.fresh_netns_sysctls(names))
    except PermissionError:
        pytest.skip("needs root to create a network namespace")
    here = {key: raw for key, raw, _error in _twfix.read_sysctls(names)}
    for name, knob in _catalogue.CATALOGUE.items():
        if here[name] is not None:
            assert (fresh[name] is not None) == knob.per_netns, name


def test_every_fixed_default_holds_in_a_new_namespace() -> None:
    names = [n for n, k in _catalogue.CATALOGUE.items() if k.per_netns and not isinstance(k.default, str | None)]
    try:
        fresh = _twfix.fresh_netns_sysctls(names)
    except PermissionError:
        pytest.skip("needs root to create a network namespace")
    for name, raw in fresh:
        if raw is not None:  # a knob this kernel lacks is the features' business
            assert sysctl.parse(name, raw) == _catalogue.CATALOGUE[name].default, name


def test_sockstat_counts_time_wait_of_this_namespace_only(netns: NetNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        time_wait_pairs(srv, 3, server_closes=True)
    with open("/proc/net/sockstat") as f:
        tcp = next(line for line in f if line.startswith("TCP:")).split()
    assert int(tcp[tcp.index("tw") + 1]) == 3


def test_tw_recycle_is_gone_and_reuse_delay_is_where_the_features_say() -> None:
    assert not os.path.exists("/proc/sys/net/ipv4/tcp_tw_recycle")  # removed in 4.12
    present = os.path.exists("/proc/sys/net/ipv4/tcp_tw_reuse_delay")
    assert present == next(f.available for f in features.features() if f.name == "tcp_tw_reuse_delay")


def test_time_wait_blocks_a_plain_bind_but_not_a_reuse_bind(netns: NetNS) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    time_wait_pairs(srv, 1, server_closes=True)
    srv.close()
    with socket.socket() as plain, pytest.raises(OSError) as info:
        plain.bind(("127.0.0.1", port))
    assert info.value.errno == errno.EADDRINUSE
    with socket.socket() as reuse:
        reuse.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reuse.bind(("127.0.0.1", port))
        reuse.listen()


def test_a_live_listener_blocks_even_a_reuse_bind_and_udp_reuseaddr_shares(netns: NetNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.socket() as second:
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError) as info:
            second.bind(srv.getsockname())
        assert info.value.errno == errno.EADDRINUSE
    with socket.socket(type=socket.SOCK_DGRAM) as a, socket.socket(type=socket.SOCK_DGRAM) as b:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        a.bind(("127.0.0.1", 0))
        b.bind(a.getsockname())  # the datagram-theft fact the UDP constructor's safety rests on


def test_the_orphan_give_up_time_follows_tcp_model_timeout() -> None:
    assert round(kernel.orphan_give_up_seconds(8), 1) == 102.2  # (2**9 - 1) * 200 ms
    assert round(kernel.orphan_give_up_seconds(15), 1) == round(1023 * 0.2 + 6 * 120, 1)  # linear past 2**9
