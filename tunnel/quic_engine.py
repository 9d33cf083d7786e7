"""The QUIC engine under the QUIC carrier, chosen by name: one namespace, one API.

``aioquic`` (the default, a dependency) and ``qh3`` (optional: ``pip install
'tunnel-agent-relay[qh3]'``, an aioquic fork whose packet path and loss recovery are native code)
share most of their public API. :func:`load_engine` returns a :class:`QuicEngine` whose names
take the same arguments and behave the same on either, the differences mapped here:

- ``QuicConfiguration``: qh3 has no ``congestion_control_algorithm`` (its native core has one
  controller, not selectable): the argument is accepted and kept as an attribute, and
  :attr:`QuicEngine.selectable_congestion_control` is False. qh3 probes the path MTU upward from
  ``max_datagram_size`` on the client (``probe_datagram_size``, up to 1472 bytes whatever the
  setting); aioquic never builds a datagram larger than ``max_datagram_size``: the namespace
  turns qh3's probing off unless asked for, so the setting is a cap on both. qh3 offers QUIC version 1 only by default, aioquic 1 and 2.
  ``load_cert_chain(certfile, keyfile)`` and ``load_verify_locations(cafile=...)`` take the same
  PEM files (qh3 parses them itself, aioquic with ``cryptography``; both read PKCS#8 keys).
- ``QuicConnection``: the same constructor (both require ``original_destination_connection_id``
  for a server). ``send_stream_data`` takes ``bytes`` or any contiguous buffer (``memoryview``)
  on both, compiled aioquic too; both copy it before returning. On a new stream beyond the
  peer's stream limit qh3 raises ValueError where aioquic queues the data until the peer allows
  the stream.
- PINGs: aioquic puts a PING in the next packet with the stream data queued before it, so its
  acknowledgement says that data arrived (the carrier's close waits on that). qh3 paces stream
  data (by ``max_datagram_size``: small writes wait a while on loopback's 16 KiB datagrams) but
  sends PINGs at once, ahead of it: the namespace's qh3 connection holds a PING while stream
  bytes wait unsent, for at most :data:`PING_HOLD` (a stream the peer gives no credit must not
  hold back the PING that keeps the connection alive).
- how far a stream was sent: qh3 tells the bytes it holds unsent (``get_send_buffer_size``),
  aioquic nothing public; the namespace's qh3 connection counts what was handed to a stream
  (``track_sent(stream_id)``) and answers ``sent_offset(stream_id)``.
- events: the same classes and attribute names in both (``HandshakeCompleted.alpn_protocol``,
  ``StreamDataReceived(data, end_stream, stream_id)``, ``ConnectionTerminated(error_code,
  frame_type, reason_phrase)``, ...): :attr:`QuicEngine.events` is the engine's module.
- header parsing: each engine's ``pull_quic_header`` takes its own ``Buffer``;
  :meth:`QuicEngine.parse_header` takes the datagram's bytes.
- Retry tokens: aioquic 1.7's handler takes keywords and ``now``, checks the token's age and
  the connection ID it was sent to, and returns the original destination connection ID; qh3's
  takes positional arguments, no time, returns both IDs and checks neither. Both engines' handlers
  are reached through :attr:`QuicEngine.RetryTokenHandler` with aioquic 1.7's signature and checks
  (qh3's carries the issue time beside the original connection ID inside its encrypted token).
- batches: qh3 takes several datagrams in one call (``receive_many_datagrams``), aioquic one at a
  time: :attr:`QuicEngine.receive_datagrams` is either.
- ``refuse_datagram``: aioquic's public packet builder makes the Initial CONNECTION_CLOSE; qh3
  has no public packet builder or initial keys, so for qh3 the same wire packet comes from
  aioquic (always installed), imported on first use: a qh3 agent never loads it.

What the namespace cannot map (qh3 2.1.0): the number of bidirectional streams the peer may
open at once is fixed at 100 (aioquic: 128, both without a public setting); a qh3 server fails
its first flight to an aioquic 1.7 client ("packet builder capacity exhausted"), so a relay on
qh3 takes only qh3 agents (an aioquic relay takes both). qh3 alone tells the bytes a stream has
queued and not yet sent (``get_send_buffer_size``).

``TUNNEL_QUIC_ENGINE`` (:func:`engine_name`) names the engine of a process.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

__all__ = ["DEFAULT_ENGINE", "ENGINES", "ENV_VAR", "Header", "QuicEngine", "available", "engine_name", "load_engine",
           "missing"]

#: The engines :func:`load_engine` knows, the default first.
ENGINES = ("aioquic", "qh3")
DEFAULT_ENGINE = "aioquic"
#: The environment variable naming the engine of a process.
ENV_VAR = "TUNNEL_QUIC_ENGINE"
#: The pinned qh3 release (pyproject.toml's ``qh3`` extra).
QH3_REQUIREMENT = "qh3==2.1.0"
#: How long a Retry token is accepted (RFC 9000 section 8.1.4: clients return them at once);
#: aioquic's own handler uses the same.
RETRY_TOKEN_LIFETIME = 30.0
#: qh3: longest a PING waits for the stream data queued before it to be sent (seconds).
PING_HOLD = 0.25


class Header(NamedTuple):
    """What the server's demultiplexer needs from a datagram's first packet header."""

    initial: bool  #: an Initial packet
    version: int | None  #: None for a short header, 0 for Version Negotiation
    destination_cid: bytes
    source_cid: bytes  #: empty for a short header
    token: bytes  #: the Initial's token (empty when none)


@dataclass(frozen=True, slots=True)
class QuicEngine:
    """One QUIC engine's public API, with the differences between engines mapped (see the
    module docstring). Names follow aioquic's."""

    name: str
    #: ``QuicConfiguration(alpn_protocols=..., is_client=..., idle_timeout=..., max_data=...,
    #: max_stream_data=..., max_datagram_size=..., congestion_control_algorithm=...,
    #: verify_mode=..., server_name=..., connection_id_length=..., supported_versions=...)``
    QuicConfiguration: type
    #: ``QuicConnection(configuration=..., original_destination_connection_id=...,
    #: retry_source_connection_id=...)``
    QuicConnection: type
    #: The engine's events module (``HandshakeCompleted``, ``StreamDataReceived``, ...).
    events: ModuleType
    #: The engine's ``Buffer`` and ``pull_quic_header(buf, host_cid_length)`` (they pair).
    Buffer: type
    pull_quic_header: Callable[..., Any]
    QuicPacketType: type
    #: ``encode_quic_retry(version=, source_cid=, destination_cid=, original_destination_cid=,
    #: retry_token=) -> bytes``
    encode_quic_retry: Callable[..., bytes]
    #: ``encode_quic_version_negotiation(source_cid=, destination_cid=, supported_versions=)``
    encode_quic_version_negotiation: Callable[..., bytes]
    #: ``RetryTokenHandler()`` with ``create_token(*, address, original_destination_connection_id,
    #: retry_source_connection_id, now) -> bytes`` and ``validate_token(*, address,
    #: destination_cid, token, now) -> bytes`` (the original destination connection ID; raises
    #: ValueError for a forged, expired or misdirected token)
    RetryTokenHandler: type
    #: ``refuse_datagram(version, source_cid, destination_cid) -> bytes``: a server Initial
    #: closing a connection attempt with CONNECTION_REFUSED.
    refuse_datagram: Callable[[int, bytes, bytes], bytes]
    #: ``receive_datagrams(connection, datagrams, addr, now)``: several datagrams from one
    #: address at once (qh3: one call into its native core; aioquic: one by one).
    receive_datagrams: Callable[[Any, list, Any, float], None]
    #: Whether ``congestion_control_algorithm`` selects the controller (aioquic: any name
    #: registered with it); False: the engine's own, fixed, whatever the name.
    selectable_congestion_control: bool

    def parse_header(self, data: bytes, cid_length: int) -> Header:
        """The first packet header of datagram ``data`` (``cid_length``: the length of the
        connection IDs this side issues); ValueError when it is not a QUIC header."""
        header = self.pull_quic_header(self.Buffer(data=data), host_cid_length=cid_length)
        packet_type = self.QuicPacketType
        return Header(header.packet_type == packet_type.INITIAL,
                      0 if header.packet_type == packet_type.VERSION_NEGOTIATION else header.version,
                      header.destination_cid, header.source_cid, header.token or b"")


