"""twfix metrics against Prometheus's own tools and server, and against `ss` inside each namespace."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import NetNS
from twfix.cli import main

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("TWFIX_REQUIRE_PROMETHEUS", "") not in ("", "0")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRED:
            pytest.fail(f"TWFIX_REQUIRE_PROMETHEUS is set but {name} is not installed (Debian: prometheus)")
        pytest.skip(f"{name} is not installed (Debian's prometheus package provides it)")
    return path


def metrics(*args: str) -> str:
    out = io.StringIO()
    assert main(["metrics", *args], out=out, err=io.StringIO()) == 0
    return out.getvalue()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    ]


POPULATE = """
import socket, sys, time
n = int(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 0), backlog=128)
done = 0
while done < n:
    batch = min(64, n - done)
    clients = [socket.create_connection(srv.getsockname()) for _ in range(batch)]
    accepted = [srv.accept()[0] for _ in clients]
    for a in accepted:
        a.close()   # the server closes first: TIME-WAIT here
    for c in clients:
        c.recv(1)
        c.close()
    done += batch
def time_wait():  # the last FINs may still sit in a late softirq on a busy host: wait for all n
    lines = [l.split() for f in ("/proc/net/tcp", "/proc/net/tcp6") for l in open(f).readlines()[1:]]
    return sum(1 for l in lines if l[3] == "06")
deadline = time.monotonic() + 20
while time_wait() < n and time.monotonic() < deadline:
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(120)
"""


class Space:
    """A namespace made by the test, holding `time_wait` TIME-WAIT sockets and one listener."""

    def __init__(self, name: str | None, time_wait: int) -> None:
        self.name = name
        if name is not None:
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
            prefix = ["ip", "netns", "exec", name]
        else:
            prefix = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", POPULATE, str(time_wait)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid
        self.inode = os.stat(f"/proc/{self.pid}/ns/net").st_ino

    def ss_time_wait(self) -> int:
        out = subprocess.run(
            ["nsenter", f"--net=/proc/{self.pid}/ns/net", "ss", "-tanH", "state", "time-wait"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return len(out.splitlines())

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()
        if self.name is not None:
            subprocess.run(["ip", "netns", "delete", self.name], check=False)


@pytest.fixture
def spaces(netns: NetNS) -> Iterator[list[Space]]:
    made: list[Space] = []
    try:
        made.append(Space(f"twfix-a-{os.getpid()}", 120))
        made.append(Space(f"twfix-b-{os.getpid()}", 45))
        made.append(Space(None, 70))  # unnamed, like a container's
        yield made
    finally:
        for s in made:
            s.close()


def test_output_passes_promtool(netns: NetNS, tmp_path: Path) -> None:
    promtool = _tool("promtool")
    text = metrics()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "# TYPE twfix_tcp_time_wait_overflow_total counter" in text
    path = tmp_path / "twfix.prom"
    assert metrics("--textfile", str(path)) == ""
    assert [p.name for p in tmp_path.iterdir()] == ["twfix.prom"]  # written atomically, no temporary left
    check = subprocess.run([promtool, "check", "metrics"], input=path.read_text(), capture_output=True, text=True)
    assert check.returncode == 0


def test_rules_and_dashboard() -> None:
    promtool = _tool("promtool")
    rules = ROOT / "deploy" / "prometheus" / "twfix-alerts.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "twfix-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in ("twfix_netns_tcp_time_wait", "twfix_time_wait_bucket_usage_ratio", "twfix_ephemeral_ports_free"):
        assert name in exprs
        assert name in rules.read_text() or name == "twfix_netns_tcp_time_wait"


def test_every_namespace_matches_ss_inside_it(spaces: list[Space]) -> None:
    text = metrics("--all-netns", "--detail", "100")  # other test workers may have busier namespaces
    tw = {labels["netns"]: (labels, value) for labels, value in samples(text, "twfix_netns_tcp_time_wait")}
    for space in spaces:
        assert str(space.inode) in tw, (space.name, space.pid, space.inode, sorted(tw))
        labels, value = tw[str(space.inode)]
        assert value == space.ss_time_wait() == {120: 120, 45: 45, 70: 70}[int(value)]
        assert labels["netns_name"] == (space.name or "")
    info = {labels["netns"]: labels for labels, _v in samples(text, "twfix_netns_info")}
    assert info[str(spaces[2].inode)]["pid"] == str(spaces[2].pid)
    assert info[str(spaces[2].inode)]["program"] == "python"
    # The three busiest get detail: states and the port series (top N plus "other") add up.
    detailed = {
        labels["netns"]: value for labels, value in samples(text, "twfix_tcp_sockets") if labels["state"] == "TIME_WAIT"
    }
    for space in spaces:
        assert detailed[str(space.inode)] == space.ss_time_wait()
    by_port = samples(text, "twfix_tcp_time_wait_by_local_port")
    assert sum(v for labels, v in by_port if labels["netns"] == str(spaces[0].inode)) == 120
    assert samples(metrics(), "twfix_namespaces")[0][1] == 1  # without --all-netns: the caller's alone


def test_a_real_prometheus_scrapes_two_namespaces(
    spaces: list[Space], tmp_path: Path, twfix_port_factory: Callable[..., int]
) -> None:
    prometheus = _tool("prometheus")
    exporter_port, prom_port = twfix_port_factory(), twfix_port_factory()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "twfix", "metrics", "--all-netns", "--detail", "3", "--serve", str(exporter_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert exporter.stdout is not None
    assert exporter.stdout.readline().startswith(f"serving /metrics on 127.0.0.1:{exporter_port}")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: twfix\n    static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n"
    )
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Two scrapes at once never block each other (each collects in its own thread).
        with (
            urllib.request.urlopen(f"http://127.0.0.1:{exporter_port}/metrics", timeout=30) as a,
            urllib.request.urlopen(f"http://127.0.0.1:{exporter_port}/metrics", timeout=30) as b,
        ):
            assert b"twfix_netns_tcp_time_wait" in a.read()
            assert b"twfix_netns_tcp_time_wait" in b.read()
        wanted = {s.name: s for s in spaces[:2]}
        found: dict[str, float] = {}
        deadline = time.monotonic() + 60
        query = f"http://127.0.0.1:{prom_port}/api/v1/query?query=twfix_netns_tcp_time_wait"
        while time.monotonic() < deadline and set(found) != set(wanted):
            time.sleep(1)
            try:
                with urllib.request.urlopen(query, timeout=5) as reply:
                    data = json.loads(reply.read())
            except OSError:
                continue
            for series in data["data"]["result"]:
                name = series["metric"].get("netns_name", "")
                if name in wanted:
                    found[name] = float(series["value"][1])
        assert found == {name: float(s.ss_time_wait()) for name, s in wanted.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)
        exporter.terminate()
        exporter.communicate(timeout=30)
    listening = subprocess.run(["ss", "-tlnH"], capture_output=True, text=True, check=True).stdout
    assert f"0.0.0.0:{exporter_port}" not in listening  # loopback by default, and gone when stopped
