"""MQTT over QUIC on 4 shards under supervisord: steering by connection id, migration, restarts.

Which shard holds a QUIC connection is visible to the client: the first byte of every
connection id the server issued is the shard's index modulo N. A client "moves" by sending
from a new UDP socket (new port, new 127.0.0.x address): what NAT rebinding or a switch from
Wi-Fi to cellular does to it. The kernel's 4-tuple hash then picks some other member of the
SO_REUSEPORT group, and only the steering (the BPF program, or forwarding over the bus) brings
the datagrams back to the shard holding the connection.

The subscriber is a raw aioquic client (tests/integration/quicraw.py); publishers are TCP
clients, so every message crosses from a TCP connection on one shard to a QUIC connection on
another. No sleeps to synchronise: every wait is for a packet or a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from listeners.quic import owner_of
from tests.harness import UNHANDLED_MARKERS, broker_kind
from tests.integration import rawclient as rc
from tests.integration.quicraw import RawQuic, RawStream
from tests.integration.rawclient import RawClient
from tests.system.supervision import Supervised, make_supervised, poll

pytestmark = [pytest.mark.system]

SHARDS = 4
HOST = "127.0.0.1"
V5 = 5
BATCH = 20
MOVES = 6


class QuicHost:
    def __init__(self, sv: Supervised, info: dict) -> None:
        self.sv = sv
        self.tcp = int(info["listeners"]["tcp"]["port"])
        self.quic = int(info["listeners"]["quic"]["port"])


def _start(tmp: Path, steering: str, extra: str = "") -> QuicHost:
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    sv = make_supervised(tmp, SHARDS, quic=f'steering = "{steering}"\n{extra}')
    try:
        info = sv.wait_ready()
        poll(lambda: len(sv.shard_pids()) == SHARDS, 30, "all shards running")
    except BaseException:
        sv.kill_all()
        raise
    return QuicHost(sv, info)


def _finish(h: QuicHost) -> None:
    try:
        code = h.sv.shutdown()
    finally:
        h.sv.kill_all()
        h.sv.cleanup_shm()
    for path in sorted((h.sv.here / "var/log").glob("*.log")):
        text = path.read_text(errors="replace")
        found = [m for m in UNHANDLED_MARKERS if m in text]
        assert not found, f"{path.name} logged {found}:\n{text[-4000:]}"
    assert code == 0


@pytest.fixture(params=["bpf", "forward"])
def steered(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QuicHost]:
    h = _start(tmp_path, request.param)
    try:
        yield h
    finally:
        _finish(h)


@pytest.fixture
def unsteered(tmp_path: Path) -> Iterator[QuicHost]:
    h = _start(tmp_path, "off")
    try:
        yield h
    finally:
        _finish(h)


def run(main, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()
    asyncio.run(bounded())


async def quic_subscriber(h: QuicHost, client_id: str, topic: str) -> tuple[RawQuic, RawStream, int]:
    q = await RawQuic.open(HOST, h.quic)
    control = await q.stream()
    control.send(rc.connect(client_id, version=V5))
    await control.expect(rc.CONNACK)
    control.send(rc.subscribe(1, [(topic, 1)], version=V5))
    await control.expect(rc.SUBACK)
    return q, control, owner_of(q.server_cid(), SHARDS)


def tcp_publisher(h: QuicHost, client_id: str) -> RawClient:
    c = RawClient(HOST, h.tcp)
    c.send(rc.connect(client_id, version=V5))
    c.expect(rc.CONNACK)
    return c


async def receive_batch(control: RawStream, start: int, n: int, timeout: float) -> list[int]:
    """Sequence numbers of the QoS 1 messages that arrive (acked as they come)."""
    got: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < n:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            p = await control.read(left)
        except TimeoutError:
            break
        if p is None:
            break
        if p.type != rc.PUBLISH:
            continue
        msg = rc.parse_publish(p, V5)
        control.send(rc.ack(rc.PUBACK, msg.packet_id or 0, version=V5))
        got.append(int(msg.payload))
    return got


def publish_batch(pub: RawClient, topic: str, start: int, n: int, pid0: int) -> None:
    for i in range(n):
        pub.send(rc.publish(topic, str(start + i).encode(), qos=1, packet_id=pid0 + i, version=V5))
    for _ in range(n):
        pub.expect(rc.PUBACK)


async def on_every_shard(h: QuicHost, tag: str, topic: str) -> dict[int, tuple[RawQuic, RawStream]]:
    """One QUIC subscriber to ``topic`` held by each shard. A new connection lands where
    the client's first id points, so keep dialling until every shard holds one (4 shards:
    a few dozen tries at most); the extra connections are closed."""
    subs: dict[int, tuple[RawQuic, RawStream]] = {}
    attempts = 0
    while len(subs) < SHARDS and attempts < 200:
        attempts += 1
        q, control, shard = await quic_subscriber(h, f"{tag}{attempts}", topic)
        if shard in subs:
            await q.aclose()
        else:
            subs[shard] = (q, control)
    assert sorted(subs) == list(range(SHARDS)), f"after {attempts} connections"
    return subs


def test_quic_clients_on_every_shard_route_across_shards(steered: QuicHost) -> None:
    tag = f"q{os.getpid()}"

    async def main() -> None:
        subs = await on_every_shard(steered, f"{tag}s", f"{tag}/all")
        with tcp_publisher(steered, f"{tag}p") as pub:
            publish_batch(pub, f"{tag}/all", 0, BATCH, 1)
        for shard, (q, control) in subs.items():
            got = await receive_batch(control, 0, BATCH, 10.0)
            assert got == list(range(BATCH)), f"shard {shard}: {got}"
        for q, _ in subs.values():
            await q.aclose()
    run(main)


def test_a_moving_quic_client_keeps_its_connection(steered: QuicHost) -> None:
    tag = f"m{os.getpid()}"
    topic = f"{tag}/stream"

    async def main() -> None:
        q, control, shard = await quic_subscriber(steered, f"{tag}s", topic)
        protocol = q.protocol
        with tcp_publisher(steered, f"{tag}p") as pub:
            seq = 0
            for move in range(MOVES):
                publish_batch(pub, topic, seq, BATCH, 1 + (seq % 60000))
                got = await receive_batch(control, seq, BATCH, 10.0)
                assert got == list(range(seq, seq + BATCH)), f"after {move} moves: {got}"
                seq += BATCH
                # a new port, a new address and (every other time) a new connection id
                await q.rebind(f"127.0.0.{2 + move}", new_id=move % 2 == 1)
            publish_batch(pub, topic, seq, BATCH, 1 + (seq % 60000))
            got = await receive_batch(control, seq, BATCH, 10.0)
            assert got == list(range(seq, seq + BATCH))
        # the same QUIC connection and the same MQTT connection all along
        assert q.protocol is protocol and not protocol._closed.is_set()
        assert owner_of(q.server_cid(), SHARDS) == shard
        await q.aclose()
    run(main)


def test_without_steering_a_moving_client_loses_its_connection(unsteered: QuicHost) -> None:
    """The control experiment: the same moves with steering off strand the connection on a
    shard that no longer receives its datagrams (a move keeps the shard by chance 1 in 4,
    so six moves all keeping it would happen once in 4096 runs)."""
    tag = f"u{os.getpid()}"
    topic = f"{tag}/stream"

    async def main() -> None:
        q, control, shard = await quic_subscriber(unsteered, f"{tag}s", topic)
        lost_at = None
        with tcp_publisher(unsteered, f"{tag}p") as pub:
            seq = 0
            for move in range(MOVES):
                await q.rebind(f"127.0.0.{2 + move}", new_id=move % 2 == 1)
                publish_batch(pub, topic, seq, BATCH, 1 + (seq % 60000))
                got = await receive_batch(control, seq, BATCH, 3.0)
                seq += BATCH
                if len(got) < BATCH:
                    lost_at = move
                    break
        assert lost_at is not None, "every move kept the connection without steering"
        await q.aclose()
    run(main)


def test_steering_survives_a_shard_restart(tmp_path: Path) -> None:
    """kill -9 of a shard: the router keeps its socket in the group, so once supervisord has
    restarted it, ids it issues still route to it, and other shards' connections carry on."""
    h = _start(tmp_path, "bpf")
    tag = f"r{os.getpid()}"
    try:
        async def main() -> None:
            subs = await on_every_shard(h, f"{tag}a", f"{tag}/t")
            victim = 1

            def pid_of(k: int) -> int | None:
                return next((p for p, i in h.sv.shard_pids().items() if i == k), None)

            old = pid_of(victim)
            assert old is not None
            os.kill(old, signal.SIGKILL)
            poll(lambda: pid_of(victim) not in (None, old), 30, "the killed shard to restart")
            new = pid_of(victim)
            poll(lambda: f"shard {victim} (pid {new}) joined" in h.sv.log("router.log"), 30,
                 "the restarted shard to rejoin the router")
            # connections on the other shards still work, and still after a move
            with tcp_publisher(h, f"{tag}p") as pub:
                publish_batch(pub, f"{tag}/t", 0, BATCH, 1)
                for shard, (q, control) in subs.items():
                    if shard == victim:
                        continue
                    assert await receive_batch(control, 0, BATCH, 10.0) == list(range(BATCH))
                    await q.rebind("127.0.0.9")
                publish_batch(pub, f"{tag}/t", BATCH, BATCH, 100)
                for shard, (q, control) in subs.items():
                    if shard != victim:
                        got = await receive_batch(control, BATCH, BATCH, 10.0)
                        assert got == list(range(BATCH, 2 * BATCH)), shard
                # a new connection on the restarted shard moves and keeps working
                m = 0
                while True:
                    m += 1
                    assert m < 200, "no new connection landed on the restarted shard"
                    q, control, shard = await quic_subscriber(h, f"{tag}b{m}", f"{tag}/new")
                    if shard == victim:
                        break
                    await q.aclose()
                await q.rebind("127.0.0.10", new_id=True)
                publish_batch(pub, f"{tag}/new", 0, BATCH, 200)
                assert await receive_batch(control, 0, BATCH, 10.0) == list(range(BATCH))
                await q.aclose()
            for shard, (q, _) in subs.items():
                await q.aclose()
        run(main)
    finally:
        _finish(h)


