"""Run the router: configuration, logging, signals, the loop."""

from __future__ import annotations

import argparse
import asyncio
import signal

from router.daemon import Router
from shards.config import Config
from shards.process import boot, run, run_dir_for


async def serve(cfg: Config) -> int:
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
    parser = argparse.ArgumentParser(prog="python -m router", description="Run shoal's router.")
    parser.add_argument("--config", help="TOML config file (default: $SHOAL_CONFIG or embedded defaults)")
    args = parser.parse_args(argv)
    cfg = boot("shoal router", args.config)
    if cfg is None:
        return 2
    return run(cfg, serve(cfg))
