"""Client of the relay's admin API (stdlib urllib only), used by ``tunnel-relay`` commands.

Where the API is: ``--admin-url`` / ``RELAY_ADMIN_URL``, else ``<state-dir>/admin.json``.
The token: ``RELAY_ADMIN_TOKEN``, else ``<state-dir>/admin-token``. An ``https://`` API (the
relay serves it so beyond loopback) is verified with the given CA file, else
``<state-dir>/ca.pem`` when it exists, else the system's trust store. Errors are
:class:`AdminError` with a one-line message that never contains the token.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from relay import ADMIN_INFO_FILE, ADMIN_TOKEN_FILE, CA_FILE

DEFAULT_TIMEOUT = 15.0


class AdminError(Exception):
    """A one-line, user-facing error (relay not running, API error, bad configuration)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401, ANN001
        return None  # never forward the bearer token elsewhere


def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    handlers = [urllib.request.ProxyHandler({}), _NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def tls_context(state_dir: str | os.PathLike | None, ca_file: str | None = None) -> ssl.SSLContext:
    """The context that verifies an ``https://`` admin API (see the module docstring)."""
    if not ca_file and state_dir is not None and (Path(state_dir) / CA_FILE).exists():
        ca_file = str(Path(state_dir) / CA_FILE)
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise AdminError(f"cannot load the admin CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def discover(
    state_dir: str | os.PathLike | None,
    admin_url: str | None = None,
    token: str | None = None,
) -> tuple[str, str]:
    """``(url, token)`` from the explicit values, then the state directory's files."""
    directory = Path(state_dir) if state_dir is not None else None
    if not admin_url:
        if directory is None:
            raise AdminError("no admin URL: give --admin-url (RELAY_ADMIN_URL) or --state-dir")
        info_path = directory / ADMIN_INFO_FILE
        if not directory.is_dir():
            raise AdminError(
                f"no relay state directory {state_dir} ({directory.resolve()}): run the command where the relay "
                "keeps its state, or give it with --state-dir DIR (RELAY_STATE_DIR; the directory of "
                "`tunnel-relay serve --state-dir`), or give --admin-url with RELAY_ADMIN_TOKEN")
        try:
            info = json.loads(info_path.read_text("utf-8"))
            admin_url = info["url"]
        except FileNotFoundError:
            raise AdminError(
                f"the relay is not running (no {info_path}); start it with `tunnel-relay serve`"
                " or give --admin-url"
            ) from None
        except PermissionError:
            raise AdminError(f"cannot read {info_path}: permission denied") from None
        except (ValueError, KeyError, TypeError, OSError):
            raise AdminError(f"cannot read the admin URL from {info_path}") from None
    if not token:
        if directory is None:
            raise AdminError("no admin token: set RELAY_ADMIN_TOKEN or give --state-dir")
        token_path = directory / ADMIN_TOKEN_FILE
        try:
            token = token_path.read_text("ascii").strip()
        except FileNotFoundError:
            raise AdminError(f"no admin token: {token_path} does not exist; set RELAY_ADMIN_TOKEN") from None
        except PermissionError:
            raise AdminError(f"cannot read {token_path}: permission denied") from None
        except (OSError, UnicodeDecodeError):
            raise AdminError(f"cannot read the admin token from {token_path}") from None
        if not token:
            raise AdminError(f"the admin token file {token_path} is empty")
    parsed = urllib.parse.urlsplit(admin_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise AdminError(f"bad admin URL {admin_url!r}: expected http://host:port or https://host:port")
    return admin_url.rstrip("/"), token


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = DEFAULT_TIMEOUT,
                 context: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout
        if context is None and self.url.startswith("https://"):
            context = tls_context(None)
        self._opener = _opener(context)

    @classmethod
    def discover(
        cls,
        state_dir: str | os.PathLike | None,
        admin_url: str | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: str | None = None,
    ) -> "AdminClient":
        url, token = discover(state_dir, admin_url, token)
        context = tls_context(state_dir, ca_file) if url.startswith("https://") else None
        return cls(url, token, timeout, context)

    def __repr__(self) -> str:  # never show the token
        return f"AdminClient({self.url!r})"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise AdminError(self._http_error_message(exc)) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise AdminError(
                    f"the relay admin API at {self.url} failed TLS verification ({reason.verify_message}); "
                    "give the relay's CA with --admin-ca-file or RELAY_ADMIN_CA_FILE (default <state-dir>/ca.pem)"
                ) from None
            if isinstance(reason, ConnectionRefusedError):
                raise AdminError(
                    f"the relay is not running (connection refused at {self.url})"
                ) from None
            text = getattr(reason, "strerror", None) or str(reason)
            raise AdminError(f"cannot reach the relay admin API at {self.url}: {text}") from None
        except TimeoutError:
            raise AdminError(f"the relay admin API at {self.url} did not answer in {self.timeout:g} s") from None
        except (OSError, ValueError) as exc:
            raise AdminError(f"cannot reach the relay admin API at {self.url}: {exc.__class__.__name__}") from None
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            raise AdminError(f"the relay admin API at {self.url} sent a malformed answer") from None

    @staticmethod
    def _http_error_message(exc: urllib.error.HTTPError) -> str:
        message = None
        try:
            payload = json.loads(exc.read(64 * 1024))
            if isinstance(payload, dict):
                message = payload.get("message") or payload.get("error")
        except (ValueError, OSError):
            pass
        if exc.code == 401:
            return "the relay refused the admin token (HTTP 401); check RELAY_ADMIN_TOKEN or --state-dir"
        return f"the relay answered HTTP {exc.code}: {message or exc.reason}"

    # ---- endpoints

    def health(self) -> dict:
        return self.request("GET", "/v1/health")

    def list_customers(self) -> list[dict]:
        return self.request("GET", "/v1/customers")

    def create_customer(self, name: str) -> dict:
        return self.request("POST", "/v1/customers", {"name": name})

    def create_resource(self, customer_id: str, name: str, port: int | None = None,
                        allow: str | list[str] | None = None) -> dict:
        body: dict[str, Any] = {"customer_id": customer_id, "name": name}
        if port is not None:
            body["port"] = port
        if allow is not None:
            body["allow"] = allow
        return self.request("POST", "/v1/resources", body)

    def update_resource(self, resource_id: str, allow: str | list[str] | None) -> dict:
        """Set who may reach the resource's endpoint (None or ``"default"``: the relay default)."""
        return self.request("PATCH", f"/v1/resources/{urllib.parse.quote(resource_id, safe='')}", {"allow": allow})

    def list_resources(self, extended: bool = False) -> list[dict]:
        return self.request("GET", "/v1/resources" + ("?extended=1" if extended else ""))

    def registration_jwt(
        self,
        customer_id: str | None = None,
        *,
        org_only: bool = False,
        resource_id: str | None = None,
        rotate: bool = False,
        ttl_seconds: int | None = None,
    ) -> str:
        body: dict[str, Any] = {}
        if customer_id is not None:
            body["customer_id"] = customer_id
        if org_only:
            body["org_only"] = True
        if resource_id is not None:
            body["resource_id"] = resource_id
        if rotate:
            body["rotate"] = True
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        answer = self.request("POST", "/v1/registration-jwt", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("jwt"), str):
            raise AdminError("the relay admin API sent a malformed answer")
        return answer["jwt"]

    def cluster_status(self) -> dict:
        return self.request("GET", "/v1/cluster")

    def delete_resource(self, resource_id: str) -> dict:
        return self.request("DELETE", "/v1/resources/" + urllib.parse.quote(resource_id, safe=""))

    def list_agents(self, customer_id: str | None = None) -> list[dict]:
        query = "?customer_id=" + urllib.parse.quote(customer_id, safe="") if customer_id else ""
        return self.request("GET", "/v1/agents" + query)

    def revoke_agent(self, instance: str, customer_id: str | None = None, reason: str | None = None) -> dict:
        body: dict[str, Any] = {}
        if customer_id is not None:
            body["customer_id"] = customer_id
        if reason is not None:
            body["reason"] = reason
        return self.request("POST", f"/v1/agents/{urllib.parse.quote(instance, safe='')}/revoke", body)
