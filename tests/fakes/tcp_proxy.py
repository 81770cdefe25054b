"""A TCP proxy on loopback that can play a database outage, for tests.

The gateway reaches a real server (PostgreSQL) through it; the test then breaks the
path without touching the server, which other tests share:

    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()        # proxy.port: point the gateway's URL here
    await proxy.stop_server()  # "stopped": listener closed, every connection reset;
                               # new connections are refused (ECONNREFUSED)
    proxy.freeze()             # "frozen": connections are accepted and kept open,
                               # but no byte moves in either direction
    await proxy.resume()       # forwards again on the same port
    await proxy.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        # Bind once to learn a free port, then keep using it across stop/resume.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """Keeps accepting and holding connections, but forwards nothing."""
        self._flowing.clear()

    async def stop_server(self) -> None:
        """Like a stopped server: nothing listens, open connections are reset."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()

    async def resume(self) -> None:
        """Forwards again (listening again when stopped)."""
        self._flowing.set()
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.stop_server()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_writer)
        await self._flowing.wait()
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _reset(client_writer)
            return
        self._writers.add(server_writer)
        pumps = [
            asyncio.create_task(self._pump(client_reader, server_writer)),
            asyncio.create_task(self._pump(server_reader, client_writer)),
        ]
        self._tasks.update(pumps)
        for pump in pumps:
            pump.add_done_callback(self._tasks.discard)
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                # A frozen proxy holds what it read: the peer sees a silent socket.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with RST (SO_LINGER 0), as a dying server's kernel would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
