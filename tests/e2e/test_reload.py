"""SIGHUP (or a changed file, with ``TUNNEL_CONFIG_WATCH_INTERVAL``) re-reads the agent's config
file on its live link: added resources register, removed ones stop taking new streams and
finish the open ones, changed targets apply to new streams, unchanged resources and their
streams are not touched; a bad file is refused and the old configuration keeps running."""

from __future__ import annotations

import os
import signal

import socket

from tests.helpers.processes import PY, Proc, Relay, _env, connect, echoed, free_port, wait_until
from tests.helpers.prometheus import fetch


def _toml(relay_url: str, ca_file: str, jwt_file: str, resources: dict) -> str:
    lines = [f'relay_url = "{relay_url}"', f'ca_file = "{ca_file}"', f'registration_jwt_file = "{jwt_file}"']
    for name, port in resources.items():
        lines += ["[[resources]]", f'name = "{name}"', 'host = "127.0.0.1"', f"port = {port}"]
    return "\n".join(lines) + "\n"


def _write(path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _start(tmp_path, relay, customer, services, **env):
    jwt = tmp_path / "agent.jwt"
    jwt.write_text(relay.jwt("--customer-id", customer))
    config = tmp_path / "agent.toml"
    write = lambda resources: _write(config, _toml(f"wss://127.0.0.1:{relay.port}", relay.ca_file, str(jwt),
                                                   {n: services[s].port for n, s in resources.items()}))
    return config, write, jwt


def test_sighup_applies_a_new_config_without_touching_what_did_not_change(tmp_path, relay, service_factory):
    services = {k: service_factory("echo") for k in ("a", "b", "c1", "c2", "d")}
    customer = relay.create_customer("acme")
    config, write, _ = _start(tmp_path, relay, customer, services)
    write({"a": "a", "b": "b", "c": "c1"})
    # No idle check of the services: their connection counts are the streams' alone.
    agent = Proc("agent", [PY, "-m", "agent", "--config", str(config)],
                 _env(LOG_LEVEL="DEBUG", TUNNEL_TARGET_CHECK_INTERVAL="0"), tmp_path / "agent.log").start()
    try:
        for name in ("a", "b", "c"):
            relay.wait_available(customer, name)
        agent_ids = {a["agent_id"] for r in relay.resources(extended=True) for a in r["agents_detail"]}
        streams = {name: connect(relay.endpoint(customer, name)) for name in ("a", "b", "c")}
        for name, s in streams.items():
            assert echoed(s, f"{name} before".encode())
        assert services["c1"].connections == 1

        # Remove b, move c to another service, add d; a unchanged.
        write({"a": "a", "c": "c2", "d": "d"})
        agent.signal(signal.SIGHUP)
        relay.wait_available(customer, "d")
        wait_until(lambda: relay.resource(customer, "b")["agents"] == 0, 10, "b to be deregistered")
        log = agent.log()
        assert "SIGHUP: config file" in log and "added d; removed b (their open streams finish); targets changed " \
            f"for new streams c -> 127.0.0.1:{services['c2'].port}; unchanged a" in log
        # The open streams of a, b and c carry on where they were.
        for name, s in streams.items():
            assert echoed(s, f"{name} after the reload".encode()), f"the open stream of {name} broke"
        # New streams: c on its new service, b nowhere (no agent: held, then reset).
        with connect(relay.endpoint(customer, "c")) as s:
            assert echoed(s, b"new c")
        assert services["c1"].connections == 1 and services["c2"].connections == 1
        with connect(relay.endpoint(customer, "d")) as s:
            assert echoed(s, b"new d")
        # Nothing reconnected: the same agent, the same link.
        assert {a["agent_id"] for r in relay.resources(extended=True) for a in r["agents_detail"]} == agent_ids
        assert "disconnected" not in relay.proc.log()
        streams.pop("b").close()

        # A bad file is refused; the running configuration goes on.
        _write(config, "relay_url = \n[[resources]\n")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: "refused" in agent.log() and "still running the previous configuration" in agent.log(), 10,
                   "the refusal")
        assert "is not valid TOML" in agent.log()
        for name, s in streams.items():
            assert echoed(s, f"{name} after the bad file".encode())
        with connect(relay.endpoint(customer, "d")) as s:
            assert echoed(s, b"d still served")
        assert agent.alive()
        for s in streams.values():
            s.close()
    finally:
        assert agent.stop() == 0


