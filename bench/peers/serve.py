"""The command line of the small TCP services (:mod:`bench.peers.echo`, :mod:`bench.peers.bulk`):
``--host``/``--port``, one protocol per connection, on uvloop when it is installed."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable


async def serve(protocol: Callable[[], asyncio.Protocol], host: str, port: int, backlog: int) -> None:
    """Serve ``protocol`` on ``host:port`` until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, host, port, backlog=backlog, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(protocol: Callable[[], asyncio.Protocol], doc: str, argv: list[str] | None = None, *,
         backlog: int) -> None:
    """Parse ``--host`` (default loopback) and ``--port``, then serve until Ctrl-C."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        import uvloop  # type: ignore
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(serve(protocol, args.host, args.port, backlog))
    except KeyboardInterrupt:
        pass
