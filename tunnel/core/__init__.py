import tunnel

# The compiled per-message path of this package, unless TUNNEL_PURE_PYTHON (see tunnel/__init__.py).
__path__ = tunnel.search_path(__name__, __path__)
