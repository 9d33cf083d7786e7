"""The agent's side of one link to the relay (:class:`AgentLinkHandler`): the registration
answer, the streams the relay opens (each dialled to the target configured for its resource
name, never to an address the relay sends), CONTROL messages, and the link's end.
"""

from __future__ import annotations

import asyncio
import logging

from tunnel.bridge.proxy_protocol import ProxyV2Bridge, parse_metadata, proxy_v2_header
from tunnel.bridge.tcp import LinkBuffers, TcpBridge, dial_bridge, stream_handler
from tunnel.carriers.base import Link, LinkHandler, LinkStream
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import AuthError, LinkError, TunnelError

log = logging.getLogger("agent")

#: Error codes from the relay after which retrying with the same token is futile.
FATAL_CODES = {"unauthorized", "revoked", "bad_request", "deleted", "certificate_required"}
#: How long the agent waits for the relay to confirm ``add_resources``/``remove_resources``.
CONTROL_ANSWER_TIMEOUT = 5.0
#: What sending on a link that is closing may raise.
SEND_FAILURES = (TunnelError, OSError)


class AgentLinkHandler(LinkHandler):
    """The agent's side of one link: registration answer, streams, control, closing, for
    ``agent`` (the :class:`agent.runner.Agent` that dialled ``link``)."""

    def __init__(self, agent, link: Link) -> None:
        self.agent = agent
        self.link = link
        loop = asyncio.get_running_loop()
        self.registered: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        #: Set when the relay drains and asks this link to move elsewhere (agent.links).
        self.moving: asyncio.Future = loop.create_future()
        self.error: AuthError | None = None
        #: What this link's bridges hold in user space, bounded as our flow control bounds it.
        self.buffers = LinkBuffers(agent.limits.receive_bound)
        #: Resource name -> the bridges of its streams on this link.
        self.bridges: dict[str, set[TcpBridge]] = {}
        #: The resources the relay routes to this link.
        self.names: set[str] = set()
        #: Set while no stream is open on this link.
        self.idle = asyncio.Event()
        self.idle.set()
        self._answers: dict[str, asyncio.Future] = {}  # "added"/"removed" -> the pending request

    @property
    def open_streams(self) -> int:
        return sum(len(b) for b in self.bridges.values())

    def stream_opened(self, stream: LinkStream):
        name, worker = parse_metadata(stream.metadata)
        target = self.agent.route(name)
        if target is None:
            log.warning("refusing a stream for resource %r: not served by this agent", name[:128])
            stream.reset(ErrorCode.REFUSED)
            return None
        if target.proxy_protocol == 2:
            bridge = ProxyV2Bridge(stream, self.buffers, proxy_v2_header(worker))
        else:
            bridge = TcpBridge(stream, self.buffers)
        bridges = self.bridges.setdefault(name, set())
        bridges.add(bridge)
        self.idle.clear()
        log.debug("stream %d for %s: dialling %s", stream.stream_id, name, target.address)

        def done() -> None:
            bridges.discard(bridge)
            log.debug("stream %d for %s: ended", stream.stream_id, name)
            if not self.open_streams:
                self.idle.set()

        bridge.on_done = done
        health = self.agent.health
        task = asyncio.get_running_loop().create_task(
            dial_bridge(stream, bridge, target.host, target.port, self.agent.settings.connect_timeout,
                        on_result=lambda exc: health.result(target, exc)))
        self.agent.tasks.add(task)
        task.add_done_callback(self.agent.tasks.discard)
        if self.agent.metrics is not None:
            self.agent.metrics.stream_dialing(name, task)
        return stream_handler(bridge)

    def control_received(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "registered" and not self.registered.done():
            self.names = {str(r.get("name")) for r in message.get("resources", []) if isinstance(r, dict)}
            # Known at once: a ``relays`` message right behind this one must see this slot's
            # relay as taken, before the registering task resumes.
            relay_id = message.get("relay_id")
            self.agent.relay_id = relay_id if isinstance(relay_id, str) else None
            self.registered.set_result(message)
        elif kind == "enroll_only" and not self.registered.done():
            # --require-agent-certificates: this link may enrol and serves nothing (Agent.register).
            self.registered.set_result(message)
        elif kind == "deregistered":
            self._deregistered(message)
        elif kind in ("relays", "draining") and self.agent.links is not None:
            self.agent.links.control(self.agent, self, message)
        elif kind in ("resources_added", "resources_removed", "enrolled", "enroll_failed"):
            future = self._answers.pop("enroll" if kind.startswith("enrol") else kind, None)
            if future is not None and not future.done():
                future.set_result(message)
        elif kind == "prove" and not self.registered.done():
            self.agent.prove(self.link, message)
        elif kind == "error":
            code = str(message.get("code", "error"))
            text = str(message.get("message", ""))[:512]
            self.error = AuthError(f"relay refused this agent: {text} ({code})", code=code, fatal=code in FATAL_CODES)
            if not self.registered.done():
                self.registered.set_exception(self.error)

    async def request(self, kind: str, names: list[str], answer: str, **extra) -> dict | None:
        """Send ``add_resources``/``remove_resources`` for ``names``; the relay's answer, or
        None when none came in time (a relay older than these messages ignores them)."""
        future = asyncio.get_running_loop().create_future()
        self._answers[answer] = future
        try:
            self.link.send_control({"type": kind, "resources": [{"name": n} for n in names], **extra})
            return await asyncio.wait_for(asyncio.shield(future), CONTROL_ANSWER_TIMEOUT)
        except (asyncio.TimeoutError, *SEND_FAILURES):
            return None
        finally:
            self._answers.pop(answer, None)

    async def enroll(self, csr: str, timeout: float) -> dict | None:
        """Send ``enroll`` with ``csr``; the relay's ``enrolled`` or ``enroll_failed``, or None
        when the link closed or no answer came within ``timeout``."""
        future = asyncio.get_running_loop().create_future()
        self._answers["enroll"] = future
        try:
            self.link.send_control({"type": "enroll", "csr": csr})
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (asyncio.TimeoutError, *SEND_FAILURES):
            return None
        finally:
            self._answers.pop("enroll", None)

    def send_health(self, names) -> None:
        entries = self.agent.health.report(n for n in names if n in self.names)
        if entries and not self.link.is_closing:
            try:
                self.link.send_control({"type": "target_health", "resources": entries})
            except SEND_FAILURES:
                pass

    def _deregistered(self, message: dict) -> None:
        """The relay stopped routing one resource to us: end it here, keep the others."""
        resource = message.get("resource") if isinstance(message.get("resource"), dict) else {}
        name = resource.get("name")
        if not isinstance(name, str) or self.agent.route(name) is None:
            return
        code = str(message.get("code", "deregistered"))[:64]
        text = str(message.get("message", ""))[:512]
        agent = self.agent
        agent.dropped[name] = f"{text} ({code})"
        self.names.discard(name)
        for bridge in list(self.bridges.pop(name, ())):
            bridge.fail(ErrorCode.UNAUTHORIZED)
        if not self.open_streams:
            self.idle.set()
        left = [t.name for t in agent.config.targets if t.name not in agent.dropped]
        if left:
            log.warning("relay deregistered resource %s (%s): %s (%s); no longer serving it, still serving %s",
                        name, resource.get("id"), text, code, ", ".join(left))
            return
        self.error = AuthError(f"relay deregistered every resource of this agent, the last {name}: {text} ({code})",
                               code=code, fatal=True)
        self.link.close(ErrorCode.UNAUTHORIZED, "no resource left to serve")

    def link_closed(self, code: int, reason: str) -> None:
        if code == ErrorCode.UNAUTHORIZED and self.error is None:
            # The refusal itself, when the carrier closed before the error message arrived.
            self.error = AuthError(f"relay refused this agent: {reason[:512] or 'unauthorized'} (unauthorized)",
                                   code="unauthorized", fatal=True)
        if not self.registered.done():
            self.registered.set_exception(self.error or LinkError(f"link closed during registration: {reason or code}"))
        if not self.closed.done():
            self.closed.set_result((code, reason))
        for future in self._answers.values():
            if not future.done():
                future.set_result(None)

