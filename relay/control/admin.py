"""The relay's admin API: HTTP/1.1 + JSON on loopback (plain HTTP), or beyond loopback
with ``--allow-remote-admin`` over TLS only (the relay's own certificate), bearer token.

HTTP/1.1 by :mod:`tunnel.ops.http11` (h11): request line and headers at most 16 KiB,
``Content-Length`` bodies at most 1 MiB (no chunked bodies), keep-alive with an idle timeout,
pipelined requests answered in order, the token compared in constant time. Every error is a JSON object
``{"error": "<code>", "message": "<text>"}``. A state directory that refuses writes (full,
read-only) answers 503 ``state_write_failed`` with one clear message, logged once per
interval, instead of a 500 and a traceback per request.

Endpoints (all but ``/v1/health`` need ``Authorization: Bearer <admin token>``)::

    GET    /v1/health                   {"status": "ok"}
    GET    /v1/customers                [{"id", "name", "created_at"}]
    POST   /v1/customers                {"name"} -> {"id", "name", "created_at"}   (201; 409 when
                                        a customer of that name, ignoring case, width and
                                        look-alike letters, exists: relay.state.name_key)
    GET    /v1/resources[?extended=1]   [{"id", "name", "customer_id", "status", "endpoint",
                                          "agents", "target_status", "target_error", "allow",
                                          "effective_allow" [, "agents_detail"]}]
    POST   /v1/resources                {"customer_id", "name", "port"?, "allow"?} -> the resource
                                        (201): created ahead of its agents, its endpoint on
                                        ``port`` (else one of the relay's --port-range); 409 when
                                        the name or port is taken
    PATCH  /v1/resources/{id}           {"allow": ["CIDR", …] | "CIDR,CIDR" | null} -> the
                                        resource: the sources that may reach its endpoint (null:
                                        the relay's --service-allow), on every relay of a cluster
    POST   /v1/registration-jwt         {"customer_id"?, "org_only"?, "resource_id"?,
                                         "rotate"?, "ttl_seconds"?} -> {"jwt"}
    DELETE /v1/resources/{id}           {"id", "deleted": true}
    GET    /v1/cluster                  {"relay_id", "advertise_url", "database", "relays", "links"}
    GET    /v1/agents[?customer_id=ID]  [{"customer_id", "instance", "identity" ("certificate" or
                                          "token"), "scope", "resource_ids", "serial" (hex),
                                          "issued_at", "expires_at", "certificates", "revoked",
                                          "revoked_at", "revoked_reason", "linked", "links"}]:
                                        every agent instance known by a certificate, a
                                        revocation or a live link, on every relay
    POST   /v1/agents/{instance}/revoke {"customer_id"?, "reason"?} -> {"customer_id", "instance",
                                        "certificates", "revoked": true}: its certificates
                                        revoked, its links (token or certificate) dropped on
                                        every relay, its renewal refused (404 when unknown, 409
                                        when several customers have that instance: give one)

The live view (agents per resource) comes from a :class:`Registry` the data plane provides:
``status`` and ``agents`` count every relay's agents, ``target_status`` (whether the private
service answers) what this relay's agents report, while
``agents_detail`` lists the agent links of every relay on the state database, each with its
``relay_id`` and ``relay_url``; live counters (bytes, streams) are known for this relay's only.
Rotation and deletion reach the agents of every relay through the state's events (see
:mod:`relay.state.cluster`). While the state database is unreachable, every endpoint but
``/v1/health`` answers 503 ``{"error": "unavailable", "message": "state database unreachable"}``.

Files: ``<state>/admin-token`` (0600, created once) and ``<state>/admin.json``
(``{"url": "http://127.0.0.1:PORT"}``, or ``https://`` beyond loopback; 0600, written once
listening).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import orjson

from tunnel.ops.http11 import HttpLimits, HttpServer, Request, Response
from tunnel.ops.logs import Throttled

from relay import ADMIN_INFO_FILE, ADMIN_TOKEN_FILE, format_host_port, is_loopback_host
from relay.state import access
from relay.state.cluster import link_view
from relay.state.relay_state import (DEFAULT_PORT_RANGE, NameTaken, RelayState, allocate_port, ensure_state_dir, state_write_failure,
                                     validate_name, write_private)
from relay.state.store.errors import UNREACHABLE_MESSAGE, StateWriteFailed, StoreUnavailable

from .names import RESOURCE_NAME
from .tokens import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, TokenAuthority, token_subject

log = logging.getLogger("relay.admin")

MAX_HEAD_SIZE = 16 * 1024
MAX_BODY_SIZE = 1024 * 1024
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
#: Loopback (or TLS with the token) only: one address, so the per-client bound is the total.
HTTP_LIMITS = HttpLimits(head_timeout=HEAD_TIMEOUT, idle_timeout=IDLE_TIMEOUT, body_timeout=BODY_TIMEOUT,
                         max_head_size=MAX_HEAD_SIZE, max_connections=64, max_per_client=64)

_RESOURCE_PATH = re.compile(r"^/v1/resources/([A-Za-z0-9_]{1,64})$")
_REVOKE_PATH = re.compile(r"^/v1/agents/([A-Za-z0-9_-]{1,64})/revoke$")
MAX_REASON = 200


class Registry(Protocol):
    """What the admin API (and :class:`relay.state.cluster.Cluster`, for revocations) needs from
    the data plane."""

    service_host: str

    def agents_of(self, resource_id: str) -> list[dict]: ...

    def drop_agents(self, resource_id: str, below_generation: int) -> int: ...

    def resource_deleted(self, resource_id: str) -> None: ...

    def resource_updated(self, resource_id: str, allow_cidrs: str | None) -> None: ...

    def drop_agent(self, agent, code: str, message: str) -> None: ...

    # Optional: ``port_range``, where new resources' endpoint ports are chosen (default
    # relay.state.DEFAULT_PORT_RANGE).



class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------- token file


def load_or_create_admin_token(state_dir: str | os.PathLike) -> str:
    """The admin token in ``<state>/admin-token``, created (0600, 32 random bytes) if absent."""
    path = ensure_state_dir(state_dir) / ADMIN_TOKEN_FILE
    try:
        token = path.read_text("ascii").strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    token = secrets.token_urlsafe(32)
    write_private(path, (token + "\n").encode("ascii"))
    return token


#: The name relay.control.server uses.
ensure_admin_token = load_or_create_admin_token


# --------------------------------------------------------------------------- the application


class AdminApi:
    """Request handling, independent of the HTTP plumbing (easy to call in tests)."""

    def __init__(
        self,
        *,
        state: RelayState,
        authority: TokenAuthority,
        registry: Registry,
        token: str,
        on_state_failure: Callable[[str], None] | None = None,
        cluster=None,
    ) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self.state = state
        self.authority = authority
        self.registry = registry
        #: This relay's :class:`relay.state.cluster.Cluster` (relay id, links, outage log).
        self.cluster = cluster
        self._token = token.encode("utf-8")
        if on_state_failure is None:
            throttled = Throttled(log)

            def on_state_failure(failure: str) -> None:
                throttled.log("state", logging.ERROR, "%s: %s", failure, state.state_dir)

        #: Called with a one-line description when the state refuses a write (logs it, throttled).
        self.on_state_failure = on_state_failure

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), self._token)

    def authorize(self, method: str, target: str, headers: dict[str, str]):
        """Route the request and check its token, before any body is read. Return what
        :meth:`handle` needs; raise :class:`HttpError` (404, 405, 401)."""
        parsed = urllib.parse.urlsplit(target)
        path = parsed.path
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        route, allowed = self._route(method, path)
        if route is None:
            if allowed:
                raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}",
                                {"Allow": ", ".join(allowed)})
            raise HttpError(404, "not_found", f"no such endpoint: {path}")
        handler, args = route
        if handler != self.get_health and not self.authorized(headers.get("authorization")):
            raise HttpError(401, "unauthorized", "missing or wrong admin token",
                            {"WWW-Authenticate": 'Bearer realm="tunnel-relay"'})
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        return handler, args, query

    async def handle(self, method: str, target: str, headers: dict[str, str], body: bytes,
                     authorized=None) -> tuple[int, Any]:
        handler, args, query = authorized or self.authorize(method, target, headers)
        payload = None
        if method in ("POST", "PUT", "PATCH"):
            payload = _parse_json_object(body)
        try:
            return await handler(*args, query=query, payload=payload)
        except StoreUnavailable as exc:
            if isinstance(exc, StateWriteFailed):
                self.on_state_failure(exc.reason)
                raise HttpError(503, "state_write_failed",
                                f"{exc.reason}: the relay cannot record changes until that is fixed") from None
            if self.cluster is not None:
                self.cluster.outages.refused("admin request(s)", exc)
            raise HttpError(503, "unavailable", UNREACHABLE_MESSAGE, {"Retry-After": "5"}) from None
        except Exception as exc:
            failure = state_write_failure(exc)
            if failure is None:
                raise
            self.on_state_failure(failure)
            raise HttpError(503, "state_write_failed",
                            f"{failure}: the relay cannot record changes until that is fixed") from None

    def _route(self, method: str, path: str):
        table: dict[str, dict[str, Callable]] = {
            "/v1/health": {"GET": self.get_health},
            "/v1/customers": {"GET": self.get_customers, "POST": self.post_customers},
            "/v1/resources": {"GET": self.get_resources, "POST": self.post_resources},
            "/v1/registration-jwt": {"POST": self.post_registration_jwt},
            "/v1/cluster": {"GET": self.get_cluster},
            "/v1/agents": {"GET": self.get_agents},
        }
        methods = table.get(path)
        args: tuple = ()
        if methods is None:
            match = _RESOURCE_PATH.match(path)
            if match is not None:
                methods = {"DELETE": self.delete_resource, "GET": self.get_resource, "PATCH": self.patch_resource}
            else:
                match = _REVOKE_PATH.match(path)
                if match is None:
                    return None, []
                methods = {"POST": self.post_agent_revoke}
            args = (match.group(1),)
        if method == "HEAD" and "GET" in methods:
            method = "GET"
        handler = methods.get(method)
        if handler is None:
            return None, sorted(methods)
        return (handler, args), []

    # ---- endpoints

    async def get_health(self, **_) -> tuple[int, Any]:
        return 200, {"status": "ok"}

    async def get_customers(self, **_) -> tuple[int, Any]:
        return 200, await self.state.list_customers()

    async def post_customers(self, *, payload: dict, **_) -> tuple[int, Any]:
        _only_fields(payload, {"name"})
        name = payload.get("name")
        try:
            customer = await self.state.create_customer(name)
        except NameTaken as exc:
            same = exc.existing
            raise HttpError(409, "conflict", f"a customer named {same['name']!r} exists already "
                            f"({same['id']}): use its id, or choose another name") from None
        except ValueError as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
        return 201, customer

    async def get_cluster(self, **_) -> tuple[int, Any]:
        if self.cluster is None:
            raise HttpError(404, "not_found", "this relay has no cluster view")
        return 200, await self.cluster.status()

    async def get_agents(self, *, query: dict, **_) -> tuple[int, Any]:
        customer_id = (query.get("customer_id") or [None])[-1]
        # Links of relays heard from lately (without a cluster view: every recorded link).
        live_within = self.cluster.settings.member_ttl if self.cluster is not None else 1e12
        agents = await self.state.list_agents(customer_id, live_within)
        return 200, [_agent_view(agent) for agent in agents]

    async def post_agent_revoke(self, instance: str, *, payload: dict, **_) -> tuple[int, Any]:
        """Revoke an agent instance: the ``agents_revoked`` event drops its links here at once
        and, through the hint, on every relay."""
        _only_fields(payload, {"customer_id", "reason"})
        customer_id = _typed(payload, "customer_id", str)
        reason = _typed(payload, "reason", str) or "revoked by the operator"
        if len(reason) > MAX_REASON or not reason.isprintable():
            raise HttpError(400, "bad_request", f"reason must be at most {MAX_REASON} printable characters")
        try:
            revoked = await self.state.revoke_agent(instance, customer_id, reason)
        except KeyError:
            whose = f" of customer {customer_id}" if customer_id else ""
            raise HttpError(404, "not_found", f"no agent instance {instance}{whose} (no certificate, no live "
                            "link): 'agents list' shows them") from None
        except ValueError as exc:
            raise HttpError(409, "conflict", str(exc)) from None
        log.info("revoked agent instance %s of customer %s (%d certificate(s)): %s", instance,
                 revoked["customer_id"], revoked["certificates"], reason)
        return 200, {**revoked, "revoked": True}

    async def _links_by_resource(self) -> dict[str, list[dict]]:
        by_resource: dict[str, list[dict]] = {}
        unreachable = self.cluster.unreachable if self.cluster is not None else ()
        for link in await self.state.list_links():
            if link["relay_id"] in unreachable:
                continue
            view = link_view(link)
            for resource_id in view["resources"]:
                by_resource.setdefault(resource_id, []).append(view)
        return by_resource

    async def _cluster_counts(self) -> dict[str, int] | None:
        """Agent links per resource on every live relay (a cluster on PostgreSQL), else None."""
        if self.cluster is None or self.state.backend != "postgresql":
            return None
        return await self.state.link_counts(self.cluster.settings.member_ttl, self.cluster.unreachable)

    def _resource_view(self, resource: dict, extended: bool, links: dict[str, list[dict]] | None = None,
                       counts: dict[str, int] | None = None) -> dict:
        try:
            agents = list(self.registry.agents_of(resource["id"]))
        except Exception:  # noqa: BLE001 - the listing must not fail on one broken entry
            log.exception("registry.agents_of failed for %s", resource["id"])
            agents = []
        # In a cluster every relay reaches every agent (relay.data.peering): count them all.
        total = len(agents) if counts is None else max(len(agents), counts.get(resource["id"], 0))
        view = {
            "id": resource["id"],
            "name": resource["name"],
            "customer_id": resource["customer_id"],
            "status": "AVAILABLE" if total else "UNAVAILABLE",
            "endpoint": format_host_port(self.registry.service_host, resource["port"]),
            "agents": total,
            # Whether the private service answers, as this relay's agents of it report.
            **_target_view(agents),
            # Who may reach the endpoint: the resource's own list (None: the relay default).
            "allow": _cidr_list(resource.get("allow_cidrs")),
            "effective_allow": _cidr_list(resource.get("allow_cidrs")
                                          or access.format_cidrs(getattr(self.registry, "service_allow", None))),
        }
        bind_error = getattr(self.registry, "bind_errors", {}).get(resource["id"])
        if bind_error:
            # The endpoint is not served on this relay (its port is taken here).
            view["endpoint_error"] = bind_error
        if counts is not None:
            view["agents_here"] = len(agents)
        if extended:
            view["generation"] = resource["generation"]
            view["created_at"] = resource["created_at"]
            view["agents_detail"] = self._cluster_agents(agents, (links or {}).get(resource["id"], []))
        return view

    def _cluster_agents(self, local: list[dict], links: list[dict]) -> list[dict]:
        """This relay's agents (live counters) and then the other relays' links of a resource."""
        if self.cluster is None:
            return local
        detail = [{**agent, "relay_id": self.cluster.relay_id, "relay_url": self.cluster.advertise_url}
                  for agent in local]
        mine = {agent.get("agent_id") for agent in local}
        for link in links:
            if link["relay_id"] == self.cluster.relay_id and link["agent_id"] in mine:
                continue
            detail.append({
                "agent_id": link["agent_id"], "transport": link["transport"], "address": link["address"],
                "version": link["version"], "hostname": link["hostname"],
                "connected_since": link["connected_since"], "bytes_sent": None, "bytes_received": None,
                "active_streams": None, "instance": link["agent_instance"], "epoch": link["epoch"],
                "relay_id": link["relay_id"], "relay_url": link["relay_url"], "identity": link["identity"],
                "cert_serial": link["cert_serial"], "cert_expires_at": link["cert_expires_at"],
            })
        return detail

    async def get_resources(self, *, query: dict, **_) -> tuple[int, Any]:
        extended = _flag(query, "extended")
        customer_id = (query.get("customer_id") or [None])[-1]
        resources = await self.state.list_resources(customer_id)
        links = await self._links_by_resource() if extended else None
        counts = await self._cluster_counts()
        return 200, [self._resource_view(r, extended, links, counts) for r in resources]

    async def get_resource(self, resource_id: str, *, query: dict, **_) -> tuple[int, Any]:
        resource = await self.state.get_resource(resource_id)
        if resource is None:
            raise HttpError(404, "not_found", f"no such resource: {resource_id}")
        return 200, self._resource_view(resource, True, await self._links_by_resource(), await self._cluster_counts())

    async def post_resources(self, *, payload: dict, **_) -> tuple[int, Any]:
        """Create a resource ahead of its agents, optionally on a fixed endpoint port; every
        relay binds its endpoint on the ``resource_created`` event."""
        _only_fields(payload, {"customer_id", "name", "port", "allow"})
        customer_id = _typed(payload, "customer_id", str)
        name = _typed(payload, "name", str)
        port = _typed(payload, "port", int)
        allow_cidrs = _allow_field(payload)
        if not customer_id or not name:
            raise HttpError(400, "bad_request", "customer_id and name are required")
        if not RESOURCE_NAME.fullmatch(name):
            raise HttpError(400, "bad_request", "name must be 1-128 letters, digits, '.', '_' or '-' (the agents' NAME)")
        validate_name(name, "resource name")
        if port is not None and not 1 <= port <= 65535:
            raise HttpError(400, "bad_request", "port must be in [1, 65535]")
        if await self.state.get_customer(customer_id) is None:
            raise HttpError(404, "not_found", f"no such customer: {customer_id}")
        existing = await self.state.find_resource(customer_id, name)
        if existing is not None:
            raise HttpError(409, "conflict", f"customer {customer_id} has a resource {name!r} already "
                            f"({existing['id']}, endpoint port {existing['port']})")
        host = self.registry.service_host
        if port is not None:
            low, high = getattr(self.registry, "port_range", DEFAULT_PORT_RANGE)
            if not low <= port <= high:
                raise HttpError(400, "bad_request", f"port {port} is outside the relay's --port-range {low}-{high}")
            if port in await self.state.taken_ports():
                raise HttpError(409, "conflict", f"port {port} is the endpoint of another resource")
            try:
                allocate_port(host, set(), (port, port))
            except (ValueError, RuntimeError, OSError):
                raise HttpError(409, "conflict", f"port {port} cannot be bound on {host} (in use?)") from None
            choose = lambda _taken: port  # noqa: E731
        else:
            port_range = getattr(self.registry, "port_range", DEFAULT_PORT_RANGE)
            choose = lambda taken_now: allocate_port(host, taken_now, port_range)  # noqa: E731
        try:
            resource = await self.state.get_or_create_resource(customer_id, name, choose, allow_cidrs=allow_cidrs)
        except RuntimeError as exc:
            raise HttpError(409, "conflict", str(exc)) from None
        log.info("created resource %s (%s) of customer %s, endpoint port %d", resource["id"], name, customer_id,
                 resource["port"])
        return 201, self._resource_view(resource, False)

    async def patch_resource(self, resource_id: str, *, payload: dict, **_) -> tuple[int, Any]:
        """Change who may reach the resource's endpoint; every relay applies it on the
        ``resource_updated`` event."""
        _only_fields(payload, {"allow"})
        if "allow" not in payload:
            raise HttpError(400, "bad_request", "nothing to update: give allow")
        allow_cidrs = _allow_field(payload)
        resource = await self.state.set_resource_allow(resource_id, allow_cidrs)
        if resource is None:
            raise HttpError(404, "not_found", f"no such resource: {resource_id}")
        log.info("resource %s: endpoint open to %s", resource_id,
                 allow_cidrs or "the relay default (--service-allow)")
        return 200, self._resource_view(resource, False)

    async def delete_resource(self, resource_id: str, **_) -> tuple[int, Any]:
        # The "deleted" event closes the endpoint and drops the agents, here and on every relay.
        if not await self.state.delete_resource(resource_id):
            raise HttpError(404, "not_found", f"no such resource: {resource_id}")
        log.info("deleted resource %s", resource_id)
        return 200, {"id": resource_id, "deleted": True}

    async def post_registration_jwt(self, *, payload: dict, **_) -> tuple[int, Any]:
        _only_fields(payload, {"customer_id", "org_only", "resource_id", "rotate", "ttl_seconds"})
        customer_id = _typed(payload, "customer_id", str)
        org_only = _typed(payload, "org_only", bool) or False
        resource_id = _typed(payload, "resource_id", str)
        rotate = _typed(payload, "rotate", bool) or False
        ttl = _typed(payload, "ttl_seconds", int)
        if ttl is None:
            ttl = DEFAULT_TTL_SECONDS
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise HttpError(400, "bad_request", f"ttl_seconds must be in [1, {MAX_TTL_SECONDS}]")

        try:
            customer_id, org_only = token_subject(customer_id, org_only)
        except ValueError as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
        customer = await self.state.get_customer(customer_id)  # creates cus_org on first use
        if customer is None:
            raise HttpError(404, "not_found", f"no such customer: {customer_id}")

        if rotate and resource_id is None:
            raise HttpError(400, "bad_request", "rotate needs customer_id and resource_id")
        generation = 0
        if resource_id is not None:
            resource = await self.state.get_resource(resource_id)
            if resource is None:
                raise HttpError(404, "not_found", f"no such resource: {resource_id}")
            if resource["customer_id"] != customer_id:
                raise HttpError(400, "bad_request", f"resource {resource_id} does not belong to {customer_id}")
            generation = resource["generation"]
            if rotate:
                # At once, through the "rotated" event (here and on every relay): the older
                # tokens' agents are deregistered even if recording the new token fails.
                try:
                    generation = await self.state.rotate_resource(resource_id)
                except KeyError:
                    raise HttpError(404, "not_found", f"no such resource: {resource_id}") from None
                log.info("rotated resource %s to generation %d", resource_id, generation)

        token, claims = self.authority.issue_with_claims(
            customer_id, resource_id, generation, org_only, ttl
        )
        await self.state.record_token(
            claims.jti, customer_id, resource_id, generation, org_only, claims.issued_at, claims.expires_at
        )
        log.info("issued registration token %s for %s", claims.jti, resource_id or customer_id)
        return 200, {"jwt": token}


def _agent_view(agent: dict) -> dict:
    """An agent instance of :meth:`RelayState.list_agents` as the admin API shows it: serials
    in hex (as the relay logs them when it issues one), times in ISO 8601 UTC."""
    certified = agent["serial"] is not None
    return {
        "customer_id": agent["customer_id"],
        "instance": agent["instance"],
        "identity": "certificate" if certified else "token",
        "scope": None if not certified else "customer" if agent["resource_ids"] is None else "resource",
        "resource_ids": agent["resource_ids"],
        "serial": format(agent["serial"], "x") if certified else None,
        "issued_at": _iso(agent["issued_at"]),
        "expires_at": _iso(agent["not_after"]),
        "certificates": agent["certificates"],
        "revoked": agent["revoked_at"] is not None,
        "revoked_at": _iso(agent["revoked_at"]),
        "revoked_reason": agent["revoked_reason"],
        "linked": agent["links"] > 0,
        "links": agent["links"],
    }


def _iso(seconds) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(seconds)))


def _target_view(agents: list[dict]) -> dict:
    """The resource's ``target_status``: REACHABLE when an agent reaches its private service,
    UNREACHABLE when the agents that told say they cannot (``target_error`` says why), else
    UNKNOWN."""
    statuses = [a.get("target_status") for a in agents]
    if "REACHABLE" in statuses:
        return {"target_status": "REACHABLE", "target_error": None}
    failing = [a for a in agents if a.get("target_status") == "UNREACHABLE"]
    if failing:
        return {"target_status": "UNREACHABLE", "target_error": failing[0].get("target_error")}
    return {"target_status": "UNKNOWN", "target_error": None}


def _allow_field(payload: dict) -> str | None:
    """The ``allow`` field, checked and in its stored form; None when absent, null or
    ``"default"`` (the relay's --service-allow applies)."""
    value = payload.get("allow")
    if value is None or value == "default":
        return None
    try:
        return access.format_cidrs(access.parse_cidrs(value))
    except ValueError as exc:
        raise HttpError(400, "bad_request", str(exc)) from None


def _cidr_list(text: str | None) -> list[str] | None:
    return text.split(",") if text else None


def _parse_json_object(body: bytes) -> dict:
    if not body:
        raise HttpError(400, "bad_request", "a JSON object body is required")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HttpError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise HttpError(400, "bad_request", "the body must be a JSON object")
    return value


def _only_fields(payload: dict, allowed: set[str]) -> None:
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise HttpError(400, "bad_request", "unknown field(s): " + ", ".join(unknown)[:200])


def _typed(payload: dict, name: str, kind: type):
    value = payload.get(name)
    if value is None:
        return None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        kind_name = {bool: "boolean", int: "integer", str: "string"}[kind]
        raise HttpError(400, "bad_request", f"{name} must be a {kind_name}")
    return value


def _flag(query: dict, name: str) -> bool:
    values = query.get(name)
    if not values:
        return False
    return values[-1].lower() in ("", "1", "true", "yes", "on")


# --------------------------------------------------------------------------- HTTP/1.1


_ERROR_CODES = {400: "bad_request", 408: "timeout", 413: "body_too_large", 431: "header_too_large",
                501: "not_implemented", 505: "http_version"}


def _json_response(status: int, body: Any, extra: dict[str, str] | None = None) -> Response:
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
               ("Connection", "keep-alive"), *(extra or {}).items()]
    return Response(status, orjson.dumps(body) + b"\n", headers)


