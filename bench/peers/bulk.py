"""A bulk-transfer service: the private service of the pytest-benchmark throughput cases.

    python -m bench.peers.bulk --port 5556

Each connection starts with 9 bytes: ``U`` or ``D`` and a big-endian 64-bit count N.

- ``U`` (upload): the service reads N bytes, then answers the 8-byte count it read and closes;
  the client's clock stops when that answer arrives, so every byte has crossed.
- ``D`` (download): the service sends N bytes and closes.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from bench.peers.serve import main as serve_main

HEADER = struct.Struct(">cQ")
CHUNK = memoryview(bytes(range(256)) * 1024)   # 256 KiB written again and again


class Bulk(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.want = -1          # bytes still expected from an upload; -1 before the header
        self.got = 0
        self.to_send = 0
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):  # type: ignore[override]
        if self.want < 0:
            self.head += data
            if len(self.head) < HEADER.size:
                return
            op, n = HEADER.unpack_from(self.head)
            data = bytes(self.head[HEADER.size:])
            if op == b"D":
                self.to_send = n
                asyncio.get_running_loop().create_task(self._download())
                return
            if op != b"U":
                self.transport.close()
                return
            self.want = n
        self.got += len(data)
        if self.got >= self.want:
            self.transport.write(struct.pack(">Q", self.got))
            self.transport.close()

    async def _download(self) -> None:
        left = self.to_send
        while left > 0 and not self.transport.is_closing():
            await self.can_write.wait()
            piece = CHUNK[:min(left, len(CHUNK))]
            self.transport.write(piece)
            left -= len(piece)
        self.transport.close()

    def pause_writing(self):  # type: ignore[override]
        self.can_write.clear()

    def resume_writing(self):  # type: ignore[override]
        self.can_write.set()

    def connection_lost(self, exc):  # type: ignore[override]
        self.can_write.set()


def main(argv: list[str] | None = None) -> None:
    serve_main(Bulk, __doc__, argv, backlog=1024)


if __name__ == "__main__":
    main()
