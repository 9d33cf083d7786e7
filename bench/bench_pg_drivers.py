"""psycopg 3 against asyncpg for the relay's shared state: what each costs and how each behaves.

Starts its own PostgreSQL (Debian's binaries, a fresh cluster in a temporary directory, as the
tests do) and measures, for each driver, under uvloop as the relay runs:

- RSS the driver adds to a relay process (the relay's own imports first, then the driver's
  import, then one open connection);
- round trip of the relay's typical queries: resource by id, rotate (UPDATE ... RETURNING +
  pg_notify in one transaction), agent link upsert + delete in one transaction;
- LISTEN/NOTIFY: latency from the notifier's commit to the listener's callback;
- the server going away: how an idle listener learns of it, how a query fails while it is
  down, and how long until a query works again after it returns (a reconnect per attempt,
  as the store does);
- the server hanging (SIGSTOP): whether a query gives up at the client-side timeout.

Run: ``python bench/bench_pg_drivers.py [--rounds N]`` (prints a Markdown table; the figures in
docs/CLUSTER.md come from it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.postgres import PostgresServer  # noqa: E402

RELAY_IMPORTS = ("import uvloop, tunnel.bridge.listen, relay.serve, relay.control.admin, relay.state.pki, relay.control.tokens")

RSS_PROBE = """
import sys, asyncio
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
{relay_imports}
base = rss()
driver = sys.argv[1]
url = sys.argv[2]
if driver == 'asyncpg':
    import asyncpg
else:
    import psycopg
imported = rss()
async def connect():
    if driver == 'asyncpg':
        c = await asyncpg.connect(url)
        await c.fetchval('SELECT 1')
        return c
    c = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await (await c.execute('SELECT 1')).fetchone()
    return c
