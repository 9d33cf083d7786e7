"""``tunnel-relay``: run the relay, or manage a running one through its admin API.

::

    tunnel-relay serve [--state-dir DIR] [--listen HOST:PORT] [--admin-listen HOST:PORT]
                       [--allow-remote-admin] [--service-host HOST] [--port-range LOW-HIGH]
                       [--cert FILE --key FILE] [--server-name NAME] [--database URL] [--advertise URL]
                       [--metrics-listen HOST:PORT] [--service-allow CIDR[,CIDR…]] [--audit-log FILE|-]
                       [--log-format plain|json] [--log-level LEVEL]
    tunnel-relay customers create NAME                  prints the new customer's id
    tunnel-relay customers list [--output json]
    tunnel-relay resources list [--extended] [--output json]
    tunnel-relay resources create --customer-id ID NAME [--port PORT] [--allow CIDR[,CIDR…]]
                                                        prints id and endpoint
    tunnel-relay resources update ID --allow CIDR[,CIDR…]|default   who may reach its endpoint
    tunnel-relay resources registration-jwt (--customer-id ID | --org-only)
                       [--resource-id ID [--rotate]] [--ttl SECONDS] [--output FILE]
                       prints the JWT, or writes it to FILE with mode 0600
                       (--org-only is the same as --customer-id cus_org; the relay decides)
    tunnel-relay resources delete ID
    tunnel-relay cluster status [--output json]         the relays and which one holds each agent link
    tunnel-relay agents list [--customer ID] [--output json]
                       agent instances: customer, certificate scope, serial and expiry, revoked, linked now
    tunnel-relay agents revoke INSTANCE [--customer ID] [--reason TEXT]
                       revoke its certificates and drop its links on every relay

Admin commands find the API through ``--state-dir`` (``RELAY_STATE_DIR``, default
``./relay-state``: ``admin.json`` and ``admin-token``) or ``--admin-url``
(``RELAY_ADMIN_URL``) with ``RELAY_ADMIN_TOKEN``. An ``https://`` admin API (served beyond
loopback with ``--allow-remote-admin``) is verified with ``--admin-ca-file``
(``RELAY_ADMIN_CA_FILE``), else ``<state-dir>/ca.pem``, else the system's trust store.
Failures print one line to stderr and exit 1. What the relay reports (names, agents'
hostnames and versions) is printed with control characters escaped, in tables and JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tunnel.ops import logs
from tunnel.ops.logs import escape

from relay import DEFAULT_STATE_DIR, __version__, parse_host_port
from relay.control.admin_client import AdminClient, AdminError
from relay.state.access import parse_cidrs
from relay.state.cluster import check_advertise_url
from relay.state.relay_state import DEFAULT_PORT_RANGE
from relay.state.store.database import is_postgres_url, redact_url

PROG = "tunnel-relay"
DEFAULT_LISTEN = "0.0.0.0:8443"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8442"
DEFAULT_SERVICE_HOST = "127.0.0.1"


class CliError(Exception):
    pass


# --------------------------------------------------------------------------- parser


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def _add_admin_location(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--state-dir",
        default=default,
        help=f"relay state directory (env RELAY_STATE_DIR, default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--admin-url",
        default=default,
        help="admin API URL, e.g. http://127.0.0.1:8442 (env RELAY_ADMIN_URL; token in RELAY_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--admin-ca-file",
        default=default,
        help="CA file that verifies an https:// admin API (env RELAY_ADMIN_CA_FILE; default <state-dir>/ca.pem)",
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", choices=("table", "json"), default="table",
                        help="output format (default: an aligned table)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The tunnel relay (cloud side).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_admin_location(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--state-dir", default=argparse.SUPPRESS,
                       help=f"state directory (env RELAY_STATE_DIR, default {DEFAULT_STATE_DIR})")
    serve.add_argument("--listen", default=_env("RELAY_LISTEN", DEFAULT_LISTEN),
                       help=f"agent-facing address, TCP (WSS) and UDP (QUIC) (env RELAY_LISTEN, default {DEFAULT_LISTEN})")
    serve.add_argument("--admin-listen", default=_env("RELAY_ADMIN_LISTEN", DEFAULT_ADMIN_LISTEN),
                       help=f"admin API address, loopback (env RELAY_ADMIN_LISTEN, default {DEFAULT_ADMIN_LISTEN})")
    serve.add_argument("--service-host", default=_env("RELAY_SERVICE_HOST", DEFAULT_SERVICE_HOST),
                       help=f"where resource endpoints are bound (env RELAY_SERVICE_HOST, default {DEFAULT_SERVICE_HOST})")
    serve.add_argument("--service-allow", default=_env("RELAY_SERVICE_ALLOW"), metavar="CIDR[,CIDR...]",
                       help="sources that may connect to resource endpoints, unless a resource has its own list "
                            "('resources create|update --allow'); others are closed at once "
                            "(env RELAY_SERVICE_ALLOW; default: any source)")
    serve.add_argument("--audit-log", default=_env("RELAY_AUDIT_LOG"), metavar="FILE",
                       help="write one JSON line per worker connection, when it ends, to FILE ('-': the log "
                            "stream); SIGHUP reopens FILE (env RELAY_AUDIT_LOG; default: no audit log)")
    serve.add_argument("--agent-cert-ttl", type=_positive_int, default=int(_env("RELAY_AGENT_CERT_TTL", "86400")),
                       metavar="SECONDS",
                       help="lifetime of the client certificates the relay's CA issues to enrolled agents "
                            "(env RELAY_AGENT_CERT_TTL, default 86400: 24 h; 60 to 2592000)")
    serve.add_argument("--require-agent-certificates", action="store_true",
                       default=_env("RELAY_REQUIRE_AGENT_CERTIFICATES", "").lower() in ("1", "true", "yes", "on"),
                       help="refuse agent links that authenticate with a registration JWT only; a JWT link is "
                            "then admitted to enrol (get a certificate) and nothing else "
                            "(env RELAY_REQUIRE_AGENT_CERTIFICATES=1; default: JWT links are served)")
    serve.add_argument("--cert", default=_env("RELAY_CERT"), help="serve this certificate (PEM) instead of the generated one")
    serve.add_argument("--key", default=_env("RELAY_KEY"), help="private key (PEM) of --cert")
    serve.add_argument("--server-name", action="append", default=None,
                       help="extra DNS name or IP for the generated server certificate (repeatable; env RELAY_SERVER_NAME)")
    serve.add_argument("--database", default=None, metavar="URL",
                       help="state database: postgresql://USER@HOST:PORT/DBNAME joins the relays on it "
                            "(env RELAY_DATABASE_URL, or a file named by RELAY_DATABASE_URL_FILE, or the systemd "
                            "credential database-url; put the password there, in PGPASSWORD or in ~/.pgpass, "
                            "not on the command line); default SQLite in the state directory")
    serve.add_argument("--advertise", default=_env("RELAY_ADVERTISE_URL"), metavar="URL",
                       help="the URL agents use to reach this relay, wss://HOST:PORT (env RELAY_ADVERTISE_URL; "
                            "default from --listen)")
    serve.add_argument("--peer-listen", default=_env("RELAY_PEER_LISTEN"), metavar="HOST:PORT",
                       help="with a PostgreSQL --database: where the other relays connect to forward streams "
                            "(mutual TLS with the cluster CA; env RELAY_PEER_LISTEN; default the host of --listen, "
                            "a free port)")
    serve.add_argument("--peer-advertise", default=_env("RELAY_PEER_ADVERTISE"), metavar="HOST",
                       help="the host the other relays use to reach --peer-listen (env RELAY_PEER_ADVERTISE; "
                            "default the host of --advertise)")
    serve.add_argument("--port-range", default=_env("RELAY_PORT_RANGE", "%d-%d" % DEFAULT_PORT_RANGE),
                       metavar="LOW-HIGH",
                       help="TCP ports for new resources' endpoints, for firewall rules; the same on every relay "
                            "of a cluster (env RELAY_PORT_RANGE, default %d-%d; existing resources keep theirs; "
                            "'resources create --port' fixes one)" % DEFAULT_PORT_RANGE)
    serve.add_argument("--drain-timeout", type=float, default=float(_env("RELAY_DRAIN_TIMEOUT", "30")),
                       metavar="SECONDS",
                       help="on SIGTERM, how long streams in flight may take to finish (env RELAY_DRAIN_TIMEOUT, "
                            "default 30)")
    serve.add_argument("--metrics-listen", default=_env("RELAY_METRICS_LISTEN"), metavar="HOST:PORT",
                       help="serve /metrics (Prometheus), /live and /ready here, plain HTTP "
                            "(env RELAY_METRICS_LISTEN; default: not served)")
    serve.add_argument("--log-format", choices=("plain", "json"), default=_env("RELAY_LOG_FORMAT", "plain"))
    serve.add_argument("--log-level", default=_env("RELAY_LOG_LEVEL", "info"),
                       type=str.lower, choices=("debug", "info", "warning", "error", "critical"))
    serve.add_argument("--allow-remote-admin", action="store_true",
                       help="allow a non-loopback --admin-listen; it is then served over TLS only, with the "
                            "relay's certificate (admin commands verify it with <state-dir>/ca.pem or --admin-ca-file)")

    customers = commands.add_parser("customers", help="manage customers")
    _add_admin_location(customers, suppress=True)  # global options before or after the subcommand
    customer_cmds = customers.add_subparsers(dest="action", metavar="ACTION")
    customer_cmds.required = True
    create = customer_cmds.add_parser("create", help="create a customer; prints its id")
    create.add_argument("name", metavar="NAME")
    _add_admin_location(create, suppress=True)
    clist = customer_cmds.add_parser("list", help="list customers")
    _add_output(clist)
    _add_admin_location(clist, suppress=True)

    resources = commands.add_parser("resources", help="manage resources and registration tokens")
    _add_admin_location(resources, suppress=True)  # global options before or after the subcommand
    resource_cmds = resources.add_subparsers(dest="action", metavar="ACTION")
    resource_cmds.required = True
    rlist = resource_cmds.add_parser("list", help="list resources with their status and endpoint")
    rlist.add_argument("--extended", action="store_true", help="add each agent's details")
    _add_output(rlist)
    _add_admin_location(rlist, suppress=True)
    rcreate = resource_cmds.add_parser(
        "create", help="create a resource before its agents register (optionally on a fixed port)",
        description="Create a resource ahead of its agents, e.g. to give it a fixed endpoint port for a "
                    "firewall rule. Agents of the customer that register NAME serve it.")
    rcreate.add_argument("name", metavar="NAME", help="the resource name its agents use (their NAME)")
    rcreate.add_argument("--customer-id", metavar="ID", required=True, help="the customer owning it (cus_...)")
    rcreate.add_argument("--port", type=_positive_int, metavar="PORT",
                         help="the endpoint's port on the relay's --service-host, within its --port-range "
                              "(default: any free one of it)")
    rcreate.add_argument("--allow", metavar="CIDR[,CIDR...]",
                         help="sources that may connect to its endpoint (default: the relay's --service-allow)")
    _add_output(rcreate)
    _add_admin_location(rcreate, suppress=True)
    rupdate = resource_cmds.add_parser(
        "update", help="change who may reach a resource's endpoint",
        description="Change a resource's settings on every relay of the cluster. Connections already open stay.")
    rupdate.add_argument("resource_id", metavar="ID")
    rupdate.add_argument("--allow", metavar="CIDR[,CIDR...]", required=True,
                         help="sources that may connect to its endpoint, e.g. 10.1.0.0/16,192.0.2.7; "
                              "'default' returns to the relay's --service-allow")
    _add_output(rupdate)
    _add_admin_location(rupdate, suppress=True)
    jwt_cmd = resource_cmds.add_parser(
        "registration-jwt", help="print a registration JWT for agents",
        description="Print a registration JWT: the token agents present (REGISTRATION_JWT) to register "
                    "resources. Give --customer-id for a customer's agents, or --org-only for the "
                    "organisation's own test resources.",
        epilog="A customer-wide token lets agents register any resource name for that customer (created "
               "at first use); with --resource-id it serves that one resource only, and --rotate revokes "
               "every older token of it.")
    # Whom the token is for is the relay's one rule (relay.control.tokens.token_subject), not argparse's.
    jwt_cmd.add_argument("--customer-id", metavar="ID",
                         help="the customer whose agents use the token: the id 'customers create' printed "
                              "(cus_...; 'customers list' shows them); needed unless --org-only")
    jwt_cmd.add_argument("--org-only", action="store_true",
                         help="a token for the organisation's own test resources instead of a customer's: they "
                              "belong to the built-in customer cus_org (the same as --customer-id cus_org)")
    jwt_cmd.add_argument("--resource-id", metavar="ID", help="limit the token to this resource")
    jwt_cmd.add_argument("--rotate", action="store_true",
                         help="revoke every older token of --resource-id and drop the agents using them")
    jwt_cmd.add_argument("--ttl", type=_positive_int, metavar="SECONDS", help="lifetime (default one year)")
    jwt_cmd.add_argument("--output", "-o", metavar="FILE",
                         help="write the token to FILE, readable by its owner only (mode 0600), "
                              "instead of printing it")
    _add_admin_location(jwt_cmd, suppress=True)
    delete = resource_cmds.add_parser("delete", help="delete a resource (drops its agents)")
    delete.add_argument("resource_id", metavar="ID")
    _add_admin_location(delete, suppress=True)

    agents = commands.add_parser("agents", help="agent instances: their identities and revocation")
    _add_admin_location(agents, suppress=True)  # global options before or after the subcommand
    agent_cmds = agents.add_subparsers(dest="action", metavar="ACTION")
    agent_cmds.required = True
    alist = agent_cmds.add_parser(
        "list", help="agent instances: customer, certificate scope, serial, expiry, revoked, linked now",
        description="Every agent instance the relays know: by the client certificates their CA issued at "
                    "enrolment, by a revocation, or by a live link (IDENTITY 'token': linked with a "
                    "registration JWT only).")
    alist.add_argument("--customer", "--customer-id", dest="customer", metavar="ID", help="this customer's only")
    _add_output(alist)
    _add_admin_location(alist, suppress=True)
    revoke = agent_cmds.add_parser(
        "revoke", help="revoke an agent instance: its certificates, its renewal and its links everywhere",
        description="Revoke an agent instance: its certificates are revoked, its links (by certificate or by "
                    "token) dropped on every relay of the cluster within seconds, and it gets no new "
                    "certificate and no link under that instance again. The registration JWT stays valid: "
                    "other agents (new instances) still enrol with it; rotate it too "
                    "('resources registration-jwt --rotate') if it may have been copied.")
    revoke.add_argument("instance", metavar="INSTANCE", help="the agent instance ('agents list' shows them)")
    revoke.add_argument("--customer", "--customer-id", dest="customer", metavar="ID",
                        help="the customer of the instance (needed when several customers have one of that name)")
    revoke.add_argument("--reason", metavar="TEXT", help="recorded with the revocation (agents list shows it)")
    _add_output(revoke)
    _add_admin_location(revoke, suppress=True)

    cluster = commands.add_parser("cluster", help="the relays sharing this relay's state database")
    _add_admin_location(cluster, suppress=True)  # global options before or after the subcommand
    cluster_cmds = cluster.add_subparsers(dest="action", metavar="ACTION")
    cluster_cmds.required = True
    status = cluster_cmds.add_parser("status", help="the relays, and which relay holds each agent link")
    _add_output(status)
    _add_admin_location(status, suppress=True)
    return parser


# --------------------------------------------------------------------------- output


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else escape(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    print(json_text(value))


def json_text(value: Any) -> str:
    """Indented JSON; any script printed as is, every non-printable character as a ``\\u``
    escape (``json`` leaves C1 controls, bidi overrides and the like raw)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable() or c == "\n":
            out.append(c)
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            high, low = divmod(ord(c) - 0x10000, 0x400)
            out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}")
    return "".join(out)


