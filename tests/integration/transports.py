"""Raw MQTT clients over TLS and WebSocket for the integration and system tests."""

from __future__ import annotations

import socket
import ssl
import time

from tests.integration import rawclient as raw
from tests.integration.pki import PKI
from tests.wsframes import client_frame, parse_server_frames, upgrade_request

HOST = "127.0.0.1"


def client_ctx(pki: PKI, cert: bool = True, stranger: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if stranger:
        ctx.load_cert_chain(str(pki.stranger_cert), str(pki.stranger_key))
    elif cert:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


class TLSRaw(raw.RawClient):
    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> None:
        plain = socket.create_connection((HOST, port), timeout=timeout)
        self.sock = ctx.wrap_socket(plain, server_hostname="localhost")
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self.version = 4


class WSRaw(raw.RawClient):
    """A raw MQTT client over WebSocket: MQTT bytes go out in masked binary frames
    (split as a test asks); server frames are unwrapped, control frames kept apart."""

    def __init__(self, port: int, sock: socket.socket | None = None, timeout: float = 5.0,
                 handshake: bool = True) -> None:
        if sock is None:
            super().__init__(HOST, port, timeout)
        else:  # a connection that has already sent something (a PROXY header)
            self.sock, self.timeout, self.buf, self.eof, self.version = sock, timeout, bytearray(), False, 4
        self.raw = b""
        self.control: list[tuple[int, bytes]] = []
        self.response = b""
        if handshake:
            self.sock.sendall(upgrade_request())
            self.response = self.read_http()
            assert self.response.startswith(b"HTTP/1.1 101 "), self.response

    def read_http(self) -> bytes:
        self.sock.settimeout(self.timeout)
        while b"\r\n\r\n" not in self.raw:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.raw += chunk
        head, _, self.raw = self.raw.partition(b"\r\n\r\n")
        return head

    def send(self, data: bytes) -> None:
        self.sock.sendall(client_frame(2, data))

    def _fill(self, deadline: float) -> bool:
        if self.eof:
            return False
        frames, self.raw = parse_server_frames(self.raw)
        if not frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise raw.RawTimeout("no data from the broker in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise raw.RawTimeout("no data from the broker in time") from None
            except (ConnectionResetError, ConnectionAbortedError):
                chunk = b""
            if not chunk:
                self.eof = True
                return False
            self.raw += chunk
            return True
        for op, _fin, payload in frames:
            if op == 2 or op == 0:
                self.buf += payload
            else:
                self.control.append((op, payload))
        return True
