"""The ``shoal`` command.

Each subcommand is registered by a function that adds its parser and sets
``handler``; adding ``shoal pub``/``sub``/``bench``/``user`` later means writing
one more ``register_*`` function and listing it in ``COMMANDS``. ``shoal bench`` hands its
arguments to ``bench.emqtt`` (imported only then). Heavy modules
(the broker's event loop, uvloop) are imported inside the handler that needs
them, so ``shoal config check`` stays fast and works where they are missing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shards.config import Config, ConfigError, example_toml, load_config, render_docs, to_toml

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_INVALID_CONFIG = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", default=None,
                        help="TOML configuration file (default: $SHOAL_CONFIG, else the "
                             "built-in defaults); SHOAL_<SECTION>__<KEY> variables override it")


# -- shoal broker --------------------------------------------------------------------------


def _run_broker(args: argparse.Namespace) -> int:
    # Imported here: the worker pulls in the event loop and the whole broker, which the
    # config subcommands have no use for.
    worker = importlib.import_module("shards.worker")
    argv = ["--config", args.config] if args.config else []
    return int(worker.main(argv) or 0)


def register_broker(sub: Any) -> None:
    p = sub.add_parser("broker", help="run the broker in the foreground",
                       description="Run a one-process broker in the foreground: one shard that "
                                   "binds its own listeners (supervisor.conf instead runs a router "
                                   "and `python3 -m shards --index K --workers N`). Stop it with "
                                   "SIGTERM or Ctrl-C.")
    _config_option(p)
    p.set_defaults(handler=_run_broker)


# -- shoal config ----------------------------------------------------------------------------


def _config_show(args: argparse.Namespace) -> int:
    config = Config() if args.defaults else load_config(args.config)
    sys.stdout.write(example_toml() if args.defaults and args.comments
                     else to_toml(config, comments=args.comments))
    return EXIT_OK


def _config_check(args: argparse.Namespace) -> int:
    load_config(args.file)
    print(f"{args.file}: OK")
    return EXIT_OK


def _config_docs(args: argparse.Namespace) -> int:
    sys.stdout.write(render_docs())
    return EXIT_OK


def register_config(sub: Any) -> None:
    p = sub.add_parser("config", help="show, check or document the configuration",
                       description="Inspect shoal's configuration.")
    csub = p.add_subparsers(dest="config_command", metavar="{show,check,docs}", required=True)

    show = csub.add_parser("show", help="print the effective configuration as TOML",
                           description="Print the configuration the broker would run with: "
                                       "defaults, then the file, then SHOAL_* overrides.")
    _config_option(show)
    show.add_argument("--comments", action="store_true",
                      help="document every key in comments")
    show.add_argument("--defaults", action="store_true",
                      help="ignore the file and the environment: print the built-in defaults "
                           "(with --comments: the content of shoal.example.toml)")
    show.set_defaults(handler=_config_show)

    check = csub.add_parser("check", help="validate a configuration file",
                            description="Validate FILE (and any SHOAL_* overrides in the "
                                        "environment); exit 0 if valid, 1 if not.")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_config_check)

    docs = csub.add_parser("docs", help="print the configuration reference (Markdown)",
                           description="Print docs/configuration.md, generated from the code.")
    docs.set_defaults(handler=_config_docs)


# -- shoal bench -----------------------------------------------------------------------------


def _run_bench(args: argparse.Namespace) -> int:
    # bench/ is a separate package the runtime never imports; only this subcommand loads it,
    # and it parses its own (emqtt-bench style) options: -h is the host there.
    try:
        emqtt = importlib.import_module("bench.emqtt")
    except ImportError as e:
        print(f"shoal bench: the bench package is not installed ({e})", file=sys.stderr)
        return EXIT_USAGE
    return int(emqtt.main(args.bench_args, prog="shoal bench") or 0)


def register_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="load-test an MQTT broker (emqtt-bench flags)",
                       add_help=False, prefix_chars="\0",
                       description="shoal bench conn|pub|sub [emqtt-bench options]; "
                                   "`shoal bench pub --help` lists them.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_run_bench)


COMMANDS: list[Callable[[Any], None]] = [register_broker, register_config, register_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="shoal, an MQTT 3.1.1/5.0 broker.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as e:
        print(f"shoal: invalid configuration: {e}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    except BrokenPipeError:
        # `shoal config docs | head` closes the pipe early: not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
