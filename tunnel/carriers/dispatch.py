"""How every carrier hands a link's events to the application (the :mod:`tunnel.carriers.base`
contract), in one place.

- Nothing is delivered before ``Link.set_handler``. What arrives before is held, in order,
  and delivered from the event loop after ``set_handler`` returns, never from inside it;
  what arrives while held events wait queues behind them.
- A stream handler that raises resets its stream only (``INTERNAL_ERROR``) and then hears
  ``reset_received``; the link and the other streams go on.
- ``LinkHandler.stream_opened`` that raises resets the stream with ``INTERNAL_ERROR``; one
  that returns None without resetting it refuses it (``REFUSED``).
- ``control_received`` and ``link_closed`` never let an exception out; ``link_closed`` is
  delivered once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tunnel.carriers.base import LinkHandler, LinkStream, StreamHandler
from tunnel.wire.constants import ErrorCode

log = logging.getLogger("tunnel.carriers")


class Dispatcher:
    """The application side of one link (see the module docstring)."""

    __slots__ = ("_loop", "handler", "_held", "_closed_told")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.handler: LinkHandler | None = None
        self._held: list | None = []  # (function, args) waiting for the handler
        self._closed_told = False

    @property
    def holding(self) -> bool:
        """True while events must be queued with :meth:`hold` instead of delivered."""
        return self._held is not None

    def hold(self, function: Callable, *args) -> None:
        """Run ``function(*args)`` once the held events before it were delivered. Arguments
        must stay valid until then (copy views of receive buffers)."""
        self._held.append((function, args))

    def set_handler(self, handler: LinkHandler) -> None:
        self.handler = handler
        if self._held is not None:
            self._loop.call_soon(self._release)

    def _release(self) -> None:
        held, self._held = self._held, None
        for function, args in held:
            function(*args)

    # --- calls into the application ---------------------------------------------------

    def stream_call(self, stream: LinkStream, method: Callable, *args) -> None:
        """Run one of ``stream``'s handler callbacks; if it raises, reset that stream only."""
        try:
            method(*args)
        except Exception:
            self.stream_failed(stream, method.__name__)

    def stream_failed(self, stream: LinkStream, name: str) -> None:
        """The handler callback ``name`` of ``stream`` raised (call this from the ``except``
        block): reset that stream only and tell its handler."""
        log.exception("stream %d handler failed; resetting it", stream.stream_id)
        stream.reset(ErrorCode.INTERNAL_ERROR)
        handler = stream.handler
        if handler is not None and name != "reset_received":
            try:
                handler.reset_received(ErrorCode.INTERNAL_ERROR)
            except Exception:
                log.exception("stream %d reset_received failed", stream.stream_id)

    def stream_done(self, stream: LinkStream, method: Callable, *args) -> None:
        """A callback after which the stream is over (``reset_received``, ``closed``): an
        exception is logged and nothing more is done."""
        try:
            method(*args)
        except Exception:
            log.exception("stream %d handler failed", stream.stream_id)

    def open(self, stream: LinkStream) -> StreamHandler | None:
        """Ask the link handler for the handler of a stream the peer opened; None if the
        stream was refused (reset here unless the application reset it itself)."""
        try:
            handler = self.handler.stream_opened(stream)
        except Exception:
            log.exception("stream_opened handler failed; resetting stream %d", stream.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)
            return None
        if handler is None:
            stream.reset(ErrorCode.REFUSED)  # a no-op if the application reset it already
        return handler

    def control(self, message: dict) -> None:
        try:
            self.handler.control_received(message)
        except Exception:
            log.exception("control_received handler failed")

    def closed(self, code: int, reason: str) -> None:
        if self._closed_told:
            return
        self._closed_told = True
        try:
            self.handler.link_closed(code, reason)
        except Exception:
            log.exception("link_closed handler failed")
