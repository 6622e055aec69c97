"""PROXY protocol v1 and v2 (HAProxy), sans-IO, plus the asyncio layer that reads it.

Knows nothing of MQTT. A load balancer in TCP mode hides the client's address:
with ``send-proxy``/``send-proxy-v2`` it sends one header first that names the
real source, which then replaces ``get_extra_info("peername")`` for the inner
protocol. A listener with PROXY protocol on requires the header: a connection
that starts with anything else is closed (whoever can reach such a port directly
could otherwise claim any address).

Bounded and timer-free: a v1 header is at most 107 bytes and a v2 header at most
16 + ``MAX_V2_PAYLOAD`` bytes, so a peer cannot make us buffer more; a peer that
stalls in the middle of a header is closed by the inner protocol's own deadline
(the MQTT connect timeout), because the inner protocol is told of the connection
at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

from listeners.adapter import Layer

log = logging.getLogger("shoal.proxy")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the specification's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V2_PAYLOAD = 1024  # addresses (at most 216 bytes) plus room for TLVs; more is refused

PENDING, DONE = "PENDING", "DONE"


class ProxyError(Exception):
    """The connection did not start with a valid PROXY protocol header."""


Address = tuple[str, int] | None


class ProxyHeaderReader:
    """Feed the first bytes of a connection; learn the real source address.

    :meth:`receive_data` returns None while the header is incomplete, then the
    bytes that followed it (possibly empty). :attr:`source` is the client's
    (host, port), or None for a LOCAL/UNKNOWN header (health checks), in which
    case the connection's own address stands.
    """

    __slots__ = ("_buf", "state", "source", "version")

    def __init__(self) -> None:
        self._buf = b""
        self.state = PENDING
        self.source: Address = None
        self.version = 0

    def receive_data(self, data: bytes) -> bytes | None:
        if self.state == DONE:
            return data
        buf = self._buf + data if self._buf else bytes(data)
        n = len(buf)
        if buf[:min(n, 12)] == V2_SIGNATURE[:min(n, 12)]:
            if n < 16:
                self._buf = buf
                return None
            return self._v2(buf)
        if buf[:min(n, 6)] == V1_PREFIX[:min(n, 6)]:
            end = buf.find(b"\r\n", 0, V1_MAX)
            if end < 0:
                if n >= V1_MAX:
                    raise ProxyError("PROXY v1 line longer than 107 bytes")
                self._buf = buf
                return None
            self._v1(buf[:end])
            return self._done(buf[end + 2:])
        raise ProxyError(f"no PROXY protocol header (starts with {buf[:16]!r})")

    def _done(self, rest: bytes) -> bytes:
        self.state = DONE
        self._buf = b""
        return rest

    def _v1(self, line: bytes) -> None:
        self.version = 1
        try:
            parts = line.decode("ascii").split(" ")
        except UnicodeDecodeError:
            raise ProxyError("PROXY v1 line is not ASCII") from None
        if len(parts) >= 2 and parts[1] == "UNKNOWN":
            return  # the balancer does not know: keep the connection's own address
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            raise ProxyError(f"malformed PROXY v1 line {line[:V1_MAX]!r}")
        _, proto, src, _dst, sport, dport = parts
        try:
            addr = ipaddress.ip_address(src)
            ipaddress.ip_address(_dst)
            port = int(sport, 10)
            dp = int(dport, 10)
        except ValueError:
            raise ProxyError(f"malformed PROXY v1 line {line[:V1_MAX]!r}") from None
        if (addr.version == 4) != (proto == "TCP4") or not (0 <= port <= 65535) or not (
                0 <= dp <= 65535) or sport != str(port):
            raise ProxyError(f"malformed PROXY v1 line {line[:V1_MAX]!r}")
        self.source = (str(addr), port)

    def _v2(self, buf: bytes) -> bytes | None:
        ver_cmd, fam, length = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
        if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1:
            raise ProxyError(f"unsupported PROXY v2 version/command 0x{ver_cmd:02X}")
        if length > MAX_V2_PAYLOAD:
            raise ProxyError(f"PROXY v2 header of {length} bytes exceeds {MAX_V2_PAYLOAD}")
        if len(buf) < 16 + length:
            self._buf = buf
            return None
        self.version = 2
        body = buf[16:16 + length]
        rest = buf[16 + length:]
        if ver_cmd & 0x0F == 0:  # LOCAL: the balancer's own connection (a health check)
            return self._done(rest)
        family, transport = fam >> 4, fam & 0x0F
        if transport not in (0, 1):  # UNSPEC or STREAM; DGRAM makes no sense here
            raise ProxyError(f"PROXY v2 transport {transport} is not a stream")
        if family == 1:  # AF_INET: src 4, dst 4, sport 2, dport 2
            if length < 12:
                raise ProxyError("PROXY v2 IPv4 addresses truncated")
            self.source = (socket.inet_ntop(socket.AF_INET, body[0:4]),
                           struct.unpack_from("!H", body, 8)[0])
        elif family == 2:  # AF_INET6: 16, 16, 2, 2
            if length < 36:
                raise ProxyError("PROXY v2 IPv6 addresses truncated")
            self.source = (socket.inet_ntop(socket.AF_INET6, body[0:16]),
                           struct.unpack_from("!H", body, 32)[0])
        elif family not in (0, 3):  # UNSPEC or UNIX: keep the connection's address
            raise ProxyError(f"PROXY v2 unknown address family {family}")
        return self._done(rest)


class ProxyProtocolLayer(Layer):
    """Reads the PROXY header, then passes bytes through; ``peername`` becomes the
    client's real address for the inner protocol (``proxy_peername`` keeps the
    balancer's)."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        super().__init__(inner)
        self.reader = ProxyHeaderReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._extra["proxy_peername"] = transport.get_extra_info("peername")
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader.state == DONE:
            self.inner.data_received(data)
            return
        try:
            rest = reader.receive_data(data)
        except ProxyError as err:
            log.info("PROXY protocol error from %s: %s; closing", self.peer_text(), err)
            self._closing = True
            self.transport.close()
            return
        if rest is None:
            return
        if reader.source is not None:
            self._extra["peername"] = reader.source
        if rest and self._inner_made:
            self.inner.data_received(rest)
