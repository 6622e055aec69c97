"""A byte-pipe layer between an asyncio transport and an inner asyncio.Protocol.

Knows nothing of MQTT. A :class:`Layer` is the protocol the loop talks to and,
towards the inner protocol, the transport: the WebSocket and PROXY-protocol
layers subclass it and override how bytes go in (:meth:`Layer.data_received`)
and out (:meth:`Layer.write`). Layers stack: PROXY -> WebSocket -> MQTT.

The inner protocol's ``connection_made`` runs at once, before any layer
handshake, so whatever deadline the inner protocol keeps for its first bytes (the
MQTT connect timeout) also bounds a client that stalls in a handshake or a PROXY
header: the layers themselves need no timer.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Layer(asyncio.Protocol):
    """Transport for ``inner``, protocol for the outer ``transport``."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.transport: Any = None
        self._extra: dict[str, Any] = {}
        self._inner_made = False
        self._closing = False

    # -- the protocol side (the loop or an outer layer calls these) ----------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._inner_made = True
        self.inner.connection_made(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._inner_made:
            self._inner_made = False
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    # -- the transport side (the inner protocol calls these) -----------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self._closing = True
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def is_closing(self) -> bool:
        return self._closing or self.transport is None or self.transport.is_closing()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def is_reading(self) -> bool:
        return bool(self.transport is not None and self.transport.is_reading())

    def get_write_buffer_size(self) -> int:
        return int(self.transport.get_write_buffer_size()) if self.transport is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    def peer_text(self) -> str:
        peer = self.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
