"""A network namespace a test makes for itself, joined to the host by a veth pair, so that the
test can filter packets (iptables inside the namespace) without touching the host's rules.

::

    with Namespace() as ns:          # host side ns.host_ip, namespace side ns.ns_ip (a /30)
        relay = Relay(tmp_path, host=ns.ns_ip, command_prefix=ns.exec_prefix)
        ns.iptables("-I", "INPUT", "-p", "udp", "--dport", "8443", "-j", "DROP")

Needs root and ``ip``; :func:`available` says whether this machine allows it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("iptables") is not None


class Namespace:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(1000):03d}"
        self.name = f"tnl{tag}"
        self.host_if, self.ns_if = f"tnh{tag}", f"tnn{tag}"
        # A /30 in 10.250.0.0/16 that no other test of this run picks (by pid and chance).
        block = random.randrange(16384)
        base = f"10.250.{block // 64}.{(block % 64) * 4}"
        prefix, last = base.rsplit(".", 1)
        self.host_ip = f"{prefix}.{int(last) + 1}"
        self.ns_ip = f"{prefix}.{int(last) + 2}"
        self.exec_prefix = ["ip", "netns", "exec", self.name]
        self._made = False

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)

    def __enter__(self) -> "Namespace":
        self._ip("netns", "add", self.name)
        self._made = True
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self.run("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self.run("ip", "link", "set", self.ns_if, "up")
        self.run("ip", "link", "set", "lo", "up")
        return self

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the namespace; raise on failure."""
        return subprocess.run([*self.exec_prefix, *cmd], check=True, timeout=30, capture_output=True)

    def iptables(self, *args: str) -> None:
        self.run("iptables", *args)

    def __exit__(self, *exc) -> None:
        if self._made:
            # Deleting the namespace deletes its end of the pair, and with it the host's end.
            subprocess.run(["ip", "netns", "del", self.name], timeout=30, capture_output=True)
            subprocess.run(["ip", "link", "del", self.host_if], timeout=30, capture_output=True)