def _print_customers(customers: list[dict], output: str) -> None:
    if output == "json":
        _print_json(customers)
        return
    print(_table(("ID", "NAME", "CREATED"), [(c.get("id"), c.get("name"), c.get("created_at")) for c in customers]))


def _print_resources(resources: list[dict], output: str, extended: bool) -> None:
    if output == "json":
        _print_json(resources)
        return
    print(_table(
        ("ID", "NAME", "CUSTOMER", "STATUS", "ENDPOINT", "AGENTS", "TARGET"),
        [(r.get("id"), r.get("name"), r.get("customer_id"), r.get("status"), r.get("endpoint"), r.get("agents"),
          _target_cell(r)) for r in resources],
    ))
    if not extended:
        return
    rows = []
    for r in resources:
        for a in r.get("agents_detail") or []:
            rows.append((
                r.get("id"), a.get("agent_id"), a.get("instance"), _identity_cell(a), a.get("transport"),
                a.get("address"), a.get("version"), a.get("hostname"), a.get("connected_since"), a.get("bytes_sent"),
                a.get("bytes_received"), a.get("active_streams"), _target_cell(a), a.get("relay_id"),
            ))
    print()
    print(_table(
        ("RESOURCE", "AGENT", "INSTANCE", "IDENTITY", "TRANSPORT", "ADDRESS", "VERSION", "HOSTNAME",
         "CONNECTED SINCE", "BYTES SENT", "BYTES RECEIVED", "STREAMS", "TARGET", "RELAY"),
        rows,
    ))


