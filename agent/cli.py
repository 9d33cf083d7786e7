"""``tunnel-agent``: configured by environment variables or ``--config FILE``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from tunnel import __version__
from tunnel.core.limits import Limits
from tunnel.ops import logs

from . import config as agent_config

log = logging.getLogger("agent")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "check":
        from .check import main as check_main

        return check_main(argv[1:])
    # argparse only when there is something to parse: imported, it holds 0.4 MB of RSS for
    # the agent's whole life.
    config_file = _parse_args(argv).config if argv else None
    try:
        conf = agent_config.load(config_file=config_file)
        limits = Limits.from_env()
    except (agent_config.ConfigError, ValueError) as exc:
        print(f"tunnel-agent: {exc}", file=sys.stderr)
        return 2
    logs.configure(conf.log_format, conf.log_level)
    log.info("tunnel-agent %s starting: relay %s (%d link(s)), resources %s", __version__, ", ".join(conf.relay_urls),
             conf.relay_links,
             ", ".join(f"{t.name} -> {t.host}:{t.port}" for t in conf.targets))
    from tunnel.ops.process import tune_malloc

    tune_malloc()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        return runner(_run(conf, limits))
    except KeyboardInterrupt:
        return 0


def _parse_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(
        prog="tunnel-agent",
        description="Dial out to a tunnel relay and serve private TCP services through it. "
                    "Configured by RELAY_URL (one relay or several, comma-separated), RELAY_LINKS, NAME, "
                    "APP_HOST, APP_PORT, REGISTRATION_JWT "
                    "(or REGISTRATION_JWT_FILE), RELAY_CA_FILE, HTTPS_PROXY/NO_PROXY, METRICS_LISTEN, "
                    "or a TOML file.",
        epilog="'tunnel-agent check [--config FILE] [--output json]' checks the configuration, the way "
               "to the relay, the registration JWT and each private service, and names the fix.")
    parser.add_argument("--config", help="TOML configuration file (also AGENT_CONFIG_FILE)")
    parser.add_argument("--version", action="version", version=f"tunnel-agent {__version__}")
    return parser.parse_args(argv)


async def _run(conf, limits: Limits) -> int:
    from .links import AgentLinks

    links = AgentLinks(conf, limits)
    agent = links.slots[0]  # metrics follow the first link
    metrics = None
    if conf.metrics_listen is not None:
        from .metrics import serve_metrics

        try:
            metrics = await serve_metrics(agent, conf.metrics_listen, limits)
        except OSError as exc:
            log.error("cannot serve metrics at METRICS_LISTEN %s:%d: %s", *conf.metrics_listen, exc.strerror or exc)
            return 2
        log.info("metrics on http://%s:%d/metrics (also /live and /ready)", conf.metrics_listen[0], metrics.port)
    task = asyncio.ensure_future(links.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, task.cancel)
        except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt (see main)
            pass
    try:
        return await task
    except asyncio.CancelledError:
        log.info("tunnel-agent stopping")
        return 0
    finally:
        if metrics is not None:
            metrics.close()
