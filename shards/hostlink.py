"""A shard's link to its host: the router's control socket, the bus, the shared index.

Implements :class:`shards.host.Host` for a shard running under a router.

Forwarding: the shared index answers "which shards have a subscriber for this
topic" as a bitmask; answers are cached per topic in a dict that is dropped
when the index's generation counter moves (0.1 µs a hit). One frame is encoded
per message and queued for each destination; the bus writes each peer's frames
once per loop turn. A retained message goes to every shard (the others only
store it), so a subscriber on any shard finds it.

Takeover across shards: the router's registry says who held the client id; the
claimant asks that shard over the bus, which disconnects its client (0x8E),
ships the session and keeps relaying deliveries until the claimant says its
index delta is in. A shard that does not answer within ``TAKEOVER_TIMEOUT``
(it is restarting and its bus frames wait in our buffer) leaves the claimant
with a new session rather than a hung CONNECT.
"""

from __future__ import annotations

import asyncio
import base64
from collections import deque
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from router.bus import Bus
from router.framing import (
    CONTROL, DATAGRAM, FLAG_ACK, FLAG_RETAIN_ONLY, PUBLISH, FrameDecoder, decode_control, encode_control, encode_frame,
)
from router.counters import HostCounters
from router.index import pick_shard
from router.shm import ShmTopicIndex
from shards.host import Claimed, Continue, IndexKey
from shards.message import Message
from shards.transfer import message_from_frame, message_to_bytes

if TYPE_CHECKING:
    from shards.shard import Shard

log = logging.getLogger("shoal.hostlink")

HEARTBEAT = 1.0
TAKEOVER_TIMEOUT = 10.0
# A safety net only: a shard that is up confirms every frame it gets, and one that goes
# down is waited for only during RESTART_GRACE (below).
DURABLE_TIMEOUT = 60.0
# Only shards that are up, or went down less than this long ago (supervisord restarts a
# killed shard in a second or two), are waited for: a stopped shard is not.
RESTART_GRACE = 5.0
# Message ids remembered to drop re-sent duplicates; a peer re-sends at most what was
# unconfirmed when we went down, far fewer than this.
SEEN_MAX = 65536
ROUTER_WAIT = 30.0  # supervisord starts the router first but does not wait for it
MATCH_CACHE_MAX = 65536


class Welcome:
    def __init__(self, msg: dict[str, Any], fds: list[int], ctl: socket.socket) -> None:
        self.workers: int = msg["workers"]
        self.tag: str = msg["tag"]
        self.listeners: list[dict[str, Any]] = msg["listeners"]
        self.counters_fd = fds.pop() if msg.get("counters") and fds else -1
        self.flapping: list[tuple[str, float]] = [tuple(b) for b in msg.get("flapping", ())]
        self.sockets = [socket.socket(fileno=fd) for fd in fds]
        self.control = ctl


def join_router(run_dir: str, index: int, workers: int, timeout: float = ROUTER_WAIT) -> Welcome:
    """Blocking hand-shake at start-up: hello, then the listening sockets arrive."""
    path = os.path.join(run_dir, "router.sock")
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no router at {path} after {timeout:.0f}s")
            time.sleep(0.05)  # the router is starting; nothing else to wait on
    s.settimeout(timeout)
    hello = {"op": "hello", "shard": index, "workers": workers, "pid": os.getpid()}
    s.sendall(encode_frame(CONTROL, encode_control(hello)))
    decoder = FrameDecoder()
    fds: list[int] = []
    while True:
        data, got, _, _ = socket.recv_fds(s, 65536, 16)
        fds.extend(got)
        if not data:
            raise ConnectionError("the router closed the hand-shake (worker count mismatch?)")
        decoder.feed(data)
        frame = decoder.next()
        if frame is not None:
            break
    msg = decode_control(frame[1])
    s.settimeout(None)
    s.setblocking(False)
    return Welcome(msg, fds, s)


class ControlClient(asyncio.Protocol):
    def __init__(self, link: RouterHost) -> None:
        self.link = link
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        for ftype, body in self.decoder:
            if ftype == CONTROL:
                self.link.on_router(decode_control(body))

    def connection_lost(self, exc: Exception | None) -> None:
        # without its router a shard cannot claim ids or subscribe correctly: exit and
        # let supervisord restart it once the router is back
        self.link.router_lost()


