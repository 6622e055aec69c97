"""Frames of the shard-to-shard bus, sans-IO: bytes in, frames out, and the frame codecs.

Wire format of one frame::

    u32 big-endian length of (type + body) | u8 frame type | body

The length counts the type byte, so it is never 0. A stream is a sequence of frames with
nothing in between; the first frame in each direction of a connection is a HELLO.

The decoder keeps incoming chunks in a deque with an offset into the first, like the MQTT
:class:`shards.protocol.reader.FrameReader`: the common case (a chunk holding many whole
frames) slices every frame straight out of the chunk, and only a frame that straddles chunks
is joined, once. The frame-size limit is checked from the 5-byte header alone, before the
body has arrived, so a peer cannot make us buffer a frame we would refuse anyway.

A PUBLISH body is one fixed struct header followed by raw byte strings: measured at about
0.6 µs a frame (FACTS.md), cheaper than any general-purpose serialiser that handles bytes.
CONTROL bodies are orjson: control-plane messages are rare and their shapes change.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from typing import Any, Iterator

import orjson

__all__ = [
    "HELLO", "PUBLISH", "CONTROL", "FRAME_HEADER_SIZE", "MAX_FRAME_SIZE", "BUS_VERSION",
    "FLAG_RETAIN_ONLY", "FLAG_SHARED", "BusProtocolError", "FrameDecoder", "Hello",
    "PublishFrame", "encode_frame", "frame_header", "pack_header", "encode_hello", "decode_hello",
    "encode_publish", "decode_publish", "decode_publish_fields", "PUBLISH_HEADER",
    "encode_control", "decode_control",
]

# Frame types. 0 is never sent, so a zeroed buffer cannot pass for a frame; 5..255 are free
# for later frame types. The decoder passes any type through: it is the bus that decides
# which types are legal at which point of a connection.
HELLO = 1
PUBLISH = 2
CONTROL = 3
DATAGRAM = 4  # a QUIC datagram the kernel gave to the wrong shard, for the owner of its id

# Bumped when a frame layout changes incompatibly. Shards of one host always run one
# release, but a rolling `supervisorctl restart` briefly mixes two: a mismatch is refused
# at HELLO instead of being misparsed frame by frame.
BUS_VERSION = 1

_HEAD = struct.Struct(">IB")
FRAME_HEADER_SIZE = _HEAD.size  # 5
# pack_header(length of type + body, ftype): the header without a Python-level call around it,
# for the bus's send path.
pack_header = _HEAD.pack

# Default limit on one frame (type + body). The largest legitimate frame is a session
# transfer carrying queued messages, or a publish with a payload at MQTT's own ceiling
# (256 MiB, which brokers do not accept by default). 64 MiB bounds what one bad length
# field makes a receiver buffer while leaving room for any sane session.
MAX_FRAME_SIZE = 64 * 1024 * 1024

# Bodies up to this size come back as bytes: copying a small slice costs less than a
# memoryview does, and bytes make the codecs' own slicing cheaper. Larger bodies come back
# as memoryviews into the received chunk, so a big payload is copied only when decoded.
_COPY_LIMIT = 2048

# PUBLISH flags.
FLAG_RETAIN_ONLY = 1  # update the receiver's retained store; deliver to nobody
FLAG_SHARED = 2  # shared-subscription delivery: `group` names the share group
FLAG_ACK = 4  # the sender holds its publisher's PUBACK until this shard says it stored it
_KNOWN_FLAGS = FLAG_RETAIN_ONLY | FLAG_SHARED | FLAG_ACK


class BusProtocolError(Exception):
    """The peer sent bytes that are not a valid bus stream. The connection must be dropped:
    after it the stream position is unknown, so nothing more is read."""


def frame_header(ftype: int, body_len: int) -> bytes:
    """The 5-byte header of a frame whose body is ``body_len`` bytes long."""
    return _HEAD.pack(body_len + 1, ftype)


def encode_frame(ftype: int, body: bytes) -> bytes:
    """A whole frame. The bus itself queues header and body separately and joins once per
    flush; this is for tests and one-off writes."""
    return _HEAD.pack(len(body) + 1, ftype) + body


class FrameDecoder:
    """Incremental frame splitter. After it has raised, it stays failed.

    ``next()`` returns ``(ftype, body)`` or None until more data is fed; iterating yields
    every whole frame buffered so far.
    """

    __slots__ = ("max_frame_size", "_chunks", "_pos", "_size", "_error")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if max_frame_size < 1:
            raise ValueError("max_frame_size must be at least 1 (the type byte)")
        self.max_frame_size = max_frame_size  # limit on type + body, the length field's value
        self._chunks: deque[bytes] = deque()
        self._pos = 0  # offset of the first unread byte in _chunks[0]
        self._size = 0  # unread bytes over all chunks
        self._error: BusProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes. Ignored once the decoder has failed (the link is closing)."""
        if not data or self._error is not None:
            return
        if type(data) is not bytes:
            # A bytearray or a view of a reused receive buffer could change under the
            # slices we hand out; own an immutable copy.
            data = bytes(data)
        self._chunks.append(data)
        self._size += len(data)

    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return self._size

    @property
    def failed(self) -> bool:
        return self._error is not None

    def __iter__(self) -> Iterator[tuple[int, bytes | memoryview]]:
        return self

    def __next__(self) -> tuple[int, bytes | memoryview]:
        frame = self.next()
        if frame is None:
            raise StopIteration
        return frame

    def next(self) -> tuple[int, bytes | memoryview] | None:
        """The next whole frame as (type, body), or None until more data is fed.

        Raises BusProtocolError for a zero length or one above ``max_frame_size``, as soon as
        the header has arrived.
        """
        if self._error is not None:
            raise self._error
        size = self._size
        if size < 5:
            return None
        chunk = self._chunks[0]
        pos = self._pos
        avail = len(chunk) - pos
        if avail >= 5:
            length, ftype = _HEAD.unpack_from(chunk, pos)
        else:
            length, ftype = _HEAD.unpack(self._peek(5))  # header cut by a read: rare
        if length > self.max_frame_size or length == 0:
            self._fail(BusProtocolError(
                "frame with no type byte" if length == 0 else
                f"frame of {length} bytes exceeds the limit of {self.max_frame_size}"))
            raise self._error  # type: ignore[misc]
        total = length + 4
        if avail >= total:
            self._size = size - total
            if avail == total:
                self._chunks.popleft()
                self._pos = 0
            else:
                self._pos = pos + total
            start = pos + 5
            if length <= _COPY_LIMIT:
                return ftype, chunk[start:pos + total]
            return ftype, memoryview(chunk)[start:pos + total]
        if size < total:
            # A large frame trickling in costs one header parse per feed, never a rejoin.
            return None
        data = self._take(total)
        if length <= _COPY_LIMIT:
            return ftype, data[5:]
        return ftype, memoryview(data)[5:]

    def _fail(self, exc: BusProtocolError) -> None:
        self._error = exc
        self._chunks.clear()
        self._size = 0
        self._pos = 0

    def _peek(self, n: int) -> bytes:
        parts = []
        pos = self._pos
        for chunk in self._chunks:
            piece = chunk[pos:pos + n]
            parts.append(piece)
            n -= len(piece)
            pos = 0
            if n <= 0:
                break
        return b"".join(parts)

    def _take(self, n: int) -> bytes:
        """Remove and return the next ``n`` bytes, which span more than one chunk."""
        chunks = self._chunks
        parts = []
        self._size -= n
        while n:
            chunk = chunks[0]
            pos = self._pos
            avail = len(chunk) - pos
            if avail <= n:
                parts.append(chunk[pos:] if pos else chunk)
                chunks.popleft()
                self._pos = 0
                n -= avail
            else:
                parts.append(chunk[pos:pos + n])
                self._pos = pos + n
                n = 0
        return b"".join(parts)