def _error_body(exc: HttpError) -> dict:
    return {"error": exc.code, "message": exc.message}


def _http_error_body(status: int, message: str) -> tuple[bytes, list[tuple[str, str]]]:
    body = {"error": _ERROR_CODES.get(status, "bad_request"), "message": message}
    return orjson.dumps(body) + b"\n", [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


def _request_handler(api: AdminApi) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        method, target, headers = request.method, request.target, request.headers
        try:
            # Route and token first: nobody unauthenticated gets a body read.
            authorized = api.authorize(method, target, headers)
            if "transfer-encoding" in headers:
                raise HttpError(501, "not_implemented", "chunked bodies are not supported; send Content-Length")
            body = await request.read_body(MAX_BODY_SIZE)
        except HttpError as exc:
            # An unread body would be taken for the next request: close after answering.
            response = _json_response(exc.status, _error_body(exc), exc.headers)
            response.close = "content-length" in headers or "transfer-encoding" in headers
            return response
        try:
            status, payload = await api.handle(method, target, headers, body, authorized)
            extra: dict[str, str] = {}
        except HttpError as exc:
            status, payload, extra = exc.status, _error_body(exc), exc.headers
        except Exception:  # noqa: BLE001
            log.exception("admin request %s %s failed", method, urllib.parse.urlsplit(target).path)
            status, payload, extra = 500, {"error": "internal", "message": "internal error"}, {}
        return _json_response(status, payload, extra)

    return handle


# --------------------------------------------------------------------------- starting


async def start_admin_server(
    host: str,
    port: int,
    *,
    state: RelayState,
    authority: TokenAuthority,
    registry: Registry,
    token: str,
    state_dir: str | os.PathLike | None = None,
    allow_remote: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    on_state_failure: Callable[[str], None] | None = None,
    cluster=None,
) -> asyncio.Server:
    """Listen on ``host:port`` (``port`` 0 picks one), then write ``<state>/admin.json``.

    A non-loopback ``host`` (``0.0.0.0`` included) needs ``allow_remote`` and is served over
    TLS only (``ssl_context``, the relay's certificate); raise ``ValueError`` otherwise.
    ``ssl_context`` on loopback serves TLS there too."""
    if not is_loopback_host(host):
        if not allow_remote:
            raise ValueError(f"refusing to serve the admin API on non-loopback address {host!r} "
                             "without --allow-remote-admin")
        if ssl_context is None:
            raise ValueError(f"the admin API on non-loopback address {host!r} is served over TLS only: "
                             "no certificate given")
    api = AdminApi(state=state, authority=authority, registry=registry, token=token,
                   on_state_failure=on_state_failure, cluster=cluster)

    http = HttpServer(_request_handler(api), HTTP_LIMITS, _http_error_body)
    server = await http.start(host, port, ssl_context)
    url = admin_url(server, tls=ssl_context is not None)
    directory = Path(state_dir) if state_dir is not None else state.state_dir
    write_private(directory / ADMIN_INFO_FILE, orjson.dumps({"url": url}) + b"\n")
    log.info("admin API listening on %s", url)
    return server


def admin_url(server: asyncio.Server, tls: bool) -> str:
    """The URL admin commands use for ``server`` (all interfaces: through loopback)."""
    sockname = server.sockets[0].getsockname()
    bound_host, bound_port = sockname[0], sockname[1]
    url_host = bound_host if bound_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return ("https://" if tls else "http://") + format_host_port(url_host, bound_port)


def clear_admin_info(state_dir: str | os.PathLike, url: str | None = None) -> None:
    """Remove ``<state>/admin.json`` at shutdown (only if it still names ``url``, when given),
    so admin commands report "not running" at once."""
    path = Path(state_dir) / ADMIN_INFO_FILE
    try:
        if url is not None and orjson.loads(path.read_bytes()).get("url") != url:
            return
        path.unlink()
    except (FileNotFoundError, ValueError, AttributeError):
        pass


__all__ = [
    "admin_url",
    "clear_admin_info",
    "ADMIN_INFO_FILE",
    "ADMIN_TOKEN_FILE",
    "AdminApi",
    "Registry",
    "ensure_admin_token",
    "load_or_create_admin_token",
    "start_admin_server",
]