def engine_name(environ: Mapping[str, str] | None = None) -> str:
    """The engine ``TUNNEL_QUIC_ENGINE`` names in ``environ`` (default: the process's
    environment); :data:`DEFAULT_ENGINE` when unset. ValueError for an unknown name."""
    environ = os.environ if environ is None else environ
    name = environ.get(ENV_VAR, "").strip().lower() or DEFAULT_ENGINE
    if name not in ENGINES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(ENGINES)}, got {name!r}")
    return name


def available(name: str) -> bool:
    """Whether engine ``name`` is installed (without importing it)."""
    return importlib.util.find_spec(name) is not None


def missing(name: str) -> str:
    """What to do when engine ``name`` (not the default) is not installed."""
    return (f"the QUIC engine {name} is not installed: pip install 'tunnel-agent-relay[{name}]' "
            f"(or pip install '{QH3_REQUIREMENT}'), or unset {ENV_VAR}")


def load_engine(name: str = DEFAULT_ENGINE) -> QuicEngine:
    """The :class:`QuicEngine` named ``name`` (see :data:`ENGINES`).

    ValueError for an unknown name; ImportError, saying how to install it, when the engine is
    not installed."""
    name = name.strip().lower()
    if name == "aioquic":
        return _aioquic()
    if name == "qh3":
        if not available("qh3"):
            raise ImportError(missing("qh3"))
        return _qh3()
    raise ValueError(f"unknown QUIC engine {name!r}: one of {', '.join(ENGINES)}")


