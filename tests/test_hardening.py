"""Attacks and faults: twfix fails safe (a clear error, nothing overwritten, nothing hung, nothing lost)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import twfix
from tests.conftest import NetNS, run_unprivileged
from twfix import _safefile, cli, sysctl, tune
from twfix.errors import TwfixError

NOBODY = 65534


@pytest.fixture
def plan(netns: NetNS, tmp_path: Path) -> tune.Plan:
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    root = tmp_path / "root"
    (root / "etc" / "sysctl.d").mkdir(parents=True)
    return tune.plan(root=root)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own temporary tree is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="twfix-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    d = tmp_path / "sysctl.d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def cli_run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ file writes


def test_backup_symlink_is_never_followed(plan: tune.Plan, confdir: Path, tmp_path: Path) -> None:
    target = confdir / "99-twfix.conf"
    tune.write(plan, target)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (confdir / "99-twfix.conf.bak").symlink_to(victim)
    with pytest.raises(FileExistsError, match="symbolic link"):
        tune.write(plan, target)
    assert victim.read_text() == "precious\n"
    assert target.read_text() == plan.snippet()


def test_foreign_backup_is_not_overwritten(plan: tune.Plan, confdir: Path) -> None:
    target = confdir / "99-twfix.conf"
    tune.write(plan, target)
    (confdir / "99-twfix.conf.bak").write_text("net.core.somaxconn = 1024\n")
    with pytest.raises(FileExistsError, match="not written by twfix"):
        tune.write(plan, target)
    assert (confdir / "99-twfix.conf.bak").read_text() == "net.core.somaxconn = 1024\n"


def test_directory_another_user_controls_is_refused(plan: tune.Plan, public_tmp: Path) -> None:
    """uid 65534 owns the directory and plants a link at PATH.bak: nothing is written at all."""
    tmp_path = public_tmp
    evil = tmp_path / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted = run_unprivileged(
        "import os, sys; os.symlink(sys.argv[2], os.path.join(sys.argv[1], '99-twfix.conf.bak'))",
        str(evil),
        str(victim),
    )
    assert planted.returncode == 0, planted.stderr
    with pytest.raises(PermissionError, match="uid 65534"):
        tune.write(plan, evil / "99-twfix.conf")
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in evil.iterdir()) == ["99-twfix.conf.bak"]
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may add names
    with pytest.raises(PermissionError, match="writable by other users"):
        tune.write(plan, shared / "99-twfix.conf")


def test_mode_is_set_on_the_descriptor(plan: tune.Plan, confdir: Path) -> None:
    old = os.umask(0o077)
    try:
        written = tune.write(plan, confdir / "99-twfix.conf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.path.stat().st_mode) == 0o644
    assert [p.name for p in confdir.iterdir()] == ["99-twfix.conf"]  # no temporary left behind


def test_a_file_that_appears_during_the_write_is_put_back(
    plan: tune.Plan, confdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between "this file is ours" and the rename: a concurrent writer puts its own file there."""
    target = confdir / "99-twfix.conf"
    tune.write(plan, target)
    real = _safefile.write_temp

    def racing(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> str:
        tmp = real(dir_fd, name, data, mode)
        foreign = confdir / "foreign.tmp"
        foreign.write_text("net.core.somaxconn = 1024\n")
        os.replace(foreign, target)  # the other writer wins the race to the name
        return tmp

    monkeypatch.setattr(_safefile, "write_temp", racing)
    with pytest.raises(FileExistsError, match="not written by twfix"):
        tune.write(plan, target)
    assert target.read_text() == "net.core.somaxconn = 1024\n"  # put back, not replaced
    assert sorted(p.name for p in confdir.iterdir()) == ["99-twfix.conf"]


def test_concurrent_writer_never_loses_a_file(plan: tune.Plan, confdir: Path) -> None:
    """A bounded race: another writer keeps replacing the file with its own; twfix must never replace one."""
    target = confdir / "99-twfix.conf"
    stop = threading.Event()
    written: list[int] = []

    def other_writer() -> None:
        i = 0
        while not stop.is_set() and i < 5000:
            tmp = confdir / f"other.{i}"
            tmp.write_text(f"# other writer {i}\n")
            os.replace(tmp, target)
            written.append(i)
            i += 1

    thread = threading.Thread(target=other_writer)
    thread.start()
    ours = 0
    try:
        for _ in range(400):
            try:
                tune.write(plan, target)
                ours += 1
            except FileExistsError:
                pass
    finally:
        stop.set()
        thread.join(timeout=30)
    # twfix replaces only its own files, so every file it displaced was one of its own snippets.
    backup = confdir / "99-twfix.conf.bak"
    if backup.exists():
        assert backup.read_text() == plan.snippet()
    leftovers = [p.name for p in confdir.iterdir() if p.name.startswith(".99-twfix")]
    assert leftovers == []
    assert written  # the race really ran


def test_fifos_devices_and_odd_paths_are_refused_without_hanging(plan: tune.Plan, confdir: Path) -> None:
    fifo = confdir / "99-twfix.conf"
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match="not a regular file"):
        tune.write(plan, fifo)
    os.unlink(fifo)
    tune.write(plan, fifo)
    os.mkfifo(confdir / "99-twfix.conf.bak")
    with pytest.raises(FileExistsError, match="not a regular file"):
        tune.write(plan, fifo)
    with pytest.raises(ValueError, match="empty"):
        tune.write(plan, "")
    with pytest.raises(IsADirectoryError):
        tune.write(plan, f"{confdir}/")
    with pytest.raises(FileExistsError, match="not a regular file"):
        tune.write(plan, "/dev/zero")
    huge = confdir / "huge.conf"
    huge.write_bytes(tune.MARKER.encode() + b"\n" + b"#" * (1 << 20))
    with pytest.raises(FileExistsError, match="larger"):
        tune.write(plan, huge)
    for argv in (["tune", "--write", ""], ["tune", "--write", f"{confdir}/"], ["tune", "--write", "/dev/zero"]):
        code, _, err = cli_run(*argv)
        assert code in (1, 2), argv
        assert "Traceback" not in err
        assert err.strip()


