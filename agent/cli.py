"""``tunnel-agent``: configured by environment variables or ``--config FILE``.

Signals: SIGHUP reads the config file again (agent.runner.Agent.reload); SIGTERM and SIGINT
stop gracefully (deregister, let open streams finish up to ``DRAIN_TIMEOUT``, exit 0); a
second one stops at once."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from tunnel import __version__
from tunnel.core.limits import Limits
from tunnel.ops import logs

from . import config as agent_config
from .identity import HELPER as IDENTITY_HELPER
from .settings import DEFAULT_AGENT_SETTINGS, AgentSettings

log = logging.getLogger("agent")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == [IDENTITY_HELPER]:  # the key helper process (agent.identity), not for users
        from .identity import helper_main

        return helper_main(argv[1:])
    command = _command_index(argv)
    if command is not None:  # global options may come before the subcommand, as users type them
        from .check import main as check_main

        return check_main(argv[:command] + argv[command + 1:])
    # argparse only when there is something to parse: imported, it holds 0.4 MB of RSS for
    # the agent's whole life.
    config_file = _parse_args(argv).config if argv else None
    try:
        conf = agent_config.load(config_file=config_file)
        limits = Limits.from_env()
        settings = AgentSettings.from_env()
        # Imports the WSS carrier, which reads TUNNEL_TLS_ENGINE: a bad value is a config error too.
        from tunnel.ops.process import tune_malloc
    except (agent_config.ConfigError, ValueError) as exc:
        print(f"tunnel-agent: {exc}", file=sys.stderr)
        return 2
    logs.configure(conf.log_format, conf.log_level)
    log.info("tunnel-agent %s starting: relay %s (%d link(s)), resources %s", __version__, ", ".join(conf.relay_urls),
             conf.relay_links, ", ".join(f"{t.name} -> {t.address}" for t in conf.targets))
    log.debug("settings: %s; DRAIN_TIMEOUT %g s; config file %s", _tunables(limits, settings), conf.drain_timeout,
              conf.config_file or "none")
    tune_malloc()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        return runner(_run(conf, limits, settings))
    except KeyboardInterrupt:
        return 0


def _command_index(argv: list[str]) -> int | None:
    """Where the ``check`` subcommand stands in ``argv`` (not as the value of ``--config``)."""
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif arg == "check":
            return i
        elif arg == "--":
            break
    return None


USAGE = "tunnel-agent [-h] [--version] [--config FILE] [check [--output {text,json}] [--timeout SECONDS]]"


def _parse_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(
        prog="tunnel-agent", usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dial out to a tunnel relay and serve private TCP services through it.",
        epilog=ENVIRONMENT + "\n" + _tunables_help())
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (also AGENT_CONFIG_FILE); SIGHUP reads it again")
    parser.add_argument("--version", action="version", version=f"tunnel-agent {__version__}")
    return parser.parse_args(argv)


ENVIRONMENT = """\
environment:
  RELAY_URL              auto://HOST:PORT (WSS, else QUIC), wss://HOST:PORT or quic://HOST:PORT;
                         the port is required (the relay's default is 8443); several relays
                         (or load balancers) of one cluster: comma-separated
  RELAY_LINKS            links kept to distinct relays of the cluster (default 2; all when fewer)
  RELAY_ALLOW_HOSTS      relays the cluster may name beyond RELAY_URL's hosts and domain:
                         host names, .domain, addresses, networks (comma-separated)
  NAME                   the resource's name (agents with one NAME and customer serve it together)
  APP_HOST, APP_PORT     the private service this agent reaches for NAME
  REGISTRATION_JWT       the registration token, or REGISTRATION_JWT_FILE (a file holding it)
  RELAY_CA_FILE          the relay's CA when it uses its own: <state-dir>/ca.pem on the relay host
  HTTPS_PROXY, NO_PROXY  an HTTP CONNECT proxy for wss://
  LOG_LEVEL              DEBUG, INFO (default), WARNING or ERROR
  LOG_FORMAT             plain (default) or json
  DRAIN_TIMEOUT          seconds SIGTERM lets open streams finish (default 30)
  METRICS_LISTEN         host:port (or :port) to serve /metrics, /live and /ready on (default: off)
  AGENT_CONFIG_FILE      the same as --config (several resources: README, "The config file")
  AGENT_STATE_DIR        the agent's key and certificate after enrolment (default: FILE.state
                         beside the config file; environment only: no enrolment unless set)

