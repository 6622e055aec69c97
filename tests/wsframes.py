"""Client-side WebSocket helpers for tests: an upgrade request and masked frames."""

from __future__ import annotations

import base64
import struct

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade_request(path: str = "/mqtt", protocol: str | None = "mqtt", key: str = KEY,
                    extra: str = "", host: str = "localhost") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bytes | None = None,
                 masked: bool = True, rsv: int = 0, length: int | None = None) -> bytes:
    """One client frame; ``length`` overrides the header's length field (for lies)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = mask if mask is not None else b"\x37\xfa\x21\x3d"  # RFC 6455's example
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def parse_server_frames(data: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """Unmasked server frames in ``data``: ([(opcode, fin, payload)], the unparsed rest)."""
    frames = []
    pos = 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "server frames must not be masked"
        n, head = b1 & 0x7F, 2
        if n == 126:
            if len(data) - pos < 4:
                break
            n, head = struct.unpack_from("!H", data, pos + 2)[0], 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            n, head = struct.unpack_from("!Q", data, pos + 2)[0], 10
        if len(data) - pos < head + n:
            break
        frames.append((b0 & 0x0F, bool(b0 & 0x80), data[pos + head:pos + head + n]))
        pos += head + n
    return frames, data[pos:]