def _identity_cell(agent: dict) -> str:
    """How a link authenticated: ``token``, or ``cert SERIAL until EXPIRY``."""
    if agent.get("cert_serial"):
        return f"cert {agent['cert_serial']} until {agent.get('cert_expires_at')}"
    return agent.get("identity") or "token"


def _print_agents(agents: list[dict], output: str) -> None:
    if output == "json":
        _print_json(agents)
        return
    print(_table(
        ("INSTANCE", "CUSTOMER", "IDENTITY", "SCOPE", "SERIAL", "EXPIRES", "REVOKED", "LINKED"),
        [(a.get("instance"), a.get("customer_id"), a.get("identity"),
          "customer" if a.get("scope") == "customer" else ",".join(a.get("resource_ids") or []) or "-",
          a.get("serial") or "-", a.get("expires_at") or "-",
          f"{a.get('revoked_at')} ({a.get('revoked_reason')})" if a.get("revoked") else "no",
          f"yes ({a.get('links')})" if a.get("linked") else "no") for a in agents],
    ))


def _target_cell(entry: dict) -> str:
    """The TARGET column: whether the private service answers the agent(s), and why not."""
    status = entry.get("target_status")
    if not status:
        return ""
    error = entry.get("target_error")
    return f"{status}: {error}" if error else status


