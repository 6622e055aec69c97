"""shards.mqttclient against misbehaving servers: real sockets, a tiny scripted TCP server.

A broker that sends garbage, refuses, or vanishes must end in a clean MQTTError (and a
None on the messages queue), never a hang or a traceback in the loop.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from listeners.quicclient import QuicConnectError
from shards.mqttclient import MQTTClient, MQTTError, parse_version
from tests.harness import Broker
from tests.integration.pki import PKI

pytestmark = pytest.mark.integration

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def serve_and_run(script: Script, main: Callable[[int], Awaitable[None]]) -> None:
    async def outer() -> None:
        errors: list[BaseException] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(
            ctx.get("exception") or RuntimeError(ctx["message"])))

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await script(r, w)
            finally:
                w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await asyncio.wait_for(main(port), 20)
        assert not errors, errors
    asyncio.run(outer())


async def read_packet(r: asyncio.StreamReader) -> bytes:
    head = await r.readexactly(2)
    assert head[1] < 128  # the client's packets here are small
    return head + await r.readexactly(head[1])


CONNACK_OK = b"\x20\x02\x00\x00"


def test_garbage_instead_of_connack_is_a_clean_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_packet(r)
        w.write(b"\x00\x05hello")  # packet type 0 is reserved: malformed
        await r.read()

    async def main(port: int) -> None:
        with pytest.raises(MQTTError):
            await MQTTClient.connect_tcp("127.0.0.1", port, client_id="g", timeout=5)
    serve_and_run(script, main)


def test_refused_connack_raises_with_its_code() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_packet(r)
        w.write(b"\x20\x02\x00\x05")  # 3.1.1: not authorised
        await r.read()

    async def main(port: int) -> None:
        with pytest.raises(MQTTError) as info:
            await MQTTClient.connect_tcp("127.0.0.1", port, client_id="r", timeout=5)
        # the codec reads a 3.1.1 return code as its MQTT 5 reason: 5 -> 0x87 Not authorized
        assert info.value.reason_code == 0x87
    serve_and_run(script, main)


def test_server_vanishing_fails_the_waiter_and_ends_the_queue() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_packet(r)
        w.write(CONNACK_OK)
        await read_packet(r)  # the SUBSCRIBE: drop the connection instead of answering

    async def main(port: int) -> None:
        c = await MQTTClient.connect_tcp("127.0.0.1", port, client_id="v", timeout=5)
        with pytest.raises(MQTTError):
            await c.subscribe([("a", 1)], timeout=5)
        assert await asyncio.wait_for(c.messages.get(), 5) is None
        assert not c.is_connected()
    serve_and_run(script, main)


def test_qos2_redelivery_with_dup_is_delivered_once() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_packet(r)
        w.write(CONNACK_OK)
        pub = b"\x34\x08\x00\x01t\x00\x07abc"  # QoS 2, topic "t", id 7, payload "abc"
        w.write(pub)
        assert await read_packet(r) == b"\x50\x02\x00\x07"  # PUBREC
        w.write(bytes([pub[0] | 0x08]) + pub[1:])  # the same again with DUP
        assert await read_packet(r) == b"\x50\x02\x00\x07"
        w.write(b"\x62\x02\x00\x07")  # PUBREL
        assert await read_packet(r) == b"\x70\x02\x00\x07"  # PUBCOMP
        w.write(b"\x30\x04\x00\x01tz")  # a QoS 0 marker after it
        await r.read()

    async def main(port: int) -> None:
        c = await MQTTClient.connect_tcp("127.0.0.1", port, client_id="q", timeout=5)
        first = await asyncio.wait_for(c.messages.get(), 5)
        second = await asyncio.wait_for(c.messages.get(), 5)
        assert first is not None and second is not None
        assert (first.payload, first.qos, second.payload) == (b"abc", 2, b"z")
        await c.disconnect()
    serve_and_run(script, main)


@pytest.mark.parametrize("text,level", [("mqttv311", 4), ("311", 4), ("mqttv5", 5), ("5", 5)])
def test_parse_version(text: str, level: int) -> None:
    assert parse_version(text) == level


def test_parse_version_refuses_unknown() -> None:
    with pytest.raises(ValueError):
        parse_version("mqttv31")


# -- against the real broker: TLS, and QUIC with a verified certificate ---------------------------

def _tls_broker_config(pki: PKI) -> dict[str, Any]:
    tls = {"enabled": True, "bind": "127.0.0.1", "port": 0, "certfile": str(pki.server_cert),
           "keyfile": str(pki.server_key)}
    quic = {"bind": "127.0.0.1", "port": 0, "certfile": str(pki.server_cert),
            "keyfile": str(pki.server_key)}
    return {"listeners": {"tls": tls, "quic": quic}}


@pytest.mark.shoal_only
def test_tls_and_verified_quic(make_broker: Callable[..., Broker], pki: PKI, uid: str) -> None:
    b = make_broker(_tls_broker_config(pki))

    async def main() -> None:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        t = await MQTTClient.connect_tcp(b.host, b.ports["tls"], ssl_context=ctx, client_id=uid + "t")
        q = await MQTTClient.connect_quic(b.host, b.ports["quic"], insecure=False,
                                          cafile=str(pki.ca), client_id=uid + "q")
        await q.subscribe([(uid, 1)])
        await t.publish(uid, b"over tls to verified quic", qos=1)
        msg = await asyncio.wait_for(q.messages.get(), 10)
        assert msg is not None and msg.payload == b"over tls to verified quic"
        await t.disconnect()
        await q.disconnect()
    asyncio.run(main())


@pytest.mark.shoal_only
def test_quic_refuses_a_certificate_its_ca_did_not_sign(broker: Broker, pki: PKI) -> None:
    # the module broker presents its generated self-signed certificate, not one from pki.ca
    async def main() -> None:
        with pytest.raises(QuicConnectError):
            await MQTTClient.connect_quic(broker.host, broker.ports["quic"], insecure=False,
                                          cafile=str(pki.ca), client_id="x", timeout=10)
    asyncio.run(main())
