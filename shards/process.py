"""What every shoal process does at start: configuration, logging, limits, its loop.

Shared by ``python -m shards`` and ``python -m router`` so both read the same
configuration the same way and die with supervisord.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from shards.config import Config, ConfigError, load_config

log = logging.getLogger("shoal.process")

PR_SET_PDEATHSIG = 1


def boot(prog: str, config_path: str | None) -> Config | None:
    """Load the configuration (None after printing why it is invalid), set up logging,
    tie the process to its parent and raise its descriptor limit."""
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None
    logging.basicConfig(level=cfg.log.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    raise_fd_limit()
    return cfg


def run(cfg: Config, coro: Coroutine[Any, Any, int]) -> int:
    """Run the process's main coroutine on the configured event loop."""
    if cfg.runtime.loop == "uvloop":
        import uvloop
        return uvloop.run(coro)
    return asyncio.run(coro)


def run_dir_for(cfg: Config) -> str:
    """Unix sockets live beside the data directory: var/run for var/data."""
    return os.path.join(os.path.dirname(os.path.abspath(cfg.runtime.data_dir)), "run")


def raise_fd_limit() -> None:
    """Every connection is a file descriptor: use the hard limit, which needs no privilege."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as err:
        log.warning("could not raise the open-file limit: %s", err)


def die_with_parent() -> None:
    """A shard never outlives a SIGKILLed supervisord (FACTS: it would keep the port)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
