"""``python -m shards``: run one shard (the whole broker while there is one shard)."""

import sys

from shards.worker import main

sys.exit(main())
