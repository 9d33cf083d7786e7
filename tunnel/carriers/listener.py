"""A listening TCP socket that can stop without resetting what the kernel already accepted
(the relay's resource endpoints: :func:`tunnel.carriers.tls.serve_tcp`).

A loop's server cannot. Closing it closes the socket, and the kernel resets every connection
still in its accept queue; aiofastnet's and asyncio's servers also drop the connections they
have accepted but not yet made transports for. A load balancer in TCP mode passes such a reset
on to its client as a clean end of stream, so while a relay drained, a worker could get an
empty reply and no error.

:meth:`TcpListener.stop` has the kernel discard new connection attempts first (a socket filter
that drops SYNs without ACK; Linux), goes on taking connections for :data:`HANDSHAKE_GRACE`
(handshakes already under way complete), takes what is left in the queue, then closes. A
client whose SYN was discarded sends it again about a second later and finds the port closed,
which a load balancer retries on another server. Every connection taken, before or during the
stop, becomes a transport of the engine the listener was made with, like any other.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Awaitable, Callable

__all__ = ["TcpListener", "HANDSHAKE_GRACE"]

log = logging.getLogger("tunnel.carriers.listener")

#: How long a stopping listener still takes connections whose handshake began before the stop.
HANDSHAKE_GRACE = 0.25

#: Seconds before accepting again after the process ran out of descriptors (EMFILE, ...).
ACCEPT_RETRY_DELAY = 1.0

_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Adopt = Callable[[Callable[[], asyncio.BaseProtocol], socket.socket], Awaitable]


class TcpListener:
    """Listening sockets on one ``host:port`` whose connections go to ``factory``'s protocols
    through ``adopt`` (a ``connect_accepted_socket``). ``sockets`` and :meth:`close` as a
    loop's server's; :meth:`stop` is the graceful close (module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 factory: Callable[[], asyncio.BaseProtocol], adopt: Adopt, backlog: int) -> None:
        self._loop = loop
        self._sockets = sockets
        self._factory = factory
        self._adopt = adopt
        self._backlog = backlog
        self._out_of_resources = False
        #: Connections accepted so far, and those still becoming transports.
        self.taken = 0
        self.adopting: set[asyncio.Task] = set()
        for sock in sockets:
            sock.listen(backlog)
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol], adopt: Adopt,
             host: str | None, port: int, *, backlog: int = 100, reuse_address: bool = True) -> TcpListener:
        """Listen on every address ``host`` (None: all interfaces) resolves to; OSError, as
        ``loop.create_server``'s, when one cannot be bound."""
        sockets: list[socket.socket] = []
        seen = set()
        try:
            for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                      flags=socket.AI_PASSIVE):
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                if reuse_address:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: "
                                             f"{(exc.strerror or str(exc)).lower()}") from None
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(loop, sockets, factory, adopt, backlog)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def is_serving(self) -> bool:
        return bool(self._sockets)

    def _accept(self, sock: socket.socket) -> None:
        taken, error = self._take_queued(sock, self._backlog + 1)
        if taken:
            self._out_of_resources = False
        if error is None:
            return
        if error.errno not in _OUT_OF_RESOURCES:
            raise error  # the loop logs it
        if not self._out_of_resources:
            log.warning("%s: cannot accept connections (%s): trying again every %g s",
                        _address(sock), error.strerror or error, ACCEPT_RETRY_DELAY)
        self._out_of_resources = True
        self._loop.remove_reader(sock.fileno())
        self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume, sock)

    def _take_queued(self, sock: socket.socket, limit: int | None = None) -> tuple[int, OSError | None]:
        """Take the connections queued on ``sock``, at most ``limit``: how many, and the error
        that stopped it (None: the queue is empty, or the limit was reached)."""
        taken = 0
        while limit is None or taken < limit:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                return taken, exc
            taken += 1
            self._take(conn)
        return taken, None

    def _resume(self, sock: socket.socket) -> None:
        if sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _take(self, conn: socket.socket) -> None:
        self.taken += 1
        conn.setblocking(False)
        task = self._loop.create_task(self._make_transport(conn))
        self.adopting.add(task)
        task.add_done_callback(self.adopting.discard)

    async def _make_transport(self, conn: socket.socket) -> None:
        try:
            await self._adopt(self._factory, conn)
        except OSError as exc:  # the client went away meanwhile
            log.debug("an accepted connection could not be served: %s", exc)
            conn.close()
        except Exception:  # noqa: BLE001 - a bug: this connection only, and said
            log.exception("an accepted connection could not be served")
            conn.close()

    def close(self) -> None:
        """Close now: connections the kernel has queued are reset."""
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def stop(self, grace: float = HANDSHAKE_GRACE) -> int:
        """Take no new connection; serve the ones the kernel has accepted or is accepting
        (module docstring), then close. Returns how many were taken while stopping."""
        if not self._sockets:
            return 0
        taken_before = self.taken
        filtered = [_refuse_new_handshakes(sock) for sock in self._sockets]
        if any(filtered) and grace > 0:
            await asyncio.sleep(grace)  # the readers go on taking what completes meanwhile
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            self._loop.remove_reader(sock.fileno())
            _, error = self._take_queued(sock)
            if error is not None:  # out of descriptors: the rest are reset
                log.warning("%s: closing with connections still queued: %s", _address(sock), error.strerror or error)
            sock.close()
        if self.adopting:
            await asyncio.wait(set(self.adopting))
        return self.taken - taken_before


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "listener"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Classic BPF, run on the TCP header of each segment reaching the listening socket: load the
#: flags byte, keep SYN and ACK; a SYN without ACK (a new handshake) is dropped, every other
#: segment (the ACK that completes a handshake under way) kept whole.
_DROP_NEW_HANDSHAKES = ((0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02), (0x06, 0, 0, 0),
                        (0x06, 0, 0, 0xFFFFFFFF))

_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


def _refuse_new_handshakes(sock: socket.socket) -> bool:
    """Have the kernel discard new connection attempts to ``sock``; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):  # the kernel copies the program it points to at once
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    program = (SockFilter * len(_DROP_NEW_HANDSHAKES))(*(SockFilter(*op) for op in _DROP_NEW_HANDSHAKES))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(SockFprog(len(_DROP_NEW_HANDSHAKES), program)))
    except OSError as exc:
        log.debug("no socket filter on %s (%s): closing without it", _address(sock), exc)
        return False
    return True
