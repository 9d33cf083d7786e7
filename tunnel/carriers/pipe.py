"""A reliable, ordered byte pipe under a :class:`tunnel.carriers.session_link.SessionLink`.

The TLS WebSocket carrier provides one (``tunnel.carriers.wss``); tests and benchmarks also use plain
TCP. Message boundaries, if the pipe has any, carry no meaning.
"""

from __future__ import annotations

import abc
import asyncio
import socket
from collections.abc import Sequence


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle off on the TCP socket under ``transport`` (nothing for other sockets)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # pragma: no cover - exotic transports
        pass


def set_notsent_lowat(transport: asyncio.BaseTransport, nbytes: int) -> None:
    """Bound the bytes the kernel holds unsent on the TCP socket under ``transport`` to
    ``nbytes`` (``TCP_NOTSENT_LOWAT``; nothing for 0, other sockets or other systems)."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is None or nbytes <= 0 or option is None:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, option, nbytes)
    except (OSError, AttributeError):  # pragma: no cover - exotic transports
        pass


class PipeReceiver:
    """What a pipe calls; the SessionLink implements it."""

    def pipe_data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the peer (a view valid during this call only)."""

    def pipe_pause_writing(self) -> None:
        """The pipe's write buffer is above its high-water mark: stop writing."""

    def pipe_resume_writing(self) -> None:
        """The write buffer drained: write again."""

    def pipe_connection_lost(self, exc: Exception | None) -> None:
        """The pipe is closed (``exc`` None for a clean close)."""


class Pipe(abc.ABC):
    peer_address: tuple

    @abc.abstractmethod
    def set_receiver(self, receiver: PipeReceiver) -> None:
        """Start delivering to ``receiver`` (bytes that arrived before are delivered first)."""

    @abc.abstractmethod
    def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Send the buffers in order (one batch; a WebSocket pipe sends one message)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush what is queued, then close."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close at once, dropping what is queued."""
