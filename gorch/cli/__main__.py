"""``python -m gorch.cli``: the ``gorch`` command."""

import sys

from gorch.cli import main

sys.exit(main())
