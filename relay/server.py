"""``tunnel-relay serve``: agent listeners (TLS WebSocket on TCP and QUIC on UDP, one port
number), agent authentication and registration, resource endpoints and the admin API, on the
state database of :mod:`relay.state` (SQLite in the state dir, or a cluster's PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import time
import urllib.parse
from pathlib import Path

from tunnel import __version__
from tunnel.carriers.base import Link, LinkHandler, LinkStream
from tunnel.core.limits import Limits
from tunnel.ops.process import tune_malloc
from tunnel.wire.constants import ErrorCode, describe_code
from tunnel.wire.errors import AuthError

from .registry import AgentSession, Registry
from .store.errors import UNREACHABLE_MESSAGE, StoreError, StoreUnavailable

log = logging.getLogger("relay")

MAX_RESOURCES_PER_AGENT = 64
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class AgentLinkHandler(LinkHandler):
    """One agent link on the relay: waits for ``auth``, then serves as a registered agent."""

    def __init__(self, relay: "Relay", link: Link) -> None:
        self.relay = relay
        self.link = link
        self.agent: AgentSession | None = None
        self._authenticating = False

    def stream_opened(self, stream: LinkStream):
        if self.agent is None:
            # docs/PROTOCOL.md: OPEN from an unauthenticated peer is a PROTOCOL_ERROR.
            log.info("agent from %s opened a stream before authenticating; closing", _addr(self.link))
            self.link.close(ErrorCode.PROTOCOL_ERROR, "stream opened before authentication")
            return None
        stream.reset(ErrorCode.REFUSED)  # agents do not open streams towards the relay
        return None

    def control_received(self, message: dict) -> None:
        if message.get("type") == "auth" and self.agent is None and not self._authenticating:
            self._authenticating = True
            task = asyncio.get_running_loop().create_task(self.relay.authenticate(self, message))
            self.relay.tasks.add(task)
            task.add_done_callback(self.relay.tasks.discard)

    def link_closed(self, code: int, reason: str) -> None:
        self.relay.links.discard(self.link)
        if self.agent is not None:
            log.info("agent %s disconnected (%s)", self.agent.agent_id, describe_code(code, reason))
            self.relay.registry.remove_agent(self.agent)
            self.relay.cluster.forget(self.agent)


class Relay:
    def __init__(self, state, authority, registry: Registry, limits: Limits, cluster) -> None:
        self.state = state
        self.authority = authority
        self.registry = registry
        self.limits = limits
        self.cluster = cluster
        self.links: set[Link] = set()
        self.tasks: set[asyncio.Task] = set()

    def on_link(self, link: Link) -> None:
        self.links.add(link)
        link.set_handler(AgentLinkHandler(self, link))

    async def authenticate(self, handler: AgentLinkHandler, message: dict) -> None:
        link = handler.link
        dry_run = message.get("dry_run") is True
        try:
            agent = await self._register(link, message, dry_run=dry_run)
        except StoreUnavailable as exc:
            # Not the agent's fault and not fatal: it retries with its backoff.
            self.cluster.outages.refused("registration(s)", exc)
            link.send_control({"type": "error", "code": "unavailable", "message": UNREACHABLE_MESSAGE})
            link.close(ErrorCode.INTERNAL_ERROR, UNREACHABLE_MESSAGE)
            return
        except AuthError as exc:
            log.warning("%s from %s refused: %s", "agent check" if dry_run else "agent", _addr(link), exc)
            link.send_control({"type": "error", "code": exc.code, "message": str(exc)})
            link.close(ErrorCode.UNAUTHORIZED, str(exc))
            return
        except Exception:
            log.exception("agent from %s: registration failed", _addr(link))
            link.send_control({"type": "error", "code": "internal", "message": "registration failed"})
            link.close(ErrorCode.INTERNAL_ERROR, "registration failed")
            return
        if link.is_closing:
            self.cluster.forget(agent)
            return
        if dry_run:
            # `tunnel-agent check`: accepted, nothing registered; the agent closes the link.
            link.send_control({
                "type": "checked",
                "customer_id": agent.customer_id,
                "resources": [self._checked_resource(agent, entry["name"]) for entry in message["resources"]],
            })
            log.info("agent check from %s: registration token accepted for customer %s", _addr(link),
                     agent.customer_id)
            return
        handler.agent = agent
        self.registry.add_agent(agent)
        link.send_control({
            "type": "registered",
            "agent_id": agent.agent_id,
            "resources": [
                {"name": name, "id": rid, "endpoint": self.registry.endpoints[rid].address}
                for rid, name in agent.resources.items()
            ],
        })
        link.handshake_done()
        log.info("agent %s registered: customer %s, resources %s, %s from %s, version %s",
                 agent.agent_id, agent.customer_id,
                 ", ".join(f"{n} ({r})" for r, n in agent.resources.items()),
                 link.carrier, _addr(link), agent.version)

    def _checked_resource(self, agent: AgentSession, name: str) -> dict:
        rid = next((r for r, n in agent.resources.items() if n == name), None)
        endpoint = self.registry.endpoints.get(rid) if rid else None
        return {"name": name, "id": rid, "endpoint": endpoint.address if endpoint else None}

    async def _register(self, link: Link, message: dict, dry_run: bool = False) -> AgentSession:
        from .tokens import check_against_state

        token = message.get("token")
        resources = message.get("resources")
        info = message.get("agent") if isinstance(message.get("agent"), dict) else {}
        if not isinstance(token, str) or not token:
            raise AuthError("no registration token", code="bad_request")
        if (not isinstance(resources, list) or not resources or len(resources) > MAX_RESOURCES_PER_AGENT
                or not all(isinstance(r, dict) and _valid_name(r.get("name")) for r in resources)):
            raise AuthError("resources must be a list of 1 to 64 objects with a name "
                            "(letters, digits, '.', '_', '-'; at most 128 characters)", code="bad_request")
        claims = self.authority.verify(token)
        registered: dict[str, str] = {}
        for entry in resources:
            resource = await check_against_state(claims, self.state, entry["name"], allocate=self._allocate_port,
                                                 create=not dry_run)
            if dry_run:
                if resource is not None:
                    registered[resource["id"]] = resource["name"]
                continue
            await self.registry.ensure_endpoint(resource)
            registered[resource["id"]] = resource["name"]
        agent_id = "agt_" + secrets.token_hex(8)
        instance = info.get("instance")
        session = AgentSession(
            agent_id=agent_id,
            link=link,
            customer_id=claims.customer_id,
            generation=claims.generation,
            version=_clip(info.get("version")),
            hostname=_clip(info.get("hostname")),
            resources=registered,
            instance=instance if isinstance(instance, str) and _INSTANCE_RE.match(instance) else agent_id,
        )
        if not dry_run:  # a check-only registration is not a link
            await self.cluster.admit(session)
        return session

    def _allocate_port(self, taken: set[int]) -> int:
        from .state import allocate_port

        return allocate_port(self.registry.service_host, taken)

    async def drain(self) -> None:
        """Graceful stop: no new streams, tell agents, close."""
        for link in list(self.links):
            link.goaway(ErrorCode.NO_ERROR, "relay shutting down")
        for link in list(self.links):
            link.close(ErrorCode.NO_ERROR, "relay shutting down")
        await asyncio.gather(*(link.wait_closed() for link in list(self.links)), return_exceptions=True)


def _valid_name(name) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 128
            and all(c.isascii() and (c.isalnum() or c in "._-") for c in name))


def _clip(value, limit: int = 128) -> str:
    return value[:limit] if isinstance(value, str) else ""


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
    except (OSError, ValueError, StoreError) as exc:
        log.error("relay cannot start: %s", exc)
        return 1


async def _serve(args) -> int:
    from tunnel.bridge.listen import serve_links

    from . import admin, pki, tokens
    from .cluster import Cluster, default_advertise_url
    from .store.settings import StoreSettings

    limits = Limits.from_env()
    settings = StoreSettings.from_env()
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    host, port = args.listen_addr
    admin_host, admin_port = args.admin_listen_addr
    advertise = args.advertise or default_advertise_url(host, port, args.server_names)
    advertise_host = urllib.parse.urlsplit(advertise).hostname
    keys = pki.ensure_pki(state_dir, extra_names=[host, advertise_host, *args.server_names], cert_file=args.cert,
                          key_file=args.key)
    cert_file, key_file = keys.cert_file, keys.key_file
    ssl_context = pki.server_ssl_context(cert_file, key_file)

    store = await _open_state(state_dir, args.database, settings)
    authority = tokens.TokenAuthority(state_dir)
    registry = Registry(args.service_host)
    cluster = Cluster(store, registry, advertise, settings)
    await cluster.start()
    relay = Relay(store, authority, registry, limits, cluster)
    for resource in await store.list_resources():
        try:
            await registry.ensure_endpoint(resource)
        except OSError as exc:
            log.error("resource %s: cannot bind endpoint %s:%s: %s", resource["id"], args.service_host,
                      resource["port"], exc.strerror or exc)

    listeners = await serve_links(host, port, ssl_context=ssl_context, cert_file=str(cert_file),
                                  key_file=str(key_file), limits=limits, on_link=relay.on_link)
    if port == 0 and not args.advertise:
        await cluster.readvertise(default_advertise_url(host, listeners.port, args.server_names))
    port = listeners.port
    admin_token = admin.load_or_create_admin_token(state_dir)
    admin_server = await admin.start_admin_server(admin_host, admin_port, state=store, authority=authority,
                                                  registry=registry, token=admin_token, state_dir=state_dir,
                                                  cluster=cluster)
    admin_bound = admin_server.sockets[0].getsockname()[1]
    log.info("relay %s (%s) listening for agents on %s:%d (wss on TCP, quic on UDP); admin API on http://%s:%d; "
             "resource endpoints on %s; state in %s, database %s", __version__, cluster.relay_id, host, port,
             admin_host, admin_bound, args.service_host, state_dir, store.description)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relay stopping")
    listeners.close()
    admin_server.close()
    admin.clear_admin_info(state_dir)
    await relay.drain()
    registry.close()
    await cluster.stop()
    await store.close()
    return 0


async def _open_state(state_dir: Path, database: str | None, settings):
    """The migrated state; a PostgreSQL that cannot be reached is retried with backoff for
    ``db_startup_timeout`` before the relay gives up."""
    from .state import RelayState
    from .store.database import redact_url

    where = redact_url(database) if database else "in the state directory"
    deadline = time.monotonic() + settings.db_startup_timeout
    delay = 0.5
    while True:
        try:
            return await RelayState.open(state_dir, database, settings)
        except StoreUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise StoreError(f"state database unreachable: {where}: {exc.reason}; "
                                 f"gave up after {settings.db_startup_timeout:g} s") from None
            log.warning("state database unreachable: %s: %s; retrying in %.1f s", where, exc.reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.db_reconnect_max)