def _print_cluster(status: dict, output: str) -> None:
    if output == "json":
        _print_json(status)
        return
    database = status.get("database") or {}
    print(escape(f"relay {status.get('relay_id')} ({status.get('advertise_url')}), "
          f"state database {database.get('url')} ({database.get('backend')})"))
    print()
    print(_table(
        ("RELAY", "ADVERTISE URL", "PEER ADDRESS", "VERSION", "STARTED", "HEARTBEAT AGE", "LINKS", "STATE", ""),
        [(r.get("id"), r.get("advertise_url"), r.get("peer_address") or "-", r.get("version"), r.get("started_at"),
          f"{r.get('heartbeat_age')} s", r.get("links"), "draining" if r.get("draining") else "unreachable" if r.get("unreachable") else "serving",
          "(this relay)" if r.get("self") else "") for r in status.get("relays") or []],
    ))
    print()
    print(_table(
        ("AGENT", "INSTANCE", "SLOT", "EPOCH", "RELAY", "CUSTOMER", "RESOURCES", "TRANSPORT", "ADDRESS",
         "CONNECTED SINCE"),
        [(link.get("agent_id"), link.get("agent_instance"), link.get("slot"), link.get("epoch"), link.get("relay_id"),
          link.get("customer_id"), ",".join(link.get("resources") or []), link.get("transport"), link.get("address"),
          link.get("connected_since")) for link in status.get("links") or []],
    ))