# --------------------------------------------------------------------------------------------
# HELLO: version, sender index, intended recipient index, sender pid, sender epoch.
#
# The recipient index is beyond what identifies the sender: it lets an acceptor refuse a
# connection meant for another shard (a stale socket path, two brokers sharing a run_dir)
# instead of silently taking its traffic. The epoch tells a restarted peer from the old one
# even when the pid is reused.

_HELLO = struct.Struct(">BHHIQ")


class Hello:
    __slots__ = ("version", "index", "peer", "pid", "epoch")

    def __init__(self, version: int, index: int, peer: int, pid: int, epoch: int) -> None:
        self.version = version
        self.index = index  # the sender's shard index
        self.peer = peer  # the shard index the sender believes it is talking to
        self.pid = pid
        self.epoch = epoch

    def __repr__(self) -> str:
        return (f"Hello(version={self.version}, index={self.index}, peer={self.peer}, "
                f"pid={self.pid}, epoch={self.epoch})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hello):
            return NotImplemented
        return (self.version, self.index, self.peer, self.pid, self.epoch) == (
            other.version, other.index, other.peer, other.pid, other.epoch)

    __hash__ = None  # type: ignore[assignment]


def encode_hello(index: int, peer: int, epoch: int, pid: int | None = None) -> bytes:
    try:
        return _HELLO.pack(BUS_VERSION, index, peer, os.getpid() if pid is None else pid, epoch)
    except struct.error as exc:
        raise ValueError(f"HELLO field out of range: {exc}") from None


def decode_hello(body: bytes | memoryview) -> Hello:
    if len(body) != _HELLO.size:
        raise BusProtocolError(f"HELLO body of {len(body)} bytes, expected {_HELLO.size}")
    version, index, peer, pid, epoch = _HELLO.unpack_from(body)
    if version != BUS_VERSION:
        raise BusProtocolError(f"bus version {version}, this shard speaks {BUS_VERSION}")
    return Hello(version, index, peer, pid, epoch)


# --------------------------------------------------------------------------------------------
# PUBLISH: the hot path.
#
#   u64 msg_id | f64 expires_at | u8 bits | u8 flags | u16 topic len | u16 origin len
#   | u16 group len | u32 props len | topic | origin | group | props | payload (the rest)
#
# bits: 0-1 qos, 2 retain, 3 expires_at present. The payload needs no length: it is what
# remains of the body, so a frame's length field bounds it.

_PUB = struct.Struct(">QdBBHHHI")
_PUB_SIZE = _PUB.size
# for a sender that packs the common frame itself (shards/transfer.py)
PUBLISH_HEADER = _PUB
_HAS_EXPIRY = 8


class PublishFrame:
    """A publish forwarded between shards. ``topic``, ``origin`` and ``group`` are str;
    ``payload`` and ``props`` (already-encoded MQTT 5 properties, opaque here) are bytes."""

    __slots__ = ("msg_id", "topic", "payload", "qos", "retain", "origin", "expires_at", "props",
                 "flags", "group")

    def __init__(self, msg_id: int, topic: str, payload: bytes, qos: int, retain: bool,
                 origin: str, expires_at: float | None, props: bytes, flags: int,
                 group: str = "") -> None:
        self.msg_id = msg_id
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.origin = origin
        self.expires_at = expires_at
        self.props = props
        self.flags = flags
        self.group = group

    def __repr__(self) -> str:
        return (f"PublishFrame(msg_id={self.msg_id}, topic={self.topic!r}, "
                f"payload=<{len(self.payload)} bytes>, qos={self.qos}, retain={self.retain}, "
                f"origin={self.origin!r}, expires_at={self.expires_at}, "
                f"props=<{len(self.props)} bytes>, flags={self.flags}, group={self.group!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublishFrame):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def encode_publish(msg_id: int, topic: str, payload: bytes, qos: int, retain: bool, origin: str,
                   expires_at: float | None, props: bytes, flags: int, group: str = "") -> bytes:
    """The body of a PUBLISH frame. ``group`` must be non-empty exactly when ``flags`` has
    FLAG_SHARED. Raises ValueError for a field the layout cannot carry."""
    t = topic.encode()
    o = origin.encode()
    bits = qos | (4 if retain else 0)
    if qos > 2 or qos < 0 or flags & ~_KNOWN_FLAGS:
        raise ValueError(f"invalid qos {qos} or flags {flags}")
    if expires_at is None:
        expiry = 0.0
    else:
        expiry = expires_at
        bits |= _HAS_EXPIRY
    try:
        if group or flags & FLAG_SHARED:
            if not (group and flags & FLAG_SHARED):
                raise ValueError("a share group goes with FLAG_SHARED, and only with it")
            g = group.encode()
            head = _PUB.pack(msg_id, expiry, bits, flags, len(t), len(o), len(g), len(props))
            return b"".join((head, t, o, g, props, payload))
        head = _PUB.pack(msg_id, expiry, bits, flags, len(t), len(o), 0, len(props))
    except struct.error as exc:
        raise ValueError(f"publish field out of range: {exc}") from None
    return b"".join((head, t, o, props, payload))


def decode_publish(body: bytes | memoryview) -> PublishFrame:
    """Parse a PUBLISH body. Raises only BusProtocolError."""
    return PublishFrame(*decode_publish_fields(body))


def decode_publish_fields(body: bytes | memoryview) -> tuple[
        int, str, bytes, int, bool, str, float | None, bytes, int, str]:
    """Parse a PUBLISH body into the fields of a PublishFrame, in its constructor's order,
    without building one: the receiving shard builds its Message from them directly, so
    the hop allocates one object per message, not two. Raises only BusProtocolError."""
    try:
        msg_id, expiry, bits, flags, tlen, olen, glen, plen = _PUB.unpack_from(body)
    except struct.error:
        raise BusProtocolError(f"PUBLISH body of {len(body)} bytes is shorter than its header") from None
    a = _PUB_SIZE + tlen
    b = a + olen
    c = b + glen
    d = c + plen
    if d > len(body) or bits > 15 or bits & 3 == 3 or flags & ~_KNOWN_FLAGS or (
            not glen) != (not flags & FLAG_SHARED):
        raise BusProtocolError("malformed PUBLISH frame")
    if type(body) is bytes:
        head = body
        payload = body[d:]
    else:
        # A large frame arrives as a view into the received chunk: copy the payload out
        # once, and the short head once so that the slicing below is on bytes.
        head = bytes(body[:d])
        payload = bytes(body[d:])
    try:
        topic = head[_PUB_SIZE:a].decode()
        origin = head[a:b].decode() if olen else ""
        group = head[b:c].decode() if glen else ""
    except UnicodeDecodeError:
        raise BusProtocolError("PUBLISH frame with invalid UTF-8") from None
    return (msg_id, topic, payload, bits & 3, bool(bits & 4), origin,
            expiry if bits & _HAS_EXPIRY else None, head[c:d] if plen else b"", flags, group)


# --------------------------------------------------------------------------------------------
# CONTROL: one orjson object per frame (session claims and transfers, subscription deltas).


def encode_control(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def decode_control(body: bytes | memoryview) -> dict[str, Any]:
    """Parse a CONTROL body. Raises only BusProtocolError."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BusProtocolError(f"CONTROL frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BusProtocolError("CONTROL frame is not a JSON object")
    return message
