"""What twfix answers where the running kernel lacks a feature, simulated on this kernel by making the
feature probe say "no" (`.ci/kernels` checks the same answers for real on 5.10 and 6.1, which lack them).
Every answer must say what the kernel cannot show, never give a wrong verdict, never raise."""

from __future__ import annotations

import errno
import io
import os
import socket
import warnings
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS
from twfix import cli, features, sysctl


@pytest.fixture
def no_bound_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel whose socket dump has no BOUND_INACTIVE (before 6.8)."""
    monkeypatch.setattr(features, "bound_inactive", lambda: False)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()


def test_asking_for_bound_only_sockets_says_the_kernel_cannot_show_them(netns: NetNS, no_bound_only: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.warns(twfix.KernelCannotTellWarning, match=r"Linux 6\.8"):
            twfix.sockets(states=["BOUND_INACTIVE"], port=port)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a question that does not name the state gets no warning
            twfix.sockets(states=["LISTEN"])
            twfix.summary()
        code, out, err = run_cli("sockets", "--state", "bound-inactive")
        assert code == 0
        assert "note:" in err
        assert "6.8" in err
        assert "Traceback" not in err + out


def test_an_unseen_holder_is_explained_as_possibly_bound_only(
    netns: NetNS, no_bound_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twfix import conflict

    real = conflict.port_entries

    def as_before_6_8(*args: object) -> list[twfix.SocketEntry]:  # the dump of a kernel without BOUND_INACTIVE
        return [e for e in real(*args) if e.state != twfix.TcpState.BOUND_INACTIVE]  # type: ignore[arg-type]

    monkeypatch.setattr(conflict, "port_entries", as_before_6_8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        why = twfix.explain(s.getsockname()[1], "127.0.0.1")
    assert why.cause == "unknown"
    assert any("bound but neither listening nor connected" in r and "6.8" in r for r in why.reasons), why


def test_the_doctor_names_the_features_it_used(netns: NetNS, tmp_path: Path, no_bound_only: None) -> None:
    (tmp_path / "etc").mkdir()
    report = twfix.doctor(root=tmp_path)
    shown = {f.name: f.available for f in report.features}
    assert shown["bound-only sockets in the socket dump (BOUND_INACTIVE)"] is False
    assert "kernel features used:" in str(report)
    assert "bound-only sockets in the socket dump (BOUND_INACTIVE): no" in str(report)
    assert report.to_dict()["kernel_features"][0]["available"] is False


def test_without_tcp_ehash_entries_the_default_comes_from_a_new_namespace(
    netns: NetNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sysctl.read(["net.ipv4.tcp_max_tw_buckets"])["net.ipv4.tcp_max_tw_buckets"].default
    monkeypatch.setattr(sysctl, "_EHASH", "net.ipv4.no_such_knob_before_6_1")  # as on 5.10: no file
    assert sysctl.read(["net.ipv4.tcp_max_tw_buckets"])["net.ipv4.tcp_max_tw_buckets"].default == real
    (tmp_path / "etc").mkdir()
    assert isinstance(real, int)
    (tmp_path / "etc" / "sysctl.conf").write_text(f"net.ipv4.tcp_max_tw_buckets = {real // 2}\n")
    assert twfix.doctor(root=tmp_path).by_code("CONF-TW-BUCKETS-LOWERED")
    # Without root (no namespace can be made) the default is unknown: the line is reported, not judged.
    monkeypatch.setattr(features, "established_hash", lambda: (None, "cannot create a network namespace"))
    report = twfix.doctor(root=tmp_path)
    assert not report.by_code("CONF-TW-BUCKETS-LOWERED")
    (seen,) = report.by_code("CONF-TW-BUCKETS-SET")
    assert "cannot be read" in seen.title


def test_an_absent_knob_is_explained_and_never_suggests_another_absent_one(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _out, err = run_cli("sysctl", "tcp_tw_recycle")
    assert code == 1
    assert "removed in Linux 4.12" in err
    assert "did you mean" not in err
    code, _out, err = run_cli("sysctl", "net.ipv4.tcp_fin_timeot")
    assert "did you mean net.ipv4.tcp_fin_timeout?" in err
    suggested = sysctl.close_match("net.ipv4.tcp_child_ehash_entriez")  # only ever a knob this kernel has
    assert suggested is None or os.path.exists("/proc/sys/" + suggested.replace(".", "/"))
    code, out, err = run_cli("sysctl", "tcp_child_ehash_entries")  # the short name the doctor advises
    assert out.startswith("net.ipv4.tcp_child_ehash_entries = ")  # known by its short name on every kernel
    if os.path.exists("/proc/sys/net/ipv4/tcp_child_ehash_entries"):
        assert code == 0
    else:  # before 6.1: absent, and said with its history (5.10 in .ci/kernels)
        assert code == 1
        assert "added in 6.1" in err


def test_without_pidfd_getfd_a_udp_holders_options_are_unknown_and_said_why(
    netns: NetNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twfix import _twfix

    def enosys(*_args: object) -> tuple[bool, bool]:
        raise OSError(errno.ENOSYS, "pidfd_getfd: Function not implemented")

    monkeypatch.setattr(features, "pidfd_getfd", lambda: False)
    monkeypatch.setattr(_twfix, "socket_reuse_flags", enosys)  # as before 5.6
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        why = twfix.explain(held.getsockname()[1], "127.0.0.1", kind="udp")
    assert not why.can_bind
    assert any("pidfd_getfd, Linux 5.6+" in r for r in why.reasons), why.reasons
