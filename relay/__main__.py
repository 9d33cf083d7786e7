"""``python -m relay`` is ``tunnel-relay``."""

import sys

from relay.cli import main

sys.exit(main())
