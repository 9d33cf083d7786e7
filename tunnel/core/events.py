"""Events a :class:`tunnel.core.session.Session` reports: past-tense facts, one base class."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Event:
    pass


@dataclass(slots=True)
class SessionReady(Event):
    """Both HELLOs are exchanged: streams may be opened."""

    version: int


@dataclass(slots=True)
class StreamOpened(Event):
    """The peer opened a stream; ``metadata`` is the OPEN payload (the resource name)."""

    stream_id: int
    metadata: bytes


@dataclass(slots=True)
class DataReceived(Event):
    """Stream bytes. The application must call ``consume(stream_id, len(data))`` once they
    have left its buffers; until then they count against the stream and session windows.
    ``data`` may be a view into the receive buffer: copy it to keep it past this callback.
    Not reported for a stream given a receiver (``Session.set_receiver``)."""

    stream_id: int
    data: memoryview | bytes


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream (FIN): no more data will arrive on it."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The stream was reset: by the peer (``remote``) or by this side because the peer broke
    the stream's rules or a timeout fired."""

    stream_id: int
    code: int
    remote: bool = True


@dataclass(slots=True)
class StreamWritable(Event):
    """The stream's queued outgoing bytes fell below the low-water mark: send more."""

    stream_id: int


@dataclass(slots=True)
class StreamClosed(Event):
    """Both directions of the stream are finished (FIN both ways, or reset): forget it."""

    stream_id: int


@dataclass(slots=True)
class ControlReceived(Event):
    """A CONTROL frame's JSON object, already parsed."""

    message: dict


@dataclass(slots=True)
class PingAcknowledged(Event):
    """Our PING was answered after ``rtt`` seconds."""

    rtt: float


@dataclass(slots=True)
class GoAwayReceived(Event):
    """The peer opens no more streams and accepts none above ``last_stream_id``."""

    last_stream_id: int
    code: int
    reason: str


@dataclass(slots=True)
class ConnectionClosed(Event):
    """The link is over: send what ``data_to_send`` still returns, then close the transport."""

    code: int
    reason: str
    remote: bool
