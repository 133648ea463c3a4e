"""Serving real frameworks on twfix sockets: the README's recipes, each run for real.

Every recipe hands a listener made by twfix to the framework and answers one HTTP request through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import twfix
from tests.conftest import NetNS


def http_get(port: int, *, attempts: int = 50) -> bytes:
    for _ in range(attempts):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/")
            return conn.getresponse().read()
        except (ConnectionError, http.client.HTTPException):
            time.sleep(0.1)
        finally:
            conn.close()
    raise AssertionError(f"no HTTP answer on port {port}")


@contextlib.contextmanager
def loop_in_thread(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Run ``loop`` on a thread for the body of the ``with``; stopped (not closed) afterwards."""
    thread = in_thread(loop.run_forever)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def in_thread(serve: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


async def asgi_app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


def test_asyncio(netns: NetNS) -> None:
    sock = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(handle, sock=sock))  # asyncio makes it non-blocking
    try:
        with loop_in_thread(loop):
            assert http_get(port) == b"ok"
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def test_uvicorn(netns: NetNS) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    sock = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi_app, lifespan="off", log_level="error"))
    thread = in_thread(lambda: asyncio.run(server.serve(sockets=[sock])))
    try:
        assert http_get(port) == b"ok"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_aiohttp(netns: NetNS) -> None:
    web = pytest.importorskip("aiohttp.web")
    sock = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()

    async def hello(request: object) -> object:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    try:
        with loop_in_thread(loop):
            assert http_get(port) == b"ok"
    finally:
        loop.run_until_complete(runner.cleanup())
        loop.close()
        sock.close()


def test_tornado_needs_and_gets_a_non_blocking_socket(netns: NetNS) -> None:
    pytest.importorskip("tornado")
    from tornado.httpserver import HTTPServer
    from tornado.ioloop import IOLoop
    from tornado.web import Application, RequestHandler

    class Hello(RequestHandler):
        def get(self) -> None:
            self.write("ok")

    sock = twfix.reusable_tcp_server(0, "127.0.0.1", blocking=False)  # add_sockets() needs O_NONBLOCK
    assert sock.getblocking() is False
    port = sock.getsockname()[1]
    holder: dict[str, object] = {}

    def serve() -> None:
        async def main() -> None:
            server = HTTPServer(Application([("/", Hello)]))
            server.add_sockets([sock])
            holder["loop"] = IOLoop.current()
            holder["server"] = server
            await asyncio.Event().wait()

        with contextlib.suppress(RuntimeError):  # the loop is stopped from the test
            asyncio.run(main())

    thread = in_thread(serve)
    try:
        assert http_get(port) == b"ok"
    finally:
        deadline = time.monotonic() + 5
        while "loop" not in holder and time.monotonic() < deadline:
            time.sleep(0.05)
        loop = holder["loop"]
        loop.add_callback(holder["server"].stop)  # type: ignore[attr-defined]
        loop.add_callback(loop.stop)  # type: ignore[attr-defined]
        thread.join(timeout=10)
        sock.close()


def test_gunicorn_fd(netns: NetNS, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("gunicorn")
    (tmp_path / "app.py").write_text(
        "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n"
    )
    sock = twfix.reusable_tcp_server(0, "127.0.0.1")
    port = sock.getsockname()[1]
    sock.set_inheritable(True)  # twfix sockets are close-on-exec; gunicorn must inherit this one
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "1", "--bind", f"fd://{sock.fileno()}", "app:app"],
        cwd=tmp_path,
        pass_fds=(sock.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert http_get(port) == b"ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sock.close()