def test_a_watched_config_file_applies_when_it_changes(tmp_path, relay, service_factory):
    services = {k: service_factory("echo") for k in ("a", "e")}
    customer = relay.create_customer("acme")
    config, write, _ = _start(tmp_path, relay, customer, services)
    write({"a": "a"})
    agent = Proc("agent", [PY, "-m", "agent", "--config", str(config)],
                 _env(TUNNEL_CONFIG_WATCH_INTERVAL="0.5"), tmp_path / "agent.log").start()
    try:
        relay.wait_available(customer, "a")
        write({"a": "a", "e": "e"})
        relay.wait_available(customer, "e", timeout=15)
        assert "agent.toml changed: config file" in agent.log()
    finally:
        assert agent.stop() == 0


def test_extended_listing_shows_each_resources_own_bytes(tmp_path, relay, service_factory):
    """One agent link serving two resources: ``resources list --extended`` shows on each row the
    bytes of that resource's streams (none for the idle one), the link's totals beside them."""
    services = {k: service_factory("echo") for k in ("busy", "idle")}
    customer = relay.create_customer("acme")
    config, write, _ = _start(tmp_path, relay, customer, services)
    write({"busy": "busy", "idle": "idle"})
    agent = Proc("agent", [PY, "-m", "agent", "--config", str(config)], _env(TUNNEL_TARGET_CHECK_INTERVAL="0"),
                 tmp_path / "agent.log").start()
    try:
        for name in ("busy", "idle"):
            relay.wait_available(customer, name)
        payload = b"x" * 100_000
        with connect(relay.endpoint(customer, "busy")) as s:
            assert echoed(s, payload)

        def rows():
            by_name = {r["name"]: r["agents_detail"][0] for r in relay.resources(extended=True)}
            return by_name if by_name["busy"]["bytes_received"] >= len(payload) else None

        rows = wait_until(rows, 10, "the busy resource's bytes")
        busy, idle = rows["busy"], rows["idle"]
        assert busy["bytes_sent"] >= len(payload) and busy["bytes_received"] >= len(payload)
        assert (idle["bytes_sent"], idle["bytes_received"]) == (0, 0)
        assert busy["link_bytes_received"] == idle["link_bytes_received"] >= busy["bytes_received"]
    finally:
        agent.stop()


def test_a_resource_removed_on_purpose_refuses_at_once(tmp_path, service_factory):
    """SIGHUP without a resource: a worker connecting to the resource its agent deregistered on
    purpose is reset at once with that reason (log and metrics), not held as in an outage (here
    the hold would last two minutes). After a graceful stop (a restart begins so) the hold
    stays: tests/e2e/test_outages.py."""
    metrics_port = free_port()
    relay = Relay(tmp_path).start(TUNNEL_ENDPOINT_HOLD_TIMEOUT="120",
                                  RELAY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    services = {k: service_factory("echo") for k in ("a", "b")}
    customer = relay.create_customer("acme")
    config, write, _ = _start(tmp_path, relay, customer, services)
    write({"a": "a", "b": "b"})
    agent = Proc("agent", [PY, "-m", "agent", "--config", str(config)], _env(TUNNEL_TARGET_CHECK_INTERVAL="0"),
                 tmp_path / "agent.log").start()
    try:
        for name in ("a", "b"):
            relay.wait_available(customer, name)
        write({"a": "a"})
        agent.signal(signal.SIGHUP)
        wait_until(lambda: relay.resource(customer, "b")["agents"] == 0, 10, "b to be deregistered")
        try:
            s = connect(relay.endpoint(customer, "b"))
        except ConnectionResetError:
            pass  # reset so soon that connect() saw it
        else:
            with s:
                s.settimeout(30)  # far below the hold: a held connection would time out here
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
                except socket.timeout:
                    raise AssertionError("the connection to b was held, not refused") from None
        with connect(relay.endpoint(customer, "a")) as s:
            assert echoed(s, b"a still served")
        log = relay.proc.log()
        assert "(b): its agents deregistered it (their config no longer has it)" in log
        assert "no agent came within" not in log
        _, body = fetch(f"http://127.0.0.1:{metrics_port}/metrics")
        refusals = [line for line in body.decode().splitlines()
                    if line.startswith("tunnel_relay_streams_refused_total") and 'reason="deregistered"' in line]
        assert sorted(line.rsplit(" ", 1)[1] for line in refusals) == ["0", "1"], refusals  # b's, a's
    finally:
        agent.stop()
        relay.stop()