loop = uvloop.new_event_loop()
conn = loop.run_until_complete(connect())
connected = rss()
print(f'{{base:.2f}} {{imported:.2f}} {{connected:.2f}}')
"""

SCHEMA = """
DROP TABLE IF EXISTS links; DROP TABLE IF EXISTS resources;
CREATE TABLE resources (id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, name TEXT NOT NULL,
    port INTEGER NOT NULL, generation INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE links (customer_id TEXT, agent_instance TEXT, slot INTEGER, epoch BIGINT, relay_id TEXT,
    PRIMARY KEY (customer_id, agent_instance, slot));
"""


def measure_rss(driver: str, url: str, runs: int = 3) -> tuple[float, float]:
    """(MB added by the import, MB added by import + one connection), best of ``runs``."""
    code = RSS_PROBE.format(relay_imports=RELAY_IMPORTS)
    imports, totals = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code, driver, url], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        base, imported, connected = map(float, out.stdout.split())
        imports.append(imported - base)
        totals.append(connected - base)
    return min(imports), min(totals)


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"{p50 * 1e6:.0f} / {p99 * 1e6:.0f}"


# --------------------------------------------------------------------------- drivers


class AsyncpgDriver:
    name = "asyncpg"

    def __init__(self, url: str) -> None:
        self.url = url

    async def connect(self):
        import asyncpg

        return await asyncpg.connect(self.url)

    async def get(self, c, rid):
        return await c.fetchrow("SELECT id, customer_id, name, port, generation, created_at FROM resources "
                                "WHERE id = $1", rid)

    async def rotate(self, c, rid):
        async with c.transaction():
            gen = await c.fetchval("UPDATE resources SET generation = generation + 1 WHERE id = $1 "
                                   "RETURNING generation", rid)
            await c.execute("SELECT pg_notify('bench', $1)", json.dumps({"r": rid, "g": gen}))
        return gen

    async def link(self, c, i):
        async with c.transaction():
            await c.execute("INSERT INTO links VALUES ($1, $2, 0, $3, 'r') ON CONFLICT (customer_id, "
                            "agent_instance, slot) DO UPDATE SET epoch = excluded.epoch "
                            "WHERE links.epoch < excluded.epoch", "c", f"i{i}", i)
        async with c.transaction():
            await c.execute("DELETE FROM links WHERE customer_id = $1 AND agent_instance = $2 AND slot = 0 "
                            "AND epoch = $3", "c", f"i{i}", i)

    async def listen(self, c, callback):
        await c.add_listener("bench", lambda *args: callback(args[3]))

    async def notify(self, c, payload):
        await c.execute("SELECT pg_notify('bench', $1)", payload)

    def on_lost(self, c, callback):
        c.add_termination_listener(lambda conn: callback())

    async def query_with_timeout(self, c, timeout):
        return await c.fetchval("SELECT 1", timeout=timeout)

    async def close(self, c):
        c.terminate()


class PsycopgDriver:
    name = "psycopg"

    def __init__(self, url: str) -> None:
        self.url = url
        self._tasks = []

    async def connect(self):
        import psycopg

        return await psycopg.AsyncConnection.connect(self.url, autocommit=True)

    async def get(self, c, rid):
        cur = await c.execute("SELECT id, customer_id, name, port, generation, created_at FROM resources "
                              "WHERE id = %s", (rid,))
        return await cur.fetchone()

    async def rotate(self, c, rid):
        async with c.transaction():
            cur = await c.execute("UPDATE resources SET generation = generation + 1 WHERE id = %s "
                                  "RETURNING generation", (rid,))
            gen = (await cur.fetchone())[0]
            await c.execute("SELECT pg_notify('bench', %s)", (json.dumps({"r": rid, "g": gen}),))
        return gen

    async def link(self, c, i):
        async with c.transaction():
            await c.execute("INSERT INTO links VALUES (%s, %s, 0, %s, 'r') ON CONFLICT (customer_id, "
                            "agent_instance, slot) DO UPDATE SET epoch = excluded.epoch "
                            "WHERE links.epoch < excluded.epoch", ("c", f"i{i}", i))
        async with c.transaction():
            await c.execute("DELETE FROM links WHERE customer_id = %s AND agent_instance = %s AND slot = 0 "
                            "AND epoch = %s", ("c", f"i{i}", i))

    async def listen(self, c, callback):
        await c.execute("LISTEN bench")

        async def pump():
            async for n in c.notifies():
                callback(n.payload)

        self._tasks.append(asyncio.get_running_loop().create_task(pump()))

    async def notify(self, c, payload):
        await c.execute("SELECT pg_notify('bench', %s)", (payload,))

    def on_lost(self, c, callback):
        # psycopg has no termination callback: the notifies() generator raises instead.
        task = self._tasks[-1]
        task.add_done_callback(lambda t: callback())

    async def query_with_timeout(self, c, timeout):
        cur = await asyncio.wait_for(c.execute("SELECT 1"), timeout)
        return (await cur.fetchone())[0]

    async def close(self, c):
        for task in self._tasks:
            task.cancel()
        await c.close()


# --------------------------------------------------------------------------- scenarios


async def round_trips(driver, rounds: int) -> dict:
    c = await driver.connect()
    admin = await driver.connect()
    for statement in SCHEMA.split(";"):
        if statement.strip():
            await (admin.execute(statement))
    rid = "res_abcdefghijklmnop"
    await admin.execute("INSERT INTO resources VALUES ('res_abcdefghijklmnop', 'cus_x', 'db', 20000, 0, 'now')")
    out = {}
    for label, op in (("get_resource", lambda i: driver.get(c, rid)),
                      ("rotate + notify", lambda i: driver.rotate(c, rid)),
                      ("link upsert + delete", lambda i: driver.link(c, i))):
        for i in range(50):
            await op(i)
        samples = []
        for i in range(rounds):
            t = time.perf_counter()
            await op(i + 100)
            samples.append(time.perf_counter() - t)
        out[label] = summary(samples)

    # LISTEN/NOTIFY latency: commit on one connection to callback on another.
    listener = await driver.connect()
    got: asyncio.Queue = asyncio.Queue()
    await driver.listen(listener, lambda payload: got.put_nowait((time.perf_counter(), payload)))
    samples = []
    for i in range(min(rounds, 500)):
        t = time.perf_counter()
        await driver.notify(c, str(i))
        arrived, payload = await asyncio.wait_for(got.get(), 5)
        assert payload == str(i)
        samples.append(arrived - t)
    out["notify -> listener"] = summary(samples)
    for conn in (c, admin, listener):
        await driver.close(conn)
    return out


async def outage(driver, server: PostgresServer) -> dict:
    out = {}
    c = await driver.connect()
    listener = await driver.connect()
    await driver.listen(listener, lambda payload: None)
    lost = asyncio.Event()
    driver.on_lost(listener, lost.set)
    t = time.perf_counter()
    await asyncio.to_thread(server.stop, "fast")
    stopped = time.perf_counter()
    try:
        await asyncio.wait_for(lost.wait(), 10)
        out["idle listener learns of a stop"] = f"yes, {(time.perf_counter() - stopped) * 1e3:.0f} ms after pg_ctl returned"
    except asyncio.TimeoutError:
        out["idle listener learns of a stop"] = "no (within 10 s)"
    del t
    t = time.perf_counter()
    try:
        await driver.query_with_timeout(c, 2.0)
        out["query while down"] = "succeeded?!"
    except Exception as exc:  # noqa: BLE001 - reporting what the driver raises
        out["query while down"] = f"{type(exc).__module__}.{type(exc).__name__} in {(time.perf_counter() - t) * 1e3:.1f} ms"
    t = time.perf_counter()
    try:
        await driver.connect()
    except Exception as exc:  # noqa: BLE001
        out["connect while down"] = f"{type(exc).__name__} in {(time.perf_counter() - t) * 1e3:.1f} ms"
    await asyncio.to_thread(server.start)
    started = time.perf_counter()
    while True:
        try:
            fresh = await driver.connect()
            await driver.query_with_timeout(fresh, 2.0)
            break
        except Exception:  # noqa: BLE001
            await asyncio.sleep(0.01)
    out["first query after restart"] = f"{(time.perf_counter() - started) * 1e3:.0f} ms (new connection)"

    # A hung server: SIGSTOP the postmaster's children and the postmaster.
    pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(server.postmaster_pid())], capture_output=True,
                                           text=True).stdout.split()] + [server.postmaster_pid()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    t = time.perf_counter()
    try:
        await driver.query_with_timeout(fresh, 1.0)
        out["query to a hung server, 1 s timeout"] = "answered?!"
    except Exception as exc:  # noqa: BLE001
        out["query to a hung server, 1 s timeout"] = f"{type(exc).__name__} after {(time.perf_counter() - t) * 1e3:.0f} ms"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    for conn in (fresh,):
        try:
            await asyncio.wait_for(driver.close(conn), 5)
        except Exception:  # noqa: BLE001
            pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    import uvloop

    server = PostgresServer().start()
    try:
        db = server.create_database("bench")
        url = server.url(db)
        results: dict[str, dict] = {}
        for cls in (AsyncpgDriver, PsycopgDriver):
            driver = cls(url)
            imported, connected = measure_rss(driver.name, url)
            row = {"RSS: import": f"{imported:.1f} MB", "RSS: import + 1 connection": f"{connected:.1f} MB"}
            row.update(uvloop.run(round_trips(driver, args.rounds)))
            row.update(uvloop.run(outage(driver, server)))
            results[driver.name] = row
    finally:
        server.destroy()
    load = os.getloadavg()[0]
    names = list(results)
    print(f"Round trips as p50 / p99 in µs over {args.rounds} rounds; load average {load:.2f}.\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in results[names[0]]:
        print(f"| {key} | " + " | ".join(results[n].get(key, "") for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
