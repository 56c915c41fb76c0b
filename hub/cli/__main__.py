"""``python -m hub.cli``: the same as ``presence-hub``."""

import sys

from hub.cli import main

sys.exit(main())
