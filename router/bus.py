"""The shard-to-shard bus: a full mesh of stream Unix sockets, one connection per pair.

Topology. Shard k listens on ``{run_dir}/bus-{k}.sock`` (a stale file left by a killed
predecessor is unlinked first). For each pair the lower index connects to the higher one and
the higher one accepts; the one connection then carries frames both ways. The first frame in
each direction is a HELLO: the dialler sends its own at once, the acceptor answers once the
dialler's has checked out (right version, addressed to it, from a lower, declared index). A
link carries data only after the peer's HELLO has arrived, so a peer is "up" exactly from
its HELLO to the loss of its connection. One stream per pair is what keeps frames between
two shards in order.

Writes. ``send()`` appends header and body to the peer's pending list and, for the first
frame of a loop turn, schedules one flush with ``call_soon``; the flush writes
``b"".join(pending)`` per peer in one ``transport.write``. FACTS.md: batching like this moves
1.53 M 100-byte frames/s over one socket against 340 k for a write per frame, and the join
beats ``writelines``. No task, no ``drain()`` per frame.

Memory bound and loss. Per peer, the bytes waiting in the pending list plus the bytes the
transport still holds are capped at ``max_pending`` (8 MiB by default: about 80 k 100-byte
frames, a second of a busy shard's traffic to one peer, tiny next to the sessions a shard
holds). A frame that would pass the cap is dropped and counted (``frames_dropped``), as are
frames still pending when a peer is removed or the bus closes. While a peer is down
(restarting) its frames wait in the pending list, so they reach it, in order, once it is
back and has said HELLO; frames already handed to the dying connection's transport are lost
without a count, because nothing tells which of them the peer read. The bus promises order
and no duplication per pair, not delivery: the broker owns loss semantics above it.

Back-pressure. When a transport's buffer passes ``high_water`` the transport pauses us:
``congested(peer)`` turns True, flushes to that peer stop, and frames accumulate in the
bounded pending list instead of the transport; ``resume_writing`` (below ``low_water``)
flushes them. ``on_congestion(peer, congested)`` reports both edges, so a shard can stop
reading the clients that publish towards a slow peer and resume them later.

Reconnecting. The lower side of a pair owns reconnection: one long-lived task per higher
peer connects, waits for the link to end, and connects again, with backoff 50 ms doubling
to 1 s while the peer's socket is missing or refuses (it is restarting). The higher side
only accepts; a new HELLO from a peer replaces (and aborts) its previous link at once, so
bytes from the old link can never be read after those of the new one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from .framing import (
    FRAME_HEADER_SIZE, HELLO, MAX_FRAME_SIZE, BusProtocolError, FrameDecoder, Hello,
    decode_hello, encode_frame, encode_hello, pack_header,
)

log = logging.getLogger("shoal.bus")

OnFrame = Callable[[int, int, "bytes | memoryview"], None]
OnPeer = Callable[[int, "Hello | None"], None]
OnCongestion = Callable[[int, bool], None]

# Defaults, each overridable per Bus.
#
# 8 MiB per peer: see the module docstring. With N shards a shard holds at most
# (N-1) x 8 MiB of bus backlog, 120 MiB on a 16-core host in the worst case.
MAX_PENDING = 8 * 1024 * 1024
# The transport pauses us above 1 MiB and resumes below 256 KiB. asyncio's default (64 KiB)
# would pause on every burst a busy shard flushes in one turn, which is normal traffic, not
# congestion; 1 MiB is about 10 k frames, a few milliseconds of a peer's reading.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
# A peer that connects and stays silent is not a shard (or is hung): its connection is
# dropped after this long without a HELLO, and the lower side retries.
HELLO_TIMEOUT = 5.0
# Reconnect backoff while a peer's socket is absent or refuses (a restart under
# supervisord takes hundreds of milliseconds): first retry soon, then at most once a second.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
# How long close() lets connected peers drain what was already written before aborting.
CLOSE_TIMEOUT = 2.0
# sun_path is 108 bytes on Linux, including the terminating NUL.
_SUN_PATH_MAX = 107

_TOTALS = ("frames_sent", "bytes_sent", "frames_received", "bytes_received", "frames_dropped",
           "bytes_dropped")

_RETRY_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ECONNRESET,
                           errno.ENOTSOCK, errno.EPIPE})


def socket_path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"bus-{index}.sock")


class _Peer:
    """What the bus knows about one other shard; outlives any one connection to it."""

    __slots__ = ("index", "link", "hello", "pending", "pending_bytes", "transport_bytes",
                 "paused", "scheduled", "connector", "frames_sent", "bytes_sent",
                 "frames_received", "bytes_received", "frames_dropped", "bytes_dropped",
                 "connects")

    def __init__(self, index: int) -> None:
        self.index = index
        self.link: _Link | None = None  # set when the peer's HELLO arrives
        self.hello: Hello | None = None
        # Headers and bodies alternate, so a flush is one join and frames = len // 2.
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        # What the transport held at the last flush or resume: never less than what it
        # holds now, because only our own writes add to it.
        self.transport_bytes = 0
        self.paused = False
        self.scheduled = False  # in the bus's dirty list for this turn's flush
        self.connector: asyncio.Task[None] | None = None
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_received = 0
        self.bytes_received = 0
        self.frames_dropped = 0
        self.bytes_dropped = 0
        self.connects = 0  # links established (HELLO exchanged), reconnects included

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.link is not None, "congested": self.paused,
            "pid": self.hello.pid if self.hello else None,
            "epoch": self.hello.epoch if self.hello else None,
            "pending_frames": len(self.pending) >> 1, "pending_bytes": self.pending_bytes,
            "transport_bytes": self.link.transport.get_write_buffer_size() if self.link else 0,
            "frames_sent": self.frames_sent, "bytes_sent": self.bytes_sent,
            "frames_received": self.frames_received, "bytes_received": self.bytes_received,
            "frames_dropped": self.frames_dropped, "bytes_dropped": self.bytes_dropped,
            "connects": self.connects,
        }


class _Link(asyncio.Protocol):
    """One connection. Before the peer's HELLO it belongs to no peer; after, it is the peer's
    current link until it is lost or replaced."""

    def __init__(self, bus: Bus, expected: int | None) -> None:
        self.bus = bus
        self.expected = expected  # the peer we dialled; None on the accepting side
        self.peer: _Peer | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.decoder = FrameDecoder(bus.max_frame_size)
        self.closed: asyncio.Future[None] = bus._loop.create_future()
        self.hello_timer: asyncio.TimerHandle | None = None
        self.dead = False  # lost, aborted or superseded: ignore whatever it still reports
        self.up_at: float | None = None  # loop time of the peer's HELLO

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = t = cast(asyncio.Transport, transport)
        bus = self.bus
        t.set_write_buffer_limits(bus.high_water, bus.low_water)
        # On the accepting side we learn the peer's index from its HELLO: address ours to it
        # then. The dialling side speaks first, so an acceptor never waits on itself.
        if self.expected is not None:
            t.write(encode_frame(HELLO, encode_hello(bus.index, self.expected, bus.epoch)))
        self.hello_timer = bus._loop.call_later(bus.hello_timeout, self._hello_timeout)
        bus._links.add(self)

    def _hello_timeout(self) -> None:
        self.hello_timer = None
        if self.peer is None and not self.dead:
            log.warning("bus %d: no HELLO within %.1fs on a %s link; dropping it", self.bus.index,
                        self.bus.hello_timeout, "dialled" if self.expected is not None else "accepted")
            self.abort()

    def abort(self) -> None:
        """Drop the connection now. The peer is down from this moment, not from the later
        connection_lost: a frame flushed in between would vanish into a dead transport."""
        if self.dead:
            return
        self.dead = True
        peer = self.peer
        if peer is not None and peer.link is self:
            self.bus._link_down(peer, None)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        decoder = self.decoder
        decoder.feed(data)
        peer = self.peer
        if peer is None:
            peer = self._handshake()
            if peer is None:
                return
        peer.bytes_received += len(data)
        on_frame = self.bus.on_frame
        index = peer.index
        nxt = decoder.next
        count = 0
        while True:
            try:
                frame = nxt()
            except BusProtocolError as exc:
                self._protocol_error(str(exc))
                break
            if frame is None:
                break
            count += 1
            ftype, body = frame
            if ftype == HELLO:
                self._protocol_error("a second HELLO")
                break
            try:
                on_frame(index, ftype, body)
            except Exception:
                # A handler bug on one frame must not cost the frames behind it on the same
                # link: log it loudly and carry on with the stream, which is still in sync.
                log.exception("bus %d: on_frame failed for a type %d frame from shard %d",
                              self.bus.index, ftype, index)
            if self.dead:
                break  # on_frame closed the bus or removed this peer
        peer.frames_received += count

    def _handshake(self) -> _Peer | None:
        """Consume the peer's HELLO if it has arrived; None until it has (or on error)."""
        bus = self.bus
        try:
            frame = self.decoder.next()
            if frame is None:
                return None
            ftype, body = frame
            if ftype != HELLO:
                raise BusProtocolError(f"first frame has type {ftype}, not HELLO")
            hello = decode_hello(body)
            if hello.peer != bus.index:
                raise BusProtocolError(f"HELLO from shard {hello.index} is for shard {hello.peer}")
            if self.expected is not None:
                if hello.index != self.expected:
                    raise BusProtocolError(f"dialled shard {self.expected}, shard {hello.index} answered")
            elif hello.index >= bus.index:
                raise BusProtocolError(f"shard {hello.index} dialled shard {bus.index}; "
                                       "only a lower index dials a higher one")
            elif bus._declared is not None and hello.index not in bus._declared:
                raise BusProtocolError(f"shard {hello.index} is not a declared peer")
        except BusProtocolError as exc:
            self._protocol_error(str(exc))
            return None
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        if self.expected is None:
            self.transport.write(encode_frame(HELLO, encode_hello(bus.index, hello.index, bus.epoch)))
        return bus._link_up(self, hello)

    def _protocol_error(self, reason: str) -> None:
        peer = self.peer.index if self.peer is not None else self.expected
        log.error("bus %d: protocol error from shard %s: %s; dropping the link", self.bus.index,
                  "?" if peer is None else peer, reason)
        self.bus.protocol_errors += 1
        self.abort()

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not self.dead and peer.link is self:
            self.bus._set_paused(peer, True)

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not self.dead and peer.link is self:
            peer.transport_bytes = self.transport.get_write_buffer_size()
            self.bus._set_paused(peer, False)
            if peer.pending:
                self.bus._write(peer, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        bus = self.bus
        bus._links.discard(self)
        peer = self.peer
        if peer is not None and peer.link is self:
            bus._link_down(peer, exc)
        if not self.closed.done():
            self.closed.set_result(None)


class Bus:
    """The bus endpoint of one shard process. Not thread-safe: use it from its loop only.

    ``on_frame(peer_index, ftype, body)`` is called synchronously for every frame received
    after the peer's HELLO, in order, all the whole frames of a read in one go. ``body`` is
    bytes up to 2 KiB and above that a memoryview into the received chunk, which it keeps
    alive while held: copy what you keep of a large body. ``on_peer(index,
    hello)`` reports a peer up (its Hello: pid and epoch tell a restart) and down (None).
    ``on_congestion(index, congested)`` reports the edges of back-pressure.
    """

    def __init__(self, index: int, run_dir: str, on_frame: OnFrame, *,
                 on_peer: OnPeer | None = None, on_congestion: OnCongestion | None = None,
                 epoch: int | None = None, max_pending: int = MAX_PENDING,
                 high_water: int = HIGH_WATER, low_water: int = LOW_WATER,
                 max_frame_size: int = MAX_FRAME_SIZE, hello_timeout: float = HELLO_TIMEOUT,
                 backoff_min: float = BACKOFF_MIN, backoff_max: float = BACKOFF_MAX) -> None:
        if not 0 <= index <= 0xFFFF:
            raise ValueError(f"shard index {index} out of range")
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        self.index = index
        self.run_dir = run_dir
        self.path = socket_path(run_dir, index)
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise ValueError(f"bus socket path longer than {_SUN_PATH_MAX} bytes: {self.path}")
        self.on_frame = on_frame
        self.on_peer = on_peer
        self.on_congestion = on_congestion
        # Distinguishes this incarnation of shard `index` from earlier ones even when the
        # pid is reused; nanoseconds of wall time are unique enough across restarts.
        self.epoch = time.time_ns() if epoch is None else epoch
        self.max_pending = max_pending
        self.high_water = high_water
        self.low_water = low_water
        self.max_frame_size = max_frame_size
        self.hello_timeout = hello_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.protocol_errors = 0
        # Counters of peers that set_peers removed, so the totals never go backwards.
        self._retired: dict[str, int] = dict.fromkeys(_TOTALS, 0)
        self._peers: dict[int, _Peer] = {}
        self._declared: frozenset[int] | None = None  # None: accept any lower index
        self._links: set[_Link] = set()
        self._dirty: list[_Peer] = []
        self._flush_scheduled = False
        self._server: asyncio.AbstractServer | None = None
        self._server_ino: int | None = None
        self._started = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on our socket and dial the declared higher peers."""
        if self._started:
            raise RuntimeError("bus already started")
        self._loop = asyncio.get_running_loop()
        self._unlink_stale()
        # The backlog covers every lower shard dialling at once after a mass restart.
        self._server = await self._loop.create_unix_server(
            lambda: _Link(self, None), self.path, backlog=max(128, len(self._peers) * 2))
        self._server_ino = os.stat(self.path).st_ino
        self._started = True
        if self._dirty:
            # Frames queued before start: the flush finds no link yet and leaves them
            # pending for link-up, but the peers must leave the dirty list.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        for peer in self._peers.values():
            self._maybe_dial(peer)

    def _unlink_stale(self) -> None:
        # The file of a killed predecessor refuses connections and blocks bind: remove it.
        # Anything that is not a socket is a misconfiguration we do not want to delete.
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"{self.path} exists and is not a socket")
        os.unlink(self.path)

    async def close(self) -> None:
        """Stop accepting and dialling, write what is pending to connected peers, let them
        drain up to CLOSE_TIMEOUT, then abort what is left and remove our socket file."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for peer in self._peers.values():
            if peer.connector is not None:
                peer.connector.cancel()
        connectors = [p.connector for p in self._peers.values() if p.connector is not None]
        if connectors:
            await asyncio.gather(*connectors, return_exceptions=True)
        for peer in self._peers.values():
            link = peer.link
            if link is not None and peer.pending:
                self._write(peer, link)  # a paused transport still takes it: we are leaving
            self._drop_pending(peer)
        links = list(self._links)
        for link in links:
            link.dead = True  # nothing more is delivered to on_frame
            link.transport.close()
        if links:
            done, _ = await asyncio.wait([link.closed for link in links], timeout=CLOSE_TIMEOUT)
            for link in links:
                if link.closed not in done:
                    link.transport.abort()
            await asyncio.wait([link.closed for link in links], timeout=CLOSE_TIMEOUT)
        if self._server is not None:
            await self._server.wait_closed()
        try:
            # Only our own file: a successor with the same index may already have replaced it.
            if self._server_ino is not None and os.stat(self.path).st_ino == self._server_ino:
                os.unlink(self.path)
        except OSError:
            pass

    # -- peers -------------------------------------------------------------------------------

    def set_peers(self, indices: Iterable[int]) -> None:
        """Declare the shards this one should be connected to (our own index is ignored).

        New higher peers are dialled; peers no longer declared are disconnected, their
        pending frames dropped and counted. Until the first call any lower shard that dials
        us is accepted, so start order does not matter.
        """
        declared = frozenset(i for i in indices if i != self.index)
        for i in declared:
            if not 0 <= i <= 0xFFFF:
                raise ValueError(f"shard index {i} out of range")
        self._declared = declared
        for i in list(self._peers):
            if i not in declared:
                gone = self._peers.pop(i)
                self._remove(gone)
                stats = gone.stats()
                for k in _TOTALS:
                    self._retired[k] += stats[k]
        for i in sorted(declared):
            peer = self._peers.get(i)
            if peer is None:
                peer = self._peers[i] = _Peer(i)
            if self._started:
                self._maybe_dial(peer)

    def peers(self) -> list[int]:
        return sorted(self._peers)

    def connected(self, peer: int) -> bool:
        return self._peers[peer].link is not None

    def congested(self, peer: int) -> bool:
        """True while the peer's transport has paused us (its buffer passed high_water).
        Frames sent meanwhile wait in the bounded pending list."""
        return self._peers[peer].paused

    def peer_hello(self, peer: int) -> Hello | None:
        return self._peers[peer].hello

    def _maybe_dial(self, peer: _Peer) -> None:
        if peer.index > self.index and peer.connector is None and not self._closing:
            peer.connector = self._loop.create_task(self._dial_forever(peer),
                                                    name=f"bus-{self.index}-dial-{peer.index}")

    def _remove(self, peer: _Peer) -> None:
        if peer.connector is not None:
            peer.connector.cancel()
            peer.connector = None
        if peer.link is not None:
            peer.link.abort()
        self._drop_pending(peer)

    async def _dial_forever(self, peer: _Peer) -> None:
        loop = self._loop
        path = socket_path(self.run_dir, peer.index)
        delay = self.backoff_min
        while not self._closing and self._peers.get(peer.index) is peer:
            try:
                _, link = await loop.create_unix_connection(lambda: _Link(self, peer.index), path)
            except OSError as exc:
                if exc.errno not in _RETRY_ERRNOS:
                    log.warning("bus %d: dialling shard %d failed: %s", self.index, peer.index, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            await asyncio.shield(link.closed)
            if link.up_at is not None and loop.time() - link.up_at >= self.backoff_max:
                # A link that worked for a while ended: the peer is most likely restarting,
                # so start over at the short delay. A link that dies as soon as it is up (a
                # peer that refuses us after its HELLO) keeps backing off instead of cycling.
                delay = self.backoff_min
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _link_up(self, link: _Link, hello: Hello) -> _Peer | None:
        peer = self._peers.get(hello.index)
        if peer is None:
            if self._declared is not None or self._closing:
                link.abort()
                return None
            peer = self._peers[hello.index] = _Peer(hello.index)
        old = peer.link
        if old is not None:
            # The peer restarted (or dialled again) before we saw the old link end. Abort it
            # now, so nothing it still has buffered can be delivered after the new link's data.
            log.info("bus %d: shard %d reconnected; dropping its previous link", self.index,
                     peer.index)
            old.abort()
        link.peer = peer
        link.up_at = self._loop.time()
        peer.link = link
        peer.hello = hello
        peer.connects += 1
        peer.transport_bytes = link.transport.get_write_buffer_size()
        log.info("bus %d: shard %d up (pid %d, epoch %d)", self.index, peer.index, hello.pid,
                 hello.epoch)
        if peer.pending:
            self._write(peer, link)  # what waited while it was down goes first, in order
        if self.on_peer is not None:
            try:
                self.on_peer(peer.index, hello)
            except Exception:
                log.exception("bus %d: on_peer failed", self.index)
        return peer if peer.link is link else None

    def _link_down(self, peer: _Peer, exc: Exception | None) -> None:
        peer.link = None
        peer.transport_bytes = 0  # lost with the connection
        if peer.paused:
            self._set_paused(peer, False)
        if not self._closing:
            log.info("bus %d: shard %d down%s", self.index, peer.index, f" ({exc})" if exc else "")
        if self.on_peer is not None:
            try:
                self.on_peer(peer.index, None)
            except Exception:
                log.exception("bus %d: on_peer failed", self.index)

    def _set_paused(self, peer: _Peer, paused: bool) -> None:
        peer.paused = paused
        if self.on_congestion is not None:
            try:
                self.on_congestion(peer.index, paused)
            except Exception:
                log.exception("bus %d: on_congestion failed", self.index)

    # -- sending -----------------------------------------------------------------------------

    def send(self, peer: int, ftype: int, body: bytes) -> bool:
        """Queue one frame for ``peer``; False if it was dropped because the peer's backlog
        is at ``max_pending``. Written at the end of this loop turn, with everything else
        queued to that peer in the turn. Raises KeyError for an undeclared peer."""
        p = self._peers[peer]
        n = len(body) + FRAME_HEADER_SIZE
        if n - 4 > self.max_frame_size:
            # The receiver would drop the link on it, losing every frame behind it too.
            raise ValueError(f"frame of {n - 4} bytes exceeds max_frame_size")
        if p.pending_bytes + p.transport_bytes + n > self.max_pending:
            p.frames_dropped += 1
            p.bytes_dropped += n
            return False
        pending = p.pending
        pending.append(pack_header(n - 4, ftype))
        pending.append(body)
        p.pending_bytes += n
        if not p.scheduled:
            p.scheduled = True
            self._dirty.append(p)
            if not self._flush_scheduled and self._started:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty = self._dirty
        self._dirty = []
        for p in dirty:
            p.scheduled = False
            link = p.link
            if link is not None and not p.paused and p.pending:
                self._write(p, link)

    def _write(self, p: _Peer, link: _Link) -> None:
        pending = p.pending
        data = b"".join(pending)
        p.frames_sent += len(pending) >> 1
        p.bytes_sent += len(data)
        p.pending = []
        p.pending_bytes = 0
        link.transport.write(data)
        p.transport_bytes = link.transport.get_write_buffer_size()

    def _drop_pending(self, peer: _Peer) -> None:
        if peer.pending:
            peer.frames_dropped += len(peer.pending) >> 1
            peer.bytes_dropped += peer.pending_bytes
            peer.pending = []
            peer.pending_bytes = 0

    # -- counters ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals over peers, and per peer (keys are peer indices as str, JSON-ready)."""
        per = {str(i): p.stats() for i, p in sorted(self._peers.items())}
        total: dict[str, Any] = {k: self._retired[k] + sum(s[k] for s in per.values())
                                 for k in _TOTALS}
        total["pending_bytes"] = sum(s["pending_bytes"] for s in per.values())
        total["protocol_errors"] = self.protocol_errors
        total["peers"] = per
        return total
