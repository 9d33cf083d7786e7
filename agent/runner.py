"""The agent's life: dial the relay, register, serve streams, and when the link drops,
reconnect, forever.

Reconnecting: the first attempt after a link loss comes within ``AgentSettings.reconnect_delay``
(1 s, jittered); each failed attempt doubles the delay up to ``AgentSettings.reconnect_max_delay``
(30 s); a link that stayed up ``HEALTHY_PERIOD`` starts over. A whole fleet coming back at once
after a relay restart is spread by the relay's handshake admission (tunnel.carriers.handshakes):
agents it turns away back off. With several links (agent.links, ``RELAY_LINKS``) each slot is
one :class:`Agent` with its own delays; a slot whose relay drains moves at once, without delay,
unless it registered there less than ``HEALTHY_PERIOD`` ago: then it waits as a reconnect would.

Each stream the relay opens names a resource; the agent dials only the ``host:port``
configured for that name and refuses any other (it never dials an address the relay sends;
agent.link_handler). Dials and a light periodic check tell the agent whether each service answers (agent.health);
the relay hears it (CONTROL ``target_health``).

When the relay deregisters one resource (CONTROL ``deregistered``: its token was revoked or it
was deleted), the agent stops serving that resource (its streams end, later registrations leave
it out) and goes on with the others; with none left it exits with code 3.

With a state directory (agent.identity), the agent enrols after a registration by its JWT
(CONTROL ``enroll`` with a CSR for its key; the certificate is stored atomically), links by
that certificate from then on (no token in ``auth``: WSS presents it at the TLS layer, QUIC
sends it and signs the relay's nonce), and renews it over the live link before two thirds of
its lifetime (:meth:`Agent._keep_enrolled`).

:meth:`Agent.reload` (SIGHUP, or a changed file under ``AgentSettings.config_watch_interval``:
agent.config_watch) applies a new config file on the live link: added resources register (CONTROL ``add_resources``),
removed ones stop taking streams and keep those they have (``remove_resources``), changed
targets apply to new streams; a changed relay, CA or token moves to a new link and drains the
old one. :meth:`Agent.stop` (SIGTERM) deregisters every resource, lets open streams finish up
to ``DRAIN_TIMEOUT`` and closes the link; ``run`` then returns 0.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import random
import re
import socket
import time

from tunnel import __version__
from tunnel.carriers.base import Link
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode, describe_code
from tunnel.wire.errors import AuthError, LinkError, TunnelError

from . import hints
from .config import AgentConfig, Target
from .config_watch import read_config, watch_config
from .health import TargetHealth
from .identity import PROOF_CONTEXT, AgentIdentity, IdentityError
from .link_handler import FATAL_CODES, AgentLinkHandler
from .settings import AgentSettings

log = logging.getLogger("agent")

#: What the relay accepts as ``agent.hostname`` (docs/LIMITS.md); other characters become '-'.
_HOSTNAME_OUTSIDE = re.compile(r"[^A-Za-z0-9._-]")
#: Failures that mean "the relay cannot be reached now"; the agent retries.
LINK_FAILURES = (LinkError, OSError, asyncio.TimeoutError, ConnectionError)
#: After a failed enrolment or renewal, the next try comes this much later (s).
ENROL_RETRY = 60.0


class Enrolled(LinkError):
    """A link the relay admitted to enrol only (``--require-agent-certificates``) gave the
    agent its certificate and closed: link again at once, by the certificate."""


class Backoff:
    """Reconnect delays: attempt ``n`` (0 after a success) waits a random time in
    [ceiling/4, ceiling], the ceiling ``first * 2**n`` capped at ``cap``: within a second
    after a link loss, then 2, 4, 8 ... 30 s while attempts keep failing."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.first * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self._rng.uniform(ceiling / 4, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Agent:
    """Runs until a fatal error (then ``run`` returns an exit code), :meth:`stop` (0) or
    cancellation."""

    #: A link that stayed up this long starts the reconnect delays over.
    HEALTHY_PERIOD = 30.0

    def __init__(self, config: AgentConfig, limits: Limits | None = None, dialer=None,
                 environ=None, *, slot: int = 0, links=None, settings: AgentSettings | None = None,
                 identity: AgentIdentity | None = None) -> None:
        self.config = config
        self.limits = limits or Limits.from_env()
        self.settings = settings or AgentSettings.from_env()
        self.environ = os.environ if environ is None else environ
        #: Which of the agent's links this life keeps, and the :class:`agent.links.AgentLinks`
        #: choosing its relay (None: one link to RELAY_URL).
        self.slot = slot
        self.links = links
        #: The relay id the last registration answered with.
        self.relay_id: str | None = None
        self.dialer = dialer if dialer is not None else self._dialer(config)
        #: The key and certificate of the state directory (agent.identity), None without one.
        self.identity = links.identity if links is not None else identity
        # As secrets.token_hex(6), without hashlib and hmac; one per agent process (all slots),
        # or the one the certificate names.
        self.instance = links.instance if links is not None else (
            self.identity.instance if self.identity is not None and self.identity.instance else os.urandom(6).hex())
        self.tasks: set[asyncio.Task] = set()
        self.backoff = Backoff(self.settings.reconnect_delay, self.settings.reconnect_max_delay)
        #: The link being served and its handler (the newest one after a move).
        self.link: Link | None = None
        self.handler: AgentLinkHandler | None = None
        #: Older links told to go away, finishing their streams.
        self.draining: set[Link] = set()
        #: Names the relay deregistered (or refused on a live link) -> why: not served, not
        #: registered again until a restart or a new token (shared by every slot).
        self.dropped: dict[str, str] = links.dropped if links is not None else {}
        #: Resources a reload removed, still served on the link until the relay confirms.
        self.retiring: dict[str, Target] = {}
        #: Resources the relay refused on the live link for a passing reason (a quota, a full
        #: relay) -> why: asked for again with backoff (:meth:`_add_later`), left out of the
        #: next ``auth`` (so that they cannot get the others refused) and added after it.
        self.waiting: dict[str, str] = {}
        self._waiting_task: asyncio.Task | None = None
        #: The agent_id the relay gave the current link.
        self.agent_id: str | None = None
        #: Whether each private service answers: one watcher per process (every slot's links
        #: hear its changes).
        self.health = links.health if links is not None else TargetHealth(
            self.settings.connect_timeout, self.settings.target_check_interval, on_change=self.health_changed)
        #: This slot's :class:`agent.metrics.SlotMetrics` when METRICS_LISTEN is set, else None.
        self.metrics = None
        self._stopping: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._switch_to = None  # (config, dialer) a reload asked to move to

    def _dialer(self, config: AgentConfig):
        from tunnel.bridge.dial import Dialer

        return Dialer(config.relay_url, ca_file=config.ca_file, limits=self.limits, proxy_env=self.environ,
                      quic_engine=self.settings.quic_engine)

    # --- what is served -----------------------------------------------------------------

    def route(self, name: str) -> Target | None:
        """The target of resource ``name`` if this agent serves it, else None."""
        if name in self.dropped:
            return None
        return self.config.target(name) or self.retiring.get(name)

    def _targets(self) -> list[Target]:
        return [t for t in self.config.targets if t.name not in self.dropped]

    def _certified(self) -> bool:
        """Whether links present the certificate (and ``auth`` carries no token)."""
        return self.identity is not None and self.identity.usable(time.time())

    def _client_certificate(self) -> tuple[str, str] | None:
        """The files WSS links present at the TLS layer (Dialer.client_certificate)."""
        if not self._certified():
            return None
        return str(self.identity.cert_file), str(self.identity.key_file)

    def _auth_message(self, carrier: str = "wss") -> dict:
        hostname = _HOSTNAME_OUTSIDE.sub("-", socket.gethostname())[:253] or "unknown"
        names = [t.name for t in self._targets()]
        first = [n for n in names if n not in self.waiting] or names
        message = {
            "type": "auth",
            "token": self.config.token,
            "agent": {"version": __version__, "hostname": hostname, "instance": self.instance, "slot": self.slot,
                      "features": ["worker_address"]},
            "resources": [{"name": n} for n in first],
        }
        if self.identity is not None:
            # A relay that requires certificates admits a token link of an agent that can
            # enrol, to enrol only (``enroll_only``).
            message["agent"]["features"].append("enroll")
        if self._certified():
            # The relay takes the identity from the certificate: verified at the TLS layer on
            # WSS, sent here and proved by a signed nonce on QUIC (whose TLS stack cannot ask
            # for a client certificate).
            del message["token"]
            if carrier == "quic":
                message["certificate"] = self.identity.certificate_pem()
        elif not self.config.token:
            expired = self.identity is not None and self.identity.enrolled
            raise AuthError(("the agent's certificate expired at " + self.identity.expires() if expired
                             else "no registration JWT and no agent certificate")
                            + ": set REGISTRATION_JWT (tunnel-relay resources registration-jwt) to enrol again",
                            code="unauthorized", fatal=True)
        return message

    def prove(self, link: Link, message: dict) -> None:
        """CONTROL ``prove`` during registration: sign the relay's nonce with the agent's key."""
        nonce = message.get("nonce")
        if self._certified() and isinstance(nonce, str) and len(nonce) <= 256:
            self._spawn(self._prove(link, nonce))

    async def _prove(self, link: Link, nonce: str) -> None:
        try:
            signature = await self.identity.sign(PROOF_CONTEXT + base64.b64decode(nonce, validate=True))
            link.send_control({"type": "proof", "signature": base64.b64encode(signature).decode("ascii")})
        except (ValueError, IdentityError, TunnelError, OSError) as exc:
            log.warning("cannot answer the relay's certificate challenge: %s", exc)

    # --- enrolment --------------------------------------------------------------------------

    async def _keep_enrolled(self, handler: AgentLinkHandler) -> None:
        """While ``handler``'s link lives: enrol at once when the agent has no usable
        certificate (it registered with its JWT), else renew when the certificate's renewal
        time comes (agent.identity). One slot at a time; the others find it done."""
        identity = self.identity
        while not handler.closed.done():
            async with identity.busy:
                now = time.time()
                due = identity.renew_at()
                if not (identity.usable(now) and due is not None and now < due):
                    delay = await self._enrol(handler)
                else:
                    delay = due - now
            await asyncio.sleep(min(max(delay, 1.0), 3600.0))

    async def _enrol(self, handler: AgentLinkHandler) -> float:
        """Ask for a certificate over ``handler``'s link and store it; seconds until the next try."""
        identity = self.identity
        renewing = identity.enrolled
        try:
            csr = await identity.csr(self.instance)
        except IdentityError as exc:
            log.error("cannot make a certificate request: %s", exc)
            return ENROL_RETRY
        answer = await handler.enroll(csr, self.limits.handshake_timeout)
        if answer is None:
            return ENROL_RETRY
        if answer.get("type") != "enrolled":
            log.warning("the relay refused to %s this agent's certificate: %s (%s); trying again in %.0f s",
                        "renew" if renewing else "issue", str(answer.get("message", ""))[:256],
                        str(answer.get("code", "error"))[:32], ENROL_RETRY)
            return ENROL_RETRY
        try:
            await identity.store(answer.get("certificate"), time.time())
        except (IdentityError, OSError) as exc:
            log.error("cannot store the agent's certificate in %s: %s", identity.directory, exc)
            return ENROL_RETRY
        log.info("%s as %s, certificate expires %s", "renewed the certificate" if renewing else "enrolled",
                 identity.instance, identity.expires())
        return identity.renew_at() - time.time()

    async def _enrol_only(self, handler: AgentLinkHandler, by_token: bool) -> None:
        """The relay requires certificates and admitted this token link to enrol and nothing
        else: enrol over it and close it; raise :class:`Enrolled` (link again by the
        certificate) or, when no certificate came, a LinkError (retry with backoff)."""
        identity = self.identity
        if identity is None or not by_token:  # not asked for: no state directory, or a link by certificate
            handler.link.close(ErrorCode.NO_ERROR, "unexpected enroll_only")
            raise LinkError("the relay answered enroll_only to a link that cannot or need not enrol")
        log.info("the relay requires agent certificates and admitted this link to enrol only: enrolling")
        async with identity.busy:
            if not self._certified():  # another slot may have enrolled meanwhile
                await self._enrol(handler)
        handler.link.close(ErrorCode.NO_ERROR, "enrolled: linking again with the certificate")
        if not self._certified():
            raise LinkError("the relay requires agent certificates and the enrolment failed")
        raise Enrolled("enrolled over a link admitted to enrol only")

    def health_changed(self, name: str) -> None:
        """Tell the relay that ``name``'s service started or stopped answering."""
        if self.handler is not None:
            self.handler.send_health([name])

    # --- registering ----------------------------------------------------------------------

    async def register(self, link: Link) -> AgentLinkHandler:
        handler = AgentLinkHandler(self, link)
        link.set_handler(handler)
        try:
            message = self._auth_message(link.carrier)
        except AuthError:
            link.close(ErrorCode.NO_ERROR, "no credentials")
            raise
        link.send_control(message)
        try:
            answer = await asyncio.wait_for(asyncio.shield(handler.registered), self.limits.handshake_timeout)
        except asyncio.TimeoutError:
            link.close(ErrorCode.TIMEOUT, "registration timed out")
            raise LinkError("the relay did not answer the registration in time") from None
        except BaseException:
            link.close(ErrorCode.UNAUTHORIZED, "registration refused")
            raise
        if answer.get("type") == "enroll_only":
            await self._enrol_only(handler, "token" in message)
        for res in answer.get("resources", []):
            log.info("serving resource %s (%s) via %s; integration endpoint %s", res.get("name"), res.get("id"),
                     link.carrier, res.get("endpoint"))
        if self.identity is not None:
            task = self._spawn(self._keep_enrolled(handler))
            handler.closed.add_done_callback(lambda _f: task.cancel())
        self.agent_id = str(answer.get("agent_id", ""))[:64] or None
        handler.send_health(handler.names)
        for name in handler.names:
            self.waiting.pop(name, None)
        if self.waiting:
            self._add_later(at_once=True)
        if self.metrics is not None:
            self.metrics.registered(link)
        if self.links is not None:
            self.links.registered(self, link)
        return handler

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> int:
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        if self.links is None:  # else agent.links runs one of each for every slot
            self._spawn(self.health.run(self._targets))
            if self.settings.config_watch_interval > 0 and self.config.config_file:
                self._spawn(self._watch_config(self.settings.config_watch_interval))
        try:
            return await self._run()
        except asyncio.CancelledError:
            # Stopped hard (a second signal): close at once; the relay fails over now
            # instead of at its keepalive timeout.
            for link in [self.link, *self.draining]:
                if link is not None and not link.is_closing:
                    link.close(ErrorCode.NO_ERROR, "agent stopping")
            raise
        finally:
            for task in list(self.tasks):
                task.cancel()

    def stop(self) -> None:
        """Graceful stop (SIGTERM): deregister, let open streams finish up to the drain
        timeout, close; ``run`` returns 0."""
        if self._stopping is not None:
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        first = True
        while True:
            if self.stopping:
                self._log_stopped()
                return 0
            level = logging.WARNING
            if self.metrics is not None:
                self.metrics.connecting()
            if self.links is not None:
                dialer = await self._unless_stopping(self.links.dialer(self), close=False)
                if dialer is None:
                    continue
                self.dialer = dialer
            self.dialer.client_certificate = self._client_certificate
            try:
                link = await self._unless_stopping(self.dialer.dial())
                if link is None:
                    continue
                self.link = link
                log.info("connected to %s over %s", _relay_name(self.dialer.url), link.carrier)
                handler = self.handler = await self.register(link)
            except Enrolled:
                self._forget_link()
                self.backoff.reset()
                first = False
                continue
            except AuthError as exc:
                self._forget_link()
                if exc.fatal:
                    fix = hints.auth_fix(str(exc), hints.token_customer(self.config.token))
                    log.error("%s -> fix: %s; not retrying: fix the registration token and restart the agent",
                              exc, fix)
                    return 3
                what = str(exc)
            except LINK_FAILURES as exc:
                self._forget_link()
                what = "relay unreachable: " + hints.relay_failure(
                    exc, host=self.dialer.host, port=self.dialer.port, ca_file=self.config.ca_file,
                    ca_setting=self.config.ca_setting)
                if self._certified() and self.dialer.scheme != "quic" and "handshake" in str(exc).lower():
                    # The relay's TLS layer refuses a certificate of another CA with an alert.
                    what += (f" (the agent presented its certificate {self.identity.cert_file}: if the relay's CA "
                             "changed, remove that file and enrol again with a registration JWT)")
                if first:
                    what += " (the agent keeps trying)"
            else:
                registered_at = loop.time()
                outcome = await self.serve(link, handler)
                if outcome is None:
                    return await self._stop_gracefully()
                if outcome is MOVED:
                    # The relay drains: link elsewhere (agent.links), at once after a link that
                    # served a while; a link told to move soon after it registered backs off,
                    # so that a relay answering every registration so cannot spin the agent.
                    if loop.time() - registered_at >= self.HEALTHY_PERIOD:
                        self.backoff.reset()
                        continue
                    delay = self.backoff.next_delay()
                    log.info("told to move %.1f s after registering: linking again in %.1f s (backing off)",
                             loop.time() - registered_at, delay)
                    await self._sleep(delay)
                    continue
                code, reason, error = outcome
                if loop.time() - registered_at >= self.HEALTHY_PERIOD:
                    self.backoff.reset()
                if isinstance(error, AuthError) and error.fatal:
                    log.error("%s; not retrying: fix the registration token and restart the agent", error)
                    return 3
                if code == ErrorCode.NO_ERROR:
                    level, what = logging.INFO, f"the relay closed the link ({reason or 'no reason given'})"
                else:
                    what = f"relay unreachable: link lost ({error or describe_code(code, reason)})"
            first = False
            delay = self.backoff.next_delay()
            log.log(level, "%s; reconnecting in %.1f s", what, delay)
            if self.metrics is not None:
                self.metrics.waiting()
            await self._sleep(delay)

    def _forget_link(self) -> None:
        self.link = self.handler = None

    async def serve(self, link: Link, handler: AgentLinkHandler):
        """Serve until the link closes, ``(code, reason, error)``; a stop is asked, None; or
        the relay drains and this slot moves to another, :data:`MOVED` (the old link finishes
        its streams). Under auto://, move back to WSS when it is reachable again; after a reload
        that changed the relay's settings, move to a link made with them."""
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({handler.closed, handler.moving, stop, wake},
                                       timeout=self.dialer.next_probe_in(), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                if stop.done():
                    return None
                if handler.closed.done():
                    break
                if handler.moving.done():
                    self._forget_link()
                    return MOVED
                self._wake.clear()
                moved = None
                if self._switch_to is not None:
                    moved = await self._switch(link)
                elif self.dialer.next_probe_in() == 0:
                    moved = await self._try_wss(link)
                if moved is not None:
                    link, handler = moved
                    self.link, self.handler = link, handler
        finally:
            stop.cancel()
        code, reason = handler.closed.result()
        self._forget_link()
        return code, reason, handler.error

    async def _try_wss(self, old: Link):
        new = await self.dialer.probe_wss()
        if new is None:
            log.debug("WSS still unreachable (%s); staying on QUIC, next try in %g s", self.dialer.last_wss_error,
                      self.dialer.reprobe_interval)
            return None
        try:
            handler = await self.register(new)
        except (AuthError, *LINK_FAILURES) as exc:
            log.info("WSS reachable again but registration over it failed: %s", hints.describe(exc))
            new.close()
            self.dialer.carrier = old.carrier
            return None
        log.info("WSS is reachable again: moved to WSS; the QUIC link finishes its %d open stream(s)",
                 old.stream_count)
        self._drain_old(old, "moving to WSS")
        return new, handler

    def _drain_old(self, old: Link, why: str) -> None:
        old.goaway(ErrorCode.NO_ERROR, why)
        self.draining.add(old)
        task = self._spawn(close_when_idle(old))
        task.add_done_callback(lambda _: self.draining.discard(old))

    async def _unless_stopping(self, awaitable, close: bool = True):
        """``awaitable``'s result, or None (it cancelled) once a stop is asked (a link it
        still returned is closed when ``close``)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            link = await task
        except BaseException:  # noqa: BLE001 - cancelled, or failed while cancelling
            return None
        if link is not None and close:
            link.close(ErrorCode.NO_ERROR, "agent stopping")
        return None

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when a stop is asked."""
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- stopping -------------------------------------------------------------------------

    async def _stop_gracefully(self) -> int:
        link, handler = self.link, self.handler
        drain = self.config.drain_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        if link is not None and handler is not None and not link.is_closing:
            names = sorted(handler.names)
            log.info("stopping: deregistering %s; open streams (%d) may finish for up to %g s (DRAIN_TIMEOUT)",
                     ", ".join(names) or "nothing", handler.open_streams, drain)
            answer = await handler.request("remove_resources", names, "resources_removed", reason="stopping")
            if answer is None:
                link.goaway(ErrorCode.NO_ERROR, "agent stopping")  # a relay without remove_resources
            handler.names.clear()
            try:
                await asyncio.wait_for(_all_idle(handler, self.draining), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.warning("DRAIN_TIMEOUT (%g s) reached with %d stream(s) open: resetting them", drain,
                            handler.open_streams + sum(old.stream_count for old in self.draining))
        for old in [link, *self.draining]:
            if old is not None and not old.is_closing:
                old.close(ErrorCode.NO_ERROR, "agent stopped")
        for old in [link, *self.draining]:
            if old is not None:
                try:
                    await asyncio.wait_for(old.wait_closed(), 2.0)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping anyway
                    pass
        self._log_stopped()
        return 0

    def _log_stopped(self) -> None:
        # One slot of several (agent.links) ends quietly: the process says "stopped" once, when
        # every slot has drained (agent.cli).
        if self.links is None:
            log.info("stopped")
        else:
            log.debug("link %d stopped", self.slot)

    # --- reloading ------------------------------------------------------------------------

    def reload(self, why: str = "SIGHUP") -> bool:
        """Read the config file again and apply it (see the module docstring); False (and the
        old configuration kept) when the file is refused. With several links, agent.links
        reads it once and applies it to every slot."""
        if self.links is not None:
            return self.links.reload(why)
        new = read_config(self.config, self.environ, why)
        return new is not None and self.apply_config(new, why)

    def apply_config(self, new: AgentConfig, why: str) -> bool:
        """Serve ``new`` (a config file read again) from now on."""
        old = self.config
        announce = self.slot == 0  # one summary per process
        before = {t.name: t for t in old.targets}
        after = {t.name: t for t in new.targets}
        added = [n for n in after if n not in before]
        removed = [n for n in before if n not in after]
        changed = [n for n in after if n in before and after[n] != before[n]]
        connection = [k for k in ("relay_urls", "ca_file", "token") if getattr(old, k) != getattr(new, k)]
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level)
        if not (added or removed or changed or connection or new != old):
            if announce:
                log.info("%s: config file %s read again: nothing changed", why, old.config_file)
            return True
        handler = self.handler
        for name in removed:
            if handler is not None and name in handler.names:
                self.retiring[name] = before[name]
            self.health.forget(name)
        self.config = new
        if announce:
            log.info("%s: config file %s read again: added %s; removed %s (their open streams finish); targets "
                     "changed for new streams %s; unchanged %s%s", why, old.config_file, _names(added),
                     _names(removed), _names(f"{n} -> {after[n].address}" for n in changed),
                     _names(n for n in after if n not in added and n not in changed),
                     f"; {', '.join(connection)} changed: moving to a new link" if connection else "")
            if new.log_format != old.log_format:
                log.warning("log_format changed: takes effect at the next start")
        if connection:
            if "token" in connection:
                self.dropped.clear()  # a new token may serve what the old one lost
            try:
                # With several links the slot's relay is chosen again when it moves.
                dialer = self._dialer(new) if self.links is None else None
            except ValueError as exc:
                log.error("%s; keeping the previous relay settings", exc)
                self.config = dataclasses.replace(new, relay_url=old.relay_url, ca_file=old.ca_file,
                                                  ca_setting=old.ca_setting, token=old.token, relay_urls=old.relay_urls)
            else:
                self._switch_to = (old, dialer)
                if self._wake is not None:
                    self._wake.set()
                if handler is None:  # not connected: the next dial uses them
                    self._switch_to = None
                    if dialer is not None:
                        self.dialer = dialer
                return True
        if handler is not None:
            self._spawn(self._apply(handler, added, removed))
        else:
            self.retiring.clear()
        return True

    async def _apply(self, handler: AgentLinkHandler, added: list[str], removed: list[str]) -> None:
        """Tell the relay what a reload added and removed on ``handler``'s link."""
        removed = [n for n in removed if n in handler.names]
        if removed:
            answer = await handler.request("remove_resources", removed, "resources_removed", reason="reload")
            if answer is None and not handler.link.is_closing:
                log.warning("the relay did not confirm removing %s: it may route their streams here until the "
                            "next reconnect (they are refused)", _names(removed))
            for name in removed:
                handler.names.discard(name)
                self.retiring.pop(name, None)
            if answer is not None:
                log.info("deregistered %s; their open streams finish", _names(removed))
        added = [n for n in added if n not in self.dropped]
        if not added:
            return
        answer = await handler.request("add_resources", added, "resources_added")
        if answer is None:
            if not handler.link.is_closing:
                log.warning("the relay did not answer adding %s: they register at the next reconnect", _names(added))
            return
        for res in answer.get("resources") or []:
            if isinstance(res, dict) and res.get("name") in added:
                handler.names.add(res["name"])
                log.info("serving resource %s (%s) via %s; integration endpoint %s", res.get("name"), res.get("id"),
                         handler.link.carrier, res.get("endpoint"))
        self._refused(answer, added)
        handler.send_health(added)

    def _refused(self, answer: dict, asked: list[str]) -> None:
        """The ``refused`` entries of a ``resources_added`` answer: dropped for good when
        retrying is futile (revoked, deleted, malformed), else waiting for another try."""
        for res in answer.get("refused") or []:
            if not (isinstance(res, dict) and res.get("name") in asked):
                continue
            name = res["name"]
            code = str(res.get("code", "refused"))[:64]
            why = f"{str(res.get('message', ''))[:300]} ({code})"
            if code in FATAL_CODES:
                self.waiting.pop(name, None)
                self.dropped[name] = why
                log.error("the relay refused resource %s: %s -> fix: %s; the others go on", name, why,
                          hints.auth_fix(why, hints.token_customer(self.config.token)))
            else:
                if name not in self.waiting:
                    log.warning("the relay refused resource %s for now: %s; the agent asks again later, the "
                                "others go on", name, why)
                self.waiting[name] = why
        if self.waiting:
            self._add_later()

    def _add_later(self, at_once: bool = False) -> None:
        """Ask the relay of the current link again, with backoff, for the resources waiting
        (one task; ``at_once``: a new link, ask it now)."""
        if self._waiting_task is not None and not self._waiting_task.done():
            if not at_once:
                return
            self._waiting_task.cancel()
        self._waiting_task = self._spawn(self._retry_waiting(at_once))

    async def _retry_waiting(self, at_once: bool) -> None:
        backoff = Backoff(self.settings.reconnect_delay, self.settings.reconnect_max_delay)
        while self.waiting:
            if not at_once:
                await self._sleep(backoff.next_delay())
            at_once = False
            handler = self.handler
            if self.stopping or handler is None or handler.link.is_closing:
                return  # the next registration asks again
            names = [n for n in self.waiting if self.route(n) is not None and n not in handler.names]
            for name in [n for n in self.waiting if n not in names]:
                del self.waiting[name]  # removed by a reload, dropped, or served meanwhile
            if not names:
                return
            answer = await handler.request("add_resources", names, "resources_added")
            if answer is None:
                continue
            for res in answer.get("resources") or []:
                if isinstance(res, dict) and res.get("name") in names:
                    self.waiting.pop(res["name"], None)
                    handler.names.add(res["name"])
                    log.info("serving resource %s (%s) via %s; integration endpoint %s (refused before)",
                             res.get("name"), res.get("id"), handler.link.carrier, res.get("endpoint"))
            futile = [res for res in answer.get("refused") or []
                      if isinstance(res, dict) and str(res.get("code", "refused"))[:64] in FATAL_CODES]
            if futile:
                self._refused({"refused": futile}, names)
            handler.send_health(n for n in names if n in handler.names)

    async def _switch(self, old_link: Link):
        """Move to a link made with the relay settings a reload brought; keep the old link
        (and settings) when that fails."""
        previous, dialer = self._switch_to
        self._switch_to = None
        try:
            if dialer is None:
                dialer = await self.links.dialer(self)
            dialer.client_certificate = self._client_certificate
            link = await dialer.dial()
            handler = await self.register(link)
        except (AuthError, *LINK_FAILURES) as exc:
            log.error("the new relay settings do not work: %s; staying on the current link with the previous ones",
                      hints.relay_failure(exc, host=dialer.host, port=dialer.port, ca_file=self.config.ca_file,
                                          ca_setting=self.config.ca_setting)
                      if not isinstance(exc, AuthError) else exc)
            self.config = dataclasses.replace(self.config, relay_url=previous.relay_url, ca_file=previous.ca_file,
                                              ca_setting=previous.ca_setting, token=previous.token, relay_urls=previous.relay_urls)
            return None
        self.dialer = dialer
        self.retiring.clear()
        log.info("moved to the new relay settings (%s over %s); the previous link finishes its %d open stream(s)",
                 _relay_name(dialer.url), link.carrier, old_link.stream_count)
        self._drain_old(old_link, "agent reconfigured")
        return link, handler

    async def _watch_config(self, interval: float) -> None:
        await watch_config(self.config.config_file, interval, self.reload)


class _Moved:
    """What :meth:`Agent.serve` returns when the relay drains and the slot moves."""

    def __repr__(self) -> str:
        return "MOVED"


MOVED = _Moved()


async def _all_idle(handler: AgentLinkHandler, draining: set[Link]) -> None:
    """Until ``handler``'s link has no open stream (or closed) and the older links closed."""
    while handler.open_streams and not handler.closed.done():
        idle = asyncio.ensure_future(handler.idle.wait())
        try:
            await asyncio.wait({idle, handler.closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
    for old in list(draining):
        await old.wait_closed()


async def close_when_idle(link: Link, timeout: float = 300.0) -> None:
    """A link told to go away closes by itself once its last stream ended; close it anyway
    after ``timeout``."""
    try:
        await asyncio.wait_for(link.wait_closed(), timeout)
    except asyncio.TimeoutError:
        link.close(ErrorCode.NO_ERROR, "drain timeout")


def _names(names) -> str:
    names = list(names)
    return ", ".join(names) if names else "none"


def _relay_name(url: str) -> str:
    return url.split("://", 1)[-1]
