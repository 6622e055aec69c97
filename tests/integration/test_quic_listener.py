"""The QUIC listener against aioquic's own client: EMQX 5's stream conventions, byte by byte.

The broker is a real process (both loops); the client is aioquic's, with hand-built MQTT
packets from rawclient.py, so every answer's stream is visible. Session behaviour over QUIC is
the TCP code's (a QUIC control stream is a Link like any other), so here we check what is
QUIC's own: which stream carries what, what ends a connection, steering on a real socket group.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from listeners.quic import attach_steering, make_udp_group, tagged_cid
from tests.harness import Broker
from tests.integration import rawclient as rc
from tests.integration.quicraw import RawQuic, RawStream
from tests.integration.rawclient import RawClient

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

V5 = 5


def run(main: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()
    asyncio.run(bounded())


async def connected(b: Broker, client_id: str, version: int = V5, **kw: Any) -> tuple[RawQuic, RawStream]:
    q = await RawQuic.open(b.host, b.ports["quic"])
    control = await q.stream()
    control.send(rc.connect(client_id, version=version, **kw))
    ack = await control.expect(rc.CONNACK)
    assert rc.parse_connack(ack, version).code == 0
    return q, control


def test_control_stream_carries_mqtt_like_tcp(broker: Broker, uid: str) -> None:
    async def main() -> None:
        q, control = await connected(broker, uid + "q")
        control.send(rc.subscribe(1, [(f"{uid}/t", 1)], version=V5))
        await control.expect(rc.SUBACK)
        with RawClient(broker.host, broker.port) as tcp:
            tcp.send(rc.connect(uid + "p", version=V5))
            tcp.expect(rc.CONNACK)
            tcp.send(rc.publish(f"{uid}/t", b"over quic", qos=1, packet_id=7, version=V5))
            tcp.expect(rc.PUBACK)
        p = rc.parse_publish(await control.expect(rc.PUBLISH), V5)
        assert (p.topic, p.payload, p.qos) == (f"{uid}/t", b"over quic", 1)
        control.send(rc.ack(rc.PUBACK, p.packet_id, version=V5))
        control.send(rc.packet(0xC0, b""))  # PINGREQ
        await control.expect(rc.PINGRESP)
        await q.aclose()
    run(main)


def test_data_streams_answer_on_their_own_stream(broker: Broker, uid: str) -> None:
    async def main() -> None:
        q, control = await connected(broker, uid)
        subs = await q.stream()
        pubs = await q.stream()
        subs.send(rc.subscribe(3, [(f"{uid}/d/#", 2)], version=V5))
        suback = await subs.expect(rc.SUBACK)
        assert suback.body[:2] == b"\x00\x03"
        # a QoS 1 PUBLISH on another data stream: its PUBACK there, the delivery where the
        # SUBSCRIBE was made, nothing on the control stream
        pubs.send(rc.publish(f"{uid}/d/x", b"m1", qos=1, packet_id=9, version=V5))
        puback = await pubs.expect(rc.PUBACK)
        assert puback.body[:2] == b"\x00\x09"
        p = rc.parse_publish(await subs.expect(rc.PUBLISH), V5)
        assert (p.topic, p.payload) == (f"{uid}/d/x", b"m1")
        subs.send(rc.ack(rc.PUBACK, p.packet_id, version=V5))
        # QoS 2 both ways on data streams
        pubs.send(rc.publish(f"{uid}/d/y", b"m2", qos=2, packet_id=10, version=V5))
        await pubs.expect(rc.PUBREC)
        pubs.send(rc.ack(rc.PUBREL, 10, version=V5))
        await pubs.expect(rc.PUBCOMP)
        p = rc.parse_publish(await subs.expect(rc.PUBLISH), V5)
        assert p.qos == 2 and p.payload == b"m2"
        subs.send(rc.ack(rc.PUBREC, p.packet_id, version=V5))
        await subs.expect(rc.PUBREL)
        subs.send(rc.ack(rc.PUBCOMP, p.packet_id, version=V5))
        # PINGRESP only on the control stream, wherever the PINGREQ came
        pubs.send(rc.packet(0xC0, b""))
        await control.expect(rc.PINGRESP)
        await pubs.silent()
        await control.silent()
        await q.aclose()
    run(main)


def test_deliveries_fall_back_to_control_when_the_data_stream_ends(broker: Broker, uid: str) -> None:
    async def main() -> None:
        q, control = await connected(broker, uid)
        data = await q.stream()
        data.send(rc.subscribe(1, [(f"{uid}/f", 0)], version=V5))
        await data.expect(rc.SUBACK)
        data.end()
        assert await data.read() is None  # the broker ends its side too
        with RawClient(broker.host, broker.port) as tcp:
            tcp.send(rc.connect(uid + "p", version=V5))
            tcp.expect(rc.CONNACK)
            tcp.send(rc.publish(f"{uid}/f", b"x", version=V5))
            p = rc.parse_publish(await control.expect(rc.PUBLISH), V5)
            assert p.payload == b"x"
        await q.aclose()
    run(main)


def test_data_stream_before_connect_waits_for_connack(broker: Broker, uid: str) -> None:
    async def main() -> None:
        q = await RawQuic.open(broker.host, broker.ports["quic"])
        control = await q.stream()
        data = await q.stream()
        # in the same flight as the CONNECT, so it reaches the broker before the CONNACK
        # is decided (with a password check on a thread, well before)
        control.send(rc.connect(uid, version=V5))
        data.send(rc.subscribe(1, [(f"{uid}/early", 0)], version=V5))
        await control.expect(rc.CONNACK)
        await data.expect(rc.SUBACK)
        await q.aclose()
    run(main)


def test_ending_the_control_stream_ends_the_connection(broker: Broker, uid: str) -> None:
    async def main() -> None:
        q, control = await connected(broker, uid)
        control.end()
        await q.closed()
        # the session is gone cleanly: the same id connects again at once
        q2, _ = await connected(broker, uid)
        await q2.aclose()
        await q.aclose()
    run(main)


def test_malformed_packet_on_a_data_stream_closes_with_the_reason(broker: Broker, uid: str) -> None:
    async def main() -> None:
        q, control = await connected(broker, uid)
        data = await q.stream()
        data.send(b"\x30\x04\x00\x09ab")  # topic length past the packet's end
        d = await control.expect(rc.DISCONNECT)
        assert rc.disconnect_reason(d) == 0x81
        await q.closed()
        await q.aclose()
    run(main)
    assert "protocol error" in broker.log()


def test_takeover_from_tcp_tells_the_quic_client(broker: Broker, uid: str) -> None:
    async def main() -> None:
        q, control = await connected(broker, uid)
        with RawClient(broker.host, broker.port) as tcp:
            tcp.send(rc.connect(uid, version=V5))
            tcp.expect(rc.CONNACK)
            d = await control.expect(rc.DISCONNECT)
            assert rc.disconnect_reason(d) == 0x8E
            await q.closed()
        await q.aclose()
    run(main)


def test_wrong_alpn_is_refused(broker: Broker) -> None:
    async def main() -> None:
        with pytest.raises(ConnectionError):
            await RawQuic.open(broker.host, broker.ports["quic"], alpn=["h3"])
    run(main)


def test_keepalive_counts_data_stream_traffic(make_broker: Callable[..., Broker], uid: str) -> None:
    b = make_broker()

    async def main() -> None:
        q, control = await connected(b, uid, keepalive=1)
        data = await q.stream()
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0  # twice the 1.5 s keepalive limit
        while loop.time() < end:
            # traffic only on the data stream, paced well inside the keepalive
            data.send(rc.publish(f"{uid}/ka", b".", version=V5))
            await asyncio.sleep(0.3)
        await control.silent(0.1)  # no DISCONNECT 0x8D
        control.send(rc.packet(0xC0, b""))
        await control.expect(rc.PINGRESP)
        await q.aclose()
    run(main)


def test_self_signed_certificate_is_generated_once(make_broker: Callable[..., Broker]) -> None:
    b = make_broker()
    cert = b.workdir / "data" / "quic-selfsigned.crt"
    key = b.workdir / "data" / "quic-selfsigned.key"
    assert cert.exists() and key.exists()
    assert os.stat(key).st_mode & 0o077 == 0  # the private key is not readable by others


@pytest.mark.parametrize("count", [2, 4])
def test_bpf_steering_on_a_real_socket_group(count: int) -> None:
    """The kernel runs our program: a datagram goes to the socket its connection id names,
    whichever source address it comes from (that is what a migrating client needs)."""
    group = make_udp_group("127.0.0.1", 0, count)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
    try:
        attach_steering(group[0], count)
        port = group[0].getsockname()[1]
        for s in group:
            s.settimeout(2.0)
        for sender in senders:
            for index in range(count):
                cid = tagged_cid(index, count)
                short = bytes([0x40]) + cid + os.urandom(20)
                long_ = bytes([0xC0, 0, 0, 0, 1, len(cid)]) + cid + os.urandom(20)
                for datagram in (short, long_):
                    sender.sendto(datagram, ("127.0.0.1", port))
                    got, _ = group[index].recvfrom(2048)
                    assert got == datagram
    finally:
        for s in group + senders:
            s.close()


def test_connection_limit_closes_the_extra_quic_connection(make_broker: Callable[..., Broker],
                                                          uid: str) -> None:
    b = make_broker({"listeners": {"quic": {"max_connections": 1}}})

    async def main() -> None:
        q1, _ = await connected(b, uid + "a")
        q2 = await RawQuic.open(b.host, b.ports["quic"])
        control = await q2.stream()
        control.send(rc.connect(uid + "b", version=V5))
        assert await control.read() is None  # no CONNACK: closed as it opened its stream
        await q2.closed()
        close = q2.close_info()
        assert close is not None and close.error_code == 2  # EMQX's "overloaded"
        await q2.aclose()
        await q1.aclose()
    run(main)
    assert "listeners.quic.max_connections" in b.log()


def _will_subscriber(b: Broker, uid: str) -> RawClient:
    sub = RawClient(b.host, b.port)
    sub.send(rc.connect(uid + "w", version=V5))
    sub.expect(rc.CONNACK)
    sub.send(rc.subscribe(1, [(f"{uid}/will", 0)], version=V5))
    sub.expect(rc.SUBACK)
    return sub


def test_will_of_a_quic_client_that_closes_without_disconnect(broker: Broker, uid: str) -> None:
    with _will_subscriber(broker, uid) as sub:
        async def main() -> None:
            q, _ = await connected(broker, uid, will=(f"{uid}/will", b"gone"))
            await q.aclose()  # QUIC CONNECTION_CLOSE, no MQTT DISCONNECT
        run(main)
        p = rc.parse_publish(sub.expect(rc.PUBLISH), V5)
        assert (p.topic, p.payload) == (f"{uid}/will", b"gone")


class _Void:
    def sendto(self, data: bytes, addr: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_will_of_a_quic_client_that_vanishes(make_broker: Callable[..., Broker], uid: str) -> None:
    """No packet at all any more (the phone left coverage): the QUIC idle timeout ends the
    connection and the will goes out."""
    b = make_broker({"listeners": {"quic": {"idle_timeout": 1.0}}})
    with _will_subscriber(b, uid) as sub:
        async def main() -> None:
            q, _ = await connected(b, uid, will=(f"{uid}/will", b"vanished"))
            assert q.protocol is not None
            q.protocol._transport.close()  # the socket is gone: nothing more is sent
            q.protocol._transport = _Void()
            await q.aclose()  # its CONNECTION_CLOSE goes nowhere
        run(main)
        p = rc.parse_publish(sub.expect(rc.PUBLISH, timeout=10.0), V5)
        assert p.payload == b"vanished"


def test_own_publish_on_a_data_stream_is_delivered_where_the_subscription_was_made(
        broker: Broker, uid: str) -> None:
    async def main() -> None:
        q, control = await connected(broker, uid)
        control.send(rc.subscribe(1, [(f"{uid}/own", 0)], version=V5))
        await control.expect(rc.SUBACK)
        data = await q.stream()
        data.send(rc.publish(f"{uid}/own", b"self", qos=1, packet_id=5, version=V5))
        await data.expect(rc.PUBACK)
        p = rc.parse_publish(await control.expect(rc.PUBLISH), V5)
        assert p.payload == b"self"
        await data.silent()
        await q.aclose()
    run(main)


def test_stop_sending_after_disconnect_is_harmless(broker: Broker, uid: str) -> None:
    """A client that sends DISCONNECT and at once STOP_SENDING on the control stream (quiche's
    forced teardown does): the broker's last write on that stream must not blow up."""
    async def main() -> None:
        q, control = await connected(broker, uid)
        control.send(rc.disconnect(V5))
        assert q.protocol is not None
        q.protocol._quic.stop_stream(control.stream_id, 0)
        q.protocol.transmit()
        await q.closed()
        await q.aclose()
    run(main)
    # the module's broker fixture fails the module if this logged an unhandled error


def test_a_long_lived_client_may_open_more_streams_than_the_initial_limit(
        broker: Broker, uid: str) -> None:
    """The initial grant is 128 client streams; ended data streams give their slot back
    (aioquic does so as it discards a finished stream), so a multi-stream client that opens
    one per request goes on past 128."""
    async def main() -> None:
        q, control = await connected(broker, uid)
        for i in range(150):
            data = await q.stream()
            data.send(rc.subscribe(i % 60000 + 1, [(f"{uid}/s/{i}", 0)], version=V5))
            await data.expect(rc.SUBACK)
            data.end()
            assert await data.read() is None
        control.send(rc.packet(0xC0, b""))
        await control.expect(rc.PINGRESP)
        await q.aclose()
    run(main, timeout=60.0)