def test_apply_is_all_or_nothing(netns: NetNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    netns.write_sysctl("net.ipv4.tcp_timestamps", "0")
    netns.write_sysctl("net.ipv4.ip_local_port_range", "40000 40998")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    p = tune.plan(root=root)
    assert len(p.changes) >= 2
    real = tune._set
    calls = []

    def second_fails(name: str, value: object) -> object:
        calls.append(name)
        if len(calls) == 2:
            raise PermissionError(13, "simulated failure")
        return real(name, value)

    monkeypatch.setattr(tune, "_set", second_fails)
    with pytest.raises(TwfixError, match="set back"):
        tune.apply(p)
    assert netns.read_sysctl("net.ipv4.tcp_timestamps") == "0"
    assert netns.read_sysctl("net.ipv4.ip_local_port_range").split() == ["40000", "40998"]


# ------------------------------------------------------------------ hangs and panics


def test_namespace_path_that_is_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "ns"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ValueError, match="not a network namespace"):
        sysctl.get("net.ipv4.tcp_fin_timeout", netns=fifo)
    with pytest.raises(ValueError, match="not a network namespace"):
        sysctl.read(netns=str(fifo))
    assert time.monotonic() - started < 10


PIDS_CHILD = """
import json, socket, sys, twfix
sys.stdin.readline()  # wait until the parent has capped this process's threads
out = {}
try:
    srv = twfix.reusable_tcp_server(0, "127.0.0.1")
    out["summary"] = twfix.summary().total
    out["sockets"] = len(twfix.sockets())
    try:
        twfix.reusable_tcp_server(srv.getsockname()[1], "127.0.0.1")
    except twfix.AddressInUseError as exc:
        out["explained"] = exc.explanation is not None
    try:
        import os
        twfix.sysctl.get("net.ipv4.tcp_fin_timeout", pid=os.getpid())
    except OSError as exc:
        out["netns_errno"] = exc.errno
    try:
        import threading
        threading.Thread(target=lambda: None).start()
        out["threads"] = "possible"
    except RuntimeError:
        out["threads"] = "impossible"
except BaseException as exc:
    out["error"] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out), flush=True)
"""


