"""An honest WAN path for benchmarks and tests: packets, not a proxy that ends TCP.

Two network namespaces joined through TUN devices by a small C forwarder that delays,
rate-limits (a token bucket in front of a bounded drop-tail queue) and drops packets, each
direction on its own. See :mod:`bench.wan.path` for the path and ``forwarder.c`` for the
forwarder; ``python -m bench.wan`` checks that a path delivers what it is asked to.

    from bench.wan import PathSpec, WanPath
    with WanPath(PathSpec.symmetric(rtt_ms=50, rate_mbit=1000, loss=0.01)) as path:
        ...  # run servers in path.ns_a / path.ns_b (netns.exec_argv, netns.call_in)
"""

from .netns import NetnsError, call_in, exec_argv
from .path import Direction, PathSpec, WanPath, WanUnavailable, build_forwarder, unavailable_reason

__all__ = ["Direction", "NetnsError", "PathSpec", "WanPath", "WanUnavailable", "build_forwarder",
           "call_in", "exec_argv", "unavailable_reason"]
