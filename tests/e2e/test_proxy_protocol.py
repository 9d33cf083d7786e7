"""PROXY protocol v2 from the agent to the private service, with real processes: nginx
listening with ``proxy_protocol`` answers (and logs) the address PROXY v2 told it; the relay
carries the worker's address to the agent in the stream's OPEN metadata. A resource without
``proxy_protocol`` sends no header (nginx sees the agent's own address)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.helpers.cluster import aliases_work
from tests.helpers.nginx import NGINX, nginx_available
from tests.helpers.processes import PY, Proc, _env, free_port, recv_all

pytestmark = pytest.mark.skipif(not nginx_available(), reason="nginx is not installed")

CONF = """\
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    log_format pp '$proxy_protocol_addr:$proxy_protocol_port -> $proxy_protocol_server_addr:$proxy_protocol_server_port via $remote_addr';
    access_log {dir}/access.log pp;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{pp_port} proxy_protocol;
        location / {{ return 200 "worker $proxy_protocol_addr:$proxy_protocol_port\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{plain_port};
        location / {{ return 200 "peer $remote_addr\\n"; }}
    }}
}}
"""


@pytest.fixture
def nginx():
    directory = Path(tempfile.mkdtemp(prefix="tunnel-nginx-pp-"))
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / sub).mkdir()
    pp_port, plain_port = free_port(), free_port()
    conf = directory / "nginx.conf"
    conf.write_text(CONF.format(dir=directory, pp_port=pp_port, plain_port=plain_port))
    process = subprocess.Popen([NGINX, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log"),
                                "-g", "daemon off; master_process on;"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        assert process.poll() is None, (directory / "error.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", plain_port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(up, 20, "nginx to listen")
        yield pp_port, plain_port, directory
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def get(addr, source: str) -> bytes:
    with socket.create_connection(addr, timeout=20, source_address=(source, 0)) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        return recv_all(s)


def test_the_private_service_sees_the_worker_address(relay, nginx, tmp_path):
    pp_port, plain_port, directory = nginx
    customer = relay.create_customer("acme")
    (tmp_path / "agent.jwt").write_text(relay.jwt("--customer-id", customer) + "\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'relay_url = "{relay.url}"\nca_file = "{relay.ca_file}"\n'
                      f'registration_jwt_file = "{tmp_path / "agent.jwt"}"\n'
                      f'[[resources]]\nname = "web"\nhost = "127.0.0.1"\nport = {pp_port}\nproxy_protocol = 2\n'
                      f'[[resources]]\nname = "plain"\nhost = "127.0.0.1"\nport = {plain_port}\n')
    agent = Proc("agent", [PY, "-m", "agent", "--config", str(config)], _env(LOG_LEVEL="DEBUG"),
                 tmp_path / "agent.log").start()
    try:
        relay.wait_available(customer, "web")
        relay.wait_available(customer, "plain")
        source = "127.0.0.2" if aliases_work() else "127.0.0.1"
        web = relay.endpoint(customer, "web")
        with socket.create_connection(web, timeout=20, source_address=(source, 0)) as s:
            port = s.getsockname()[1]
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = recv_all(s)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(f"worker {source}:{port}\n".encode())
        logged = f"{source}:{port} -> 127.0.0.1:{web[1]} via 127.0.0.1"
        wait_until(lambda: logged in (directory / "access.log").read_text(), 10, "nginx's access log line")
        # Without proxy_protocol the service gets the bytes as they are, from the agent's address.
        assert get(relay.endpoint(customer, "plain"), source).endswith(b"peer 127.0.0.1\n")
        assert "Traceback" not in agent.log() + relay.proc.log()
    finally:
        agent.stop()


def test_a_bad_proxy_protocol_value_is_refused(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('relay_url = "wss://127.0.0.1:1"\n'
                      '[[resources]]\nname = "web"\nhost = "127.0.0.1"\nport = 80\nproxy_protocol = 1\n')
    out = subprocess.run([PY, "-m", "agent", "--config", str(config)], env=_env(REGISTRATION_JWT="a.b.c"),
                         capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "proxy_protocol" in out.stderr and "must be 2" in out.stderr


def test_the_worker_address_crosses_a_cluster(tmp_path, postgres_url, nginx):
    if not aliases_work():
        pytest.skip("127.0.0.2 is not a loopback address here")
    import shutil as _shutil

    from tests.helpers.processes import Relay

    pp_port, _, _ = nginx
    env = {"RELAY_DATABASE_URL": postgres_url, "RELAY_HEARTBEAT_INTERVAL": "1", "RELAY_MEMBER_TTL": "5"}
    first = Relay(tmp_path, host="127.0.0.1", state_dir=tmp_path / "first").start(**env)
    second = agent = None
    try:
        customer = first.create_customer("acme")
        (tmp_path / "agent.jwt").write_text(first.jwt("--customer-id", customer) + "\n")
        _shutil.copytree(first.state_dir, tmp_path / "second", ignore=_shutil.ignore_patterns("admin.json"))
        second = Relay(tmp_path, host="127.0.0.2", state_dir=tmp_path / "second").start(**env)
        config = tmp_path / "agent.toml"
        config.write_text(f'relay_url = "{first.url}"\nca_file = "{first.ca_file}"\n'
                          f'registration_jwt_file = "{tmp_path / "agent.jwt"}"\n'
                          f'[[resources]]\nname = "web"\nhost = "127.0.0.1"\nport = {pp_port}\nproxy_protocol = 2\n')
        agent = Proc("agent", [PY, "-m", "agent", "--config", str(config)], _env(RELAY_LINKS="1"),
                     tmp_path / "agent.log").start()
        first.wait_available(customer, "web")
        _, port = second.endpoint(customer, "web")

        def answer():
            try:
                return get(("127.0.0.2", port), "127.0.0.5")
            except OSError:
                return None

        # The second relay holds no agent: it forwards to the first, which passes the address on.
        got = wait_until(answer, 20, "the second relay's endpoint to answer")
        assert b"worker 127.0.0.5:" in got, got
    finally:
        for proc in (agent, second, first):
            if proc is not None:
                proc.stop()
