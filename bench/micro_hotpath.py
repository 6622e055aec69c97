"""Microbenchmark of the hot path: decode → match → deliver → encode, per message.

Runs the real MQTTConnection and Shard with in-memory links (no sockets, no
loop), so it measures only shoal's own per-message CPU cost. Scenarios:

- ``1:1``      one publisher, one subscriber on the exact topic, QoS 0
- ``1:1 qos1`` the same at QoS 1 (PUBACK to the publisher, subscriber acks)
- ``fanout``   one publish to 100 subscribers (cost per delivery reported too)
- ``filters``  1:1 while 100k other filters (exact and wildcard) are subscribed

Usage: ``python -m bench.micro_hotpath [--messages N]``. Prints µs per message
(median of 5 runs). These are absolute numbers on a noisy machine: compare runs
of the same commit, and use bench/compare for ratios against other brokers.
"""

from __future__ import annotations

import argparse
import statistics
import time

from shards.config import MQTTConfig
from shards.protocol.codec import encode
from shards.protocol.connection import MQTTConnection
from shards.protocol.packets import MQTT_5, Connect, Puback, Publish, SubOptions, Subscribe
from shards.session import Session
from shards.shard import Shard


class Link:
    def __init__(self, shard: Shard) -> None:
        self.conn = MQTTConnection(0.0, receive_maximum=65535)
        self.session: Session | None = None
        self.congested = False
        self.peer = "bench"
        self.peer_username: str | None = None  # no mTLS certificate name
        self.disconnected_cleanly = False
        self.peer_username: str | None = None
        self.shard = shard

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass

    def resume(self, now: float) -> None:
        pass

    def feed(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data, 0.0)
        handle = self.shard.handle
        while (p := conn.next_packet()) is not None:
            handle(self, p, 0.0)


def client(shard: Shard, cid: str, filters: list[str] = (), qos: int = 0) -> Link:  # type: ignore[assignment]
    link = Link(shard)
    link.feed(encode(Connect(cid, protocol_level=MQTT_5, props={}), MQTT_5))
    if filters:
        link.feed(encode(Subscribe(1, [(f, SubOptions(qos)) for f in filters]), MQTT_5))
    link.conn.data_to_send()
    return link


def run(n: int, subscribers: int, qos: int, extra_filters: int) -> float:
    shard = Shard(MQTTConfig(max_inflight=65535, receive_maximum=65535, max_queued_messages=n * 2,
                             max_subscriptions_per_client=0), 0, 0.0)
    if extra_filters:
        noise = client(shard, "noise")
        for start in range(0, extra_filters, 1000):
            fs = [f"noise/{i}/x" if i % 2 else f"noise/+/{i}/#" for i in range(start, start + 1000)]
            noise.feed(encode(Subscribe(1, [(f, SubOptions(0)) for f in fs]), MQTT_5))
    subs = [client(shard, f"s{i}", ["bench/topic/x"], qos) for i in range(subscribers)]
    pub = client(shard, "pub")
    payload = b"x" * 64
    if qos:
        stream = b"".join(encode(Publish("bench/topic/x", payload, qos, packet_id=(i % 60000) + 1), MQTT_5)
                          for i in range(n))
    else:
        stream = encode(Publish("bench/topic/x", payload), MQTT_5) * n
    # the subscriber side acks every delivery at QoS 1, as a real client would
    acks = b"".join(encode(Puback((i % 65535) + 1), MQTT_5) for i in range(n)) if qos else b""
    chunk = 64 * 1024
    t0 = time.perf_counter()
    view = memoryview(stream)
    for off in range(0, len(stream), chunk):
        pub.feed(bytes(view[off:off + chunk]))
        pub.conn.data_to_send()
        for s in subs:
            s.conn.data_to_send()
    if qos:
        for s in subs:
            s.feed(acks)
    elapsed = time.perf_counter() - t0
    delivered = shard.counters.publish_sent
    assert delivered == n * subscribers, (delivered, n * subscribers)
    return elapsed / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.messages
    scenarios = [
        ("1:1 qos0", dict(subscribers=1, qos=0, extra_filters=0), 1),
        ("1:1 qos1", dict(subscribers=1, qos=1, extra_filters=0), 1),
        ("fanout 1->100 qos0", dict(subscribers=100, qos=0, extra_filters=0), 100),
        ("1:1 qos0, 100k other filters", dict(subscribers=1, qos=0, extra_filters=100_000), 1),
    ]
    print(f"{'scenario':34} {'µs/msg':>8} {'µs/delivery':>12} {'msg/s':>10}")
    for name, kw, fan in scenarios:
        count = n // fan if fan > 1 else n
        samples = [run(count, **kw) for _ in range(args.repeat)]  # type: ignore[arg-type]
        us = statistics.median(samples)
        print(f"{name:34} {us:8.2f} {us / fan:12.3f} {1e6 / us:10.0f}")


if __name__ == "__main__":
    main()
