"""A relay that obeys the protocol but not the operator: built from the project's own WSS
carrier and session, it accepts a real agent process, answers its ``auth`` with
``registered`` for every name, and then lets the test drive the link (open streams, write
as much as the agent's credit allows). Used to hold the agent to its announced bounds."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from relay.state import pki
from tests.helpers.processes import free_port
from tunnel.carriers.base import LinkHandler, StreamHandler
from tunnel.carriers.wss import serve_wss
from tunnel.core.limits import Limits


class _Handler(LinkHandler):
    def __init__(self, relay: "HostileRelay", link) -> None:
        self.relay = relay
        self.link = link

    def control_received(self, message: dict) -> None:
        if message.get("type") == "auth":
            self.relay.auths.append(message)
        if message.get("type") != "auth" or (self.relay.link is not None and not self.relay.drain_every_auth):
            return
        names = [r.get("name") for r in message.get("resources", [])]
        self.link.send_control({"type": "registered", "agent_id": "agt_hostile", "resources": [
            {"name": n, "id": f"res_{i}", "endpoint": "-"} for i, n in enumerate(names)]})
        self.link.handshake_done()
        self.relay.link = self.link
        self.relay.answered += 1
        self.relay.registered.set()
        if self.relay.drain_every_auth:
            # Move elsewhere, to a relay nobody knows; this link is never closed from here.
            self.link.send_control({"type": "draining", "relay_id": "rly_nowhere", "message": "go away"})


class HostileRelay:
    """``async with HostileRelay(workdir) as relay``: listening on ``relay.url`` with its own CA
    in ``relay.ca_file``; ``await relay.wait_agent()`` returns the agent's link."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", drain_every_auth: bool = False) -> None:
        self.workdir = Path(workdir)
        self.host = host
        #: Answer every ``auth`` with ``registered`` and then ``draining`` (not only the first).
        self.drain_every_auth = drain_every_auth
        self.port = free_port()
        self.url = f"wss://{host}:{self.port}"
        self.link = None
        #: Every ``auth`` received (tokens included), from any link.
        self.auths: list[dict] = []
        #: ``auth`` messages answered with ``registered``.
        self.answered = 0
        self.registered = asyncio.Event()
        self.ca_file = ""
        self._server = None

    async def __aenter__(self) -> "HostileRelay":
        keys = pki.ensure_pki(self.workdir / "hostile-pki", ["127.0.0.1", self.host])
        self.ca_file = keys.ca_file
        context = pki.server_ssl_context(keys.cert_file, keys.key_file)
        self._server = await serve_wss(self.host, self.port, ssl_context=context, limits=Limits(),
                                       on_link=lambda link: link.set_handler(_Handler(self, link)))
        return self

    async def __aexit__(self, *exc) -> None:
        if self.link is not None:
            self.link.close()
        self._server.close()

    async def wait_agent(self, timeout: float = 30.0):
        await asyncio.wait_for(self.registered.wait(), timeout)
        return self.link

    def open(self, name: str):
        return self.link.open_stream(name.encode(), StreamHandler())

    @property
    def starved(self) -> bool:
        """Data is queued but the agent grants no credit for it: it took all it will take."""
        session = self.link.session
        return session.send_buffered_total > 0 and not session.has_data_to_send


class StalledService:
    """Accepts every connection and never reads (small receive buffers, so the kernel takes
    little of what the agent writes)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted sockets
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


class UnreachableService:
    """A port whose accept queue is full: every further connect hangs in SYN_SENT (the kernel
    drops SYNs to a full queue), so the agent's dials stay in progress."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):  # the queue holds backlog + 1; more to be sure
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for s in [*self.fillers, self.sock]:
            s.close()


class DiscardService:
    """Reads and drops everything, fast."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 20):
                    self.received += len(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
