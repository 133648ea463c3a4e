import socket

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