# --- aioquic ----------------------------------------------------------------------------


def _aioquic() -> QuicEngine:
    from aioquic.buffer import Buffer
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import QuicPacketType, encode_quic_retry, encode_quic_version_negotiation, pull_quic_header
    from aioquic.quic.retry import QuicRetryTokenHandler

    return QuicEngine(
        name="aioquic", QuicConfiguration=QuicConfiguration, QuicConnection=QuicConnection, events=events,
        Buffer=Buffer, pull_quic_header=pull_quic_header, QuicPacketType=QuicPacketType,
        encode_quic_retry=encode_quic_retry, encode_quic_version_negotiation=encode_quic_version_negotiation,
        RetryTokenHandler=QuicRetryTokenHandler, refuse_datagram=_aioquic_refuse_datagram,
        receive_datagrams=_receive_one_by_one, selectable_congestion_control=True)


def _receive_one_by_one(connection, datagrams: list, addr, now: float) -> None:
    for data in datagrams:
        connection.receive_datagram(data, addr, now)


def _aioquic_refuse_datagram(version: int, source_cid: bytes, destination_cid: bytes) -> bytes:
    """A server Initial packet closing a connection attempt with CONNECTION_REFUSED, built
    with aioquic's public packet builder (wire format only: any client engine reads it)."""
    from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
    from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY
    from aioquic.quic.crypto import CryptoPair
    from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
    from aioquic.quic.packet_builder import QuicPacketBuilder

    crypto = CryptoPair()
    crypto.setup_initial(cid=source_cid, is_client=False, version=version)
    builder = QuicPacketBuilder(host_cid=source_cid, is_client=False, max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
                                peer_cid=destination_cid, version=version)
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    # CONNECTION_CLOSE (transport): error code, offending frame type (none: PADDING), no reason
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY)
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]


# --- qh3 --------------------------------------------------------------------------------


