"""Microbenchmark of the codec: per-packet encode/decode cost and frame splitting.

Usage: ``python -m bench.micro_codec [--number N]``. Prints µs per operation,
the best of 5 timeit repeats (the minimum is the least noisy estimate of the
code's own cost). Absolute numbers on a noisy machine: compare runs of the same
commit, before and after a change.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from shards.protocol.codec import decode, encode, encode_publish
from shards.protocol.packets import Prop, Puback
from shards.protocol.reader import FrameReader

TOPIC = "sensors/building-7/floor-3/room-12/temperature"
SMALL = b'{"t": 21.5, "h": 40}'
KB = bytes(range(256)) * 4
PROPS = {Prop.MESSAGE_EXPIRY_INTERVAL: 60, Prop.USER_PROPERTY: [("trace", "abc123")]}


def _body(frame: bytes) -> bytes:
    reader = FrameReader()
    reader.feed(frame)
    got = reader.next_frame()
    assert got is not None
    return bytes(got[1])


def cases() -> list[tuple[str, Callable[[], object]]]:
    small_v4 = encode_publish(TOPIC, SMALL, 1, False, False, 7, None, 4)
    small_v5 = encode_publish(TOPIC, SMALL, 1, False, False, 7, None, 5)
    props_v5 = encode_publish(TOPIC, SMALL, 1, False, False, 7, PROPS, 5)
    kb_v4 = encode_publish(TOPIC, KB, 1, False, False, 7, None, 4)
    b_small_v4, b_small_v5, b_props_v5, b_kb_v4 = map(_body, (small_v4, small_v5, props_v5, kb_v4))
    puback = encode(Puback(7), 4)
    batch = small_v4 * 100

    def split_batch() -> None:
        reader = FrameReader()
        reader.feed(batch)
        while reader.next_frame() is not None:
            pass

    def split_and_decode_batch() -> None:
        reader = FrameReader()
        reader.feed(batch)
        while (f := reader.next_frame()) is not None:
            decode(f[0], f[1], 4)

    return [
        ("encode_publish qos0 v4 small", lambda: encode_publish(TOPIC, SMALL, 0, False, False, 0, None, 4)),
        ("encode_publish qos1 v4 small", lambda: encode_publish(TOPIC, SMALL, 1, False, False, 7, None, 4)),
        ("encode_publish qos1 v5 small", lambda: encode_publish(TOPIC, SMALL, 1, False, False, 7, None, 5)),
        ("encode_publish qos1 v5 props", lambda: encode_publish(TOPIC, SMALL, 1, False, False, 7, PROPS, 5)),
        ("encode_publish qos1 v4 1KiB", lambda: encode_publish(TOPIC, KB, 1, False, False, 7, None, 4)),
        ("decode publish qos1 v4 small", lambda: decode(0x32, b_small_v4, 4)),
        ("decode publish qos1 v5 small", lambda: decode(0x32, b_small_v5, 5)),
        ("decode publish qos1 v5 props", lambda: decode(0x32, b_props_v5, 5)),
        ("decode publish qos1 v4 1KiB", lambda: decode(0x32, b_kb_v4, 4)),
        ("encode puback v4", lambda: encode(Puback(7), 4)),
        ("decode puback v4", lambda: decode(0x40, puback[2:], 4)),
        ("split 100 publishes (per frame)", split_batch),
        ("split+decode 100 publishes (per frame)", split_and_decode_batch),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per repeat")
    args = parser.parse_args()
    for name, fn in cases():
        per_call = 100 if "100 publishes" in name else 1
        number = max(1, args.number // (100 if per_call > 1 else 1))
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number / per_call
        print(f"{name:42s} {best * 1e6:7.3f} µs")


if __name__ == "__main__":
    main()