# --------------------------------------------------------------------------- commands


def _state_dir(args: argparse.Namespace) -> str:
    return args.state_dir or _env("RELAY_STATE_DIR", DEFAULT_STATE_DIR)


def _client(args: argparse.Namespace):
    return AdminClient.discover(
        _state_dir(args),
        admin_url=args.admin_url or _env("RELAY_ADMIN_URL"),
        token=_env("RELAY_ADMIN_TOKEN"),
        ca_file=getattr(args, "admin_ca_file", None) or _env("RELAY_ADMIN_CA_FILE"),
    )


def _run_admin(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.command == "agents":
        if args.action == "list":
            _print_agents(client.list_agents(args.customer), args.output)
            return 0
        revoked = client.revoke_agent(args.instance, args.customer, args.reason)
        if args.output == "json":
            _print_json(revoked)
        else:
            print(escape(f"revoked agent instance {revoked.get('instance')} of customer {revoked.get('customer_id')} "
                         f"({revoked.get('certificates')} certificate(s)); its links are dropped on every relay"))
        return 0
    if args.command == "cluster":
        _print_cluster(client.cluster_status(), args.output)
        return 0
    if args.command == "customers":
        if args.action == "create":
            customer = client.create_customer(args.name)
            print(customer["id"])
        else:
            _print_customers(client.list_customers(), args.output)
        return 0
    if args.action == "list":
        _print_resources(client.list_resources(args.extended), args.output, args.extended)
    elif args.action == "create":
        resource = client.create_resource(args.customer_id, args.name, args.port, args.allow)
        if args.output == "json":
            _print_json(resource)
        else:
            print(f"{resource.get('id')} {resource.get('endpoint')}")
    elif args.action == "update":
        resource = client.update_resource(args.resource_id, args.allow)
        if args.output == "json":
            _print_json(resource)
        else:
            print(escape(f"{resource.get('id')} allow {','.join(resource.get('effective_allow') or ['any source'])}"
                         + ("" if resource.get("allow") else " (relay default)")))
    elif args.action == "registration-jwt":
        if args.rotate and not args.resource_id:
            raise CliError("--rotate needs --resource-id (and --customer-id)")
        token = client.registration_jwt(
            args.customer_id,
            org_only=args.org_only,
            resource_id=args.resource_id,
            rotate=args.rotate,
            ttl_seconds=args.ttl,
        )
        if args.output:
            _write_secret(args.output, token + "\n")
            print(f"registration JWT written to {escape(args.output)} (mode 0600)", file=sys.stderr)
        else:
            print(token)
    elif args.action == "delete":
        client.delete_resource(args.resource_id)
        print(f"deleted {args.resource_id}")
    return 0


def _write_secret(path: str, text: str) -> None:
    """``text`` into ``path`` with mode 0600, also when the file was already there with another."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)


def configure_logging(log_format: str = "plain", level: str = "info") -> None:
    """The project's logging set-up: plain or JSON lines, secrets redacted."""
    logs.configure(log_format, level.upper())


#: The systemd credential (LoadCredential=database-url:FILE) that holds the database URL.
DATABASE_CREDENTIAL = "database-url"


def _database_url(option: str | None) -> str | None:
    """``--database``, else ``RELAY_DATABASE_URL``, else the file ``RELAY_DATABASE_URL_FILE``
    names, else the systemd credential ``database-url`` (in ``$CREDENTIALS_DIRECTORY``; empty:
    none); refuses what the relay cannot use."""
    url = option or _env("RELAY_DATABASE_URL")
    if not url and _env("RELAY_DATABASE_URL_FILE"):
        path = _env("RELAY_DATABASE_URL_FILE")
        try:
            with open(path, encoding="utf-8") as f:
                url = f.read().strip()
        except OSError as exc:
            raise CliError(f"cannot read RELAY_DATABASE_URL_FILE {path}: {exc.strerror or exc}") from None
        if not url:
            raise CliError(f"RELAY_DATABASE_URL_FILE {path} is empty")
    if not url and _env("CREDENTIALS_DIRECTORY"):
        try:
            with open(os.path.join(_env("CREDENTIALS_DIRECTORY"), DATABASE_CREDENTIAL), encoding="utf-8") as f:
                url = f.read().strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CliError(f"cannot read the systemd credential {DATABASE_CREDENTIAL}: {exc.strerror or exc}") from None
    if not url:
        return None
    if not is_postgres_url(url) and not url.startswith("sqlite:///"):
        raise CliError(f"unsupported database URL {redact_url(url)!r}: expected postgresql://USER@HOST:PORT/DBNAME")
    if option and redact_url(option) != option:
        logging.getLogger("relay").warning(
            "the --database URL carries a password, which process listings show: put it in RELAY_DATABASE_URL, "
            "PGPASSWORD or ~/.pgpass instead")
    return url


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.strip().partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not 0 < int(low) <= int(high) <= 65535:
        raise ValueError(f"bad port range {text!r}: expected LOW-HIGH, e.g. 20000-29999")
    return int(low), int(high)


def _run_serve(args: argparse.Namespace) -> int:
    args.state_dir = _state_dir(args)
    try:
        args.listen_addr = parse_host_port(args.listen, 8443)
        args.admin_listen_addr = parse_host_port(args.admin_listen, 8442)
        args.metrics_listen_addr = parse_host_port(args.metrics_listen) if args.metrics_listen else None
        args.peer_listen_addr = parse_host_port(args.peer_listen, 0) if args.peer_listen else None
        args.peer_advertise_host = args.peer_advertise.strip("[]") if args.peer_advertise else None
        args.port_range = _port_range(args.port_range)
        if args.service_allow:
            args.service_allow = parse_cidrs(args.service_allow)
        if not 60 <= args.agent_cert_ttl <= 30 * 24 * 3600:
            raise ValueError("--agent-cert-ttl must be 60 to 2592000 seconds")
        if args.drain_timeout < 0:
            raise ValueError("--drain-timeout must be zero or more seconds")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if bool(args.cert) != bool(args.key):
        raise CliError("--cert and --key must be given together")
    if args.advertise:
        try:
            args.advertise = check_advertise_url(args.advertise)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    names = list(args.server_name or [])
    env_names = _env("RELAY_SERVER_NAME")
    if env_names:
        names += [n.strip() for n in env_names.split(",") if n.strip()]
    args.server_name = names[0] if names else None
    args.server_names = names
    configure_logging(args.log_format, args.log_level)
    args.database = _database_url(args.database)
    try:
        # Only here: the server (uvloop, aioquic, the carriers, the store) would add about 1 s
        # to every admin command (python -X importtime on a loaded 2-core machine).
        from relay.serve import serve_main
    except ImportError as exc:
        raise CliError(f"the relay server is not available: {exc}") from None
    result = serve_main(args)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _run_serve(args)
        return _run_admin(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: not an error worth a traceback.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        if isinstance(exc, (AdminError, CliError)):
            message = str(exc)
        elif isinstance(exc, (ValueError, OSError)):
            message = str(exc) or exc.__class__.__name__
        else:
            # A crash of the server is worth its traceback in the log; admin commands stay terse.
            logging.getLogger("relay").log(
                logging.ERROR if args.command == "serve" else logging.DEBUG, "unexpected error", exc_info=True
            )
            message = f"unexpected error: {exc.__class__.__name__}: {exc}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
