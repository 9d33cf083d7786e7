"""The pending-handshake table both carriers use (tunnel.carriers.handshakes)."""

from tunnel.carriers.handshakes import PendingHandshakes


def test_slots_fill_and_free():
    table = PendingHandshakes(limit=2)
    table.admit("a", "10.0.0.1", now=0.0)
    assert not table.full
    table.admit("b", "10.0.0.2", now=0.0)
    assert table.full and len(table) == 2 and "a" in table
    assert table.forget("a") and not table.forget("a")
    assert not table.full and "a" not in table


def test_victim_is_the_oldest_of_the_busiest_source():
    table = PendingHandshakes(limit=4, evictable_after=1.0)
    table.admit("agent", "10.0.0.9", now=0.0)
    for i, t in enumerate((0.5, 0.6, 0.7)):
        table.admit(f"idle{i}", "192.0.2.1", now=t)
    assert table.pick_victim(now=1.55) == "idle0"
    assert "idle0" not in table and table.evicted == 1
    # The busiest source's oldest is now 0.6 s old at 1.55: too young, even though the lone
    # handshake from another source is older.
    assert table.pick_victim(now=1.55) is None
    assert table.pick_victim(now=1.65) == "idle1"


def test_young_handshakes_are_never_evicted():
    table = PendingHandshakes(limit=1, evictable_after=1.0)
    table.admit("a", "h", now=10.0)
    assert table.pick_victim(now=10.99) is None
    assert "a" in table and table.evicted == 0
    assert PendingHandshakes(limit=1).pick_victim(now=0.0) is None
