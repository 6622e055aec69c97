"""PROXY protocol v1/v2 header reader (sans-IO) and the certificate-name helper."""

from __future__ import annotations

import socket
import struct

import pytest

from listeners.proxy import (DONE, V2_SIGNATURE, ProxyError, ProxyHeaderReader)
from listeners.tls import peer_identity


def v2(src: str = "203.0.113.7", sport: int = 4242, dst: str = "10.0.0.1", dport: int = 1883,
       cmd: int = 1, tlv: bytes = b"") -> bytes:
    if ":" in src:
        body = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack("!HH", sport, dport))
        fam = 0x21
    else:
        body = (socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst)
                + struct.pack("!HH", sport, dport))
        fam = 0x11
    body += tlv
    return V2_SIGNATURE + bytes((0x20 | cmd, fam)) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("header, source", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 1883\r\n", ("203.0.113.7", 4242)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 1883\r\n", ("2001:db8::7", 4242)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (v2(), ("203.0.113.7", 4242)),
    (v2("2001:db8::9", 5555, "2001:db8::1"), ("2001:db8::9", 5555)),
    (v2(tlv=b"\x01\x00\x04mqtt"), ("203.0.113.7", 4242)),
    (v2(cmd=0), None),
])
def test_headers_give_the_source_and_pass_the_rest(header: bytes, source: object) -> None:
    rest = b"\x10\x0c\x00\x04MQTT"
    for step in (1, 5, len(header) + len(rest)):
        r = ProxyHeaderReader()
        data = header + rest
        out = []
        for i in range(0, len(data), step):
            got = r.receive_data(data[i:i + step])
            if got is not None:
                out.append(got)
        assert r.state == DONE and r.source == source
        assert b"".join(out) == rest


@pytest.mark.parametrize("data", [
    b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",   # an MQTT CONNECT, no header
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
    b"PROXY TCP4 ::1 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 " + b"1" * 120,
    b"PROXY \xff\r\n",
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),   # version 3
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),   # command 2
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),    # IPv4 truncated
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),   # DGRAM
    V2_SIGNATURE + b"\x21\x11\xff\xff",               # length beyond the bound
    V2_SIGNATURE + b"\x21\x51\x00\x00",               # unknown family
])
def test_bad_or_missing_headers_raise(data: bytes) -> None:
    with pytest.raises(ProxyError):
        ProxyHeaderReader().receive_data(data)


def test_after_the_header_bytes_pass_untouched() -> None:
    r = ProxyHeaderReader()
    assert r.receive_data(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n") == b""
    assert r.receive_data(b"PROXY again") == b"PROXY again"


def test_peer_identity() -> None:
    cert = {"subject": ((("countryName", "NL"),), (("commonName", "alice"),)),
            "subjectAltName": (("IP Address", "10.0.0.1"), ("email", "a@x"), ("DNS", "alice.example"))}
    assert peer_identity(cert, "cn") == "alice"
    assert peer_identity(cert, "san") == "alice.example"
    assert peer_identity(cert, "none") is None
    assert peer_identity(None, "cn") is None
    assert peer_identity({}, "san") is None
    assert peer_identity({"subjectAltName": (("email", "a@x"),)}, "san") == "a@x"
