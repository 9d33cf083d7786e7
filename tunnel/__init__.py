"""Tunnel core: frame codec, sans-IO multiplexed session, carriers (TLS WebSocket, QUIC)."""

__version__ = "0.1.0"
