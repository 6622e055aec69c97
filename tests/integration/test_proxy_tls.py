"""PROXY protocol on the TLS and WSS listeners against a real broker: the header comes
first, then a real TLS handshake (Python's ssl client), then MQTT (over WebSocket for WSS),
under both loops."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.conftest import _finish
from tests.harness import Broker, start_shoal
from tests.integration import rawclient as raw
from tests.integration.pki import PKI
from tests.integration.test_tls_ws import recv_until_closed, tls_table, v2_header
from tests.integration.transports import HOST, WSRaw, client_ctx

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

V1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 8883\r\n"
BAD_PACKET = bytes.fromhex("f000")  # a reserved packet type: a protocol error, logged with the peer


class ProxiedTLS(raw.RawClient):
    """A PROXY header in clear, then TLS over the same socket."""

    def __init__(self, port: int, ctx: ssl.SSLContext, header: bytes, timeout: float = 5.0) -> None:
        plain = socket.create_connection((HOST, port), timeout=timeout)
        plain.sendall(header)
        self.sock = ctx.wrap_socket(plain, server_hostname="localhost")
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self.version = 4


@pytest.fixture(scope="module")
def ptb(loop_name: str, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    root = tmp_path_factory.mktemp("proxytls")
    # alice (the client certificate's CN) is banned: a refusal proves the certificate
    # reached the MQTT layer through the PROXY and TLS layers
    banned = root / "banned.json"
    banned.write_text(json.dumps({"version": 1, "bans": [{"kind": "username", "value": "alice"}]}))
    b = start_shoal(root / "broker", {
        "mqtt": {"connect_timeout": 1.0},
        "auth": {"banned_file": str(banned)},
        "listeners": {"tls": tls_table(pki, "optional", "cn") | {"proxy_protocol": True},
                      "wss": tls_table(pki, "optional", "cn") | {"proxy_protocol": True}}},
        loop=loop_name)
    try:
        yield b
    finally:
        _finish(b)


def test_tls_after_v1_and_v2_headers_gives_the_real_address(ptb: Broker, pki: PKI, uid: str) -> None:
    port = ptb.ports["tls"]
    for header, shown in ((V1, "203.0.113.7:4242"), (v2_header("2001:db8::7", 5151),
                                                     "2001:db8::7:5151")):
        with ProxiedTLS(port, client_ctx(pki, cert=False), header) as c:
            c.send(raw.connect(f"{uid}a"))
            assert c.expect(raw.CONNACK).body[1] == 0
            c.send(raw.subscribe(1, [(f"{uid}/t", 0)]) + raw.publish(f"{uid}/t", b"over proxy+tls"))
            c.expect(raw.SUBACK)
            assert raw.parse_publish(c.expect(raw.PUBLISH), 4).payload == b"over proxy+tls"
            c.send(BAD_PACKET)
            c.expect_eof()
        assert f"protocol error from {shown}" in ptb.log(), ptb.log()[-2000:]


def test_client_certificate_is_seen_through_the_layers(ptb: Broker, pki: PKI, uid: str) -> None:
    with ProxiedTLS(ptb.ports["tls"], client_ctx(pki), V1) as c:
        c.send(raw.connect(f"{uid}cert"))
        assert c.expect(raw.CONNACK).body[1] == 5  # banned by CN (v3: not authorized)


def test_wss_after_a_header(ptb: Broker, pki: PKI, uid: str) -> None:
    plain = socket.create_connection((HOST, ptb.ports["wss"]), timeout=5)
    plain.sendall(b"PROXY TCP4 198.51.100.9 10.0.0.1 6060 8084\r\n")
    tls = client_ctx(pki, cert=False).wrap_socket(plain, server_hostname="localhost")
    with WSRaw(ptb.ports["wss"], sock=tls) as c:
        c.send(raw.connect(f"{uid}ws"))
        assert c.expect(raw.CONNACK).body[1] == 0
        c.send(BAD_PACKET)
        assert c.read() is None
    assert "protocol error from 198.51.100.9:6060" in ptb.log()


def test_no_header_bad_tls_or_a_stall_is_closed(ptb: Broker, pki: PKI) -> None:
    port = ptb.ports["tls"]
    # TLS straight away, without the header: the PROXY layer refuses it
    with socket.create_connection((HOST, port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, OSError)):
            client_ctx(pki, cert=False).wrap_socket(s, server_hostname="localhost")
    # a header, then plain MQTT instead of a handshake
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(V1 + raw.connect("plain"))
        out = recv_until_closed(s)
        assert out == b"" or out[0] == 0x15  # closed, at most after a TLS alert record
    # a header, then half a ClientHello and nothing more: closed at the handshake timeout
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(V1 + b"\x16\x03\x01")
        assert recv_until_closed(s, timeout=10) == b""
    log = ptb.log()
    assert "PROXY protocol error from 127.0.0.1" in log
    assert "TLS handshake failed" in log and "not done within" in log
    # and the listener still serves
    with ProxiedTLS(port, client_ctx(pki, cert=False), V1) as c:
        c.send(raw.connect("after"))
        assert c.expect(raw.CONNACK).body[1] == 0


def test_the_tls_layer_refuses_what_the_context_refuses(ptb: Broker, pki: PKI) -> None:
    # a certificate from another CA is refused in the handshake
    ctx = client_ctx(pki, stranger=True)
    with pytest.raises((ssl.SSLError, OSError, raw.RawEOF)):
        with ProxiedTLS(ptb.ports["tls"], ctx, V1) as c:
            c.send(raw.connect("stranger"))
            c.expect(raw.CONNACK)
