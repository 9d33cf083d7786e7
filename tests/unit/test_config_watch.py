"""agent.config_watch.watch_config: a config file being written in place is never applied
half-written (a valid prefix would deregister the resources still to come); a change applies
once two checks in a row find the same file. Time is the watcher's ``sleep``, driven here."""

from __future__ import annotations

import asyncio

from agent import config as agent_config
from agent.config_watch import watch_config

HEAD = 'relay_url = "wss://127.0.0.1:8443"\nregistration_jwt_file = "{jwt}"\n'
RESOURCE = '[[resources]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'


class Stop(Exception):
    pass


def _watch(path, steps) -> list[list[str]]:
    """Run the watcher over ``steps`` (one per check: a callable run before it, or None) and
    return the resource names of every configuration it applied."""
    applied: list[list[str]] = []
    script = list(steps)

    async def sleep(_interval):
        if not script:
            raise Stop
        step = script.pop(0)
        if step is not None:
            step()

    def reload(why):
        config = agent_config.load({}, str(path))
        applied.append([t.name for t in config.targets])

    async def main():
        try:
            await watch_config(str(path), 1.0, reload, sleep=sleep)
        except Stop:
            pass

    asyncio.run(main())
    return applied


def test_a_file_written_in_place_is_applied_whole(tmp_path):
    jwt = tmp_path / "jwt"
    jwt.write_text("x.y.z\n")
    path = tmp_path / "agent.toml"
    head = HEAD.format(jwt=jwt)
    whole = head + RESOURCE.format(name="a", port=1) + RESOURCE.format(name="e", port=2)
    path.write_text(head + RESOURCE.format(name="a", port=1))

    def truncate_and_write_half():
        with open(path, "w") as f:  # in place, as an editor without rename does
            f.write(head + RESOURCE.format(name="a", port=1))  # valid TOML, resource e still to come
            f.write("\n")

    def write_the_rest():
        with open(path, "w") as f:
            f.write(whole)

    # One check sees the half file, the next the whole one: only the whole one applies.
    assert _watch(path, [None, truncate_and_write_half, write_the_rest, None, None]) == [["a", "e"]]


def test_a_file_renamed_into_place_applies_after_one_more_check(tmp_path):
    jwt = tmp_path / "jwt"
    jwt.write_text("x.y.z\n")
    path = tmp_path / "agent.toml"
    head = HEAD.format(jwt=jwt)
    path.write_text(head + RESOURCE.format(name="a", port=1))

    def rename_into_place():
        new = tmp_path / ".agent.toml.new"
        new.write_text(head + RESOURCE.format(name="b", port=3))
        new.replace(path)

    assert _watch(path, [rename_into_place, None]) == [["b"]]
    assert _watch(path, [None, None]) == []  # nothing changed: nothing applied
