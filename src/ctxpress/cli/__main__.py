"""``python -m ctxpress.cli``: the same as the ``ctxpress`` script."""

import sys

from .main import main

sys.exit(main())
