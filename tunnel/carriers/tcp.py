"""A plain TCP :class:`~tunnel.carriers.pipe.Pipe` and links over it, for tests and
benchmarks: the session without TLS or WebSocket framing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from tunnel.carriers.pipe import Pipe, PipeReceiver, set_nodelay
from tunnel.carriers.session_link import SessionLink
from tunnel.core.limits import DEFAULT_LIMITS, Limits
from tunnel.core.session_state import Role
from tunnel.wire.constants import ErrorCode

__all__ = ["TcpPipe", "open_tcp_link", "serve_tcp_links"]

log = logging.getLogger("tunnel.carriers.tcp")


class TcpPipe(Pipe, asyncio.Protocol):
    """A :class:`~tunnel.carriers.pipe.Pipe` over a TCP connection (TCP_NODELAY, ``writelines``)."""

    #: Transport write buffer limits: pause_writing above ``high``.
    write_high_water = 1024 * 1024
    write_low_water = 256 * 1024

    def __init__(self) -> None:
        self.peer_address: tuple = ()
        self._transport: asyncio.Transport | None = None
        self._receiver: PipeReceiver | None = None
        self._early: list[bytes] = []
        self._paused = False
        self._lost = False
        self._lost_exc: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self._transport = transport
        self.peer_address = transport.get_extra_info("peername") or ()
        set_nodelay(transport)
        try:
            transport.set_write_buffer_limits(high=self.write_high_water, low=self.write_low_water)
        except Exception:
            pass

    def data_received(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.pipe_data_received(data)
        else:
            self._early.append(data)

    def eof_received(self):
        return False  # close the transport; connection_lost follows

    def pause_writing(self) -> None:
        self._paused = True
        if self._receiver is not None:
            self._receiver.pipe_pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        if self._receiver is not None:
            self._receiver.pipe_resume_writing()

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._lost_exc = exc
        if self._receiver is not None:
            self._receiver.pipe_connection_lost(exc)

    # Pipe
    def set_receiver(self, receiver: PipeReceiver) -> None:
        self._receiver = receiver
        early, self._early = self._early, []
        for data in early:
            receiver.pipe_data_received(data)
        if self._paused:
            receiver.pipe_pause_writing()
        if self._lost:
            receiver.pipe_connection_lost(self._lost_exc)

    def write(self, buffers: Sequence) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.writelines(buffers)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def open_tcp_link(host: str, port: int, role: Role = Role.AGENT,
                        limits: Limits = DEFAULT_LIMITS) -> SessionLink:
    """Dial ``host:port`` and return a :class:`SessionLink` over it (not yet ready: use
    ``await link.wait_ready()``)."""
    loop = asyncio.get_running_loop()
    _transport, pipe = await loop.create_connection(TcpPipe, host, port)
    return SessionLink(pipe, role, limits, carrier="tcp", loop=loop)


async def serve_tcp_links(host: str, port: int, role: Role = Role.RELAY,
                          limits: Limits = DEFAULT_LIMITS,
                          on_link: Callable | None = None) -> asyncio.Server:
    """Listen on ``host:port``; every accepted connection becomes a :class:`SessionLink`
    passed to ``on_link`` (a function or a coroutine function)."""
    loop = asyncio.get_running_loop()
    tasks: set = set()

    class _ServerPipe(TcpPipe):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            link = SessionLink(self, role, limits, carrier="tcp", loop=loop)
            if on_link is None:
                return
            try:
                result = on_link(link)
            except Exception:
                log.exception("on_link failed")
                link.close(ErrorCode.INTERNAL_ERROR, "internal error")
                return
            if asyncio.iscoroutine(result):
                task = loop.create_task(result)
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    return await loop.create_server(_ServerPipe, host, port)
