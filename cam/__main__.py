"""``python -m cam``: see :mod:`cam.cli`."""

import sys

from .cli import main

sys.exit(main())
