"""Run the router: configuration, logging, signals, the loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from router.daemon import Router


def run_dir_for(cfg: object) -> str:
    """Unix sockets live beside the data directory: var/run for var/data."""
    data_dir = cfg.runtime.data_dir  # type: ignore[attr-defined]
    return os.path.join(os.path.dirname(os.path.abspath(data_dir)), "run")


async def serve(cfg: object) -> int:
    loop = asyncio.get_running_loop()
    router = Router(cfg, loop, run_dir_for(cfg))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, router.stopping.set)
    await router.start()
    try:
        await router.stopping.wait()
    finally:
        await router.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    # the router sits above the shard package's configuration: it reads the same file
    from shards.config import ConfigError, load_config
    from shards.worker import die_with_parent

    parser = argparse.ArgumentParser(prog="python -m router", description="Run shoal's router.")
    parser.add_argument("--config", help="TOML config file (default: $SHOAL_CONFIG or embedded defaults)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"shoal router: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    if cfg.runtime.loop == "uvloop":
        import uvloop
        return uvloop.run(serve(cfg))
    return asyncio.run(serve(cfg))
