"""A small, fast TCP echo server (uvloop when available): the private service for the
round-trip, connection-rate and 1,000-stream measurements.

    python -m bench.peers.echo --port 5555

Echoes every byte back; on the client's FIN it finishes writing and closes.
"""

from __future__ import annotations

import asyncio
import socket

from bench.peers.serve import main as serve_main


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


def main(argv: list[str] | None = None) -> None:
    serve_main(Echo, __doc__, argv, backlog=4096)


if __name__ == "__main__":
    main()
