"""relay.data.forward.Splice: a stream from another relay joined to a stream on an agent's link,
over real sessions on TCP: exact bytes, backpressure (a stalled agent stalls the forwarding
relay's writer; what the splicing relay holds stays within the windows), FIN and RESET across."""

from __future__ import annotations

import asyncio
import dataclasses
import os

from relay.data.forward import Splice
from tunnel.carriers.base import LinkHandler, StreamHandler
from tunnel.carriers.tcp import open_tcp_link, serve_tcp_links
from tunnel.core.limits import DEFAULT_LIMITS
from tunnel.core.session_state import Role
from tunnel.wire.constants import ErrorCode

KiB = 1024
LIMITS = dataclasses.replace(DEFAULT_LIMITS, initial_stream_window=256 * KiB, max_stream_window=256 * KiB,
                             stream_send_high_water=64 * KiB, stream_send_low_water=16 * KiB)


class Sink(StreamHandler):
    """The agent's end: keeps what arrives; consumes only while ``consuming``."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.stream = None
        self.data = bytearray()
        self.unconsumed = 0
        self.consuming = False
        self.eof = loop.create_future()
        self.reset = loop.create_future()

    def data_received(self, data) -> None:
        self.data += data
        self.unconsumed += len(data)
        if self.consuming:
            self.release()

    def release(self) -> None:
        n, self.unconsumed = self.unconsumed, 0
        self.stream.consume(n)

    def eof_received(self) -> None:
        self.eof.set_result(None)

    def reset_received(self, code) -> None:
        self.reset.set_result(code)


class Agent(LinkHandler):
    def __init__(self) -> None:
        self.sinks: list[Sink] = []
        self.opened = asyncio.Event()

    def stream_opened(self, stream):
        sink = Sink()
        sink.stream = stream
        self.sinks.append(sink)
        self.opened.set()
        return sink


class Holder(LinkHandler):
    """The relay holding the agent: joins each stream from its peer to a new agent stream."""

    def __init__(self) -> None:
        self.agent_link = None
        self.splices: list[Splice] = []
        self.done = 0

    def stream_opened(self, stream):
        splice = Splice()
        handler = splice.connect(stream, self.agent_link, b"db")
        splice.on_done = self._done
        self.splices.append(splice)
        return handler

    def _done(self) -> None:
        self.done += 1


async def pair(handler_for_accepted):
    accepted = asyncio.get_running_loop().create_future()

    def on_link(link):
        link.set_handler(handler_for_accepted)
        accepted.set_result(link)

    server = await serve_tcp_links("127.0.0.1", 0, Role.RELAY, LIMITS, on_link)
    dialled = await open_tcp_link("127.0.0.1", server.sockets[0].getsockname()[1], Role.AGENT, LIMITS)
    return server, dialled, await accepted


def test_a_splice_carries_bytes_exactly_with_backpressure_fin_and_reset(run, cleanup):
    async def go():
        agent = Agent()
        holder = Holder()
        # Holder (relay role) <-> agent (dials), and the forwarding relay (dials) <-> holder.
        agent_server, agent_link, holder_agent_link = await pair(None)
        agent_link.set_handler(agent)
        holder.agent_link = holder_agent_link
        holder_agent_link.set_handler(LinkHandler())
        peer_server, forwarding, _holder_peer = await pair(holder)
        forwarding.set_handler(LinkHandler())
        await asyncio.gather(agent_link.wait_ready(), forwarding.wait_ready(), holder_agent_link.wait_ready())
        for closing in (agent_link, forwarding):
            cleanup.append(closing.close)
        cleanup.extend([agent_server.close, peer_server.close])

        back = Sink()
        stream = forwarding.open_stream(b"res_1", back)
        back.stream = stream
        back.consuming = True
        payload = os.urandom(4 * 1024 * KiB)
        sent = 0
        # The agent does not consume: the writer must stall long before the payload is out.
        for _ in range(250):
            while sent < len(payload) and not stream.paused:
                stream.write(payload[sent:sent + 16 * KiB])
                sent += 16 * KiB
            await asyncio.sleep(0.002)
        assert sent < len(payload) // 2, "no backpressure through the splice"
        (splice,) = holder.splices
        sink = agent.sinks[0]
        # What the splicing relay holds: the agent stream's queue up to its high-water mark
        # (plus one piece), then at most one window of the peer stream it has not credited.
        assert 0 < splice.peer.held <= LIMITS.initial_stream_window
        assert splice.agent.stream.send_buffered <= (LIMITS.stream_send_high_water + 16 * KiB
                                                     + LIMITS.initial_stream_window)
        assert splice.agent.stream.send_buffered - splice.peer.held <= LIMITS.stream_send_high_water + 16 * KiB
        assert len(sink.data) <= LIMITS.initial_stream_window
        # The agent reads: everything arrives, in order.
        sink.consuming = True
        sink.release()
        while sent < len(payload):
            while stream.paused:
                await asyncio.sleep(0.001)
            stream.write(payload[sent:sent + 16 * KiB])
            sent += 16 * KiB
        stream.write_eof()
        await asyncio.wait_for(sink.eof, 20)
        assert bytes(sink.data) == payload
        # The other way, then FIN: the splice ends once both streams are over.
        sink.stream.write(b"answer")
        sink.stream.write_eof()
        await asyncio.wait_for(back.eof, 10)
        assert bytes(back.data) == b"answer"
        for _ in range(200):
            if holder.done:
                break
            await asyncio.sleep(0.01)
        assert holder.done == 1

        # A reset from the worker's side reaches the agent with its code.
        second = Sink()
        stream2 = forwarding.open_stream(b"res_1", second)
        second.stream = stream2
        stream2.write(b"x")
        agent.opened.clear()
        await asyncio.wait_for(agent.opened.wait(), 10)
        stream2.reset(ErrorCode.CONNECTION_RESET)
        assert await asyncio.wait_for(agent.sinks[1].reset, 10) == ErrorCode.CONNECTION_RESET
        for _ in range(200):
            if holder.done == 2:
                break
            await asyncio.sleep(0.01)
        assert holder.done == 2

    run(go())
