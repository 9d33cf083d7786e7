"""relay.control.admin: the admin API over a real loopback socket, with a fake data-plane registry."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import stat

import pytest
from relay_fakes import fake_agent

from relay.control.admin import start_admin_server
from relay.state.relay_state import ORG_CUSTOMER_ID
from relay.control.tokens import check_against_state
from tunnel.wire.errors import AuthError


class Api:
    def __init__(self, server) -> None:
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def request(self, method: str, path: str, body=None, *, token: str | None = "default", headers=None,
                raw: bytes | None = None):
        all_headers = dict(headers or {})
        if token == "default":
            token = self.server.token
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=all_headers)
        response = self.conn.getresponse()
        payload = response.read()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, (json.loads(payload) if payload else None), response

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def api(admin_server):
    client = Api(admin_server)
    yield client
    client.close()


def alloc(taken):
    port = 24000
    while port in taken:
        port += 1
    return port


def make_resource(server, customer_id: str, name: str = "db") -> dict:
    return server.call(server.state.get_or_create_resource, customer_id, name, alloc)


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --------------------------------------------------------------------------- files, auth


def test_admin_files(admin_server):
    info = admin_server.state_dir / "admin.json"
    assert json.loads(info.read_text()) == {"url": admin_server.url}
    assert stat.S_IMODE(os.stat(info).st_mode) == 0o600
    token_file = admin_server.state_dir / "admin-token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert token_file.read_text().strip() == admin_server.token
    assert len(admin_server.token) >= 43


def test_health_needs_no_token(api):
    status, body, _ = api.request("GET", "/v1/health", token=None)
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.parametrize("path", ["/v1/customers", "/v1/resources"])
def test_token_required(api, path):
    for token in (None, "wrong", "", api.server.token + "x", api.server.token[:-1]):
        status, body, response = api.request("GET", path, token=token)
        assert status == 401
        assert body["error"] == "unauthorized"
        assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
    status, body, _ = api.request("GET", path, token=None, headers={"Authorization": "Basic " + api.server.token})
    assert status == 401
    status, _, _ = api.request("GET", path, token=None, headers={"Authorization": "bearer " + api.server.token})
    assert status == 200


def test_unauthenticated_post_changes_nothing(api):
    status, _, _ = api.request("POST", "/v1/customers", {"name": "x"}, token="wrong")
    assert status == 401
    assert api.server.call(api.server.state.list_customers) == []


# --------------------------------------------------------------------------- customers


def test_customers(api):
    status, body, _ = api.request("GET", "/v1/customers")
    assert (status, body) == (200, [])
    status, created, _ = api.request("POST", "/v1/customers", {"name": "Acme"})
    assert status == 201
    assert set(created) == {"id", "name", "created_at"} and created["name"] == "Acme"
    assert created["id"].startswith("cus_")
    status, body, _ = api.request("GET", "/v1/customers")
    assert (status, body) == (200, [created])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "JSON object body is required"),
        (b'{"name": 5}', "must be a string"),
        (b'{"name": ""}', "must not be empty"),
        (b"{}", "must be a string"),
        (b'{"name": "a", "extra": 1}', "unknown field"),
        ("{\"name\": \"\\u0000\"}".encode(), "control characters"),
    ],
)
def test_bad_customer_bodies(api, raw, message):
    status, body, _ = api.request("POST", "/v1/customers", raw=raw, headers={"Content-Type": "application/json"})
    assert status == 400
    assert body["error"] == "bad_request" and message in body["message"]


# --------------------------------------------------------------------------- resources


def test_resources_status_endpoint_and_agents(api):
    server = api.server
    customer = server.call(server.state.create_customer, "acme")
    db = make_resource(server, customer["id"], "db")
    status, body, _ = api.request("GET", "/v1/resources")
    assert status == 200
    assert body == [{
        "id": db["id"],
        "name": "db",
        "customer_id": customer["id"],
        "status": "UNAVAILABLE",
        "endpoint": f"127.0.0.1:{db['port']}",
        "agents": 0,
        "target_status": "UNKNOWN",
        "target_error": None,
        "allow": None,
        "effective_allow": None,
    }]
    server.registry.agents[db["id"]] = [fake_agent("agt_1"), fake_agent("agt_2", transport="quic")]
    status, body, _ = api.request("GET", "/v1/resources")
    assert body[0]["status"] == "AVAILABLE" and body[0]["agents"] == 2
    assert "agents_detail" not in body[0]
    for query in ("?extended=1", "?extended=true", "?extended"):
        status, body, _ = api.request("GET", "/v1/resources" + query)
        assert status == 200
        detail = body[0]["agents_detail"]
        assert [a["agent_id"] for a in detail] == ["agt_1", "agt_2"]
        assert set(detail[0]) >= {"agent_id", "transport", "address", "version", "hostname",
                                  "connected_since", "bytes_sent", "bytes_received", "active_streams"}
    status, body, _ = api.request("GET", "/v1/resources?extended=0")
    assert "agents_detail" not in body[0]


def test_ipv6_service_host_endpoint(api):
    server = api.server
    server.registry.service_host = "::1"
    customer = server.call(server.state.create_customer, "acme")
    db = make_resource(server, customer["id"])
    _, body, _ = api.request("GET", "/v1/resources")
    assert body[0]["endpoint"] == f"[::1]:{db['port']}"


def test_delete_resource(api):
    server = api.server
    customer = server.call(server.state.create_customer, "acme")
    db = make_resource(server, customer["id"])
    status, body, _ = api.request("DELETE", f"/v1/resources/{db['id']}")
    assert status == 200 and body == {"id": db["id"], "deleted": True}
    assert server.registry.deleted == [db["id"]]
    assert server.call(server.state.get_resource, db["id"]) is None
    status, body, _ = api.request("DELETE", f"/v1/resources/{db['id']}")
    assert status == 404 and body["error"] == "not_found"
    assert server.registry.deleted == [db["id"]]


# --------------------------------------------------------------------------- registration JWTs


def test_registration_jwt_for_a_customer(api):
    server = api.server
    customer = server.call(server.state.create_customer, "acme")
    status, body, _ = api.request("POST", "/v1/registration-jwt", {"customer_id": customer["id"]})
    assert status == 200 and set(body) == {"jwt"}
    claims = server.authority.verify(body["jwt"])
    assert claims.customer_id == customer["id"] and claims.resource_id is None and not claims.org_only
    tokens = server.call(server.state.list_tokens)
    assert [t["jti"] for t in tokens] == [claims.jti]


def test_registration_jwt_ttl(api):
    server = api.server
    customer = server.call(server.state.create_customer, "acme")
    _, body, _ = api.request("POST", "/v1/registration-jwt", {"customer_id": customer["id"], "ttl_seconds": 120})
    claims = server.authority.verify(body["jwt"])
    assert claims.expires_at - claims.issued_at == 120
    for bad in (0, -5, "60", True, 10**12):
        status, body, _ = api.request("POST", "/v1/registration-jwt", {"customer_id": customer["id"], "ttl_seconds": bad})
        assert status == 400, bad


def test_registration_jwt_org_only(api):
    server = api.server
    status, body, _ = api.request("POST", "/v1/registration-jwt", {"org_only": True})
    assert status == 200
    claims = server.authority.verify(body["jwt"])
    assert claims.customer_id == ORG_CUSTOMER_ID and claims.org_only
    resource = server.call(check_against_state, claims, server.state, "sample", alloc)
    assert resource["customer_id"] == ORG_CUSTOMER_ID


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({}, 400),
        ({"customer_id": "cus_aaaaaaaaaaaaaaaa"}, 404),
        ({"customer_id": 5}, 400),
        ({"org_only": "yes"}, 400),
        ({"org_only": True, "customer_id": "cus_aaaaaaaaaaaaaaaa"}, 400),
        ({"rotate": True, "org_only": True}, 400),
        ({"unknown": 1, "org_only": True}, 400),
    ],
)
def test_registration_jwt_bad_requests(api, payload, status):
    got, body, _ = api.request("POST", "/v1/registration-jwt", payload)
    assert got == status and "message" in body


def test_registration_jwt_resource_must_belong_to_the_customer(api):
    server = api.server
    acme = server.call(server.state.create_customer, "acme")
    evil = server.call(server.state.create_customer, "evil")
    db = make_resource(server, acme["id"])
    status, body, _ = api.request("POST", "/v1/registration-jwt", {"customer_id": evil["id"], "resource_id": db["id"]})
    assert status == 400 and "does not belong" in body["message"]
    status, _, _ = api.request("POST", "/v1/registration-jwt", {"customer_id": acme["id"], "resource_id": "res_aaaaaaaaaaaaaaaa"})
    assert status == 404
    status, _, _ = api.request("POST", "/v1/registration-jwt",
                               {"customer_id": evil["id"], "resource_id": db["id"], "rotate": True})
    assert status == 400
    assert server.call(server.state.get_resource, db["id"])["generation"] == 0
    assert server.registry.dropped == []


def test_rotate(api):
    server = api.server
    acme = server.call(server.state.create_customer, "acme")
    db = make_resource(server, acme["id"])
    _, old, _ = api.request("POST", "/v1/registration-jwt", {"customer_id": acme["id"], "resource_id": db["id"]})
    old_claims = server.authority.verify(old["jwt"])
    assert (old_claims.resource_id, old_claims.generation) == (db["id"], 0)
    server.registry.agents[db["id"]] = [fake_agent("agt_old", generation=0)]

    status, new, _ = api.request("POST", "/v1/registration-jwt",
                                 {"customer_id": acme["id"], "resource_id": db["id"], "rotate": True})
    assert status == 200
    new_claims = server.authority.verify(new["jwt"])
    assert (new_claims.resource_id, new_claims.generation) == (db["id"], 1)
    assert server.registry.dropped == [(db["id"], 1)]
    assert server.registry.agents[db["id"]] == []
    with pytest.raises(AuthError, match="revoked"):
        server.call(check_against_state, old_claims, server.state, "db", alloc)
    assert server.call(check_against_state, new_claims, server.state, "db", alloc)["id"] == db["id"]


# --------------------------------------------------------------------------- HTTP strictness


def test_unknown_path_and_method(api):
    status, body, _ = api.request("GET", "/v1/nothing")
    assert status == 404 and body["error"] == "not_found"
    status, body, _ = api.request("GET", "/v1/resources/../customers")
    assert status == 404
    status, body, response = api.request("DELETE", "/v1/customers")
    assert status == 405 and body["error"] == "method_not_allowed"
    assert set(response.getheader("Allow").split(", ")) == {"GET", "POST"}
    status, body, response = api.request("PUT", "/v1/health", token=None)
    assert status == 405


def test_keep_alive_serves_many_requests_on_one_connection(api):
    for _ in range(5):
        status, _, response = api.request("GET", "/v1/customers")
        assert status == 200 and response.getheader("Connection") == "keep-alive"
    sock = api.conn.sock
    status, _, _ = api.request("GET", "/v1/health")
    assert api.conn.sock is sock


def test_connection_close_is_honoured(admin_server):
    response = raw_exchange(admin_server.port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200 and b"Connection: close" in response
    response = raw_exchange(admin_server.port, b"GET /v1/health HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v1/health HTTP/2.0\r\n\r\n", 505),
        (b"GET /v1/health FTP/1.0\r\n\r\n", 400),
        (b"GET v1/health HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/health HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET /v1/health HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"POST /v1/customers HTTP/1.1\r\nAUTH\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /v1/customers HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nAUTH\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nAUTH\r\nContent-Length: 2000000\r\n\r\n", 413),
        (b"GET /v1/health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_requests(admin_server, request_bytes, status):
    auth = b"Authorization: Bearer " + admin_server.token.encode()
    response = raw_exchange(admin_server.port, request_bytes.replace(b"AUTH", auth))
    assert status_of(response) == status
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert "error" in json.loads(body)


def test_no_body_is_read_without_the_token(admin_server):
    response = raw_exchange(admin_server.port, b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n")
    assert status_of(response) == 401
    assert b"Connection: close" in response


def test_error_without_body_keeps_the_connection(api):
    status, _, response = api.request("GET", "/v1/customers", token="wrong")
    assert status == 401 and response.getheader("Connection") == "keep-alive"
    status, _, _ = api.request("GET", "/v1/customers")
    assert status == 200


def test_truncated_body_is_not_processed(admin_server):
    # The client promises more than it sends, then half-closes: nothing is created.
    with socket.create_connection(("127.0.0.1", admin_server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + admin_server.token.encode()
            + b"\r\nContent-Length: 100\r\n\r\n{\"name\": \"x\"}"
        )
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    assert admin_server.call(admin_server.state.list_customers) == []


def test_refuses_non_loopback_host_unless_forced_and_tls(tmp_path, admin_server):
    from relay.state import pki

    server = admin_server
    keys = pki.ensure_pki(tmp_path / "pki")
    context = pki.server_ssl_context(keys.cert_file, keys.key_file)

    async def attempt(host, **kwargs):
        srv = await start_admin_server(host, 0, state=server.state, authority=server.authority,
                                       registry=server.registry, token="t", state_dir=tmp_path, **kwargs)
        srv.close()
        await srv.wait_closed()
        return json.loads((tmp_path / "admin.json").read_text())["url"]

    with pytest.raises(ValueError, match="non-loopback"):
        asyncio.run(attempt("0.0.0.0"))
    with pytest.raises(ValueError, match="non-loopback"):
        asyncio.run(attempt("192.0.2.1"))
    with pytest.raises(ValueError, match="TLS only"):
        asyncio.run(attempt("0.0.0.0", allow_remote=True))
    assert asyncio.run(attempt("0.0.0.0", allow_remote=True, ssl_context=context)).startswith("https://127.0.0.1:")
    assert asyncio.run(attempt("localhost")).startswith("http://")


def test_clear_admin_info(tmp_path):
    from relay.control.admin import clear_admin_info

    info = tmp_path / "admin.json"
    info.write_text(json.dumps({"url": "http://127.0.0.1:1"}))
    clear_admin_info(tmp_path, "http://127.0.0.1:2")
    assert info.exists()
    clear_admin_info(tmp_path, "http://127.0.0.1:1")
    assert not info.exists()
    clear_admin_info(tmp_path)


# --------------------------------------------------------------------------- the agents' view, names, ports


def test_target_status_of_a_resource_follows_its_agents(api):
    server = api.server
    customer = server.call(server.state.create_customer, "acme")
    db = make_resource(server, customer["id"], "db")
    down = fake_agent("agt_1", target_status="UNREACHABLE", target_error="connection refused: nothing listens")
    server.registry.agents[db["id"]] = [down]
    _, body, _ = api.request("GET", "/v1/resources")
    assert (body[0]["target_status"], body[0]["target_error"]) == ("UNREACHABLE", "connection refused: nothing listens")
    server.registry.agents[db["id"]] = [down, fake_agent("agt_2", target_status="REACHABLE")]
    _, body, _ = api.request("GET", "/v1/resources?extended=1")
    assert (body[0]["target_status"], body[0]["target_error"]) == ("REACHABLE", None)
    assert [a["target_status"] for a in body[0]["agents_detail"]] == ["UNREACHABLE", "REACHABLE"]
    server.registry.agents[db["id"]] = [fake_agent("agt_3")]  # said nothing yet
    _, body, _ = api.request("GET", "/v1/resources")
    assert body[0]["target_status"] == "UNKNOWN"


def test_ten_concurrent_creates_through_the_api_make_one_customer(admin_server):
    import concurrent.futures

    def create(name):
        client = Api(admin_server)
        try:
            status, body, _ = client.request("POST", "/v1/customers", {"name": name})
            return status, body
        finally:
            client.close()

    names = ["acme"] * 4 + ["\u0430cme", "acm\uff45", "ACME", "a\u0441me", " acme", "\uff41cme"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(create, names))
    made = [body for status, body in results if status == 201]
    assert len(made) == 1, results
    assert sorted(status for status, _ in results) == [201] + [409] * 9
    assert all(made[0]["id"] in body["message"] for status, body in results if status == 409)


def test_customer_names_are_unique_ignoring_case(api):
    status, first, _ = api.request("POST", "/v1/customers", {"name": "Acme"})
    assert status == 201
    for name in ("Acme", "acme", " ACME "):
        status, body, _ = api.request("POST", "/v1/customers", {"name": name})
        assert status == 409 and body["error"] == "conflict", body
        assert first["id"] in body["message"] and "use its id" in body["message"]
    status, customers, _ = api.request("GET", "/v1/customers")
    assert [c["name"] for c in customers] == ["Acme"]


def test_create_a_resource_on_a_fixed_port_or_from_the_range(api):
    server = api.server
    customer = server.call(server.state.create_customer, "acme")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        fixed = probe.getsockname()[1]
    server.registry.port_range = (fixed, fixed)
    status, body, _ = api.request("POST", "/v1/resources", {"customer_id": customer["id"], "name": "db",
                                                            "port": fixed + 1})
    assert status == 400 and f"outside the relay's --port-range {fixed}-{fixed}" in body["message"], body
    server.registry.port_range = (1024, 65535)
    status, created, _ = api.request("POST", "/v1/resources", {"customer_id": customer["id"], "name": "db",
                                                                "port": fixed})
    assert status == 201, created
    assert created["endpoint"] == f"127.0.0.1:{fixed}" and created["status"] == "UNAVAILABLE"
    assert server.call(server.state.get_resource, created["id"])["port"] == fixed
    server.registry.port_range = (28000, 28009)
    status, ranged, _ = api.request("POST", "/v1/resources", {"customer_id": customer["id"], "name": "api"})
    assert status == 201 and 28000 <= int(ranged["endpoint"].rsplit(":", 1)[1]) <= 28009
    server.registry.port_range = (1024, 65535)
    # Conflicts: the name, a port another resource has, a port something else holds.
    for payload, fragment in (({"name": "db"}, "has a resource 'db' already"),
                              ({"name": "db2", "port": fixed}, "endpoint of another resource")):
        status, body, _ = api.request("POST", "/v1/resources", {"customer_id": customer["id"], **payload})
        assert status == 409 and fragment in body["message"], body
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        status, body, _ = api.request("POST", "/v1/resources", {"customer_id": customer["id"], "name": "db3",
                                                                 "port": busy.getsockname()[1]})
        assert status == 409 and "cannot be bound" in body["message"]
    for payload, status_code in (({"customer_id": "cus_nope", "name": "x"}, 404),
                                 ({"customer_id": customer["id"], "name": "bad name"}, 400),
                                 ({"customer_id": customer["id"], "name": "x", "port": 70000}, 400),
                                 ({"customer_id": customer["id"]}, 400)):
        status, body, _ = api.request("POST", "/v1/resources", payload)
        assert status == status_code, (payload, body)


# --------------------------------------------------------------------------- smuggling, slow clients


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a stream of responses (each with Content-Length) into (status, body) pairs."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        out.append((status_of(head), rest[:length]))
        data = rest[length:]
    return out


def test_pipelined_requests_are_answered_in_order(admin_server):
    auth = b"Authorization: Bearer " + admin_server.token.encode() + b"\r\n"
    body = b'{"name": "piped"}'
    answers = _responses(raw_exchange(
        admin_server.port,
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"POST /v1/customers HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: %d\r\n\r\n" % len(body) + body
        + b"GET /v1/customers HTTP/1.1\r\nHost: x\r\n" + auth + b"Connection: close\r\n\r\n"))
    assert [status for status, _ in answers] == [200, 201, 200]
    assert [c["name"] for c in json.loads(answers[2][1])] == ["piped"]


@pytest.mark.parametrize("framing", [
    # Both framings: a front end that honours Content-Length and one that honours chunked
    # would see different requests.
    b"Content-Length: 60\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 60\r\n",
    # Two different lengths.
    b"Content-Length: 5\r\nContent-Length: 60\r\n",
    b"Content-Length: 5, 60\r\n",
])
def test_conflicting_body_framing_is_refused(admin_server, framing):
    auth = b"Authorization: Bearer " + admin_server.token.encode() + b"\r\n"
    smuggled = b"POST /v1/customers HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 17\r\n\r\n{\"name\": \"evil\"}"
    response = raw_exchange(
        admin_server.port,
        b"POST /v1/customers HTTP/1.1\r\nHost: x\r\n" + auth + framing + b"\r\n0\r\n\r\n" + smuggled)
    answers = _responses(response)
    assert [status for status, _ in answers] == [400]
    assert b"Connection: close" in response
    assert admin_server.call(admin_server.state.list_customers) == []


def test_a_body_never_reads_as_a_request(admin_server):
    # A GET with a body that holds a request: one answer, and the body is not served.
    auth = b"Authorization: Bearer " + admin_server.token.encode() + b"\r\n"
    inner = b"DELETE /v1/resources/abc HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    response = raw_exchange(
        admin_server.port,
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(inner)
        + inner)
    assert [status for status, _ in _responses(response)] == [200]


def test_header_flood_is_refused(admin_server):
    flood = b"".join(b"X-%d: v\r\n" % i for i in range(4000))  # small headers, 40 KB in all
    response = raw_exchange(admin_server.port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + flood + b"\r\n")
    assert status_of(response) == 431 and b"Connection: close" in response


def test_a_trickled_head_does_not_renew_its_deadline(admin_server, monkeypatch):
    import dataclasses

    import relay.control.admin as admin_module

    monkeypatch.setattr(admin_module, "HTTP_LIMITS", dataclasses.replace(admin_module.HTTP_LIMITS, head_timeout=0.5))

    async def main():
        server = await start_admin_server("127.0.0.1", 0, state=admin_server.state, authority=admin_server.authority,
                                          registry=admin_server.registry, token="t",
                                          state_dir=admin_server.state.state_dir)
        try:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            started = loop.time()
            closed = asyncio.ensure_future(reader.read())
            # One byte every 50 ms, for up to 50 s: the deadline counts from the connection.
            for byte in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                if closed.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.wait([closed], timeout=0.05)
            assert closed.done() and closed.result() == b""
            assert loop.time() - started < 5
            writer.close()
        finally:
            server.close()

    admin_server.call(main)
