"""Peers and helpers of the end-to-end benchmark harness (``bench/e2e.py``).

- :mod:`bench.peers.procs`: process registry (process groups, cleanup on exit and Ctrl-C),
  free loopback ports, readiness checks, RSS / CPU sampling from ``/proc``.
- :mod:`bench.peers.services`: the private services (echo, iperf3 server, nginx);
  :mod:`bench.peers.serve`: the one command line of the echo and bulk services.
- :mod:`bench.peers.cpucap`: a process held to a fraction of a core (cgroup CPU quota).
- :mod:`bench.peers.sshd`: a private sshd and ``ssh -R`` clients.
- :mod:`bench.peers.ours`: our relay and agents, driven through the CLI contract.
- :mod:`bench.peers.clients`: the load clients (round trips, connection rate, 1,000 streams,
  iperf3, wrk).

Everything here talks to loopback (or to a namespace of :mod:`bench.wan` when told to), and
every load loop is bounded in count and time.
"""
