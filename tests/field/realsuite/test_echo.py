"""An echo server per test, on the port the project's own fixture hands out."""

import asyncio

import pytest


async def echo(reader, writer):
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("i", range(20))
def test_echo(i, unused_tcp_port):
    async def main():
        await asyncio.sleep(0.02)  # the set-up a real test does before its server starts
        server = await asyncio.start_server(echo, "127.0.0.1", unused_tcp_port)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port)
            writer.write(b"ping %d" % i)
            assert await reader.read(100) == b"ping %d" % i
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())
