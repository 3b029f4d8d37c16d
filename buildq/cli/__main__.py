"""``python -m buildq.cli``: the same as the ``buildq`` command."""

import sys

from buildq.cli import main

sys.exit(main())