def test_no_thread_to_be_had_is_not_a_panic(netns: NetNS) -> None:
    """A pids limit: the socket table needs no thread and works; entering a namespace is an OSError."""
    base = Path("/sys/fs/cgroup/pids")
    if not (base / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids controller at /sys/fs/cgroup/pids")
    group = base / f"twfix-test-{os.getpid()}"
    group.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", PIDS_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        (group / "cgroup.procs").write_text(str(child.pid))
        (group / "pids.max").write_text((group / "pids.current").read_text().strip())
        out, _ = child.communicate("go\n", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        group.rmdir()
    result = json.loads(out)
    assert "error" not in result, result
    assert result["threads"] == "impossible"  # the limit really holds
    assert result["summary"] >= 1
    assert result["explained"] is True
    assert result["netns_errno"] == 11  # EAGAIN: a clear OSError, not a PanicException


# ------------------------------------------------------------------ hostile text


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\nfake line\u202e"
HOSTILE_CHILD = """
import socket, sys, time
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[1][:15])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""


@pytest.fixture
def hostile_listener(netns: NetNS) -> Iterator[int]:
    """A listener of uid 65534 whose process name and command line carry terminal escape sequences."""
    from tests.conftest import _NOBODY, unprivileged_python

    python, path = unprivileged_python()
    proc = subprocess.Popen(
        [*_NOBODY, python, "-c", HOSTILE_CHILD, HOSTILE],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=path),
    )
    assert proc.stdout is not None
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.communicate()


def _clean(text: str) -> None:
    for bad in ("\x1b", "\x07", "\u202e", "\nfake line"):
        assert bad not in text, repr(text)


def test_hostile_process_names_never_reach_the_terminal(hostile_listener: int) -> None:
    port = hostile_listener
    for argv in (["who", str(port)], ["explain", str(port), "--host", "127.0.0.1"]):
        _code, out, err = cli_run(*argv)
        _clean(out + err)
        assert "\\x1b" in out, out  # shown, escaped
    with pytest.raises(twfix.AddressInUseError) as caught:
        twfix.reusable_tcp_server(port, "127.0.0.1")
    _clean(str(caught.value))
    holder = twfix.who_holds(port).holders[0]
    assert HOSTILE in " ".join(holder.cmdline)  # the raw value stays in the structured fields
    assert HOSTILE in twfix.who_holds(port).to_dict()["holders"][0]["cmdline"]
    _clean(str(twfix.who_holds(port)))
    _clean(twfix.who_holds(port)._repr_html_())


# ------------------------------------------------------------------ degrading, not failing


def test_one_unreadable_directory_hides_nothing(public_tmp: Path) -> None:
    tmp_path = public_tmp
    root = tmp_path / "root"
    (root / "etc" / "sysctl.d").mkdir(parents=True)
    (root / "etc" / "sysctl.d" / "10-old.conf").write_text("net.ipv4.tcp_tw_recycle = 1\n")
    (root / "run" / "sysctl.d").mkdir(parents=True)
    (root / "run" / "sysctl.d").chmod(0o700)
    for folder in (tmp_path, root, root / "etc", root / "etc" / "sysctl.d", root / "run"):
        folder.chmod(0o755)
    script = "import json, sys, twfix\nprint(json.dumps([f.code for f in twfix.doctor(root=sys.argv[1]).findings]))"
    proc = run_unprivileged(script, str(root))
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout)
    assert "CONF-UNREADABLE" in codes
    assert "CONF-TW-RECYCLE" in codes  # the readable file was still checked


def test_bad_values_are_findings_about_their_line(netns: NetNS, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "sysctl.d").mkdir(parents=True)
    (root / "etc" / "sysctl.d" / "50-bad.conf").write_text(
        "net.ipv4.tcp_max_tw_buckets = \u00b2\nnet.ipv4.tcp_tw_recycle = 1\n"
    )
    report = twfix.doctor(root=root)
    (bad,) = report.by_code("CONF-BAD-VALUE")
    assert bad.evidence["line"] == 1
    assert report.by_code("CONF-TW-RECYCLE")  # the rest still runs
    assert sysctl.parse("net.ipv4.tcp_fin_timeout", "\u00b2") == "\u00b2"  # text, not a crash
    code, _, err = cli_run("doctor", "--root", str(root))
    assert code == 1
    assert "Traceback" not in err


def test_one_unreadable_knob_is_a_note(netns: NetNS) -> None:
    code, out, err = cli_run("sysctl", "net.ipv4.route.flush", "net.ipv4.tcp_fin_timeout")
    assert code == 0, err
    assert "unreadable" in out
    assert "net.ipv4.tcp_fin_timeout = " in out
    table = sysctl.read(["net.ipv4.route.flush", "net.ipv4.tcp_fin_timeout"])
    assert table["net.ipv4.route.flush"].error is not None
    assert table["net.ipv4.tcp_fin_timeout"].value == int(netns.read_sysctl("net.ipv4.tcp_fin_timeout"))
    with pytest.raises(PermissionError):
        sysctl.get("net.ipv4.route.flush")


def test_cli_edges_are_not_usage_errors(netns: NetNS, hostile_listener: int) -> None:
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    err = io.StringIO()
    assert cli.main(["who", str(hostile_listener)], out=ascii_out, err=err) == 0
    ascii_out.flush()
    assert "Traceback" not in err.getvalue()
    closed = io.StringIO()
    closed.close()
    err = io.StringIO()
    assert cli.main(["sockets"], out=closed, err=err) == 1
    assert "closed" in err.getvalue()
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(200)]
    try:
        proc = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {sys.executable} -m twfix sockets | head -1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        for s in listeners:
            s.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    proc = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m twfix sockets >&-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr


def test_file_parsers_never_crash_on_random_text() -> None:
    """Config lines and knob values come from files and the kernel: random text never raises."""
    import random

    from twfix.sysctl_conf import assignments

    rng = random.Random(20261125)
    alphabet = "0123456789 -=,.#;\t\n\x00\x1b\u00b2\u0663abcnet.ipv4.tcp_"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        for name in ("net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_fin_timeout"):
            value = sysctl.parse(name, text)
            assert isinstance(value, int | str | tuple | list)
        list(assignments(text))
        sysctl.is_int_text(text)
