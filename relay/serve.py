"""``tunnel-relay serve``: builds the relay from its layers (state, data, control) and runs it
until SIGTERM or SIGINT, then drains."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import urllib.parse
from pathlib import Path

from tunnel import __version__
from tunnel.bridge.listen import serve_links
from tunnel.core.limits import Limits
from tunnel.ops.process import prefer_aes128, release_free_memory_forever, tune_malloc

from relay import CA_FILE, format_host_port, is_loopback_host
from relay.control import admin, tokens
from relay.control.server import DEFAULT_AGENT_CERT_TTL, Relay
from relay.data.audit import AuditLog
from relay.data.metrics import MetricsService
from relay.data.peering import Peering
from relay.data.quotas import Descriptors, raise_nofile_limit
from relay.data.registry import Registry
from relay.settings import RelaySettings
from relay.state import pki
from relay.state.cluster import Cluster, default_advertise_url
from relay.state.relay_state import RelayState
from relay.state.store.database import redact_url
from relay.state.store.errors import StateWriteFailed, StoreError, StoreUnavailable
from relay.state.store.settings import StoreSettings

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
    uvloop = None

log = logging.getLogger("relay")


def serve_main(args) -> int:
    """Entry point of ``tunnel-relay serve`` (``args`` from relay.cli)."""
    tune_malloc()
    prefer_aes128()  # before any SSL context exists: the relay chooses the suite of every link
    try:
        if uvloop is not None:
            return uvloop.run(_serve(args))
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError, StoreError) as exc:
        log.error("relay cannot start: %s", exc)
        return 1


def open_files_line(before: int, limit: int, descriptors: Descriptors) -> str:
    """The start-up line on the open-file limit (raised from ``before`` only when it was)."""
    raised = f" (raised from {before})" if limit != before else ""
    return (f"open files: limit {limit}{raised}; {descriptors.budget} for agents and endpoints, at most "
            f"{descriptors.share} per customer, {limit - descriptors.budget} kept in reserve")


async def _serve(args) -> int:
    limits = Limits.from_env()
    relay_settings = RelaySettings.from_env()
    settings = StoreSettings.from_env()
    before, open_files = raise_nofile_limit()
    descriptors = Descriptors(open_files, relay_settings)
    log.info("%s", open_files_line(before, open_files, descriptors))
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    host, port = args.listen_addr
    admin_host, admin_port = args.admin_listen_addr
    allow_remote = getattr(args, "allow_remote_admin", False)
    advertise = args.advertise or default_advertise_url(host, port, args.server_names)
    names = [host, urllib.parse.urlsplit(advertise).hostname, *args.server_names]
    if allow_remote and not is_loopback_host(admin_host):
        names.append(admin_host)
    keys = pki.ensure_pki(state_dir, extra_names=names, cert_file=args.cert, key_file=args.key)
    cert_file, key_file = keys.cert_file, keys.key_file
    ssl_context = pki.agent_server_ssl_context(cert_file, key_file, state_dir / CA_FILE)

    store = await _open_state(state_dir, args.database, settings)
    if await store.public_can_connect():
        log.warning("every database role may connect to %s (PostgreSQL's default): REVOKE CONNECT ON DATABASE "
                    "… FROM PUBLIC, and give the relays a role of their own (docs/CLUSTER.md, \"Setting up "
                    "PostgreSQL\")", store.description)
    authority = tokens.TokenAuthority(state_dir)
    registry = Registry(args.service_host, descriptors, settings=relay_settings)
    registry.service_allow = getattr(args, "service_allow", None) or None
    cluster = Cluster(store, registry, advertise, settings)
    registry.relay_id = cluster.relay_id
    audit = _open_audit(getattr(args, "audit_log", None))
    if audit is not None:
        audit.start(asyncio.get_running_loop())
        registry.audit = audit
    await cluster.start()
    relay = Relay(store, authority, registry, limits, descriptors, cluster=cluster, settings=relay_settings)
    relay.port_range = args.port_range
    relay.state_dir = state_dir
    relay.agent_cert_ttl = getattr(args, "agent_cert_ttl", None) or DEFAULT_AGENT_CERT_TTL
    relay.require_agent_certificates = bool(getattr(args, "require_agent_certificates", False))
    await relay.expire_idle_resources()

    # The relay's own listeners first, so that no endpoint port (a fixed one, say) can take
    # their address; an endpoint that cannot bind is logged and reported, never fatal.
    if store.backend == "postgresql":
        relay.peering = await _start_peering(args, relay, keys, names, limits)
        registry.forwarder = relay.peering

    metrics = await _start_metrics(relay, args.metrics_listen_addr, limits, relay_settings)
    listeners = await serve_links(host, port, ssl_context=ssl_context, cert_file=str(cert_file),
                                  key_file=str(key_file), limits=limits, on_link=relay.on_link)
    if port == 0 and not args.advertise:
        await cluster.readvertise(default_advertise_url(host, listeners.port, args.server_names))
    relay.accepting = True
    port = listeners.port
    admin_token = admin.load_or_create_admin_token(state_dir)
    admin_server = await admin.start_admin_server(
        admin_host, admin_port, state=store, authority=authority, registry=registry, token=admin_token,
        state_dir=state_dir, allow_remote=allow_remote,
        ssl_context=pki.server_ssl_context(cert_file, key_file) if not is_loopback_host(admin_host) else None,
        on_state_failure=relay.state_failed, cluster=cluster)
    admin_url = admin.admin_url(admin_server, tls=not is_loopback_host(admin_host))
    for resource in await store.list_resources():
        await relay.bind(resource)
    log.info("relay %s (%s) listening for agents on %s:%d (wss on TCP, quic on UDP); admin API on %s; "
             "resource endpoints on %s; state in %s, database %s", __version__, cluster.relay_id, host, port,
             admin_url, args.service_host, state_dir, store.description)
    expiry = asyncio.get_running_loop().create_task(relay.expire_forever())
    trimming = asyncio.get_running_loop().create_task(release_free_memory_forever())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (systemctl reload, logrotate) reopens the audit log; never stops the relay.
    loop.add_signal_handler(signal.SIGHUP, audit.reopen if audit is not None else lambda: None)
    await stop.wait()
    log.info("relay stopping: draining for up to %.0f s", args.drain_timeout)
    relay.accepting = False
    expiry.cancel()
    trimming.cancel()
    listeners.wss.close()  # no new agents; QUIC ones are refused while draining (its socket serves the others)
    await relay.drain(args.drain_timeout)
    listeners.close()
    admin_server.close()
    admin.clear_admin_info(state_dir)
    registry.close()
    if audit is not None:
        await audit.close()
    # Writes the closing links started (served times), then leave the cluster.
    if relay.tasks:
        await asyncio.wait(set(relay.tasks), timeout=settings.db_query_timeout)
    await cluster.stop()
    await store.close()
    if metrics is not None:
        metrics.close()
    return 0


def _open_audit(path: str | None) -> AuditLog | None:
    """The audit log of ``--audit-log`` (None when not asked for)."""
    if not path:
        return None
    try:
        audit = AuditLog(path)
    except OSError as exc:
        raise OSError(f"cannot open the audit log --audit-log {path}: {exc.strerror or exc}") from None
    log.info("audit log: one line per worker connection to %s", "the log stream" if path == "-" else path)
    return audit


async def _start_peering(args, relay: Relay, keys, names: list[str], limits: Limits):
    """Listen for the other relays of the cluster at ``--peer-listen`` (default: the host of
    ``--listen``, a free port) and record where they reach this one."""
    host, port = args.peer_listen_addr or (args.listen_addr[0], 0)
    advertised_host = args.peer_advertise_host or urllib.parse.urlsplit(relay.cluster.advertise_url).hostname
    cert_file, key_file = pki.ensure_peer_cert(args.state_dir, [*names, host, advertised_host])
    peering = Peering(relay.cluster, relay.registry, limits,
                      server_context=pki.peer_server_ssl_context(cert_file, key_file, keys.ca_file),
                      client_context=pki.peer_client_ssl_context(cert_file, key_file, keys.ca_file))
    try:
        port = await peering.listen(host, port)
    except OSError as exc:
        raise OSError(f"cannot listen for other relays at --peer-listen {format_host_port(host, port)}: "
                      f"{exc.strerror or exc}") from None
    address = format_host_port(advertised_host, port)
    await relay.cluster.set_peer_address(address)
    peering.connect_members(relay.cluster.members)
    log.info("relay-to-relay links on %s (mutual TLS, cluster CA)", address)
    return peering


async def _open_state(state_dir: Path, database: str | None, settings):
    """The migrated state; a PostgreSQL that cannot be reached is retried with backoff for
    ``db_startup_timeout`` before the relay gives up."""
    where = redact_url(database) if database else "in the state directory"
    deadline = time.monotonic() + settings.db_startup_timeout
    delay = 0.5
    while True:
        try:
            return await RelayState.open(state_dir, database, settings)
        except StoreUnavailable as exc:
            if isinstance(exc, StateWriteFailed):
                raise StoreError(f"{exc.reason}: {state_dir}") from None
            if time.monotonic() + delay > deadline:
                raise StoreError(f"state database unreachable: {where}: {exc.reason}; "
                                 f"gave up after {settings.db_startup_timeout:g} s") from None
            log.warning("state database unreachable: %s: %s; retrying in %.1f s", where, exc.reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.db_reconnect_max)


async def _start_metrics(relay: Relay, address: tuple[str, int] | None, limits: Limits, settings: RelaySettings):
    """``/metrics``, ``/live`` and ``/ready`` at ``--metrics-listen`` (None: not served)."""
    if address is None:
        return None
    try:
        service = await MetricsService(relay, limits, settings).start(*address)
    except OSError as exc:
        raise OSError(f"cannot serve metrics at --metrics-listen {format_host_port(*address)}: "
                      f"{exc.strerror or exc}") from None
    log.info("metrics on http://%s/metrics (also /live and /ready)", format_host_port(address[0], service.port))
    return service
