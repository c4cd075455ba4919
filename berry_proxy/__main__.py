"""``python -m berry_proxy``: the same as the ``berry-proxy`` console script."""

import sys

from .cli import main

sys.exit(main())
