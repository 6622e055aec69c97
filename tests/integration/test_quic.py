"""MQTT over QUIC with shoal's own client (shards.mqttclient over listeners.quicclient).

The broker is a real process with a QUIC listener on an ephemeral port (the harness gives
every broker one); the clients run on the test's loop, uvloop or asyncio like the broker.
What is checked: QoS 0/1/2 both ways over QUIC, QUIC and TCP clients talking to each other,
EMQX's multi-stream mode (acks and deliveries on the stream that asked), a client address
change mid-session (same connection, nothing lost), and `shoal pub`/`shoal sub --quic`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest

from shards.mqttclient import MQTTClient
from shards.protocol.packets import Publish
from tests.harness import REPO, Broker
from tests.relay import UDPRelay

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

TIMEOUT = 10.0


def run(loop_name: str, main: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    """Run ``main`` on the loop the broker runs on, bounded so a stall fails instead of hanging."""
    async def bounded() -> None:
        await asyncio.wait_for(main(), timeout)
    if loop_name == "uvloop":
        import uvloop
        uvloop.run(bounded())
    else:
        asyncio.run(bounded())


async def quic(b: Broker, cid: str, version: int = 5, **kw: object) -> MQTTClient:
    return await MQTTClient.connect_quic(b.host, b.ports["quic"], client_id=cid, version=version,
                                         **kw)  # type: ignore[arg-type]


async def tcp(b: Broker, cid: str, version: int = 5, **kw: object) -> MQTTClient:
    return await MQTTClient.connect_tcp(b.host, b.port, client_id=cid, version=version,
                                        **kw)  # type: ignore[arg-type]


async def get(q: asyncio.Queue[Publish | None]) -> Publish:
    msg = await asyncio.wait_for(q.get(), TIMEOUT)
    assert msg is not None, "connection closed while waiting for a message"
    return msg


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_and_receive_over_quic(broker: Broker, loop_name: str, uid: str, qos: int,
                                       version: int) -> None:
    async def main() -> None:
        sub = await quic(broker, uid + "s", version)
        pub = await quic(broker, uid + "p", version)
        assert await sub.subscribe([(f"{uid}/#", qos)]) == [qos]
        for i in range(20):
            assert await pub.publish(f"{uid}/{i}", b"m%d" % i, qos=qos) == 0
        got = [await get(sub.messages) for _ in range(20)]
        assert [(m.topic, m.payload, m.qos) for m in got] == \
            [(f"{uid}/{i}", b"m%d" % i, qos) for i in range(20)]
        assert sub.connacks == pub.connacks == 1
        await pub.disconnect()
        await sub.disconnect()
    run(loop_name, main)


def test_quic_and_tcp_clients_exchange_messages(broker: Broker, loop_name: str, uid: str) -> None:
    async def main() -> None:
        q = await quic(broker, uid + "q", 4)
        t = await tcp(broker, uid + "t", 5)
        await q.subscribe([(f"{uid}/to-quic", 2)])
        await t.subscribe([(f"{uid}/to-tcp", 1)])
        await t.publish(f"{uid}/to-quic", b"from tcp", qos=2)
        await q.publish(f"{uid}/to-tcp", b"from quic", qos=1, retain=True)
        m = await get(q.messages)
        assert (m.topic, m.payload, m.qos) == (f"{uid}/to-quic", b"from tcp", 2)
        m = await get(t.messages)
        assert (m.topic, m.payload, m.qos) == (f"{uid}/to-tcp", b"from quic", 1)
        # the retained message a QUIC client left is served to a later TCP subscriber
        late = await tcp(broker, uid + "late", 4)
        await late.subscribe([(f"{uid}/to-tcp", 0)])
        m = await get(late.messages)
        assert (m.payload, m.retain) == (b"from quic", True)
        await t.publish(f"{uid}/to-tcp", b"", retain=True)  # clear it
        for c in (q, t, late):
            await c.disconnect()
    run(loop_name, main)


def test_publish_on_a_data_stream_is_acked_on_that_stream(broker: Broker, loop_name: str,
                                                          uid: str) -> None:
    async def main() -> None:
        c = await quic(broker, uid + "m")
        watcher = await tcp(broker, uid + "w")
        await watcher.subscribe([(f"{uid}/#", 2)])
        data = c.open_data_stream()
        assert data.transport.get_extra_info("stream_id") == 4
        # A Channel only resolves acks that arrive on its own stream: had the PUBACK/PUBREC/
        # PUBCOMP come back on the control stream, these would time out.
        assert await data.publish(f"{uid}/d1", b"q1", qos=1, timeout=TIMEOUT) == 0
        assert await data.publish(f"{uid}/d2", b"q2", qos=2, timeout=TIMEOUT) == 0
        await data.publish(f"{uid}/d0", b"q0", qos=0)
        got = [(m.topic, m.payload) for m in [await get(watcher.messages) for _ in range(3)]]
        assert got == [(f"{uid}/d1", b"q1"), (f"{uid}/d2", b"q2"), (f"{uid}/d0", b"q0")]
        # the control stream still works beside it
        assert await c.publish(f"{uid}/c", b"ctl", qos=1) == 0
        assert (await get(watcher.messages)).payload == b"ctl"
        await c.disconnect()
        await watcher.disconnect()
    run(loop_name, main)


def test_subscribe_on_a_data_stream_gets_deliveries_there(broker: Broker, loop_name: str,
                                                          uid: str) -> None:
    async def main() -> None:
        c = await quic(broker, uid + "m")
        pub = await tcp(broker, uid + "p")
        data = c.open_data_stream()
        assert await data.subscribe([(f"{uid}/data/#", 1)], timeout=TIMEOUT) == [1]
        assert await c.subscribe([(f"{uid}/ctl/#", 1)]) == [1]
        for i in range(5):
            await pub.publish(f"{uid}/data/{i}", b"d%d" % i, qos=1)
            await pub.publish(f"{uid}/ctl/{i}", b"c%d" % i, qos=1)
        on_data = [await get(data.messages) for _ in range(5)]
        on_ctl = [await get(c.messages) for _ in range(5)]
        assert [m.payload for m in on_data] == [b"d%d" % i for i in range(5)]
        assert [m.payload for m in on_ctl] == [b"c%d" % i for i in range(5)]
        await c.disconnect()
        await pub.disconnect()
    run(loop_name, main)


def test_client_rebind_keeps_the_session(broker: Broker, loop_name: str, uid: str) -> None:
    """The client moves to a new local port and 127.0.0.x address while a QoS 1 stream flows:
    same QUIC connection (one CONNACK), every message once, in order."""
    async def main() -> None:
        sub = await quic(broker, uid + "s", local_host="127.0.0.1")
        pub = await tcp(broker, uid + "p")
        await sub.subscribe([(f"{uid}/t", 1)])
        n = 300
        addresses = {sub.quic.local_addr}

        async def publish() -> None:
            for i in range(n):
                await pub.publish(f"{uid}/t", b"%d" % i, qos=1)

        task = asyncio.ensure_future(publish())
        got: list[int] = []
        for k in range(n):
            got.append(int((await get(sub.messages)).payload))
            if k % 50 == 25:
                addresses.add(await sub.quic.rebind(f"127.0.0.{2 + k // 50}"))
        await task
        assert got == list(range(n))
        assert sub.quic.rebinds == 6 and len(addresses) == 7
        assert sub.connacks == 1 and sub.is_connected()
        # and the connection still works both ways from the last address
        assert await sub.publish(f"{uid}/t", b"again", qos=1) == 0
        assert (await get(sub.messages)).payload == b"again"
        await sub.disconnect()
        await pub.disconnect()
    run(loop_name, main)


def test_relay_rebinding_keeps_the_connection(broker: Broker, loop_name: str, uid: str) -> None:
    """The same through tests/relay.py: the client never changes, the "NAT" in front does.

    Until the client sends again, the server only knows the forgotten mapping and what it
    sends is lost (as behind a real NAT); the client's next packet, at the latest the PINGREQ
    its 1 s keepalive sends after 0.5 s of silence, moves the connection to the new path
    and QUIC retransmits what was lost."""
    async def main() -> None:
        async with UDPRelay((broker.host, broker.ports["quic"])) as relay:
            sub = await MQTTClient.connect_quic(*relay.address, client_id=uid + "s", version=5,
                                                keepalive=1)
            pub = await tcp(broker, uid + "p")
            await sub.subscribe([(f"{uid}/t", 1)])
            seen = set(relay.upstream_addresses())
            for r in range(4):
                for i in range(25):
                    await pub.publish(f"{uid}/t", b"%d" % (r * 25 + i), qos=1)
                seen.update(await relay.rebind(f"127.0.0.{10 + r}"))
            got = [int((await get(sub.messages)).payload) for _ in range(100)]
            assert got == list(range(100))
            assert len(seen) == 5 and sub.connacks == 1
            assert await sub.publish(f"{uid}/t", b"last", qos=2) == 0
            assert (await get(sub.messages)).payload == b"last"
            await sub.disconnect()
            await pub.disconnect()
    run(loop_name, main)


def test_closing_the_connection_ends_the_session_cleanly(broker: Broker, loop_name: str,
                                                         uid: str) -> None:
    async def main() -> None:
        c = await quic(broker, uid + "c")
        c.quic.close()  # no DISCONNECT: the broker must see the connection go
        await asyncio.wait_for(c.wait_closed(), TIMEOUT)
        assert not c.is_connected()
        # the same client id connects again at once (its old session is gone or taken over)
        again = await quic(broker, uid + "c")
        assert again.connacks == 1
        await again.disconnect()
    run(loop_name, main)


def test_ending_the_control_stream_ends_the_connection(broker: Broker, loop_name: str,
                                                      uid: str) -> None:
    async def main() -> None:
        c = await quic(broker, uid + "c")
        data = c.open_data_stream()
        assert await data.subscribe([(f"{uid}/x", 0)], timeout=TIMEOUT) == [0]
        c.control.transport.write_eof()  # FIN on stream 0, nothing else
        await asyncio.wait_for(c.wait_closed(), TIMEOUT)  # the broker closed the connection
        assert c.quic.is_closed() and not c.is_connected()
        assert await asyncio.wait_for(data.messages.get(), TIMEOUT) is None
    run(loop_name, main)


def test_quic_stream_pauses_and_resumes_the_writer(broker: Broker, loop_name: str, uid: str) -> None:
    """listeners.quicclient's back-pressure: a burst beyond the high-water mark pauses the
    protocol; the broker's acknowledgements resume it; everything arrives."""
    from listeners.quicclient import WRITE_HIGH_WATER, QuicStreamClient
    from shards.protocol.codec import encode, encode_publish
    from shards.protocol.packets import Connect

    class Recorder(asyncio.Protocol):
        def __init__(self) -> None:
            self.events: list[str] = []
            self.resumed = asyncio.Event()

        def pause_writing(self) -> None:
            self.events.append("pause")

        def resume_writing(self) -> None:
            self.events.append("resume")
            self.resumed.set()

    async def main() -> None:
        watcher = await tcp(broker, uid + "w")
        await watcher.subscribe([(f"{uid}/burst", 0)])
        q = await QuicStreamClient.connect(broker.host, broker.ports["quic"])
        rec = Recorder()
        stream = q.open_stream(rec)
        stream.write(encode(Connect(client_id=uid + "b", protocol_level=4), 4))
        n, size = 300, 4096
        for i in range(n):
            stream.write(encode_publish(f"{uid}/burst", b"%06d" % i + bytes(size), 0, False, False,
                                        0, None, 4))
        assert n * size > WRITE_HIGH_WATER and rec.events == ["pause"]
        await asyncio.wait_for(rec.resumed.wait(), TIMEOUT)
        got = [int((await get(watcher.messages)).payload[:6]) for _ in range(n)]
        assert got == list(range(n)) and rec.events == ["pause", "resume"]
        q.close()
        await watcher.disconnect()
    run(loop_name, main)


