"""``python -m toyrlhf``: the same as the ``toyrlhf`` console script."""

import sys

from .cli import main

sys.exit(main())
