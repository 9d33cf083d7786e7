"""Before ``registered`` the relay takes one ``auth`` and nothing else (docs/PROTOCOL.md,
"Control messages"): any other CONTROL message, a second ``auth`` or a stream gets an
``error`` and the link closes with PROTOCOL_ERROR at once, not at the handshake deadline.

Found in a hostile review: an unauthenticated client sending 64 KiB CONTROL messages of
nested JSON kept the relay at 99 % of a core until the deadline, then reconnected. Here the
deadline is 30 s, so a relay that waits for it fails every case. About 10 s."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.faults.faultkit import FAST, auth_message, echo_once, hand_link, setup_agent, until
from tunnel import codec as frames
from tunnel.wire.constants import ErrorCode, FrameType

HANDSHAKE_TIMEOUT = 30


@pytest.fixture
def relay_env() -> dict:
    return {**FAST, "TUNNEL_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT)}


async def _closed_after(relay, transport: str, send) -> tuple:
    link, recorder = await hand_link(relay, transport)
    loop = asyncio.get_running_loop()
    started = loop.time()
    send(link)
    await until(lambda: recorder.closed, 10, "the relay to close the link")
    return recorder, loop.time() - started


def test_anything_but_one_auth_closes_the_link(relay, agents, service_factory):
    service = service_factory("echo")
    customer, token, agent, addr = setup_agent(relay, agents, service, customer_name="bystander")
    cases = {
        "another CONTROL type (wss)": ("wss", lambda link: link.send_control({"type": "ping-me", "x": 1})),
        "another CONTROL type (quic)": ("quic", lambda link: link.send_control({"type": "hello"})),
        "a second auth": ("wss", lambda link: (link.send_control(auth_message(token, ["db"])),
                                               link.send_control(auth_message(token, ["db"])))),
        "a stream": ("wss", lambda link: link.open_stream(b"db", None)),
    }

    async def main():
        results = {}
        for name, (transport, send) in cases.items():
            results[name] = await _closed_after(relay, transport, send)
        return results

    results = asyncio.run(main())
    for name, (recorder, took) in results.items():
        print(f"{name}: closed after {took:.2f}s with {recorder.closed}, {recorder.messages}")
        assert took < 5, f"{name}: the relay kept the link {took:.1f}s"
        assert recorder.closed[0] == ErrorCode.PROTOCOL_ERROR, (name, recorder.closed)
        error = recorder.first("error")
        assert error and error["code"] == "bad_request" and "expected one auth" in error["message"], (name, error)
        assert recorder.first("registered") is None, name
    assert echo_once(addr, b"still here") == b"still here"
    assert agent.alive()
    log = relay.proc.log()
    assert "Traceback" not in log


def test_control_flood_before_auth_is_cut_at_once(relay):
    """The review's flood: 64 KiB CONTROL messages of nested JSON, as fast as the link takes
    them. The relay parses one and closes."""
    payload = json.dumps({"type": "noise", "pad": [[1] * 5] * 6000}).encode()
    payload = payload[:65000].rsplit(b",", 1)[0] + b"]}"
    frame = frames.encode_frame(FrameType.CONTROL, 0, 0, payload)

    async def main():
        link, recorder = await hand_link(relay)
        await until(lambda: not link.session.has_data_to_send, 5, "our HELLO to leave")
        pipe = link._pipe  # write raw frames under the session, as an attacker would
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        while recorder.closed is None and loop.time() - started < 10:
            pipe.write([frame] * 8)
            sent += 8
            await asyncio.sleep(0.001)
        return loop.time() - started, sent, recorder

    took, sent, recorder = asyncio.run(main())
    print(f"flood: link closed after {took:.2f}s and {sent} messages sent, {recorder.closed}")
    assert recorder.closed is not None and took < 5
    assert recorder.closed[0] == ErrorCode.PROTOCOL_ERROR and "expected one auth" in recorder.closed[1]
    assert relay.proc.alive()
