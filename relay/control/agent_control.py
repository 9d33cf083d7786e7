"""CONTROL messages a registered agent sends on its live link (docs/PROTOCOL.md, "Control
messages"): how its private services answer, and resources it adds or removes without a new
link (a config reload, a graceful stop).

- ``target_health``: recorded per agent and resource, shown by ``resources list``, logged once
  per interval when a service does not answer; routing prefers agents whose service answers.
  Per customer, at most ``max_target_reports_per_minute`` entries are taken and
  ``max_target_log_lines_per_minute`` lines logged.
- ``add_resources``: checked as at registration (token claims, revocation, quotas), endpoints
  bound, then routed to the agent and its link recorded again with them (so that the other
  relays of a cluster forward here); answered with ``resources_added`` (``resources`` served,
  ``refused`` with a code and message each).
- ``remove_resources``: no new streams of those resources go to the agent at once (the link's
  record follows in the background; until it is written, streams other relays of a cluster
  forwarded meanwhile still go to the agent); the open ones finish. Answered with ``resources_removed`` once routing has changed, so the agent
  knows no stream for them is still on its way after that answer over WSS (over QUIC a stream
  opened just before may still arrive; the agent serves it).

- ``enroll``: ``{"csr": PEM}``; the relay's CA signs a short-lived client certificate for
  this agent instance, scoped to what its registration token allows (relay.state.enrolment), and
  answers ``enrolled`` (``certificate`` PEM chain, ``expires_at`` Unix seconds) or
  ``enroll_failed`` (``code``, ``message``). At most one per link each ``ENROL_INTERVAL``.
  The certificate is recorded in the state database before the agent gets it; a revoked
  instance (``agents revoke``) gets ``enroll_failed`` ``revoked``.

Malformed messages are ignored with a log line (the link stays up: the agent registered).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from tunnel.ops.logs import escape
from tunnel.wire.errors import AuthError

from relay.data.endpoints import AgentSession
from relay.data.quotas import PerCustomerRate, QuotaExceeded
from relay.state.enrolment import EnrolmentRefused, issue_agent_certificate
from relay.state.relay_state import LinkRefused
from relay.state.store.errors import UNREACHABLE_MESSAGE, StoreUnavailable

from .names import MAX_RESOURCES_PER_AGENT, RESOURCE_NAME, valid

if TYPE_CHECKING:
    from .server import Relay

log = logging.getLogger("relay.agents")

#: ``target_health`` reasons an agent may give (agent.hints).
TARGET_REASONS = frozenset({"dns", "refused", "timeout", "unreachable", "error"})
MAX_MESSAGE = 200
#: A link may ask for a certificate at most once per this many seconds (signing costs CPU).
ENROL_INTERVAL = 10.0


class AgentControl:
    """Handles the CONTROL messages of registered agents for one relay."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        #: ``target_health`` entries taken per customer (``max_target_reports_per_minute``).
        self.reports = PerCustomerRate(relay.settings.max_target_reports_per_minute)

    def received(self, agent: AgentSession, message: dict) -> None:
        kind = message.get("type")
        if kind == "target_health":
            self.target_health(agent, message)
        elif kind == "remove_resources":
            self.remove_resources(agent, message)
        elif kind == "add_resources":
            self.relay.spawn(self.add_resources(agent, message))
        elif kind == "enroll":
            self.relay.spawn(self.enroll(agent, message))
        # Unknown types are ignored (forward compatibility).

    # --- enroll -------------------------------------------------------------------------

    async def enroll(self, agent: AgentSession, message: dict) -> bool:
        """Answer ``enroll`` with ``enrolled`` (True) or ``enroll_failed`` (False)."""
        relay = self.relay
        now = time.monotonic()
        if agent.enrolled_at is not None and now - agent.enrolled_at < ENROL_INTERVAL:
            self._reply(agent, {"type": "enroll_failed", "code": "too_many",
                                "message": f"one certificate per link every {ENROL_INTERVAL:g} s"})
            return False
        agent.enrolled_at = now
        if relay.state.agent_instance_revoked(agent.customer_id, agent.instance) or (
                agent.cert_serial is not None and relay.state.agent_certificate_revoked(agent.cert_serial)):
            self._reply(agent, {"type": "enroll_failed", "code": "revoked",
                                "message": f"agent instance {agent.instance} is revoked: no certificate for it"})
            return False
        claims = agent.claims
        resource_ids = [claims.resource_id] if getattr(claims, "resource_id", None) else None
        try:
            ca_cert, ca_key = relay.agent_ca()
            issued = issue_agent_certificate(
                message.get("csr"), ca_cert=ca_cert, ca_key=ca_key, customer_id=agent.customer_id,
                resource_ids=resource_ids, instance=agent.instance, ttl=relay.agent_cert_ttl)
        except EnrolmentRefused as exc:
            relay.throttled.log(("enroll", agent.customer_id), logging.WARNING,
                                "agent %s (customer %s): certificate request refused: %s", agent.agent_id,
                                agent.customer_id, exc)
            self._reply(agent, {"type": "enroll_failed", "code": "bad_request", "message": str(exc)})
            return False
        except (OSError, ValueError) as exc:
            log.error("agent %s: cannot issue a certificate: %s", agent.agent_id, exc)
            self._reply(agent, {"type": "enroll_failed", "code": "unavailable",
                                "message": "the relay cannot issue certificates now"})
            return False
        try:
            # Recorded before the agent has it: a certificate the table does not hold cannot be revoked.
            await relay.state.record_agent_certificate(serial=issued.serial, instance=agent.instance,
                                                       customer_id=agent.customer_id, resource_ids=resource_ids,
                                                       not_after=issued.not_after)
        except LinkRefused as exc:
            self._reply(agent, {"type": "enroll_failed", "code": "revoked", "message": str(exc)})
            return False
        except StoreUnavailable as exc:
            relay.cluster.outages.refused("enrolment(s)", exc)
            self._reply(agent, {"type": "enroll_failed", "code": "unavailable", "message": UNREACHABLE_MESSAGE})
            return False
        except Exception:  # noqa: BLE001 - refused, never an unretrieved task exception
            log.exception("agent %s: recording its certificate failed", agent.agent_id)
            self._reply(agent, {"type": "enroll_failed", "code": "unavailable",
                                "message": "the relay cannot issue certificates now"})
            return False
        log.info("agent %s (instance %s, customer %s): issued certificate %x, valid until %s", agent.agent_id,
                 agent.instance, agent.customer_id, issued.serial, issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"))
        self._reply(agent, {"type": "enrolled", "certificate": issued.certificate.decode("ascii"),
                            "expires_at": int(issued.not_after.timestamp())})
        return True

    @staticmethod
    def _reply(agent: AgentSession, message: dict) -> None:
        try:
            agent.link.send_control(message)
        except Exception:  # noqa: BLE001 - the link is closing; its end removes the agent
            pass

    # --- target_health ------------------------------------------------------------------

    def target_health(self, agent: AgentSession, message: dict) -> None:
        by_name = {name: rid for rid, name in agent.resources.items()}
        entries = message.get("resources")
        if not isinstance(entries, list):
            return
        entries = entries[:64]
        taken = self.reports.take(agent.customer_id, len(entries))
        if taken < len(entries):
            self.relay.throttled.log(("target reports", agent.customer_id), logging.WARNING,
                                     "customer %s: over %d private service reports per minute "
                                     "(TUNNEL_MAX_TARGET_REPORTS_PER_MINUTE); ignoring the rest", agent.customer_id,
                                     int(self.reports.capacity))
        for entry in entries[:taken]:
            if not isinstance(entry, dict) or entry.get("name") not in by_name:
                continue
            reachable = entry.get("reachable")
            if not isinstance(reachable, bool):
                continue
            since = entry.get("since")
            report = {"reachable": reachable,
                      "since": int(since) if isinstance(since, int) and 0 < since < 2 ** 40 else int(time.time())}
            if not reachable:
                reason = entry.get("reason")
                report["reason"] = reason if reason in TARGET_REASONS else "error"
                report["message"] = escape(str(entry.get("message") or "connection failed")[:MAX_MESSAGE])
            self.relay.registry.target_health(agent, by_name[entry["name"]], report)

    # --- remove_resources -----------------------------------------------------------------

    def remove_resources(self, agent: AgentSession, message: dict) -> None:
        names = _names(message)
        if names is None:
            return
        by_name = {name: rid for rid, name in agent.resources.items()}
        removed = []
        why = message.get("reason") if message.get("reason") in ("reload", "stopping") else "asked"
        for name in names:
            rid = by_name.get(name)
            if rid is not None:
                self.relay.registry.remove_resource(agent, rid, why)
                removed.append({"name": name, "id": rid})
        if removed:
            log.info("agent %s deregistered %s (%s); their open streams finish", agent.agent_id,
                     ", ".join(f"{r['name']} ({r['id']})" for r in removed), why)
            ids = {r["id"] for r in removed}
            agent.leaving.update(ids)
            self.relay.spawn(self._relink(agent, ids))
        self._send(agent, {"type": "resources_removed", "resources": removed})

    async def _relink(self, agent: AgentSession, left: set[str]) -> None:
        """Record the link without the resources it left; until then streams other relays
        forward for them still reach it (``AgentSession.leaving``)."""
        try:
            await self.relay.cluster.relink(agent)
        finally:
            agent.leaving.difference_update(left)

    # --- add_resources --------------------------------------------------------------------

    async def add_resources(self, agent: AgentSession, message: dict) -> None:
        names = _names(message)
        if names is None:
            return
        relay = self.relay
        added, refused = [], []
        new = [n for n in dict.fromkeys(names) if n not in agent.resources.values()]
        if len(agent.resources) + agent.adding + len(new) > MAX_RESOURCES_PER_AGENT:
            refused = [{"name": n, "code": "bad_request",
                        "message": f"an agent serves at most {MAX_RESOURCES_PER_AGENT} resources"} for n in new]
            new = []
        if new and agent.claims is None:
            refused = [{"name": n, "code": "unavailable", "message": "this link cannot add resources: register again"}
                       for n in new]
            new = []
        if new:
            try:
                _fresh(agent.claims)
                relay.rate.charge(agent.customer_id)
            except (AuthError, QuotaExceeded) as exc:
                refused = [{"name": n, "code": exc.code, "message": str(exc)} for n in new]
                new = []
        # Counted against the link's limit from the check above until added or refused, so that
        # concurrent messages cannot all pass it.
        agent.adding += len(new)
        try:
            for name in new:
                try:
                    resource = await relay.resource_for(agent.claims, name)
                except (AuthError, QuotaExceeded) as exc:
                    refused.append({"name": name, "code": exc.code, "message": str(exc)})
                    continue
                except OSError as exc:
                    refused.append({"name": name, "code": "unavailable",
                                    "message": f"the relay cannot bind the endpoint: {exc.strerror or exc}"})
                    continue
                except StoreUnavailable as exc:
                    refused.append({"name": name, "code": "unavailable", "message": UNREACHABLE_MESSAGE})
                    relay.cluster.outages.refused("resource addition(s)", exc)
                    continue
                except Exception:  # noqa: BLE001 - refused, never an unretrieved task exception
                    log.exception("agent %s: adding resource %s failed", agent.agent_id, name)
                    refused.append({"name": name, "code": "internal", "message": "adding the resource failed"})
                    continue
                if agent.link.is_closing:
                    return
                relay.registry.add_resource(agent, resource)
                added.append({"name": name, "id": resource["id"],
                              "endpoint": relay.registry.endpoints[resource["id"]].address})
        finally:
            agent.adding -= len(new)
        for entry in added:
            log.info("agent %s now serves %s (%s) too", agent.agent_id, entry["name"], entry["id"])
        for entry in refused:
            log.warning("agent %s: adding resource %s refused: %s (%s)", agent.agent_id, entry["name"],
                        entry["message"], entry["code"])
        if added:
            relay.mark_served(e["id"] for e in added)
            await relay.cluster.relink(agent)
        self._send(agent, {"type": "resources_added", "resources": added, "refused": refused})

    def _send(self, agent: AgentSession, message: dict) -> None:
        try:
            agent.link.send_control(message)
        except Exception:  # noqa: BLE001 - the link is closing; its end removes the agent
            pass


def _names(message: dict) -> list[str] | None:
    entries = message.get("resources")
    if (not isinstance(entries, list) or len(entries) > 64
            or not all(isinstance(e, dict) and valid(RESOURCE_NAME, e.get("name")) for e in entries)):
        log.info("ignoring a malformed %s message", str(message.get("type"))[:32])
        return None
    return [e["name"] for e in entries]


def _fresh(claims) -> None:
    """The registration token must still be valid to add resources with it."""
    expires = getattr(claims, "expires_at", None)
    if expires is not None and expires <= time.time():
        raise AuthError("registration token expired: reconnect with a new one", code="unauthorized")
