"""The agents' side of the relay (:class:`Relay`, started by :mod:`relay.serve`): agent links
(TLS WebSocket on TCP and QUIC on UDP, one port number), agent authentication and
registration, on the state of :mod:`relay.state` (SQLite in the state dir, or a cluster's
PostgreSQL).

Before it is registered a link may send one thing: one ``auth`` message (and, when the relay
asked with ``prove``, one ``proof``). Anything else (a second ``auth``, another CONTROL type,
a stream) gets a CONTROL ``error`` and the link is closed with ``PROTOCOL_ERROR``
(docs/PROTOCOL.md, "Control messages").

An ``auth`` with a registration token is checked against the token authority; one without
authenticates by the agent's certificate (docs/PROTOCOL.md, "Enrolment"): verified by OpenSSL
at the TLS layer on WSS, or sent in ``auth`` and its key proved by signing a nonce on QUIC
(:meth:`Relay._certificate_identity`), then checked against the revocation list and turned
into the claims of a token of the certificate's scope (:meth:`Relay._certificate_claims`).

A relay started with ``--require-agent-certificates`` refuses an ``auth`` by registration token
(``certificate_required``), unless the agent announced ``enroll`` in ``agent.features``: that
link is admitted for enrolment only (:meth:`Relay._admit_to_enrol`): answered ``enroll_only``,
never registered nor routed to, it may send ``enroll`` and nothing else, and is closed once it
has its certificate or after ``ENROL_ONLY_TIMEOUT``.

Registration (:meth:`Relay._register`) runs in three steps: checks against the state (token,
quotas, resources, created when a customer-wide token names a new one); binding the endpoints
of new resources; and recording the link (:meth:`relay.state.cluster.Cluster.admit`), in the
transaction that re-reads the resources' generations, before the agent is added with no
``await`` in between. A rotation or deletion, on this relay or any other, commits either before
that transaction (which then sees it and refuses) or after it (its event then finds the
registration pending, or the agent in the registry): no revoked token gets in.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections import Counter
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tunnel.bridge.tcp import LinkBuffers
from tunnel.carriers.base import Link, LinkHandler, LinkStream
from tunnel.core.limits import Limits
from tunnel.ops.logs import Throttled, escape
from tunnel.wire.constants import ErrorCode, describe_code
from tunnel.wire.errors import AuthError

from relay import CA_FILE
from relay.data.endpoints import AgentSession
from relay.data.quotas import FULL_CODE, Descriptors, QuotaExceeded, RegistrationRate
from relay.data.registry import Registry
from relay.settings import DEFAULT_RELAY_SETTINGS, RelaySettings
from relay.state.enrolment import (
    NONCE_SIZE,
    AgentIdentity,
    EnrolmentRefused,
    check_proof,
    identity_from_peercert,
    verify_presented,
)
from relay.state.pki import CA_KEY_FILE
from relay.state.relay_state import ORG_CUSTOMER_ID, allocate_port
from relay.state.store.errors import UNREACHABLE_MESSAGE, StateWriteFailed, StoreUnavailable, state_write_failure

from .agent_control import AgentControl
from .names import AGENT_FEATURES, AGENT_FIELDS, MAX_AGENT_SLOTS, MAX_RESOURCES_PER_AGENT, RESOURCE_NAME, valid
from .tokens import Claims, check_against_state

log = logging.getLogger("relay")

#: A draining relay tells its agents to move in tenths of its move window, at least this many at once.
DRAIN_BATCH = 100
#: Lifetime of agents' client certificates (s): ``serve --agent-cert-ttl``.
DEFAULT_AGENT_CERT_TTL = 24 * 3600
#: A recurring condition (quota, full state directory) is logged once per this many seconds.
LOG_INTERVAL = 60.0
#: How long a link admitted for enrolment only (``--require-agent-certificates``) may stay.
ENROL_ONLY_TIMEOUT = 30.0


class EndpointUnavailable(Exception):
    """A resource's endpoint cannot be bound on this relay's host (its port is taken)."""


class AgentLinkHandler(LinkHandler):
    """One agent link on the relay: waits for one ``auth``, then serves as a registered agent."""

    def __init__(self, relay: "Relay", link: Link) -> None:
        self.relay = relay
        self.link = link
        self.agent: AgentSession | None = None
        #: Admitted to enrol and nothing else (``--require-agent-certificates``).
        self.enroll_only = False
        self._authenticating = False
        #: While a link proves its certificate's key: the future its ``proof`` fills.
        self.proof: asyncio.Future | None = None
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
        if self.enroll_only:
            if message.get("type") == "enroll":
                self.relay.spawn(self._enrol_then_close(message))
            return  # anything else is ignored: this link serves nothing
        if self.agent is not None:
            self.relay.control.received(self.agent, message)  # relay.control.agent_control
            return
        kind = message.get("type")
        if kind == "proof" and self.proof is not None and not self.proof.done():
            self.proof.set_result(message.get("signature"))
            return
        if kind == "auth" and not self._authenticating:
            self._authenticating = True
            task = asyncio.get_running_loop().create_task(self.relay.authenticate(self, message))
            self.relay.tasks.add(task)
            task.add_done_callback(self.relay.tasks.discard)
            return
        self._refuse_early("a second auth" if kind == "auth" else f"a {str(kind)[:32]!r} message")

    async def _enrol_then_close(self, message: dict) -> None:
        if await self.relay.control.enroll(self.agent, message):
            self.link.close(ErrorCode.NO_ERROR, "enrolled: link again with the certificate")

    def _refuse_early(self, what: str) -> None:
        """Anything but one ``auth`` before registration closes the link."""
        if self.link.is_closing:
            return
        self.relay.throttled.log("before registration", logging.INFO,
                                 "agent link from %s sent %s before registration; closing it",
                                 _addr(self.link), what)
        self.relay.metrics.spoke_before_auth(self.link.carrier)
        message = f"expected one auth message before anything else, got {what}"
        try:
            self.link.send_control({"type": "error", "code": "bad_request", "message": message})
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.link.close(ErrorCode.PROTOCOL_ERROR, message)

    def link_closed(self, code: int, reason: str) -> None:
        relay = self.relay
        relay.links.discard(self.link)
        if self.proof is not None and not self.proof.done():
            self.proof.set_result(None)  # no proof will come: the registration ends now
        agent = self.agent
        if self._counted and relay.descriptors is not None:
            self._counted = False
            relay.descriptors.give(agent.customer_id if agent is not None else None)
        if agent is not None:
            log.info("agent %s disconnected (%s)", agent.agent_id, describe_code(code, reason))
            relay.registry.remove_agent(agent)
            relay.cluster.forget(agent)
            relay.mark_served(agent.resources)


class Relay:
    def __init__(self, state, authority, registry: Registry, limits: Limits,
                 descriptors: Descriptors | None = None, *, cluster, settings: RelaySettings = DEFAULT_RELAY_SETTINGS) -> None:
        self.state = state
        self.authority = authority
        self.registry = registry
        self.limits = limits
        self.settings = settings
        self.descriptors = descriptors
        #: What relay.metrics exports; shared with the registry.
        self.metrics = registry.metrics
        #: True while the listeners accept agents (``/ready``).
        self.accepting = False
        #: This relay's :class:`relay.state.cluster.Cluster`: records links, applies revocations.
        self.cluster = cluster
        self.links: set[Link] = set()
        self.tasks: set[asyncio.Task] = set()
        self.rate = RegistrationRate(settings.max_registrations_per_minute)
        self.throttled = Throttled(log, LOG_INTERVAL)
        #: Resources with a registration between its first and last step (never expired).
        self.registering: Counter = Counter()
        #: This relay's links to the other relays (relay.data.peering), None outside a cluster.
        self.peering = None
        cluster.on_members = self.members_changed
        cluster.on_resource_created = self.resource_created
        #: CONTROL messages of registered agents.
        self.control = AgentControl(self)
        #: ``--require-agent-certificates``: token links are admitted to enrol only.
        self.require_agent_certificates = False
        #: Where the CA that signs agents' certificates lives, and their lifetime (s).
        self.state_dir: Path | None = None
        self.agent_cert_ttl = DEFAULT_AGENT_CERT_TTL
        self._agent_ca = None

    def agent_ca(self):
        """The relay CA's certificate and key (read once), which sign agents' certificates."""
        if self._agent_ca is None:
            if self.state_dir is None:
                raise ValueError("no state directory")
            cert = x509.load_pem_x509_certificate((self.state_dir / CA_FILE).read_bytes())
            key = serialization.load_pem_private_key((self.state_dir / CA_KEY_FILE).read_bytes(), None)
            self._agent_ca = (cert, key)
        return self._agent_ca

    @property
    def port_range(self) -> tuple[int, int]:
        """Where new resources' ports are chosen (``--port-range``; the same on every relay of
        a cluster, so a load balancer can forward that range); kept by the registry, which
        the admin API reads too."""
        return self.registry.port_range

    @port_range.setter
    def port_range(self, value: tuple[int, int]) -> None:
        self.registry.port_range = value

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
        if self.cluster.draining:
            self.metrics.auth_refused("unavailable")
            _refuse(link, "unavailable", "relay draining: link to another relay", ErrorCode.NO_ERROR)
            return
        try:
            if message.get("dry_run") is True:
                await self._check_only(link, message)
                return
            if self.require_agent_certificates and message.get("token"):
                await self._admit_to_enrol(handler, message)
                return
            agent = await self._register(handler, message)
        except StateWriteFailed as exc:
            self.metrics.auth_refused("unavailable")
            self.state_failed(exc.reason)
            _refuse(link, "unavailable", f"the relay cannot register agents now: {exc.reason}",
                    ErrorCode.INTERNAL_ERROR)
            return
        except StoreUnavailable as exc:
            # Not the agent's fault and not fatal: it retries with its backoff.
            self.metrics.auth_refused("unavailable")
            self.cluster.outages.refused("registration(s)", exc)
            _refuse(link, "unavailable", UNREACHABLE_MESSAGE, ErrorCode.INTERNAL_ERROR)
            return
        except EndpointUnavailable as exc:
            # Another process holds the port on this host (e.g. a client's ephemeral port
            # inside --port-range): not the agent's fault, and no traceback, once a minute.
            self.metrics.auth_refused("unavailable")
            self.throttled.log(("endpoint", str(exc)), logging.WARNING, "agent from %s refused: %s", _addr(link), exc)
            _refuse(link, "unavailable", str(exc), ErrorCode.INTERNAL_ERROR)
            return
        except QuotaExceeded as exc:
            self.metrics.auth_refused(exc.code, exc)
            self.throttled.log(("quota", str(exc)), logging.WARNING, "agent from %s refused: %s", _addr(link), exc)
            _refuse(link, exc.code, str(exc), ErrorCode.ENHANCE_YOUR_CALM)
            return
        except AuthError as exc:
            self.metrics.auth_refused(exc.code)
            log.warning("agent from %s refused: %s", _addr(link), exc)
            _refuse(link, exc.code, str(exc), ErrorCode.UNAUTHORIZED)
            return
        except Exception as exc:  # noqa: BLE001
            failure = state_write_failure(exc)
            self.metrics.auth_refused("internal" if failure is None else "unavailable")
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
            "relay_id": self.cluster.relay_id,
            "resources": [
                {"name": name, "id": rid, "endpoint": self.registry.endpoints[rid].address}
                for rid, name in agent.resources.items()
            ],
        })
        if self.cluster.members:
            link.send_control(self.relays_message())
        link.handshake_done()
        jti = getattr(agent.claims, "jti", "")
        log.info("agent %s registered: customer %s, resources %s, %s from %s, version %s, host %s, instance %s%s",
                 agent.agent_id, agent.customer_id,
                 ", ".join(f"{n} ({r})" for r, n in agent.resources.items()),
                 link.carrier, _addr(link), agent.version, agent.hostname, agent.instance,
                 f", by certificate {jti[5:]}" if jti.startswith("cert:") else "")
        self.mark_served(agent.resources)

    async def _admit_to_enrol(self, handler: AgentLinkHandler, message: dict) -> None:
        """``--require-agent-certificates`` and a token ``auth``: refused, unless the agent can
        enrol (``enroll`` in ``agent.features``); then, its token and resources checked as a
        registration would (nothing created), the link may get a certificate and nothing else."""
        link = handler.link
        token, resources, info = _auth_fields(message)
        if "enroll" not in info["features"]:
            raise AuthError("this relay requires agent certificates (--require-agent-certificates): enrol with "
                            "an agent that supports it, then link with the certificate", code="certificate_required")
        claims = self.authority.verify(token)
        self.rate.charge(claims.customer_id)
        self._check_link_quotas(link, claims.customer_id)
        for entry in resources:
            await check_against_state(claims, self.state, entry["name"], create=False)
        agent_id = "agt_" + secrets.token_hex(8)
        instance = info["instance"] or agent_id
        if self.state.agent_instance_revoked(claims.customer_id, instance):
            raise AuthError(f"agent instance {instance} is revoked: a new instance enrols with a registration "
                            "token", code="revoked")
        if link.is_closing:
            return
        handler.agent = AgentSession(
            agent_id=agent_id, link=link, customer_id=claims.customer_id, generation=claims.generation,
            version=info["version"], hostname=info["hostname"], instance=instance, slot=info["slot"],
            features=info["features"], resources={}, claims=claims)
        handler.enroll_only = True
        if handler._counted and self.descriptors is not None:
            self.descriptors.attribute(claims.customer_id)
        link.send_control({"type": "enroll_only", "agent_id": agent_id, "relay_id": self.cluster.relay_id,
                           "message": "this relay requires agent certificates: send enroll, then link with the "
                                      "certificate; this link serves no resource"})
        link.handshake_done()
        asyncio.get_running_loop().call_later(ENROL_ONLY_TIMEOUT, _close_unless_closing, link,
                                              "enrolment window over: link with the certificate")
        log.info("agent %s (instance %s, customer %s) admitted to enrol only, %s from %s", agent_id, instance,
                 claims.customer_id, link.carrier, _addr(link))

    async def _check_only(self, link: Link, message: dict) -> None:
        """``tunnel-agent check``: verify the token and the resource names as a registration
        would, register nothing, answer ``checked`` (the agent closes the link)."""
        try:
            token, resources, _info = _auth_fields(message)
            claims = self.authority.verify(token)
            found = [await check_against_state(claims, self.state, entry["name"], create=False)
                     for entry in resources]
        except AuthError as exc:
            self.metrics.auth_refused(exc.code)
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

    async def _register(self, handler: AgentLinkHandler, message: dict) -> AgentSession | None:
        link = handler.link
        token, resources, info = _auth_fields(message)
        identity = None
        if token is None:
            identity = await self._certificate_identity(handler, message)
            claims = await self._certificate_claims(identity, [entry["name"] for entry in resources])
            info["instance"] = identity.instance
        else:
            claims = self.authority.verify(token)

        # Step 1: quotas and resources.
        customer_id = claims.customer_id
        self.rate.charge(customer_id)
        limits = self.limits
        self._check_link_quotas(link, customer_id)

        wanted = [await check_against_state(claims, self.state, entry["name"], allocate=self._allocate_port,
                                            before_create=self._before_create, quota=self._resource_quota)
                  for entry in resources]
        ids = {r["id"] for r in wanted}
        self.registering.update(ids)
        try:
            # Step 2: bind the endpoints of new resources.
            for resource in wanted:
                try:
                    await self.registry.ensure_endpoint(resource)
                except OSError:
                    why = self.registry.bind_errors.get(resource["id"], "cannot bind its endpoint")
                    raise EndpointUnavailable(f"resource {resource['name']}: this relay cannot listen on its "
                                              f"endpoint ({why}); the agent retries") from None
            if link.is_closing:
                return None
            agent_id = "agt_" + secrets.token_hex(8)
            agent = AgentSession(
                agent_id=agent_id,
                link=link,
                customer_id=customer_id,
                generation=claims.generation,
                version=info["version"],
                hostname=info["hostname"],
                instance=info["instance"] or agent_id,
                slot=info["slot"],
                features=info["features"],
                resources={r["id"]: r["name"] for r in wanted},
                buffers=LinkBuffers(limits.receive_bound),
                claims=claims,
            )
            if identity is not None:
                agent.cert_serial, agent.cert_not_after = identity.serial, identity.not_after
            # Step 3: record the link, refused if anything was revoked or deleted meanwhile;
            # then, with no await, the checks that others' registrations may have changed.
            await self.cluster.admit(agent, quota=lambda count: self._links_quota(customer_id, count))
            if link.is_closing:
                self.cluster.forget(agent)
                return None
            try:
                self._check_link_quotas(link, customer_id)
            except BaseException:
                self.cluster.forget(agent)
                raise
            self.registry.add_agent(agent)
            return agent
        finally:
            for rid in ids:
                self.registering[rid] -= 1
                if self.registering[rid] <= 0:
                    del self.registering[rid]

    async def _certificate_identity(self, handler: AgentLinkHandler, message: dict) -> AgentIdentity:
        """Who a link without a token is, from its client certificate: verified by OpenSSL at
        the TLS layer (WSS), or sent in ``auth`` and proved by signing a nonce (QUIC, where the
        TLS stack cannot ask for one: docs/PROTOCOL.md, "Enrolment"); then checked against
        the revocation list. AuthError otherwise."""
        link = handler.link
        try:
            peer = link.peer_certificate
            if peer:
                identity = identity_from_peercert(peer)
            elif message.get("certificate") is not None:
                identity, key = verify_presented(message["certificate"], self.agent_ca()[0])
                nonce = secrets.token_bytes(NONCE_SIZE)
                handler.proof = asyncio.get_running_loop().create_future()
                link.send_control({"type": "prove", "nonce": base64.b64encode(nonce).decode("ascii")})
                try:
                    signature = await asyncio.wait_for(handler.proof, self.limits.handshake_timeout)
                except asyncio.TimeoutError:
                    raise AuthError("no proof of the agent certificate's key in time", code="unauthorized") from None
                check_proof(key, nonce, signature)
            else:
                raise AuthError("no registration token and no agent certificate: enrol with a registration JWT",
                                code="unauthorized")
        except EnrolmentRefused as exc:
            raise AuthError(str(exc), code="unauthorized") from None
        if identity.not_after <= time.time():
            raise AuthError("the agent certificate has expired: enrol again with a registration JWT",
                            code="unauthorized")
        if self.state.agent_certificate_revoked(identity.serial):
            raise AuthError(f"the certificate of agent instance {identity.instance} is revoked: enrol again with a "
                            "registration JWT", code="revoked")
        return identity

    async def _certificate_claims(self, identity: AgentIdentity, names: list[str]) -> Claims:
        """The claims a registration token of the certificate's scope would carry; the
        generation is the resources' current one (a rotation drops the agent as it drops
        tokens; revoking the certificate keeps it out)."""
        customer_id = identity.customer_id
        resource_id = None
        if identity.resource_ids is not None:
            if len(identity.resource_ids) != 1:
                raise AuthError("the agent certificate names more than one resource", code="unauthorized")
            resource_id = identity.resource_ids[0]
            resource = await self._certificate_scope(customer_id, resource_id, names)
            generation = resource["generation"]
        else:
            found = [await self.state.find_resource(customer_id, name) for name in names]
            generation = max([r["generation"] for r in found if r is not None] or [0])
        return Claims(customer_id=customer_id, resource_id=resource_id, generation=generation,
                      org_only=customer_id == ORG_CUSTOMER_ID, jti=f"cert:{identity.serial:x}",
                      expires_at=identity.not_after)

    async def _certificate_scope(self, customer_id: str, resource_id: str, names: list[str]) -> dict:
        """The resource a resource-scoped agent certificate allows; AuthError when it is gone,
        another customer's, or ``names`` ask for another."""
        resource = await self.state.get_resource(resource_id)
        if resource is None or resource["customer_id"] != customer_id:
            raise AuthError(f"the agent certificate's resource {escape(resource_id[:64])} does not exist for "
                            f"customer {escape(customer_id[:64])}", code="unauthorized")
        outside = [name for name in names if name != resource["name"]]
        if outside:
            raise AuthError(f"the agent certificate allows resource {resource['name']} only, not "
                            f"{', '.join(outside)}", code="unauthorized")
        return resource

    async def _before_create(self, owner: str) -> None:
        """A first, cheap check before a port is chosen (:meth:`_resource_quota` decides)."""
        self._resource_quota(owner, await self.state.count_resources(owner))

    def _resource_quota(self, owner: str, count: int) -> None:
        """Refuse a new resource of ``owner``, who has ``count``, beyond its quota of resources
        or its share of the port range (checked again in the creating transaction)."""
        limit = self.settings.max_resources_per_customer
        if count >= limit:
            raise QuotaExceeded(f"customer {owner} is over its quota of {limit} "
                                "resources (TUNNEL_MAX_RESOURCES_PER_CUSTOMER); delete unused ones",
                                limit="max_resources_per_customer", customer_id=owner)
        low, high = self.port_range
        share = max(1, int((high - low + 1) * self.settings.customer_port_share))
        if count >= share:
            raise QuotaExceeded(f"customer {owner} is over its share of {share} endpoint ports of the relay's "
                                f"--port-range {low}-{high} (TUNNEL_CUSTOMER_PORT_SHARE); delete unused resources",
                                limit="customer_port_share", customer_id=owner)

    async def resource_for(self, claims, name: str) -> dict:
        """The resource ``name`` the verified ``claims`` may serve, as a registration finds it
        (created if need be, its endpoint bound), checked again after the bind: AuthError if it
        was revoked or deleted meanwhile. For resources added on a live link."""
        if claims.jti.startswith("cert:") and claims.resource_id is not None:
            await self._certificate_scope(claims.customer_id, claims.resource_id, [name])
        resource = await check_against_state(claims, self.state, name, allocate=self._allocate_port,
                                             before_create=self._before_create, quota=self._resource_quota)
        rid = resource["id"]
        self.registering[rid] += 1
        try:
            await self.registry.ensure_endpoint(resource)
            now = await self.state.get_resource(rid)
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
        self._links_quota(customer_id, self.registry.links_of(customer_id))
        if self.descriptors is not None and link.carrier == "wss":  # a QUIC link holds no descriptor
            self.descriptors.check_link(customer_id)

    def _links_quota(self, customer_id: str, count: int) -> None:
        """Refuse another link of ``customer_id``, who has ``count`` (on this relay, or on every
        relay of the cluster as the database counts them when the link is recorded)."""
        limit = self.settings.max_links_per_customer
        if count >= limit:
            raise QuotaExceeded(f"customer {customer_id} is over its quota of {limit} live agent links "
                                "(TUNNEL_MAX_LINKS_PER_CUSTOMER)", limit="max_links_per_customer",
                                customer_id=customer_id)

    def _allocate_port(self, taken: set[int]) -> int:
        try:
            return allocate_port(self.registry.service_host, taken, self.port_range)
        except RuntimeError:
            low, high = self.port_range
            raise QuotaExceeded(f"the relay has no free endpoint port in its --port-range {low}-{high}; "
                                "retry later", code=FULL_CODE, limit="port_range", customer_id=None) from None

    def mark_served(self, resource_ids) -> None:
        """Record, in the background, that these resources were served until now (their idle
        time starts over)."""
        ids = list(resource_ids)
        if ids:
            task = asyncio.get_running_loop().create_task(self._mark_served(ids))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _mark_served(self, ids: list[str]) -> None:
        try:
            await self.state.mark_served(ids, int(time.time()))
        except StateWriteFailed as exc:  # serving goes on without the record
            self.state_failed(exc.reason)
        except StoreUnavailable:
            pass  # the outage is logged once; the next expiry round marks them again

    def state_failed(self, failure: str) -> None:
        self.throttled.log("state", logging.ERROR, "%s: %s; free space there (or fix it) and the relay resumes",
                           failure, self.state.state_dir)

    async def expire_idle_resources(self) -> list[dict]:
        """Delete the resources no agent has served for ``resource_idle_expiry`` (and that no
        token names by id), freeing their ports; refresh the time of those served now (by this
        relay: every relay refreshes its own, so none expires a resource another serves)."""
        served = [rid for rid, endpoint in self.registry.endpoints.items() if endpoint.agents]
        if served:
            await self.state.mark_served(served, int(time.time()))
        cutoff = int(time.time() - self.settings.resource_idle_expiry)
        expired = []
        for resource in await self.state.idle_resources(cutoff):
            rid = resource["id"]
            if self.registering[rid] or self.registry.status(rid) == "AVAILABLE":
                continue
            # The "deleted" event closes its endpoint here and on every relay.
            await self.state.delete_resource(rid)
            log.info("resource %s (%s) of customer %s expired: no agent served it for %.0f s; port %d freed",
                     rid, resource["name"], resource["customer_id"], self.settings.resource_idle_expiry,
                     resource["port"])
            expired.append(resource)
        return expired

    async def expire_forever(self) -> None:
        interval = min(max(self.settings.resource_idle_expiry / 4, 0.5), 3600.0)
        while True:
            try:
                await self.expire_idle_resources()
            except StoreUnavailable as exc:
                if isinstance(exc, StateWriteFailed):
                    self.state_failed(exc.reason)
            except Exception as exc:  # noqa: BLE001
                failure = state_write_failure(exc)
                if failure is None:
                    log.exception("expiring idle resources failed")
                else:
                    self.state_failed(failure)
            await asyncio.sleep(interval)

    # ---- the cluster, as agents see it

    def relays_message(self) -> dict:
        """CONTROL ``relays``: every live relay of the cluster (docs/PROTOCOL.md)."""
        return {"type": "relays", "relays": [
            {"id": m["id"], "url": m["advertise_url"], "draining": m["draining"]} for m in self.cluster.members]}

    def members_changed(self, members: list[dict]) -> None:
        """Relays joined, left or began draining: tell every agent here, link to new peers."""
        message = self.relays_message()
        for agent in list(self.registry.agents):
            if not agent.link.is_closing:
                try:
                    agent.link.send_control(message)
                except Exception:  # noqa: BLE001 - closing; its end removes the agent
                    pass
        if self.peering is not None:
            self.peering.connect_members(members)

    def resource_created(self, resource: dict) -> None:
        """Any relay created a resource: bind its endpoint here too (same port everywhere)."""
        if not self.registry.listening or resource.get("id") in self.registry.endpoints:
            return
        task = asyncio.get_running_loop().create_task(self.bind(resource))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def bind(self, resource: dict) -> None:
        """Bind ``resource``'s endpoint here; a port that cannot be bound is logged (once, by the
        registry) and shown by ``resources list``, never raised."""
        try:
            await self.registry.ensure_endpoint(resource)
        except OSError:
            pass  # logged once by the registry, shown by resources list
        except (QuotaExceeded, KeyError, TypeError) as exc:
            log.error("resource %s: endpoint not bound: %s", resource.get("id"), exc)

    # ---- stopping

    def in_flight(self) -> int:
        """Streams still open: workers' connections here and streams from other relays."""
        return self.registry.open_connections() + (len(self.peering.splices) if self.peering else 0)

    async def drain(self, timeout: float = 0.0) -> None:
        """Graceful stop (SIGTERM). The caller has stopped the agent listeners. Tell the other
        relays (they forward here last), stop taking worker connections, tell every agent to
        link elsewhere (CONTROL ``draining``; skipped when no other relay serves) and give them
        until half of ``timeout`` (at most 10 s) to move, then GOAWAY the links left; wait for
        the streams in flight up to ``timeout`` in all; then close what remains."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.cluster.drain()
        await self.registry.stop_listening()
        agents = [a for a in self.registry.agents if not a.link.is_closing]
        if not any(m["id"] != self.cluster.relay_id and not m["draining"] for m in self.cluster.members):
            agents = []  # no other relay to move to: straight to GOAWAY
        log.info("draining: telling %d agent link(s) to move; %d worker connection(s) and %d stream(s) from other "
                 "relays in flight; waiting up to %.0f s", len(agents), self.registry.open_connections(),
                 len(self.peering.splices) if self.peering else 0, timeout)
        window = min(timeout / 2, 10.0)
        move_by = loop.time() + window
        # In tenths of the window, so that thousands of agents do not all register on the other
        # relays in the same second.
        batch = max(DRAIN_BATCH, -(-len(agents) // 10))
        for first in range(0, len(agents), batch):
            if first:
                await asyncio.sleep(window / 10)
            for agent in agents[first:first + batch]:
                try:
                    agent.link.send_control({"type": "draining", "relay_id": self.cluster.relay_id,
                                             "message": "relay draining: link to another relay"})
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
        while loop.time() < move_by and any(not a.link.is_closing for a in agents):
            await asyncio.sleep(0.05)
        for link in list(self.links):
            link.goaway(ErrorCode.NO_ERROR, "relay shutting down")
        while loop.time() < deadline and self.in_flight():
            await asyncio.sleep(0.05)
        left = self.in_flight()
        if left:
            log.warning("drain timeout: resetting %d stream(s) still open", left)
        else:
            log.info("drained: no stream in flight")
        if self.peering is not None:
            self.peering.close()
        for link in list(self.links):
            link.close(ErrorCode.NO_ERROR, "relay shutting down")
        await asyncio.gather(*(link.wait_closed() for link in list(self.links)), return_exceptions=True)


def _auth_fields(message: dict) -> tuple[str | None, list, dict]:
    """The token (None: the link authenticates by certificate), resources and agent
    strings of an ``auth`` message, checked; AuthError (``bad_request``) for anything
    malformed."""
    token = message.get("token")
    resources = message.get("resources")
    if token is not None and (not isinstance(token, str) or not token):
        raise AuthError("no registration token", code="bad_request")
    if (not isinstance(resources, list) or not resources or len(resources) > MAX_RESOURCES_PER_AGENT
            or not all(isinstance(r, dict) and valid(RESOURCE_NAME, r.get("name")) for r in resources)):
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
        elif valid(pattern, value):
            result[name] = value
        else:
            raise AuthError(f"agent.{name} must be {what}, got {escape(str(value)[:64])!r}", code="bad_request")
    slot = info.get("slot", 0)
    if type(slot) is not int or not 0 <= slot < MAX_AGENT_SLOTS:
        raise AuthError(f"agent.slot must be an integer from 0 to {MAX_AGENT_SLOTS - 1}", code="bad_request")
    result["slot"] = slot
    # What the agent understands beyond the base protocol; unknown names are ignored.
    features = info.get("features")
    result["features"] = frozenset(f for f in features[:16] if f in AGENT_FEATURES) \
        if isinstance(features, list) else frozenset()
    return result


def _refuse(link: Link, code: str, message: str, close_code: int) -> None:
    try:
        link.send_control({"type": "error", "code": code, "message": message})
    except Exception:  # noqa: BLE001 - closing anyway
        pass
    link.close(close_code, message)


def _close_unless_closing(link: Link, reason: str) -> None:
    if not link.is_closing:
        link.close(ErrorCode.NO_ERROR, reason)


def _addr(link: Link) -> str:
    try:
        host, port = link.peer_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"
