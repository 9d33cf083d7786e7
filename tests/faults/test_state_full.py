"""A state directory that refuses writes (disk full) gives one clear error, "state directory
full", logged once per interval: never a generic 500 with a traceback per request. Reads go
on, and writes work again once there is room.

The real thing where the test may mount: a relay whose state directory is a small tmpfs the
test fills up. Always: the relay's admin API and registration in process, on a database that
SQLite itself finds full (``PRAGMA max_page_count``: the same SQLITE_FULL a full disk gives).
About 5 s."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess

import pytest

from relay.control.admin import AdminApi, HttpError
from relay.control.admin_client import AdminClient, AdminError
from relay.state.cluster import Cluster
from relay.data.registry import Registry
from relay.control.server import AgentLinkHandler, Relay
from relay.state.relay_state import RelayState, StateWriteFailed
from relay.control.tokens import TokenAuthority
from tests.faults.faultkit import FAST, register
from tests.faults.test_registration_race import ADMIN_TOKEN, RecordingLink, _admin
from tests.helpers.processes import Relay as RelayProcess
from tunnel.core.limits import Limits

FULL = "state directory full"


def _fill(directory) -> int:
    """Write a file until the filesystem is full; its size."""
    written = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        try:
            while True:
                written += f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


async def _fill_database(state: RelayState) -> None:
    """Fill every page of the customers and resources tables (and their indexes): with
    ``max_page_count`` at the page count, any further row makes SQLite answer SQLITE_FULL."""
    import itertools

    customer = (await state.create_customer("filler"))["id"]
    ports = itertools.count(30000)
    n = itertools.count()
    pages = await state.db.fetchval("PRAGMA page_count")
    await state.db.execute(f"PRAGMA max_page_count = {pages + 8}")
    for size in (180, 90, 40, 16, 4, 1):
        for write in (lambda: state.create_customer(f"{next(n)}" + "x" * size),  # names are unique
                      lambda: state.get_or_create_resource(customer, f"{next(n)}" + "r" * size,
                                                           lambda taken: next(ports))):
            while True:
                try:
                    await write()
                except StateWriteFailed as exc:
                    assert "full" in str(exc), exc
                    break


def test_full_state_directory_on_a_real_relay(tmp_path):
    mount = tmp_path / "relay-state"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (the in-process test below covers the same path)")
    relay = RelayProcess(tmp_path)
    try:
        relay.start(**FAST)
        customer = relay.create_customer("before")
        token = relay.jwt("--customer-id", customer)
        api = AdminClient.discover(relay.state_dir)
        _fill(mount)
        errors = []
        for i in range(20):
            try:
                api.create_customer(f"while-full-{i}")
            except AdminError as exc:
                errors.append(str(exc))
        assert errors and all("HTTP 503" in e and FULL in e for e in errors), errors
        assert [c["name"] for c in api.list_customers()][0] == "before"  # reads go on
        _, rec = asyncio.run(register(relay, token, ["new-resource"]))
        error = rec.first("error")
        assert error and error["code"] == "unavailable" and FULL in error["message"], rec.messages
        (mount / "filler").unlink()
        assert api.create_customer("after")["name"] == "after"
        log = relay.proc.log()
        print([line for line in log.splitlines() if FULL in line])
        assert log.count(FULL) == 1, "logged once per interval"
        assert "Traceback" not in log and relay.proc.alive()
    finally:
        relay.stop()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_database_in_process(tmp_path, caplog):
    async def scenario():
        state = await RelayState.open(tmp_path)
        authority = TokenAuthority(tmp_path)
        registry = Registry("127.0.0.1")
        cluster = Cluster(state, registry, "wss://127.0.0.1:8443")
        await cluster.start()
        api = AdminApi(state=state, authority=authority, registry=registry, token=ADMIN_TOKEN, cluster=cluster)
        customer = (await state.create_customer("acme"))["id"]
        token = authority.issue(customer)
        caplog.set_level(logging.INFO)
        await _fill_database(state)  # SQLite's own SQLITE_FULL, as on a full disk
        answers = []
        for i in range(20):
            try:
                answers.append(await _admin(api, "POST", "/v1/customers", {"name": f"c{i:03d}" + "x" * 150}))
            except HttpError as exc:
                answers.append((exc.status, exc.code, exc.message))
        relay = Relay(state, authority, registry, Limits(), cluster=cluster)
        link = RecordingLink()
        handler = AgentLinkHandler(relay, link)
        for _ in range(3):
            handler._authenticating = False
            handler.control_received({"type": "auth", "token": token, "resources": [{"name": "n" * 120}]})
            await asyncio.gather(*relay.tasks)
        await cluster.stop()
        await state.close()
        registry.close()
        return answers, link

    answers, link = asyncio.run(scenario())
    refused = [a for a in answers if a[0] == 503]
    assert refused and all(a[1] == "state_write_failed" and a[2].startswith(FULL) for a in refused), answers
    assert link.sent and all(m["code"] == "unavailable" and FULL in m["message"] for m in link.sent), link.sent
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in errors if FULL in r.getMessage()]) == 2, caplog.text  # the API's, the relay's
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
