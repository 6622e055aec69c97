"""``python -m router``: the control plane of one host (see router/daemon.py)."""

import sys

from router.main import main

sys.exit(main())