def _qh3() -> QuicEngine:
    from qh3.quic import events
    from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
    from qh3.quic.connection import QuicConnection as Qh3Connection
    from qh3.quic.packet import (
        Buffer,
        QuicPacketType,
        encode_quic_retry,
        encode_quic_version_negotiation,
        pull_quic_header,
    )
    from qh3.quic.retry import QuicRetryTokenHandler

    class QuicConfiguration(Qh3Configuration):
        """qh3's configuration, taking aioquic's arguments: ``congestion_control_algorithm``
        is kept but has no effect (qh3's controller is fixed), and the client builds datagrams
        of ``max_datagram_size`` without probing for larger ones unless
        ``probe_datagram_size=True`` is passed."""

        def __init__(self, *, congestion_control_algorithm: str | None = None, probe_datagram_size: bool = False,
                     **kwargs) -> None:
            super().__init__(probe_datagram_size=probe_datagram_size, **kwargs)
            self.congestion_control_algorithm = congestion_control_algorithm

    class QuicConnection(Qh3Connection):
        """qh3's connection with PINGs in order with the stream data queued before them, and
        ``sent_offset`` for the streams named to ``track_sent`` (see the module docstring)."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self._written: dict[int, int] = {}  # tracked stream -> bytes handed to the engine
            self._held: list[int] = []  # PING uids waiting for queued stream data
            self._held_until: float | None = None
            self._now = 0.0  # the latest time the caller passed

        def track_sent(self, stream_id: int) -> None:
            """Count the bytes handed to stream ``stream_id`` from now on (before any)."""
            self._written.setdefault(stream_id, 0)

        def sent_offset(self, stream_id: int) -> int | None:
            """How far stream ``stream_id`` was sent (None unless tracked)."""
            written = self._written.get(stream_id)
            return None if written is None else written - self.get_send_buffer_size(stream_id)

        def send_stream_data(self, stream_id: int, data, end_stream: bool = False) -> None:
            super().send_stream_data(stream_id, data, end_stream)
            if stream_id in self._written:
                self._written[stream_id] += len(data)

        def send_ping(self, uid: int) -> None:
            if self._held or self.get_send_buffer_size():
                if not self._held:
                    self._held_until = self._now + PING_HOLD
                self._held.append(uid)
            else:
                super().send_ping(uid)

        def datagrams_to_send(self, now: float) -> list:
            self._now = now
            datagrams = super().datagrams_to_send(now)
            if self._held and (not self.get_send_buffer_size() or now >= self._held_until):
                held, self._held, self._held_until = self._held, [], None
                for uid in held:
                    super().send_ping(uid)
                datagrams += super().datagrams_to_send(now)
            return datagrams

        def get_timer(self) -> float | None:
            at = super().get_timer()
            held = self._held_until
            return held if held is not None and (at is None or held < at) else at

        def handle_timer(self, now: float) -> None:
            self._now = now
            super().handle_timer(now)

        def receive_datagram(self, data, addr, now: float) -> None:
            self._now = now
            super().receive_datagram(data, addr, now)

        def receive_many_datagrams(self, datagrams, addr, now: float) -> None:
            self._now = now
            super().receive_many_datagrams(datagrams, addr, now)

    class RetryTokenHandler:
        """qh3's Retry token handler with aioquic 1.7's API and checks: the token also holds its
        issue time (after the original destination connection ID, in qh3's encrypted field)."""

        def __init__(self) -> None:
            self._handler = QuicRetryTokenHandler()

        def create_token(self, *, address, original_destination_connection_id: bytes,
                         retry_source_connection_id: bytes, now: float) -> bytes:
            stamped = original_destination_connection_id + struct.pack("!d", now)
            return self._handler.create_token(address, stamped, retry_source_connection_id)

        def validate_token(self, *, address, destination_cid: bytes, token: bytes, now: float) -> bytes:
            try:
                stamped, retry_cid = self._handler.validate_token(address, token)
            except Exception as exc:  # qh3 raises its own error for a token it cannot decrypt
                raise ValueError("Token is invalid.") from exc
            if len(stamped) < 8:
                raise ValueError("Token is invalid.")
            (issued,) = struct.unpack("!d", stamped[-8:])
            if destination_cid != retry_cid:
                raise ValueError("Destination connection ID does not match.")
            if not 0 <= now - issued <= RETRY_TOKEN_LIFETIME:
                raise ValueError("Token has expired.")
            return stamped[:-8]

    return QuicEngine(
        name="qh3", QuicConfiguration=QuicConfiguration, QuicConnection=QuicConnection, events=events,
        Buffer=Buffer, pull_quic_header=pull_quic_header, QuicPacketType=QuicPacketType,
        encode_quic_retry=encode_quic_retry, encode_quic_version_negotiation=encode_quic_version_negotiation,
        RetryTokenHandler=RetryTokenHandler, refuse_datagram=_aioquic_refuse_datagram,
        receive_datagrams=_receive_many, selectable_congestion_control=False)


def _receive_many(connection, datagrams: list, addr, now: float) -> None:
    connection.receive_many_datagrams(datagrams, addr, now)