signals: SIGHUP reads the config file again; SIGTERM deregisters, lets open streams finish up
to DRAIN_TIMEOUT and exits 0.

'tunnel-agent check [--config FILE] [--output json]' checks the configuration, the way to the
relay, the registration JWT and each private service, and names the fix.
"""


def _tunables_help() -> str:
    """Every TUNNEL_* setting with its default, wrapped (docs/LIMITS.md says what each bounds)."""
    import dataclasses
    import textwrap

    from tunnel.core.limits import DEFAULT_LIMITS

    items = [f"TUNNEL_{f.name.upper()}={_number(getattr(defaults, f.name))}"
             for defaults in (DEFAULT_LIMITS, DEFAULT_AGENT_SETTINGS) for f in dataclasses.fields(defaults)]
    body = textwrap.fill("  ".join(items), width=96, initial_indent="  ", subsequent_indent="  ",
                         break_on_hyphens=False)
    return ("tunables (environment, defaults shown, in seconds and bytes; docs/LIMITS.md says what each "
            "bounds):\n" + body)


def _number(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _tunables(limits: Limits, settings: AgentSettings) -> str:
    import dataclasses

    from tunnel.core.limits import DEFAULT_LIMITS

    changed = [f"{f.name}={_number(getattr(values, f.name))}"
               for values, defaults in ((limits, DEFAULT_LIMITS), (settings, DEFAULT_AGENT_SETTINGS))
               for f in dataclasses.fields(values) if getattr(values, f.name) != getattr(defaults, f.name)]
    return "tunables " + (", ".join(changed) if changed else "at their defaults")


def _open_identity(conf):
    """The agent's key and certificate (agent.identity) from ``conf.state_dir``, or None: no
    state directory, another agent process holds it, or the default one beside the config
    file cannot be made (then the JWT alone, with a warning). ValueError when the agent cannot
    start that way."""
    from .identity import AgentIdentity, IdentityError, StateDirUnavailable

    if not conf.state_dir:
        return None
    try:
        identity = AgentIdentity.open(conf.state_dir)
    except StateDirUnavailable as exc:
        if conf.state_dir_set or not conf.token:
            raise ValueError(str(exc)) from None
        log.warning("%s; linking with the registration JWT only (set AGENT_STATE_DIR to enrol)", exc)
        return None
    except IdentityError as exc:
        raise ValueError(str(exc)) from None
    if identity is None:
        if not conf.token:
            raise ValueError(f"the agent state directory {conf.state_dir} is in use by another agent process, and "
                             "no registration JWT is set: give this agent its own AGENT_STATE_DIR")
        log.warning("the agent state directory %s is in use by another agent process: this one links with its "
                    "registration JWT only (give it its own AGENT_STATE_DIR to enrol)", conf.state_dir)
    elif identity.enrolled:
        log.info("agent instance %s: certificate in %s, expires %s", identity.instance, conf.state_dir,
                 identity.expires())
    return identity


async def _run(conf, limits: Limits, settings: AgentSettings) -> int:
    from .links import AgentLinks

    try:
        identity = _open_identity(conf)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    links = AgentLinks(conf, limits, settings=settings, identity=identity)
    metrics = None
    if conf.metrics_listen is not None:
        from .metrics import serve_metrics

        try:
            metrics = await serve_metrics(links.slots, conf.metrics_listen, limits, settings)
        except OSError as exc:
            log.error("cannot serve metrics at METRICS_LISTEN %s:%d: %s", *conf.metrics_listen, exc.strerror or exc)
            return 2
        log.info("metrics on http://%s:%d/metrics (also /live and /ready)", conf.metrics_listen[0], metrics.port)
    from tunnel.ops.process import release_free_memory_forever

    task = asyncio.ensure_future(links.run())
    trimming = asyncio.ensure_future(release_free_memory_forever())
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        if links.stopping:
            log.info("stopping now")
            task.cancel()
        else:
            links.stop()

    for sig, callback in ((signal.SIGTERM, on_stop_signal), (signal.SIGINT, on_stop_signal),
                          (getattr(signal, "SIGHUP", None), links.reload)):
        if sig is None:
            continue
        try:
            loop.add_signal_handler(sig, callback)
        except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt (see main)
            pass
    try:
        code = await task
        if code == 0 and links.stopping:
            log.info("stopped")  # every link drained
        return code
    except asyncio.CancelledError:
        log.info("tunnel-agent stopped")
        return 0
    finally:
        trimming.cancel()
        if metrics is not None:
            metrics.close()