def shoal(*args: str) -> list[str]:
    return [sys.executable, "-m", "shards.cli", *args]


def test_shoal_pub_and_sub_over_quic(broker: Broker, uid: str) -> None:
    port = str(broker.ports["quic"])
    sub = subprocess.Popen(shoal("sub", "-h", broker.host, "-p", port, "--quic", "-t", f"{uid}/#",
                                 "-q", "2", "-v", "-C", "3", "-d", "-V", "5",
                                 "--rebind-after", "0.2"),
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = sub.stderr.readline()  # type: ignore[union-attr]
        assert line.startswith("connected (quic)"), line
        line = sub.stderr.readline()  # type: ignore[union-attr]
        assert line.startswith("subscribed"), line
        for qos, msg in ((0, "zero"), (1, "one"), (2, "two")):
            p = subprocess.run(shoal("pub", "-h", broker.host, "-p", port, "--quic", "-t",
                                     f"{uid}/{qos}", "-m", msg, "-q", str(qos)),
                               cwd=REPO, capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, p.stderr
        out, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert sub.returncode == 0, err
    assert out.splitlines() == [f"{uid}/0 zero", f"{uid}/1 one", f"{uid}/2 two"]


def test_shoal_pub_lines_over_tcp_to_quic(broker: Broker, uid: str) -> None:
    port = str(broker.ports["quic"])
    sub = subprocess.Popen(shoal("sub", "-h", broker.host, "-p", port, "--quic", "-t", f"{uid}",
                                 "-q", "1", "-C", "3", "-d"),
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):
            sub.stderr.readline()  # type: ignore[union-attr]  # connected, subscribed
        p = subprocess.run(shoal("pub", "-h", broker.host, "-p", str(broker.port), "-t", uid,
                                 "-l", "-q", "1", "-V", "mqttv5"),
                           input="a\nb\nc\n", cwd=REPO, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        out, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert (sub.returncode, out.splitlines()) == (0, ["a", "b", "c"]), err


def test_shoal_sub_reports_an_unreachable_quic_broker() -> None:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bound, never answers
        s.bind(("127.0.0.1", 0))
        p = subprocess.run(shoal("pub", "-h", "127.0.0.1", "-p", str(s.getsockname()[1]),
                                 "--quic", "-t", "x", "-m", "y"),
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "QUIC handshake" in p.stderr
