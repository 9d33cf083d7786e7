"""``python -m relay`` is ``tunnel-relay``."""

import sys

from .cli import main

sys.exit(main())
