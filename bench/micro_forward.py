"""Microbenchmark of the cross-shard hop, beside the same-shard path.

Per message: the publishing shard encodes one bus frame (``message_to_bytes``),
the receiving shard decodes it (``message_from_frame``) and delivers it to its
subscriber, who gets the MQTT bytes. No sockets: this is the CPU a forwarded
message adds, to compare with bench/micro_hotpath's same-shard cost. Run:
``python -m bench.micro_forward [--messages N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.micro_hotpath import client
from shards.config import MQTTConfig
from shards.message import Message
from shards.protocol.codec import encode_properties
from shards.protocol.packets import Prop
from shards.shard import Shard
from shards.transfer import message_from_frame, message_to_bytes


def run(n: int, props: bool) -> tuple[float, float, float]:
    shard = Shard(MQTTConfig(max_inflight=65535, receive_maximum=65535), 1, 0.0)
    sub = client(shard, "s", ["bench/topic/x"], 0)
    p = {Prop.USER_PROPERTY: [("k", "v")], Prop.CONTENT_TYPE: "text/plain"} if props else None
    # as the publishing shard builds them: with the PUBLISH's property block as received
    wire = encode_properties(p) if p else None
    msgs = [Message.from_publish("bench/topic/x", b"x" * 64, 0, False, p or {}, "pub", 0.0, i, wire)
            for i in range(n)]
    t0 = time.perf_counter()
    frames = [message_to_bytes(m) for m in msgs]
    t1 = time.perf_counter()
    for f in frames:
        m, flags, _ = message_from_frame(f, 0.0)
        shard.received(m, True, 0.0)
    sub.conn.data_to_send()
    t2 = time.perf_counter()
    for m in msgs:  # the same deliveries without the hop, for scale
        shard.deliver_local(m, 0.0)
    sub.conn.data_to_send()
    t3 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6, (t3 - t2) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'properties':12} {'encode frame':>13} {'decode+deliver':>15} {'deliver only':>13}  (µs/msg)")
    for props in (False, True):
        runs = [run(args.messages, props) for _ in range(args.repeat)]
        enc, dec, local = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{'yes' if props else 'no':12} {enc:13.2f} {dec:15.2f} {local:13.2f}")


if __name__ == "__main__":
    main()
