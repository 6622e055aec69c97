"""The sans-IO connection: bytes in, packets out, time passed in."""

from __future__ import annotations

import pytest

from shards.protocol.codec import decode, encode
from shards.protocol.connection import CLOSED, CONNECTED, CONNECTING, MQTTConnection
from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.packets import (
    MQTT_5, MQTT_311, Connack, Connect, Disconnect, Pingreq, Prop, Publish, Puback,
)
from shards.protocol.reader import FrameReader


def written(conn: MQTTConnection, version: int) -> list[object]:
    reader = FrameReader()
    reader.feed(conn.data_to_send())
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(decode(frame[0], frame[1], version))
    return out


def connected(version: int = MQTT_5, keepalive: int = 10, now: float = 0.0, **kw: object) -> MQTTConnection:
    conn = MQTTConnection(now, **kw)  # type: ignore[arg-type]
    conn.receive_data(encode(Connect("c", protocol_level=version, keepalive=keepalive), version), now)
    assert isinstance(conn.next_packet(), Connect)
    conn.accept(Connack(), keepalive)
    conn.data_to_send()
    return conn


def test_keepalive_expires_after_one_and_a_half_intervals() -> None:
    conn = connected(keepalive=10, now=100.0)
    assert conn.handle_timer(100.0 + 14.9) is None
    conn.receive_data(encode(Pingreq(), MQTT_5), 110.0)
    assert conn.handle_timer(110.0 + 15.0) is None
    assert conn.handle_timer(110.0 + 15.1) == Reason.KEEP_ALIVE_TIMEOUT


def test_keepalive_zero_never_expires() -> None:
    conn = connected(keepalive=0)
    assert conn.handle_timer(1e9) is None


def test_connect_timeout() -> None:
    conn = MQTTConnection(0.0, connect_timeout=2.0)
    assert conn.handle_timer(1.9) is None
    assert conn.handle_timer(2.0) == Reason.MAXIMUM_CONNECT_TIME


def test_first_packet_must_be_connect() -> None:
    conn = MQTTConnection(0.0)
    conn.receive_data(encode(Pingreq(), MQTT_311), 0.0)
    with pytest.raises(ProtocolError) as err:
        conn.next_packet()
    conn.fail(err.value)
    assert conn.state == CLOSED and conn.data_to_send() == b""


def test_frames_after_connect_wait_for_accept() -> None:
    conn = MQTTConnection(0.0)
    data = encode(Connect("c", protocol_level=MQTT_5), MQTT_5) + encode(Pingreq(), MQTT_5)
    conn.receive_data(data, 0.0)
    assert isinstance(conn.next_packet(), Connect)
    assert conn.state == CONNECTING and conn.next_packet() is None
    conn.accept(Connack(), 60)
    assert conn.state == CONNECTED and isinstance(conn.next_packet(), Pingreq)


def test_second_connect_is_a_protocol_error_reported_by_disconnect() -> None:
    conn = connected()
    conn.receive_data(encode(Connect("c", protocol_level=MQTT_5), MQTT_5), 0.0)
    with pytest.raises(ProtocolError) as err:
        conn.next_packet()
    conn.fail(err.value)
    out = written(conn, MQTT_5)
    assert isinstance(out[0], Disconnect) and out[0].reason_code == Reason.PROTOCOL_ERROR
    assert conn.state == CLOSED


def test_v311_protocol_error_closes_without_packet() -> None:
    conn = connected(version=MQTT_311)
    conn.fail(ProtocolError(Reason.MALFORMED_PACKET, "x"))
    assert conn.data_to_send() == b"" and conn.state == CLOSED


def test_errors_before_connack_become_connack() -> None:
    conn = MQTTConnection(0.0)
    conn.receive_data(encode(Connect("c", protocol_level=MQTT_5), MQTT_5), 0.0)
    conn.next_packet()
    conn.fail(ProtocolError(Reason.NOT_AUTHORIZED, "no"))
    out = written(conn, MQTT_5)
    assert isinstance(out[0], Connack) and out[0].reason_code == Reason.NOT_AUTHORIZED


def test_unsupported_protocol_level_gets_v311_code_1() -> None:
    conn = MQTTConnection(0.0)
    # CONNECT with protocol level 6
    conn.receive_data(bytes.fromhex("100d00044d5154540602003c0001") + b"c", 0.0)
    with pytest.raises(ProtocolError) as err:
        conn.next_packet()
    assert err.value.reason == Reason.UNSUPPORTED_PROTOCOL_VERSION
    conn.fail(err.value)
    assert conn.data_to_send() == b"\x20\x02\x00\x01"


def test_oversize_packet_rejected_from_its_header() -> None:
    conn = connected(max_packet_size=1024)
    conn.receive_data(b"\x30\xff\xff\x03", 0.0)  # PUBLISH announcing ~64 KiB
    with pytest.raises(ProtocolError) as err:
        conn.next_packet()
    assert err.value.reason == Reason.PACKET_TOO_LARGE


def test_problem_information_zero_strips_reason_strings_from_acks() -> None:
    conn = MQTTConnection(0.0)
    conn.receive_data(encode(Connect("c", protocol_level=MQTT_5,
                                     props={Prop.REQUEST_PROBLEM_INFORMATION: 0}), MQTT_5), 0.0)
    conn.next_packet()
    conn.accept(Connack(), 60)
    conn.send(Puback(1, Reason.NOT_AUTHORIZED, {Prop.REASON_STRING: "denied"}))
    out = written(conn, MQTT_5)
    assert out[1] == Puback(1, Reason.NOT_AUTHORIZED)


def test_outbound_publish_respects_client_maximum_packet_size() -> None:
    conn = MQTTConnection(0.0)
    conn.receive_data(encode(Connect("c", protocol_level=MQTT_5,
                                     props={Prop.MAXIMUM_PACKET_SIZE: 32}), MQTT_5), 0.0)
    conn.next_packet()
    conn.accept(Connack(), 60)
    conn.data_to_send()
    assert conn.send_publish("t", b"small", 0, False, 0, None)
    assert not conn.send_publish("t", b"x" * 64, 0, False, 0, None)
    assert written(conn, MQTT_5) == [Publish("t", b"small")]
