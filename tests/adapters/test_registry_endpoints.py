"""relay.registry: an endpoint is bound once however many ask at once (a registration and the
``resource_created`` event of the same resource race on every relay of a cluster)."""

from __future__ import annotations

import asyncio
import socket

from relay.registry import Registry


def test_concurrent_binds_of_one_resource_share_one_endpoint(run, cleanup):
    async def go():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        registry = Registry("127.0.0.1")
        cleanup.append(registry.close)
        resource = {"id": "res_a", "name": "db", "customer_id": "cus_a", "port": port}
        first, second, third = await asyncio.gather(*(registry.ensure_endpoint(resource) for _ in range(3)))
        assert first is second is third is registry.endpoints["res_a"]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens

    run(go())
