"""A small, fast TCP echo server (uvloop when available): the private service for the
round-trip, connection-rate and 1,000-stream measurements.

    python -m bench.peers.echo --port 5555

Echoes every byte back; on the client's FIN it finishes writing and closes.
"""

from __future__ import annotations

import argparse
import asyncio
import socket


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data):  # type: ignore[override]
        self.transport.write(data)

    def eof_received(self):  # type: ignore[override]
        self.transport.close()  # close() flushes what is buffered first
        return False


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        import uvloop  # type: ignore
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
