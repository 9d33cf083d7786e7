"""The agent's configuration: environment variables (the names Prismatic's agent uses) or a
TOML file (``--config`` / ``AGENT_CONFIG_FILE``) for several resources.

Environment::

    RELAY_URL               wss://host:port, quic://host:port or auto://host:port (the port is
                            required: the relay listens on 8443 unless its operator chose another);
                            several relays (or load balancers) of one cluster: comma-separated
    RELAY_LINKS             links kept to distinct relays of the cluster (default 2; all when fewer)
    RELAY_ALLOW_HOSTS       relays the agent may dial when the cluster names them (CONTROL
                            ``relays``) besides those within RELAY_URL's domain (see
                            :func:`relay_allowed`): comma-separated host names, ``.example.com``
                            (that domain and every name under it), IP addresses or networks
                            (``10.1.0.0/16``)
    NAME                    the resource name agents of one customer share
    APP_HOST, APP_PORT      the private service this agent reaches for that resource
    REGISTRATION_JWT        the registration token (or REGISTRATION_JWT_FILE: a file holding it;
                            under systemd, a credential named registration-jwt in
                            $CREDENTIALS_DIRECTORY serves without either)
    RELAY_CA_FILE           trust anchor for a relay with a private CA (else the system store)
    HTTPS_PROXY, NO_PROXY   outbound HTTP CONNECT proxy (WSS only)
    LOG_FORMAT, LOG_LEVEL   plain|json, DEBUG|INFO|WARNING|ERROR
    DRAIN_TIMEOUT           seconds SIGTERM lets open streams finish (default 30)
    METRICS_LISTEN          host:port (or :port) to serve /metrics, /live and /ready on
                            (plain HTTP; default: not served)
    AGENT_STATE_DIR         the agent's key and client certificate (agent.identity; default
                            <config file without suffix>.state beside the config file; with
                            environment variables only, no enrolment unless it is set)

File (every key optional where the environment gives it; the environment wins)::

    relay_url = "auto://relay.example.com:8443"
    relay_links = 2
    relay_allow_hosts = [".relays.example.net"]
    registration_jwt_file = "/etc/tunnel-agent/jwt"
    ca_file = "/etc/tunnel-agent/ca.pem"
    log_level = "INFO"
    log_format = "plain"
    drain_timeout = 30
    metrics_listen = "127.0.0.1:9464"
    state_dir = "/var/lib/tunnel-agent"
    [[resources]]
    name = "orders-db"
    host = "10.0.0.5"
    port = 5432
    proxy_protocol = 2         # optional: a PROXY v2 header with the worker's address first

SIGHUP re-reads the file (agent.reload); the README describes the format for users.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tunnel.bridge.dial import RELAY_DEFAULT_PORT, parse_relay_url

from .identity import CERT_FILE, default_state_dir

DEFAULT_DRAIN_TIMEOUT = 30.0
#: RELAY_LINKS: the most links one agent keeps (the relay accepts slots 0-15).
MAX_RELAY_LINKS = 16
DEFAULT_RELAY_LINKS = 2
#: The systemd credential (LoadCredential=registration-jwt:...) read when no token is given.
CREDENTIAL_NAME = "registration-jwt"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class ConfigError(Exception):
    """A configuration mistake the user must fix; the message says which and how."""


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    #: Which setting names it, for messages that say what to fix ("APP_HOST" or
    #: "[[resources]] NAME in FILE"); not part of equality.
    origin: str = field(default="APP_HOST", compare=False)
    #: 2: send the service a PROXY protocol v2 header with the worker's address
    #: (``proxy_protocol = 2`` in the resource's table); 0: none.
    proxy_protocol: int = 0

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def host_setting(self) -> str:
        return "APP_HOST" if self.origin == "APP_HOST" else f"the host of {self.origin}"

    @property
    def port_setting(self) -> str:
        return "APP_PORT" if self.origin == "APP_HOST" else f"the port of {self.origin}"


@dataclass(frozen=True)
class AgentConfig:
    relay_url: str
    token: str = field(repr=False)
    targets: tuple[Target, ...]
    ca_file: str | None = None
    log_format: str = "plain"
    log_level: str = "INFO"
    #: Where the token came from (a variable or file name, never the token), for `check`.
    token_source: str = ""
    #: Seconds SIGTERM lets open streams finish before the agent closes its link.
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    #: The TOML file read (None: environment only); SIGHUP reads it again.
    config_file: str | None = None
    #: ``(host, port)`` of the /metrics, /live and /ready server; None: not served.
    metrics_listen: tuple[str, int] | None = None
    #: Every relay RELAY_URL names (``relay_url`` is the first).
    relay_urls: tuple[str, ...] = ()
    #: RELAY_LINKS: how many links to distinct relays to keep.
    relay_links: int = DEFAULT_RELAY_LINKS
    #: Where ``ca_file`` was set, as messages name it: RELAY_CA_FILE, or ca_file in the file.
    ca_setting: str = "RELAY_CA_FILE"
    #: RELAY_ALLOW_HOSTS: learned relays allowed beyond RELAY_URL's domain (relay_allowed).
    relay_allow_hosts: tuple[str, ...] = ()
    #: AGENT_STATE_DIR: where the agent's key and certificate live (None: no enrolment).
    state_dir: str | None = None
    #: False when ``state_dir`` is the default beside the config file (not set by the user):
    #: one that cannot be created then means no enrolment rather than an error.
    state_dir_set: bool = False

    def relay_allowed(self, url: str) -> bool:
        """May this agent dial (and send its token to) ``url``, a relay the cluster named?"""
        return relay_allowed(url, self.relay_urls or (self.relay_url,), self.relay_allow_hosts)

    def target(self, name: str) -> Target | None:
        for t in self.targets:
            if t.name == name:
                return t
        return None


def _port(value, what: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a TCP port number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what} must be between 1 and 65535, got {port}")
    return port


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{what} must be 1-128 letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not value:
        raise ConfigError(f"{what} {path} is empty")
    return value


def load(environ: Mapping[str, str] | None = None, config_file: str | None = None) -> AgentConfig:
    """Build the configuration, raising ConfigError with one clear message on any mistake."""
    env = os.environ if environ is None else environ
    config_file = config_file or env.get("AGENT_CONFIG_FILE")
    file_conf: dict = {}
    if config_file:
        import tomllib  # only with a config file: half a megabyte of RSS otherwise

        try:
            with open(config_file, "rb") as f:
                file_conf = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None

    relay_url_list = env.get("RELAY_URL") or file_conf.get("relay_url")
    if not relay_url_list or not str(relay_url_list).strip(" ,"):
        raise ConfigError(f"RELAY_URL is not set: set it to auto://HOST:{RELAY_DEFAULT_PORT} (or wss:// or "
                          "quic://), the relay's address and agent port; several relays: comma-separated")
    relay_urls = tuple(u.strip() for u in str(relay_url_list).split(",") if u.strip())
    for relay_url in relay_urls:
        check_relay_url(relay_url)
    links_text = env.get("RELAY_LINKS") or file_conf.get("relay_links") or DEFAULT_RELAY_LINKS
    try:
        relay_links = int(links_text)
    except (TypeError, ValueError):
        relay_links = 0
    if not 1 <= relay_links <= MAX_RELAY_LINKS:
        raise ConfigError(f"RELAY_LINKS must be a number from 1 to {MAX_RELAY_LINKS}, got {links_text!r}")

    state_dir = env.get("AGENT_STATE_DIR") or file_conf.get("state_dir") or default_state_dir(config_file, env)
    credential = os.path.join(env["CREDENTIALS_DIRECTORY"], CREDENTIAL_NAME) if env.get("CREDENTIALS_DIRECTORY") else ""
    if env.get("REGISTRATION_JWT"):
        token, token_source = env["REGISTRATION_JWT"].strip(), "REGISTRATION_JWT"
    elif env.get("REGISTRATION_JWT_FILE"):
        token = _read_secret_file(env["REGISTRATION_JWT_FILE"], "REGISTRATION_JWT_FILE")
        token_source = f"REGISTRATION_JWT_FILE {env['REGISTRATION_JWT_FILE']}"
    elif file_conf.get("registration_jwt_file"):
        token = _read_secret_file(file_conf["registration_jwt_file"], "registration_jwt_file")
        token_source = f"registration_jwt_file {file_conf['registration_jwt_file']}"
    elif credential and os.path.exists(credential):
        token = _read_secret_file(credential, f"systemd credential {CREDENTIAL_NAME}")
        token_source = f"systemd credential {CREDENTIAL_NAME}"
    elif state_dir and os.path.exists(os.path.join(state_dir, CERT_FILE)):
        token, token_source = "", f"the certificate in {state_dir}"  # enrolled: links by mutual TLS
    else:
        raise ConfigError("REGISTRATION_JWT (or REGISTRATION_JWT_FILE) is not set: "
                          "get one with 'tunnel-relay resources registration-jwt --customer-id ID'")

    targets: list[Target] = []
    if env.get("NAME") or env.get("APP_HOST") or env.get("APP_PORT"):
        missing = [k for k in ("NAME", "APP_HOST", "APP_PORT") if not env.get(k)]
        if missing:
            raise ConfigError(f"{', '.join(missing)} not set (NAME, APP_HOST and APP_PORT go together)")
        targets.append(Target(_name(env["NAME"], "NAME"), env["APP_HOST"], _port(env["APP_PORT"], "APP_PORT")))
    resources = file_conf.get("resources", [])
    if not isinstance(resources, list):
        raise ConfigError(f"resources in {config_file} must be a list of tables: write each as [[resources]]")
    for i, entry in enumerate(resources):
        if not isinstance(entry, dict) or not entry.get("host"):
            raise ConfigError(f"resources[{i}] in {config_file} needs name, host and port")
        name = _name(entry.get("name"), f"resources[{i}].name")
        proxy_protocol = entry.get("proxy_protocol", 0)
        if proxy_protocol not in (0, 2) or isinstance(proxy_protocol, bool):
            raise ConfigError(f"resources[{i}].proxy_protocol in {config_file} must be 2 (send a PROXY protocol v2 "
                              f"header to the service) or 0 (none), got {proxy_protocol!r}")
        targets.append(Target(name, str(entry["host"]), _port(entry.get("port"), f"resources[{i}].port"),
                              origin=f"[[resources]] {name} in {config_file}", proxy_protocol=proxy_protocol))
    if not targets:
        raise ConfigError("no resource configured: set NAME, APP_HOST and APP_PORT (or [[resources]] in a config file)")
    names = [t.name for t in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"resource names must be unique; {', '.join(duplicates)} is configured twice")

    allow = env.get("RELAY_ALLOW_HOSTS") or file_conf.get("relay_allow_hosts") or ()
    if isinstance(allow, str):
        allow = allow.split(",")
    if not isinstance(allow, (list, tuple)) or not all(isinstance(h, str) for h in allow):
        raise ConfigError("relay_allow_hosts must be a list of host names, .domains, addresses or networks")
    relay_allow_hosts = tuple(h.strip().lower().rstrip(".") for h in allow if h.strip())
    for entry in relay_allow_hosts:
        _check_allow_entry(entry)

    ca_file = env.get("RELAY_CA_FILE") or file_conf.get("ca_file") or None
    ca_setting = "RELAY_CA_FILE" if env.get("RELAY_CA_FILE") or not ca_file else f"ca_file in {config_file}"
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{ca_setting} {ca_file} is not a readable PEM certificate file "
                              f"({getattr(exc, 'strerror', None) or exc}): copy the relay's <state-dir>/ca.pem "
                              f"here and point {ca_setting.split(' ')[0]} at the copy") from None

    log_format = env.get("LOG_FORMAT", file_conf.get("log_format", "plain"))
    if log_format not in ("plain", "json"):
        raise ConfigError(f"LOG_FORMAT must be plain or json, got {log_format!r}")
    log_level = env.get("LOG_LEVEL", file_conf.get("log_level", "INFO")).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    raw_drain = env.get("DRAIN_TIMEOUT", file_conf.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT))
    try:
        drain_timeout = float(raw_drain)
    except (TypeError, ValueError):
        raise ConfigError(f"DRAIN_TIMEOUT must be a number of seconds, got {raw_drain!r}") from None
    if not 0 <= drain_timeout <= 86400:
        raise ConfigError(f"DRAIN_TIMEOUT must be between 0 and 86400 seconds, got {raw_drain!r}")

    metrics_listen = None
    if env.get("METRICS_LISTEN") or file_conf.get("metrics_listen"):
        from tunnel.ops.metrics_http import parse_listen

        try:
            metrics_listen = parse_listen(str(env.get("METRICS_LISTEN") or file_conf["metrics_listen"]), "METRICS_LISTEN")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return AgentConfig(relay_urls[0], token, tuple(targets), ca_file, log_format, log_level, token_source,
                       drain_timeout, config_file, metrics_listen, relay_urls, relay_links, ca_setting,
                       relay_allow_hosts, state_dir, bool(env.get("AGENT_STATE_DIR") or file_conf.get("state_dir")))


def _check_allow_entry(entry: str) -> None:
    if "/" in entry or _is_ip(entry):
        try:
            ipaddress.ip_network(entry, strict=False)
            return
        except ValueError:
            raise ConfigError(f"RELAY_ALLOW_HOSTS: {entry!r} is not an IP address or network") from None
    name = entry[2:] if entry.startswith("*.") else entry.lstrip(".")
    if not name or not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", name) or ".." in name:
        raise ConfigError(f"RELAY_ALLOW_HOSTS: {entry!r} is not a host name, .domain, address or network")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _domain(host: str) -> str | None:
    """The domain a configured relay host vouches for: the host without its first label
    (``relay.example.com`` -> ``example.com``), when at least two labels remain; None for an
    address or a name of one or two labels (those vouch for themselves only)."""
    if _is_ip(host):
        return None
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) >= 3 else None


def relay_allowed(url: str, relay_urls, allow_hosts=()) -> bool:
    """Whether an agent configured with ``relay_urls`` (RELAY_URL) and ``allow_hosts``
    (RELAY_ALLOW_HOSTS) may dial ``url``, a relay the cluster named (its database holds the
    relays' ``--advertise`` URLs, so whoever can write there could name any host): its host is

    - a RELAY_URL host, or under the domain of one (``relay-2.example.com`` for RELAY_URL
      ``wss://relay.example.com:8443``: the host without its first label, when at least two
      labels remain; addresses and shorter names vouch for themselves only);
    - or allowed by RELAY_ALLOW_HOSTS: that name, a ``.domain`` (or ``*.domain``) it is or is
      under, an address or a network holding it.

    The agent still checks the relay's certificate as for RELAY_URL."""
    try:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    if not host:
        return False
    for configured in relay_urls:
        own = (urlsplit(configured).hostname or "").lower().rstrip(".")
        domain = _domain(own)
        if host == own or (domain and host.endswith("." + domain)):
            return True
    address = None
    if _is_ip(host):
        address = ipaddress.ip_address(host)
    for entry in allow_hosts:
        if "/" in entry or _is_ip(entry):
            if address is not None and address in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        if entry.startswith((".", "*.")):
            domain = entry[2:] if entry.startswith("*.") else entry[1:]
            if host == domain or host.endswith("." + domain):
                return True
        elif host == entry:
            return True
    return False


def check_relay_url(url: str) -> None:
    """Raise ConfigError naming the fix unless ``url`` is ``wss|quic|auto://host:port``
    (:func:`tunnel.bridge.dial.parse_relay_url`'s message)."""
    try:
        parse_relay_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
