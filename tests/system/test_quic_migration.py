"""QUIC connection migration across 4 shards under supervisord, and why steering is needed.

A QUIC subscriber talks to the broker through tests/relay.py's UDP relay, a loopback "NAT"
whose upstream socket the test swaps mid-session (new source port and a new 127.0.0.x
source address): to the broker the client's address changes, as after a NAT rebinding.
A TCP publisher placed on another shard sends a steady QoS 1 stream the whole time.

- steering "bpf" (the default) and "forward": the datagrams from the new address reach the
  shard holding the connection, which validates the path and carries on: every message
  arrives, in order, duplicates only as MQTT allows (DUP set), one CONNACK, one connection.
- steering "off": the kernel hashes the new 4-tuple to some shard; after a few rebinds the
  client's datagrams land on shards that do not know its connection id and it dies. The
  test asserts that failure: it is what the steering is for. (Each rebind lands on the
  right shard by chance with probability 1/4; six in a row would be 1 in 4096.)
- TCP through the TCP relay: the same "address change" resets the TCP connection.

The subscriber's MQTT keepalive is 1 s: a receiver sends nothing until it hears something, so
after a rebinding its PINGREQ (after 0.5 s of silence) is what tells the server the new path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from shards.mqttclient import MQTTClient
from tests.harness import broker_kind
from tests.relay import TCPRelay, UDPRelay
from tests.system.supervision import make_supervised
from tests.system.test_shards import Broker

pytestmark = pytest.mark.system

SHARDS = 4
HOST = "127.0.0.1"
MESSAGES = 400
GAP = 0.01  # seconds between publishes: ~4 s of stream, six rebinds inside it
REBINDS = 6


def start(here: Path, steering: str) -> Broker:
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    sv = make_supervised(here, SHARDS, start=False)
    config = here / "shoal.toml"
    text = config.read_text()
    table = '[listeners.quic]\nbind = "127.0.0.1"\nport = 0\n'
    assert table in text
    config.write_text(text.replace(table, table + f'steering = "{steering}"\n'))
    sv.start()
    try:
        return Broker(sv, sv.wait_ready(60))
    except BaseException:
        sv.kill_all()
        sv.cleanup_shm()
        raise


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Broker]]:
    started: dict[str, Broker] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, steering: str) -> Broker:
            b = start(tmp_path_factory.mktemp(f"q{steering}"), steering)
            started[steering] = b
            self[steering] = b
            return b

    try:
        yield Lazy()
    finally:
        for b in started.values():
            b.sv.kill_all()
            b.sv.cleanup_shm()


def quic_port(b: Broker) -> int:
    return int(b.info["listeners"]["quic"]["port"])


def shard_of_quic(c: MQTTClient) -> int:
    """Every connection id shard k issues has byte0 % N == k; the client sends to one."""
    return c.quic.quic._peer_cid.cid[0] % SHARDS  # type: ignore[no-any-return]


async def placed_publisher(b: Broker, cid: str, exclude: int) -> tuple[MQTTClient, int]:
    sock, k = await asyncio.to_thread(b.dial, None, {exclude})
    pub = await MQTTClient.connect_tcp(sock=sock, client_id=cid, version=5)
    return pub, k


async def stream_through_rebinds(b: Broker, tag: str, deadline: float) -> dict[str, object]:
    """Run the scenario; report what the subscriber saw instead of asserting, so the
    steering-off case can assert the opposite."""
    loop = asyncio.get_running_loop()
    async with UDPRelay((HOST, quic_port(b))) as relay:
        sub = await MQTTClient.connect_quic(*relay.address, client_id=tag + "s", version=5,
                                            keepalive=1)
        k = shard_of_quic(sub)
        await sub.subscribe([(f"{tag}/t", 1)])
        pub, pk = await placed_publisher(b, tag + "p", exclude=k)
        assert pk != k
        sources = set(relay.upstream_addresses())

        async def publish() -> None:
            for i in range(MESSAGES):
                try:
                    await pub.publish(f"{tag}/t", b"%d" % i, qos=1)
                except Exception:
                    return
                await asyncio.sleep(GAP)  # a fixed-rate publisher, not synchronisation

        async def rebind() -> None:
            for r in range(REBINDS):
                await asyncio.sleep(MESSAGES * GAP / (REBINDS + 1))  # spread over the stream
                sources.update(await relay.rebind(f"127.0.0.{20 + r}"))

        tasks = [asyncio.ensure_future(publish()), asyncio.ensure_future(rebind())]
        seen: list[tuple[int, bool]] = []
        end = loop.time() + deadline
        closed = False
        while len({i for i, _ in seen}) < MESSAGES:
            left = end - loop.time()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(sub.messages.get(), left)
            except asyncio.TimeoutError:
                break
            if msg is None:
                closed = True
                break
            seen.append((int(msg.payload), msg.dup))
        for t in tasks:
            await t
        result = {"seen": seen, "connacks": sub.connacks, "connected": sub.is_connected(),
                  "closed": closed, "sources": sources, "rebinds": relay.rebinds,
                  "sub_shard": k, "pub_shard": pk}
        await sub.disconnect()
        await pub.disconnect()
        return result


@pytest.mark.parametrize("steering", ["bpf", "forward"])
def test_quic_subscriber_survives_address_changes(brokers: dict[str, Broker], steering: str) -> None:
    b = brokers[steering]
    r = asyncio.run(stream_through_rebinds(b, f"mig{steering}", deadline=60.0))
    seen: list[tuple[int, bool]] = r["seen"]  # type: ignore[assignment]
    first: list[int] = []
    for i, dup in seen:
        if i in first:
            assert dup, f"message {i} delivered twice without DUP"  # QoS 1 allows a DUP resend
        else:
            first.append(i)
    assert first == list(range(MESSAGES)), f"lost or reordered: {len(first)} of {MESSAGES}"
    assert r["connacks"] == 1 and r["connected"] and not r["closed"]
    assert r["rebinds"] == REBINDS and len(r["sources"]) == REBINDS + 1  # type: ignore[arg-type]


def test_without_steering_the_migrated_connection_dies(brokers: dict[str, Broker]) -> None:
    b = brokers["off"]
    r = asyncio.run(stream_through_rebinds(b, "migoff", deadline=20.0))
    got = {i for i, _ in r["seen"]}  # type: ignore[attr-defined]
    assert len(got) < MESSAGES, "every message arrived although nothing steered the datagrams"
    # the connection stalled and the client's keepalive gave up on it
    assert r["closed"] or not r["connected"], r


def test_tcp_connection_dies_on_address_change(brokers: dict[str, Broker]) -> None:
    b = brokers["bpf"]

    async def main() -> None:
        async with TCPRelay((HOST, b.port)) as relay:
            sub = await MQTTClient.connect_tcp(*relay.address, client_id="migtcps", version=5)
            await sub.subscribe([("migtcp/t", 1)])
            pub = await MQTTClient.connect_tcp(HOST, b.port, client_id="migtcpp", version=5)
            await pub.publish("migtcp/t", b"before", qos=1)
            assert (await asyncio.wait_for(sub.messages.get(), 10)).payload == b"before"  # type: ignore[union-attr]
            assert relay.rebind() == 1
            assert await asyncio.wait_for(sub.messages.get(), 10) is None  # connection lost
            assert not sub.is_connected() and sub.connacks == 1
            await pub.disconnect()
    asyncio.run(main())
