"""One command for the side-by-side comparison: Mosquitto, amqtt, shoal-1 and shoal-N.

    python -m bench.compare [--quick] [--shards N] [any bench.e2e option]

Starts Mosquitto (Debian package), amqtt (PyPI) and shoal with 1 and N shards on free
loopback ports, runs bench/e2e.py's scenarios against each over MQTT 3.1.1 (amqtt speaks
nothing newer, so every broker gets the same protocol), and writes the markdown table
(msg/s, broker CPU µs per message, ratios to Mosquitto) and a PNG bar chart to
bench/results/e2e-<date>-<time>.{md,json,png}. The table is also printed.
"""

from __future__ import annotations

import argparse
import sys

from bench import e2e


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--shards", type=int, default=2)
    known, rest = ap.parse_known_args(argv)
    brokers = f"mosquitto,amqtt,shoal-1,shoal-{known.shards}"
    if "--png" not in rest:
        rest.append("--png")
    return e2e.main(rest, prog="python -m bench.compare [--shards N]", default_brokers=brokers)


if __name__ == "__main__":
    sys.exit(main())
