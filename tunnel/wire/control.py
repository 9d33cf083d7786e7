"""CONTROL frame payloads: one JSON object with a ``type`` string each (docs/PROTOCOL.md,
"Control messages"), shared by the session and the QUIC carrier.

The standard library's ``json``, not orjson: a link carries a handful of control messages in
its life, and orjson costs the agent 1.1 MB of resident memory at rest against 0.1 MB.
"""

from __future__ import annotations

import json
import re

from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import ProtocolError, UsageError


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


_decode = json.JSONDecoder(parse_constant=_no_constants).decode
_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def encode_control(message: dict, max_size: int) -> bytes:
    """The payload of a CONTROL frame; :class:`UsageError` if above ``max_size`` bytes."""
    payload = _encode(message).encode()
    if len(payload) > max_size:
        raise UsageError(f"control message of {len(payload)} bytes exceeds max_control_size")
    return payload


def decode_control(payload, max_size: int, max_depth: int) -> dict:
    """The message in a CONTROL payload; :class:`ProtocolError` for anything but a JSON object
    with a string ``type``, at most ``max_size`` bytes and ``max_depth`` levels of nesting
    (the object itself is level 1)."""
    if len(payload) > max_size:
        raise ProtocolError(f"CONTROL of {len(payload)} bytes", ErrorCode.FRAME_SIZE_ERROR)
    try:
        text = bytes(payload).decode()
    except ValueError:
        raise ProtocolError("CONTROL payload is not UTF-8") from None
    if _depth(text) > max_depth:  # before parsing: deep nesting costs the parser most
        raise ProtocolError(f"CONTROL message nested deeper than {max_depth} levels")
    try:
        message = _decode(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ProtocolError("CONTROL payload is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("CONTROL payload is not an object with a type")
    return message


_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON ``text`` (strings skipped; malformed
    text gives some number and fails in the parser)."""
    depth = deepest = 0
    for token in _STRUCTURE.findall(text):
        first = token[0]
        if first == "[" or first == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif first == "]" or first == "}":
            depth -= 1
    return deepest
