"""``tunnel-relay serve``: agent listeners (TLS WebSocket on TCP and QUIC on UDP, one port
number), agent authentication and registration, resource endpoints and the admin API.

Before it is registered a link may send one thing: one ``auth`` message. Anything else (a
second ``auth``, another CONTROL type, a stream) gets a CONTROL ``error`` and the link is
closed with ``PROTOCOL_ERROR`` (docs/PROTOCOL.md, "Control messages").

Registration (:meth:`Relay._register`) runs in three steps: checks against the state with
no ``await`` between them (token, quotas, resources, created when a customer-wide token names
a new one); binding the endpoints of new resources (the only ``await``); and, again without
an ``await``, checking that nothing was revoked or deleted meanwhile before the agent is
added. The admin API's rotate and delete run on the same event loop without an ``await``
either, so each of them happens wholly before or wholly after that last step.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import time
from collections import Counter
from pathlib import Path

from tunnel import __version__
from tunnel.bridge.tcp import LinkBuffers
from tunnel.carriers.base import Link, LinkHandler, LinkStream
from tunnel.core.limits import Limits
from tunnel.ops.logs import Throttled, escape
from tunnel.ops.process import tune_malloc
from tunnel.wire.constants import ErrorCode, describe_code
from tunnel.wire.errors import AuthError

from . import is_loopback_host
from .quotas import Descriptors, QuotaExceeded, RegistrationRate, raise_nofile_limit
from .registry import AgentSession, Registry
from .state import state_write_failure

log = logging.getLogger("relay")

MAX_RESOURCES_PER_AGENT = 64
#: Agent-supplied strings accepted at ``auth`` (docs/PROTOCOL.md): anything else is refused.
RESOURCE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
AGENT_FIELDS = {
    "version": (re.compile(r"[A-Za-z0-9._+-]{1,64}"), "1-64 letters, digits, '.', '_', '+' or '-'"),
    "hostname": (re.compile(r"[A-Za-z0-9._-]{1,253}"), "1-253 letters, digits, '.', '_' or '-'"),
    "instance": (re.compile(r"[A-Za-z0-9_-]{1,64}"), "1-64 letters, digits, '_' or '-'"),
}
#: A recurring condition (quota, full state directory) is logged once per this many seconds.
LOG_INTERVAL = 60.0


class AgentLinkHandler(LinkHandler):
    """One agent link on the relay: waits for one ``auth``, then serves as a registered agent."""

    def __init__(self, relay: "Relay", link: Link) -> None:
        self.relay = relay
        self.link = link
        self.agent: AgentSession | None = None
        self._authenticating = False
        self._counted = link.carrier == "wss"  # a TCP connection: one descriptor
        if self._counted and relay.descriptors is not None:
            relay.descriptors.take(None)

    def stream_opened(self, stream: LinkStream):
        if self.agent is None:
            self._refuse_early("a stream")
            return None
        stream.reset(ErrorCode.REFUSED)  # agents do not open streams towards the relay
        return None

    def control_received(self, message: dict) -> None:
        if self.agent is not None:
            self.relay.control.received(self.agent, message)  # relay.agent_control
            return
        kind = message.get("type")
        if kind == "auth" and not self._authenticating:
            self._authenticating = True
            task = asyncio.get_running_loop().create_task(self.relay.authenticate(self, message))
            self.relay.tasks.add(task)
            task.add_done_callback(self.relay.tasks.discard)
            return
        self._refuse_early("a second auth" if kind == "auth" else f"a {str(kind)[:32]!r} message")

    def _refuse_early(self, what: str) -> None:
        """Anything but one ``auth`` before registration closes the link."""
        if self.link.is_closing:
            return
        self.relay.throttled.log("before registration", logging.INFO,
                                 "agent link from %s sent %s before registration; closing it",
                                 _addr(self.link), what)
        message = f"expected one auth message before anything else, got {what}"
        try:
            self.link.send_control({"type": "error", "code": "bad_request", "message": message})
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.link.close(ErrorCode.PROTOCOL_ERROR, message)

    def link_closed(self, code: int, reason: str) -> None:
        relay = self.relay
        relay.links.discard(self.link)
        agent = self.agent
        if self._counted and relay.descriptors is not None:
            self._counted = False
            relay.descriptors.give(agent.customer_id if agent is not None else None)
        if agent is not None:
            log.info("agent %s disconnected (%s)", agent.agent_id, describe_code(code, reason))
            relay.registry.remove_agent(agent)
            relay.mark_served(agent.resources)


class Relay:
    def __init__(self, state, authority, registry: Registry, limits: Limits,
                 descriptors: Descriptors | None = None) -> None:
        self.state = state
        self.authority = authority
        self.registry = registry
        self.limits = limits
        self.descriptors = descriptors
        self.links: set[Link] = set()
        self.tasks: set[asyncio.Task] = set()
        self.rate = RegistrationRate(limits.max_registrations_per_minute)
        self.throttled = Throttled(log, LOG_INTERVAL)
        #: Resources with a registration between its first and last step (never expired).
        self.registering: Counter = Counter()
        from .agent_control import AgentControl

        #: CONTROL messages of registered agents.
        self.control = AgentControl(self)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def on_link(self, link: Link) -> None:
        self.links.add(link)
        link.set_handler(AgentLinkHandler(self, link))

    async def authenticate(self, handler: AgentLinkHandler, message: dict) -> None:
        link = handler.link
        if message.get("dry_run") is True:
            self._check_only(link, message)
            return
        try:
            agent = await self._register(link, message)
        except QuotaExceeded as exc:
            self.throttled.log(("quota", str(exc)), logging.WARNING, "agent from %s refused: %s", _addr(link), exc)
            _refuse(link, exc.code, str(exc), ErrorCode.ENHANCE_YOUR_CALM)
            return
        except AuthError as exc:
            log.warning("agent from %s refused: %s", _addr(link), exc)
            _refuse(link, exc.code, str(exc), ErrorCode.UNAUTHORIZED)
            return
        except Exception as exc:  # noqa: BLE001
            failure = state_write_failure(exc)
            if failure is None:
                log.exception("agent from %s: registration failed", _addr(link))
                _refuse(link, "internal", "registration failed", ErrorCode.INTERNAL_ERROR)
            else:
                self.state_failed(failure)
                _refuse(link, "unavailable", f"the relay cannot register agents now: {failure}",
                        ErrorCode.INTERNAL_ERROR)
            return
        if agent is None:  # the link closed meanwhile
            return
        handler.agent = agent
        if handler._counted and self.descriptors is not None:
            self.descriptors.attribute(agent.customer_id)
        link.send_control({
            "type": "registered",
            "agent_id": agent.agent_id,
            "resources": [
                {"name": name, "id": rid, "endpoint": self.registry.endpoints[rid].address}
                for rid, name in agent.resources.items()
            ],
        })
        link.handshake_done()
        log.info("agent %s registered: customer %s, resources %s, %s from %s, version %s, host %s",
                 agent.agent_id, agent.customer_id,
                 ", ".join(f"{n} ({r})" for r, n in agent.resources.items()),
                 link.carrier, _addr(link), agent.version, agent.hostname)
        self.mark_served(agent.resources)

    def _check_only(self, link: Link, message: dict) -> None:
        """``tunnel-agent check``: verify the token and the resource names as a registration
        would, register nothing, answer ``checked`` (the agent closes the link)."""
        from .tokens import check_against_state

        try:
            token, resources, _info = _auth_fields(message)
            claims = self.authority.verify(token)
            found = [check_against_state(claims, self.state, entry["name"], create=False) for entry in resources]
        except AuthError as exc:
            log.warning("agent check from %s refused: %s", _addr(link), exc)
            _refuse(link, exc.code, str(exc), ErrorCode.UNAUTHORIZED)
            return
        answer = []
        for entry, resource in zip(resources, found):
            endpoint = self.registry.endpoints.get(resource["id"]) if resource else None
            answer.append({"name": entry["name"], "id": resource["id"] if resource else None,
                           "endpoint": endpoint.address if endpoint else None})
        link.send_control({"type": "checked", "customer_id": claims.customer_id, "resources": answer})
        log.info("agent check from %s: registration token accepted for customer %s", _addr(link),
                 claims.customer_id)

    async def _register(self, link: Link, message: dict) -> AgentSession | None:
        from .tokens import check_against_state

        token, resources, info = _auth_fields(message)
        claims = self.authority.verify(token)

        # Step 1: quotas and resources, no await.
        customer_id = claims.customer_id
        self.rate.charge(customer_id)
        limits = self.limits
        self._check_link_quotas(link, customer_id)

        wanted = [check_against_state(claims, self.state, entry["name"], allocate=self._allocate_port,
                                      before_create=self._before_create) for entry in resources]
        ids = {r["id"] for r in wanted}
        self.registering.update(ids)
        try:
            # Step 2: bind the endpoints of new resources.
            for resource in wanted:
                await self.registry.ensure_endpoint(resource)
            # Step 3, no await: nothing revoked or deleted meanwhile, then commit.
            if link.is_closing:
                return None
            self._check_link_quotas(link, customer_id)  # others may have registered meanwhile
            for resource in wanted:
                now = self.state.get_resource(resource["id"])
                if now is None:
                    self.registry.resource_deleted(resource["id"])  # the endpoint bound for it
                    raise AuthError("resource deleted", code="deleted")
                if claims.generation < now["generation"]:
                    raise AuthError("registration token revoked", code="revoked")
            agent = AgentSession(
                agent_id="agt_" + secrets.token_hex(8),
                link=link,
                customer_id=customer_id,
                generation=claims.generation,
                version=info["version"],
                hostname=info["hostname"],
                instance=info["instance"],
                resources={r["id"]: r["name"] for r in wanted},
                buffers=LinkBuffers(limits.session_window),
                claims=claims,
            )
            self.registry.add_agent(agent)
            return agent
        finally:
            for rid in ids:
                self.registering[rid] -= 1
                if self.registering[rid] <= 0:
                    del self.registering[rid]

    def _before_create(self, owner: str) -> None:
        limit = self.limits.max_resources_per_customer
        if self.state.count_resources(owner) >= limit:
            raise QuotaExceeded(f"customer {owner} is over its quota of {limit} "
                                "resources (TUNNEL_MAX_RESOURCES_PER_CUSTOMER); delete unused ones")

    async def resource_for(self, claims, name: str) -> dict:
        """The resource ``name`` the verified ``claims`` may serve, as a registration finds it
        (created if need be, its endpoint bound), checked again after the bind: AuthError if it
        was revoked or deleted meanwhile. For resources added on a live link."""
        from .tokens import check_against_state

        resource = check_against_state(claims, self.state, name, allocate=self._allocate_port,
                                       before_create=self._before_create)
        rid = resource["id"]
        self.registering[rid] += 1
        try:
            await self.registry.ensure_endpoint(resource)
            now = self.state.get_resource(rid)
            if now is None:
                self.registry.resource_deleted(rid)
                raise AuthError("resource deleted", code="deleted")
            if claims.generation < now["generation"]:
                raise AuthError("registration token revoked", code="revoked")
            return resource
        finally:
            self.registering[rid] -= 1
            if self.registering[rid] <= 0:
                del self.registering[rid]

    def _check_link_quotas(self, link: Link, customer_id: str) -> None:
        limit = self.limits.max_links_per_customer
        if self.registry.links_of(customer_id) >= limit:
            raise QuotaExceeded(f"customer {customer_id} is over its quota of {limit} live agent links "
                                "(TUNNEL_MAX_LINKS_PER_CUSTOMER)")
        if self.descriptors is not None and link.carrier == "wss":  # a QUIC link holds no descriptor
            self.descriptors.check_link(customer_id)

    def _allocate_port(self, taken: set[int]) -> int:
        from .state import allocate_port

        return allocate_port(self.registry.service_host, taken, self.registry.port_range)

    def mark_served(self, resource_ids) -> None:
        """Record that these resources were served until now (their idle time starts over)."""
        ids = list(resource_ids)
        if not ids:
            return
        try:
            self.state.mark_served(ids, int(time.time()))
        except Exception as exc:  # noqa: BLE001 - serving goes on without the record
            failure = state_write_failure(exc)
            if failure is None:
                raise
            self.state_failed(failure)

    def state_failed(self, failure: str) -> None:
        self.throttled.log("state", logging.ERROR, "%s: %s; free space there (or fix it) and the relay resumes",
                           failure, self.state.state_dir)

    def expire_idle_resources(self) -> list[dict]:
        """Delete the resources no agent has served for ``resource_idle_expiry`` (and that no
        token names by id), freeing their ports; refresh the time of those served now."""
        served = [rid for rid, endpoint in self.registry.endpoints.items() if endpoint.agents]
        self.mark_served(served)
        cutoff = int(time.time() - self.limits.resource_idle_expiry)
        expired = []
        for resource in self.state.idle_resources(cutoff):
            rid = resource["id"]
            if self.registering[rid] or self.registry.status(rid) == "AVAILABLE":
                continue
            self.registry.resource_deleted(rid)
            self.state.delete_resource(rid)
            log.info("resource %s (%s) of customer %s expired: no agent served it for %.0f s; port %d freed",
                     rid, resource["name"], resource["customer_id"], self.limits.resource_idle_expiry,
                     resource["port"])
            expired.append(resource)
        return expired

    async def expire_forever(self) -> None:
        interval = min(max(self.limits.resource_idle_expiry / 4, 0.5), 3600.0)
        while True:
            try:
                self.expire_idle_resources()
            except Exception as exc:  # noqa: BLE001
                failure = state_write_failure(exc)
                if failure is None:
                    log.exception("expiring idle resources failed")
                else:
                    self.state_failed(failure)
            await asyncio.sleep(interval)

    async def drain(self) -> None:
        """Graceful stop: no new streams, tell agents, close."""
        for link in list(self.links):
            link.goaway(ErrorCode.NO_ERROR, "relay shutting down")
        for link in list(self.links):
            link.close(ErrorCode.NO_ERROR, "relay shutting down")
        await asyncio.gather(*(link.wait_closed() for link in list(self.links)), return_exceptions=True)


def _valid(pattern: re.Pattern, value) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _auth_fields(message: dict) -> tuple[str, list, dict]:
    """The token, resources and agent strings of an ``auth`` message, checked; AuthError
    (``bad_request``) for anything malformed."""
    token = message.get("token")
    resources = message.get("resources")
    if not isinstance(token, str) or not token:
        raise AuthError("no registration token", code="bad_request")
    if (not isinstance(resources, list) or not resources or len(resources) > MAX_RESOURCES_PER_AGENT
            or not all(isinstance(r, dict) and _valid(RESOURCE_NAME, r.get("name")) for r in resources)):
        raise AuthError("resources must be a list of 1 to 64 objects with a name "
                        "(letters, digits, '.', '_', '-'; at most 128 characters)", code="bad_request")
    return token, resources, _agent_info(message.get("agent"))


def _agent_info(info) -> dict:
    """The ``agent`` object of ``auth``: each field optional, but when given it must match
    its pattern; anything else is refused (it would reach logs and terminals)."""
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise AuthError("agent must be an object", code="bad_request")
    result = {}
    for name, (pattern, what) in AGENT_FIELDS.items():
        value = info.get(name)
        if value is None or value == "":
            result[name] = ""
        elif _valid(pattern, value):
            result[name] = value
        else:
            raise AuthError(f"agent.{name} must be {what}, got {escape(str(value)[:64])!r}", code="bad_request")
    return result


def _refuse(link: Link, code: str, message: str, close_code: int) -> None:
    try:
        link.send_control({"type": "error", "code": code, "message": message})
    except Exception:  # noqa: BLE001 - closing anyway
        pass
    link.close(close_code, message)


def _addr(link: Link) -> str:
    try:
        host, port = link.peer_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"


def serve_main(args) -> int:
    """Entry point of ``tunnel-relay serve`` (``args`` from relay.cli)."""
    tune_malloc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        uvloop = None
    try:
        if uvloop is not None:
            return uvloop.run(_serve(args))
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as exc:
        log.error("relay cannot start: %s", exc)
        return 1


async def _serve(args) -> int:
    from tunnel.bridge.listen import serve_links

    from . import admin, pki, tokens
    from . import state as state_mod

    limits = Limits.from_env()
    before, open_files = raise_nofile_limit()
    descriptors = Descriptors(open_files, limits)
    log.info("open files: limit %d (raised from %d); %d for agents and endpoints, at most %d per customer, "
             "%d kept in reserve", open_files, before, descriptors.budget, descriptors.share,
             open_files - descriptors.budget)
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    host, port = args.listen_addr
    admin_host, admin_port = args.admin_listen_addr
    allow_remote = getattr(args, "allow_remote_admin", False)
    names = [host, *args.server_names]
    if allow_remote and not is_loopback_host(admin_host):
        names.append(admin_host)
    keys = pki.ensure_pki(state_dir, extra_names=names, cert_file=args.cert, key_file=args.key)
    cert_file, key_file = keys.cert_file, keys.key_file
    ssl_context = pki.server_ssl_context(cert_file, key_file)

    store = state_mod.RelayState(state_dir / "relay.db")
    authority = tokens.TokenAuthority(state_dir)
    registry = Registry(args.service_host, descriptors, limits, args.port_range)
    relay = Relay(store, authority, registry, limits, descriptors)
    relay.expire_idle_resources()
    for resource in store.list_resources():
        try:
            await registry.ensure_endpoint(resource)
        except OSError as exc:
            log.error("resource %s: cannot bind endpoint %s:%s: %s", resource["id"], args.service_host,
                      resource["port"], exc.strerror or exc)
        except QuotaExceeded as exc:
            log.error("resource %s: endpoint not bound: %s", resource["id"], exc)

    listeners = await serve_links(host, port, ssl_context=ssl_context, cert_file=str(cert_file),
                                  key_file=str(key_file), limits=limits, on_link=relay.on_link)
    port = listeners.port
    admin_token = admin.load_or_create_admin_token(state_dir)
    admin_server = await admin.start_admin_server(
        admin_host, admin_port, state=store, authority=authority, registry=registry, token=admin_token,
        state_dir=state_dir, allow_remote=allow_remote,
        ssl_context=pki.server_ssl_context(cert_file, key_file) if not is_loopback_host(admin_host) else None,
        on_state_failure=relay.state_failed)
    admin_url = admin.admin_url(admin_server, tls=not is_loopback_host(admin_host))
    log.info("relay %s listening for agents on %s:%d (wss on TCP, quic on UDP); admin API on %s; "
             "resource endpoints on %s; state in %s", __version__, host, port, admin_url,
             args.service_host, state_dir)
    expiry = asyncio.get_running_loop().create_task(relay.expire_forever())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relay stopping")
    expiry.cancel()
    listeners.close()
    admin_server.close()
    admin.clear_admin_info(state_dir)
    await relay.drain()
    registry.close()
    return 0
