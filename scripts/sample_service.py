"""A sample private service for the demo: a tiny HTTP server.

GET /           a greeting
GET /bytes?n=N  N bytes of payload (throughput runs)
"""

import asyncio
import sys
from urllib.parse import parse_qs, urlsplit

CHUNK = b"\0" * (256 * 1024)
MAX_BYTES = 64 * 1024**3


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            url = urlsplit(target)
            if url.path == "/bytes":
                n = min(int(parse_qs(url.query).get("n", ["0"])[0]), MAX_BYTES)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % n)
                while n > 0:
                    piece = CHUNK if n >= len(CHUNK) else CHUNK[:n]
                    writer.write(piece)
                    n -= len(piece)
                    await writer.drain()
            else:
                body = b"hello from the private service behind the agent\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 18080))