def test_retry_tokens_come_back_to_the_shard_that_made_them(tmp_path: Path) -> None:
    """With Retry on, the token a shard hands out is validated by that same shard: the Retry
    carries a connection id of the shard's own, and the client's next Initial is addressed
    to it. No key is shared between shards."""
    h = _start(tmp_path, "bpf", "retry = true\n")
    tag = f"y{os.getpid()}"
    try:
        async def main() -> None:
            seen = await on_every_shard(h, tag, f"{tag}/t")
            for q, _ in seen.values():  # each went through a Retry first
                assert q.protocol is not None and q.protocol._quic._retry_count == 1
            with tcp_publisher(h, f"{tag}p") as pub:
                publish_batch(pub, f"{tag}/t", 0, BATCH, 1)
            for q, control in seen.values():
                assert await receive_batch(control, 0, BATCH, 10.0) == list(range(BATCH))
                await q.aclose()
        run(main)
    finally:
        _finish(h)


def test_data_stream_answers_wait_for_the_index_and_stay_on_their_stream(tmp_path: Path) -> None:
    """Under a router a SUBACK waits for the host-wide index; it must still go out on the
    data stream that carried the SUBSCRIBE, and deliveries for it follow there."""
    h = _start(tmp_path, "bpf")
    tag = f"d{os.getpid()}"
    try:
        async def main() -> None:
            q = await RawQuic.open(HOST, h.quic)
            control = await q.stream()
            control.send(rc.connect(f"{tag}s", version=V5))
            await control.expect(rc.CONNACK)
            data = await q.stream()
            data.send(rc.subscribe(7, [(f"{tag}/new/#", 1)], version=V5))
            suback = await data.expect(rc.SUBACK)
            assert suback.body[:2] == b"\x00\x07"
            with tcp_publisher(h, f"{tag}p") as pub:
                publish_batch(pub, f"{tag}/new/x", 0, BATCH, 1)
            assert await receive_batch(data, 0, BATCH, 10.0) == list(range(BATCH))
            await control.silent()
            await q.aclose()
        run(main)
    finally:
        _finish(h)
