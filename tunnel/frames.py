"""The frame codec in use: the compiled ``tunnel._frames`` when it is built, else the
pure-Python twin. Set ``TUNNEL_PURE_PYTHON=1`` to force the twin (debugging, tests)."""

import os

if os.environ.get("TUNNEL_PURE_PYTHON", "") not in ("", "0"):
    from ._frames_py import *  # noqa: F401,F403
    from ._frames_py import HELLO_SIZE, IMPLEMENTATION  # noqa: F401
else:
    try:
        from ._frames import *  # noqa: F401,F403
        from ._frames import HELLO_SIZE, IMPLEMENTATION  # noqa: F401
    except ImportError:  # not built: fall back to the twin
        from ._frames_py import *  # noqa: F401,F403
        from ._frames_py import HELLO_SIZE, IMPLEMENTATION  # noqa: F401
