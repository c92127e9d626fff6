"""``python -m fedpeft.tools.cli``: the ``fedpeft`` command, run by this Python."""

import sys

from fedpeft.tools.cli import main

sys.exit(main())
