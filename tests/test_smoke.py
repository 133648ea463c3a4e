import socket
import subprocess
import sys

import twfix


def test_version_matches_cargo() -> None:
    import pathlib
    import tomllib

    cargo = tomllib.loads((pathlib.Path(__file__).parents[1] / "Cargo.toml").read_text())
    assert twfix.__version__ == cargo["package"]["version"]


def test_netns_is_private(netns) -> None:
    s = twfix.reusable_tcp_server(0, "127.0.0.1")
    with s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1


def test_import_elsewhere_than_linux_fails_with_a_clear_message() -> None:
    code = "import sys; sys.platform = 'darwin'\ntry:\n    import twfix\nexcept ImportError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "twfix supports Linux only" in out
    assert "darwin" in out
