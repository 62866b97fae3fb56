"""``python -m serving.cli``: the ``serving`` command without the console script."""

import sys

from serving.cli import main

sys.exit(main())