class RouterHost:
    def __init__(self, index: int, welcome: Welcome, run_dir: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.bit = 1 << index
        self.workers = welcome.workers
        self.loop = loop
        self.welcome = welcome
        self.run_dir = run_dir
        self.shard: Shard | None = None
        self.topic_index = ShmTopicIndex.attach(welcome.tag)
        # host-wide connection counts (None from a router that does not share them)
        self.counters = (HostCounters.attach(welcome.counters_fd, welcome.workers)
                         if welcome.counters_fd >= 0 else None)
        self.bus = Bus(index, run_dir, self.on_frame, on_peer=self._on_peer,
                       on_congestion=self._on_congestion)
        # QoS 1/2 frames the bus refused (peer backlog full), sent again when it drains:
        # their publishers' acks wait for them, so they are never dropped
        self._retry: dict[int, list[tuple[int, bytes]]] = {}
        self._congested: set[int] = set()
        # the worker stops reading from clients while a peer cannot keep up
        self.on_input_paused: Callable[[bool], None] = lambda paused: None
        # when each peer was last seen going down (all "down" until they say hello)
        self._down_since: dict[int, float] = {j: loop.time() for j in range(welcome.workers)
                                              if j != index}
        self.control: ControlClient | None = None
        self._seq = itertools.count(1)
        self._acks: dict[int, Continue] = {}
        self._claims: dict[int, tuple[str, bool, Claimed]] = {}
        # client id -> the router's number for our CONNECT in progress (None: not known yet)
        self._my_claim: dict[str, int | None] = {}
        # takeover requests waiting to learn that number: client id -> [(peer, msg)]
        self._held: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._takeovers: dict[tuple[str, int], tuple[Claimed, asyncio.TimerHandle]] = {}
        self._got_from: dict[str, int] = {}  # client id -> shard it came from
        self._cache: dict[str, int] = {}
        self._gen = -1
        self._all_peers = 0
        for j in range(self.workers):
            if j != index:
                self._all_peers |= 1 << j
        self.on_router_lost: Callable[[], None] = lambda: None
        self.sys_stats: dict[str, Any] | None = None
        self.closing = False
        # msg id -> [mask of shards still to confirm, continuation or None, deadline, frame]
        self._durable: dict[int, list[Any]] = {}
        # ids of confirmed-delivery frames already handled: a frame re-sent after a peer
        # restart may arrive twice, and QoS 2 must not be delivered twice
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        # per peer: ids of its QoS 1/2 messages to confirm after our next commit
        self._to_confirm: dict[int, list[int]] = {}
        self.on_pending: Callable[[], None] = lambda: None
        # QUIC datagrams other shards forward to us (listeners.quic.steering)
        self.on_datagram: Callable[[bytes], None] | None = None

    async def start(self, shard: Shard) -> None:
        self.shard = shard
        await self.bus.start()
        self.bus.set_peers(j for j in range(self.workers) if j != self.index)
        _, proto = await self.loop.connect_accepted_socket(lambda: ControlClient(self),
                                                           sock=self.welcome.control)
        self.control = proto  # type: ignore[assignment]
        # restate everything this shard has (restored sessions): the router replaces
        # what an earlier incarnation of this shard left
        self._send({"op": "subs", "reset": True, "add": [list(k) for k in shard.index_keys()]})
        if shard.sessions:
            self._send({"op": "own", "cids": list(shard.sessions)})
        self.loop.call_later(HEARTBEAT, self._heartbeat)

    def ready(self) -> None:
        self._send({"op": "ready"})

    async def close(self) -> None:
        self.closing = True
        await self.bus.close()
        if self.control is not None and self.control.transport is not None:
            self.control.transport.close()
        self.topic_index.close()

    def router_lost(self) -> None:
        if not self.closing:
            self.on_router_lost()

    # -- router control ------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        control = self.control
        if control is not None and control.transport is not None and not control.transport.is_closing():
            control.transport.write(encode_frame(CONTROL, encode_control(msg)))

    def on_router(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        now = self.loop.time()
        if op == "ack":
            then = self._acks.pop(msg["seq"], None)
            if then is not None:
                then(now)
        elif op == "claimed":
            entry = self._claims.pop(msg["seq"], None)
            if entry is None:
                return
            cid, clean, then = entry
            prev = msg["prev"]
            if cid in self._my_claim:
                self._my_claim[cid] = msg["n"]
            if prev < 0 or prev == self.index:
                then(None, now)
            else:
                self._ask_takeover(prev, cid, clean, then, msg["n"])
            for peer, request in self._held.pop(cid, ()):
                self._takeover_request(peer, request, now)
        elif op == "sys":
            self.sys_stats = msg["stats"]
        elif op == "flapping" and self.shard is not None:
            flapping = self.shard.security.flapping
            if flapping is not None:
                flapping.ban(msg["cid"], now + float(msg["for"]))
        elif op == "disown" and self.shard is not None:
            for cid in msg["cids"]:
                self.shard.disown(cid, now)

    def _heartbeat(self) -> None:
        shard = self.shard
        if shard is None:
            return
        now = self.loop.time()
        self._send({"op": "hb", "stats": shard.stats(now)})
        self._expire_durable(now)
        self.loop.call_later(HEARTBEAT, self._heartbeat)

    # -- Host port -------------------------------------------------------------------------

    def claim(self, client_id: str, clean_start: bool, then: Claimed, now: float) -> None:
        seq = next(self._seq)
        self._claims[seq] = (client_id, clean_start, then)
        self._my_claim[client_id] = None
        self._send({"op": "claim", "seq": seq, "cid": client_id})

    def claim_done(self, client_id: str) -> None:
        self._my_claim.pop(client_id, None)

    def disconnected(self, client_id: str, now: float) -> bool:
        # the router counts every shard's disconnects of an id: a client that reconnects
        # through the kernel's hash lands on another shard each time, and per-shard counts
        # would need N times the disconnects to notice it
        self._send({"op": "disconnected", "cid": client_id})
        return True

    def released(self, client_id: str) -> None:
        self._send({"op": "release", "cid": client_id})

    def subscribed(self, keys: list[IndexKey], then: Continue, now: float) -> None:
        seq = next(self._seq)
        self._acks[seq] = then
        self._send({"op": "subs", "seq": seq, "add": [list(k) for k in keys]})

    def unsubscribed(self, keys: list[IndexKey]) -> None:
        self._send({"op": "subs", "del": [list(k) for k in keys]})

    def _match(self, topic: str) -> int:
        index = self.topic_index
        g = index.generation()
        if g != self._gen:
            self._cache = {}
            self._gen = g
        mask = self._cache.get(topic)
        if mask is None:
            mask = index.match(topic)
            if len(self._cache) >= MATCH_CACHE_MAX:
                self._cache = {}
            self._cache[topic] = mask
        return mask

    def forward(self, msg: Message) -> int:
        # an unreachable index answers "every shard" (FULL_MASK): keep to shards that exist
        mask = self._match(msg.topic) & self._all_peers
        if msg.retain:
            # every shard keeps the retained store: the others only store it
            store_only = self._all_peers & ~mask
            if store_only:
                body = message_to_bytes(msg, FLAG_RETAIN_ONLY)
                self._fan_out(store_only, PUBLISH, body)
        if not mask:
            return 0
        if msg.qos:
            body = message_to_bytes(msg, FLAG_ACK)
            wait = self._waitable(mask)
            if wait:
                self._durable[msg.id] = [wait, None, self.loop.time() + DURABLE_TIMEOUT, body]
            self._fan_out(mask, PUBLISH, body, must=True)
            return mask.bit_count()
        self._fan_out(mask, PUBLISH, message_to_bytes(msg))
        return mask.bit_count()

    def _on_peer(self, peer: int, hello: object | None) -> None:
        if hello is not None:
            self._down_since.pop(peer, None)
            self._flush_retry(peer)
            return
        self._down_since[peer] = self.loop.time()
        # frames handed to the dead connection are lost: queue every unconfirmed one
        # again; the bus holds them for the peer's next incarnation, which confirms them
        bit = 1 << peer
        for entry in self._durable.values():
            if entry[0] & bit:
                self.bus.send(peer, PUBLISH, entry[3])

    def _waitable(self, mask: int) -> int:
        """The shards of ``mask`` that will confirm soon: up, or restarting."""
        down = self._down_since
        if not down:
            return mask
        now = self.loop.time()
        for j, since in down.items():
            if now - since >= RESTART_GRACE:
                mask &= ~(1 << j)
        return mask

    def awaiting(self, msg_id: int) -> bool:
        return msg_id in self._durable

    def _remember(self, msg_id: int) -> None:
        self._seen.add(msg_id)
        order = self._seen_order
        order.append(msg_id)
        if len(order) > SEEN_MAX:
            self._seen.discard(order.popleft())

    def _confirm_later(self, peer: int, msg_id: int) -> None:
        ids = self._to_confirm.get(peer)
        if ids is None:
            self._to_confirm[peer] = [msg_id]
            self.on_pending()
        else:
            ids.append(msg_id)

    def when_durable(self, msg_id: int, then: Continue, now: float) -> None:
        entry = self._durable.get(msg_id)
        if entry is None:
            then(now)  # nothing forwarded: our own commit precedes the ack's write
        else:
            entry[1] = then

    def committed(self) -> None:
        if not self._to_confirm:
            return
        pending, self._to_confirm = self._to_confirm, {}
        for peer, ids in pending.items():
            self._bus_control(peer, {"op": "durable", "ids": ids})

    def _confirmed(self, peer: int, ids: list[int], now: float) -> None:
        durable = self._durable
        clear = ~(1 << peer)
        for msg_id in ids:
            entry = durable.get(msg_id)
            if entry is None:
                continue
            entry[0] &= clear
            if not entry[0]:
                del durable[msg_id]
                if entry[1] is not None:
                    entry[1](now)

    def _expire_durable(self, now: float) -> None:
        """Stop waiting for shards that stayed down past the restart grace: a stopped shard
        must not stall publishers on the others. Shards that are up confirm everything
        they get (a frame lost with a connection is sent again), so they are waited for;
        the deadline only catches a confirmation that can never come (a bug)."""
        late = []
        overdue = 0
        for msg_id, entry in self._durable.items():
            entry[0] = self._waitable(entry[0])
            if not entry[0]:
                late.append(msg_id)
            elif entry[2] <= now:
                late.append(msg_id)
                overdue += 1
        if late:
            log.warning("%d forwarded QoS>0 messages not confirmed (%d overdue from shards that "
                        "are up, the rest from shards down past the restart grace): "
                        "acknowledging them to their publishers anyway", len(late), overdue)
        for peer in list(self._retry):
            if peer in self._down_since and now - self._down_since[peer] >= RESTART_GRACE:
                del self._retry[peer]  # nobody will take them; their publishers were acked
        for msg_id in late:
            entry = self._durable.pop(msg_id)
            if entry[1] is not None:
                entry[1](now)

    def _fan_out(self, mask: int, ftype: int, body: bytes, must: bool = False) -> None:
        send = self.bus.send
        while mask:
            low = mask & -mask
            peer = low.bit_length() - 1
            retry = self._retry.get(peer)
            if retry:
                # behind frames already waiting, so a pair's frames keep their order
                if must:
                    retry.append((ftype, body))
                elif self.shard is not None:
                    self.shard.counters.dropped += 1
            elif not send(peer, ftype, body):
                if must:
                    self._retry.setdefault(peer, []).append((ftype, body))
                elif self.shard is not None:
                    self.shard.counters.dropped += 1  # QoS 0 over a full backlog
            mask ^= low

    def _on_congestion(self, peer: int, congested: bool) -> None:
        if congested:
            self._congested.add(peer)
        else:
            self._congested.discard(peer)
            self._flush_retry(peer)
        self.on_input_paused(bool(self._congested))

    def _flush_retry(self, peer: int) -> None:
        frames = self._retry.pop(peer, None)
        if not frames:
            return
        send = self.bus.send
        for i, (ftype, body) in enumerate(frames):
            if not send(peer, ftype, body):
                self._retry[peer] = frames[i:]
                return

    def serves_group(self, group: str, filt: str, msg: Message) -> bool:
        mask = self.topic_index.group_shards(group, filt) & (self._all_peers | self.bit)
        if not mask & ~self.bit:
            return True
        return pick_shard(mask, msg.id) == self.index

    def send_datagram(self, peer: int, blob: bytes) -> None:
        """A QUIC datagram for the shard that owns its connection id. Dropped if the bus is
        congested, as the network would: QUIC retransmits."""
        if not self._retry.get(peer):
            try:
                self.bus.send(peer, DATAGRAM, blob)
            except KeyError:
                pass  # not a shard of ours (a forged id's owner): drop it

    def relay(self, shard: int, client_id: str, msg: Message, qos: int, retain: bool,
              sub_ids: tuple[int, ...]) -> None:
        self._bus_control(shard, {"op": "relay", "cid": client_id, "qos": qos, "retain": retain,
                                  "ids": list(sub_ids),
                                  "msg": base64.b64encode(message_to_bytes(msg)).decode()})

    def adopted(self, client_id: str) -> None:
        source = self._got_from.pop(client_id, None)
        if source is not None:
            self._bus_control(source, {"op": "installed", "cid": client_id})

    # -- takeover over the bus -------------------------------------------------------------

    def _bus_control(self, peer: int, msg: dict[str, Any]) -> None:
        """Control frames (takeovers, confirmations) are never dropped: a full backlog
        keeps them for when it drains, behind what is already waiting."""
        body = encode_control(msg)
        retry = self._retry.get(peer)
        if retry:
            retry.append((CONTROL, body))  # keep their order behind earlier refused frames
        elif not self.bus.send(peer, CONTROL, body):
            self._retry.setdefault(peer, []).append((CONTROL, body))

    def _ask_takeover(self, prev: int, cid: str, clean: bool, then: Claimed, n: int) -> None:
        seq = next(self._seq)

        def timed_out() -> None:
            entry = self._takeovers.pop((cid, seq), None)
            if entry is not None:
                log.warning("shard %d did not hand over %r within %.0fs: starting a new session",
                            prev, cid, TAKEOVER_TIMEOUT)
                entry[0](None, self.loop.time())

        timer = self.loop.call_later(TAKEOVER_TIMEOUT, timed_out)
        self._takeovers[(cid, seq)] = (then, timer)
        self._bus_control(prev, {"op": "takeover", "cid": cid, "clean": clean, "seq": seq, "n": n})

    def _takeover_request(self, peer: int, msg: dict[str, Any], now: float) -> None:
        """Hand our session for ``cid`` to ``peer``, respecting the router's claim order."""
        shard = self.shard
        assert shard is not None
        cid = msg["cid"]
        mine = self._my_claim.get(cid, -1)
        if mine is None:
            # our own CONNECT's claim number is on its way: only it tells who came first
            self._held.setdefault(cid, []).append((peer, msg))
            return
        seq = msg["seq"]

        def ship(state: dict[str, Any] | None) -> None:
            self._bus_control(peer, {"op": "session", "cid": cid, "seq": seq, "state": state})

        earlier = mine is not None and 0 <= mine < msg["n"]
        shard.give_up(cid, peer, bool(msg["clean"]), now, ship, after_connect=earlier)

    def on_frame(self, peer: int, ftype: int, body: bytes | memoryview) -> None:
        shard = self.shard
        if shard is None:
            return
        now = self.loop.time()
        if ftype == PUBLISH:
            msg, flags, _ = message_from_frame(body, now)
            if flags & FLAG_ACK:
                if msg.id in self._seen:
                    self._confirm_later(peer, msg.id)  # a re-sent copy: confirm, don't deliver
                    return
                self._remember(msg.id)
            shard.received(msg, not flags & FLAG_RETAIN_ONLY, now)
            if flags & FLAG_ACK:
                self._confirm_later(peer, msg.id)  # after this turn's commit
            return
        if ftype == DATAGRAM:
            on_datagram = self.on_datagram
            if on_datagram is not None:
                on_datagram(bytes(body))
            return
        if ftype != CONTROL:
            return
        msg = decode_control(body)
        op = msg.get("op")
        cid = msg.get("cid", "")
        if op == "takeover":
            self._takeover_request(peer, msg, now)
        elif op == "session":
            entry = self._takeovers.pop((cid, msg["seq"]), None)
            if entry is None:
                # too late: we already started a new session; the old one is dropped,
                # but the giver's relay must still end
                if msg["state"] is not None:
                    log.warning("session %r from shard %d arrived after the timeout; dropped",
                                cid, peer)
                    self._bus_control(peer, {"op": "installed", "cid": cid})
                return
            then, timer = entry
            timer.cancel()
            if msg["state"] is not None:
                self._got_from[cid] = peer
            then(msg["state"], now)
        elif op == "relay":
            m, _, _ = message_from_frame(base64.b64decode(msg["msg"]), now)
            shard.relayed(cid, m, msg["qos"], msg["retain"], tuple(msg["ids"]), now)
        elif op == "installed":
            shard.drop_relay(cid)
            self._bus_control(peer, {"op": "relay_done", "cid": cid})
        elif op == "relay_done":
            shard.relay_ended(cid)
        elif op == "durable":
            self._confirmed(peer, msg["ids"], now)
