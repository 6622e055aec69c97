"""Cut an incoming byte stream into MQTT frames (fixed header + body).

Input arrives as chunks of whatever size the transport delivers. The reader
keeps them in a list and an offset into the first one, so the common case (a
chunk holding many whole packets) slices each frame straight out of the chunk
with no copying of the stream; only a frame that straddles chunks is joined.

The packet-size limit is enforced from the fixed header alone, before the body
has arrived, so a peer cannot make us buffer a packet we would refuse anyway.
"""

from __future__ import annotations

from .errors import ProtocolError, Reason, malformed

# Largest possible MQTT packet: 1 byte type + 4 bytes remaining length + 268 435 455.
MAX_PACKET_SIZE = 268_435_460

# Bodies up to this size are returned as bytes: copying a small slice costs less
# than a memoryview does, and bytes make the decoder's own slicing cheaper.
# Larger bodies are returned as memoryviews so the payload is copied only once.
_COPY_LIMIT = 2048


class FrameReader:
    """Incremental frame splitter. After it has raised, it stays failed."""

    __slots__ = ("max_packet_size", "_chunks", "_pos", "_size", "_head", "_error")

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        # Whole-packet limit including the fixed header (as MQTT 5's Maximum Packet Size).
        self.max_packet_size = max_packet_size
        # A list, not a deque: it holds one chunk or none nearly always, and an empty
        # deque costs ~760 bytes against a list's 56, in every idle connection (the
        # connection storm in bench/e2e). Frames that span many chunks drop them with
        # one slice deletion (_take), so the list never degrades to quadratic work.
        self._chunks: list[bytes] = []
        self._pos = 0  # offset of the first unread byte in _chunks[0]
        self._size = 0  # unread bytes over all chunks
        # (byte0, header length, remaining length) of a frame whose header was parsed
        # but whose body has not all arrived: lets a large packet trickle in without
        # reparsing or rejoining anything per feed.
        self._head: tuple[int, int, int] | None = None
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes. Ignored once the reader has failed (the connection is closing)."""
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

    def next_frame(self) -> tuple[int, bytes | memoryview] | None:
        """The next whole frame as (byte 0, body), or None until more data is fed.

        Raises ProtocolError(MALFORMED_PACKET) for packet type 0 or a remaining
        length longer than 4 bytes, ProtocolError(PACKET_TOO_LARGE) as soon as a
        header announces a packet above ``max_packet_size``.
        """
        if self._error is not None:
            raise self._error
        size = self._size
        if not size:
            return None
        chunk = self._chunks[0]
        pos = self._pos
        avail = len(chunk) - pos
        head = self._head
        try:
            if head is not None:
                byte0, hlen, rlen = head
                if hlen + rlen > self.max_packet_size:  # the limit may have shrunk since
                    raise ProtocolError(Reason.PACKET_TOO_LARGE, "packet exceeds maximum packet size")
            elif avail >= 2 and chunk[pos + 1] < 0x80:
                # The common case: a one-byte remaining length inside the first chunk.
                byte0 = chunk[pos]
                if byte0 < 0x10:
                    raise malformed("reserved packet type 0")
                hlen = 2
                rlen = chunk[pos + 1]
                if rlen + 2 > self.max_packet_size:
                    raise ProtocolError(Reason.PACKET_TOO_LARGE, "packet exceeds maximum packet size")
            else:
                parsed = self._parse_header(chunk, pos, avail)
                if parsed is None:
                    return None
                byte0, hlen, rlen = parsed
        except ProtocolError as exc:
            self._fail(exc)
            raise
        total = hlen + rlen
        if avail >= total:
            self._head = None
            self._size = size - total
            if avail == total:
                del self._chunks[0]
                self._pos = 0
            else:
                self._pos = pos + total
            start = pos + hlen
            if rlen <= _COPY_LIMIT:
                return byte0, chunk[start:start + rlen]
            return byte0, memoryview(chunk)[start:start + rlen]
        if size < total:
            self._head = (byte0, hlen, rlen)
            return None
        self._head = None
        data = self._take(total)
        if rlen <= _COPY_LIMIT:
            return byte0, data[hlen:]
        return byte0, memoryview(data)[hlen:]

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        self._chunks.clear()
        self._size = 0
        self._pos = 0
        self._head = None

    def _parse_header(self, chunk: bytes, pos: int, avail: int) -> tuple[int, int, int] | None:
        """Parse a fixed header that may straddle chunks; None if it is incomplete."""
        if avail < 5 and self._size > avail:
            # Gather at most the 5 header bytes; this path is rare (a header cut by a read).
            buf = self._peek(5)
            pos = 0
            avail = len(buf)
        else:
            buf = chunk
        byte0 = buf[pos]
        if byte0 < 0x10:
            raise malformed("reserved packet type 0")
        rlen = 0
        shift = 0
        i = 1
        while True:
            if i >= avail:
                return None
            b = buf[pos + i]
            i += 1
            rlen |= (b & 0x7F) << shift
            if b < 0x80:
                break
            if i == 5:
                raise malformed("remaining length longer than 4 bytes")  # spec 1.5.5
            shift += 7
        if i + rlen > self.max_packet_size:
            raise ProtocolError(Reason.PACKET_TOO_LARGE, "packet exceeds maximum packet size")
        return byte0, i, rlen

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
        used = 0  # chunks consumed whole, dropped together at the end
        while n:
            chunk = chunks[used]
            pos = self._pos
            avail = len(chunk) - pos
            if avail <= n:
                parts.append(chunk[pos:] if pos else chunk)
                used += 1
                self._pos = 0
                n -= avail
            else:
                parts.append(chunk[pos:pos + n])
                self._pos = pos + n
                n = 0
        del chunks[:used]
        return b"".join(parts)
