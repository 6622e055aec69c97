"""A client's session: what outlives one network connection.

Subscriptions, outbound QoS 1/2 messages in flight (with their packet ids), the
queue of messages waiting for a connection or for flow-control credit, inbound
QoS 2 packet ids awaiting PUBREL, the will and the expiry. Pure logic: it writes
packets through ``link.conn`` (the sans-IO connection) and asks the link to
flush with ``link.wake()``; it never touches a socket or a clock.

Flow control: at most ``send_quota`` QoS>0 deliveries are unacknowledged
(the client's Receive Maximum, capped by ``max_inflight``). Further QoS>0
deliveries wait in ``queue``, bounded by ``max_queued_messages``; when the queue
is full the new message is dropped and counted, so a stalled client costs a
bounded amount of memory.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

from shards.message import Message
from shards.protocol.codec import expiry_entry, splice_properties, subscription_ids_entries
from shards.protocol.packets import MQTT_5, Pubrel, Will

if TYPE_CHECKING:
    from shards.acl import Principal
    from shards.config import MQTTConfig
    from shards.store import Store
    from shards.protocol.connection import MQTTConnection
    from shards.subs import Subscription


class Link(Protocol):
    """What the I/O layer gives the shard for one connection."""

    conn: MQTTConnection
    session: Session | None
    congested: bool
    disconnected_cleanly: bool
    # the name a verified client certificate gives (TLS listeners with
    # peer_cert_as_username); used as the username when CONNECT carries none
    peer_username: str | None

    @property
    def peer(self) -> str:
        """The client's address, for log lines (read when needed: a PROXY header can
        change it after the connection is made)."""

    def wake(self) -> None:
        """Output is pending: flush it once this loop turn ends."""

    def close(self) -> None:
        """Flush what is pending, then close the transport."""

    def resume(self, now: float) -> None:
        """The CONNECT was accepted: process what arrived behind it."""


class Counters:
    """Shard-wide message counters ($SYS and metrics)."""

    __slots__ = ("received", "sent", "dropped", "publish_received", "publish_sent", "expired",
                 "connections_refused", "clients_throttled")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self.dropped = 0
        self.publish_received = 0
        self.publish_sent = 0
        self.expired = 0
        self.connections_refused = 0  # closed at accept: over a connection count or rate limit
        self.clients_throttled = 0  # times a client's reading was paused for its rate limit


class Inflight:
    __slots__ = ("msg", "qos", "retain", "sub_ids", "released")

    def __init__(self, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...]) -> None:
        self.msg = msg
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.released = False  # QoS 2: PUBREC received, PUBREL sent, awaiting PUBCOMP


Queued = tuple[Message, int, bool, tuple[int, ...]]
_NO_IDS: frozenset[int] = frozenset()


class Session:
    __slots__ = (
        "client_id", "version", "link", "subscriptions", "inflight", "queue", "next_pid",
        "inbound_qos2", "send_quota", "expiry_interval", "expires_at", "will", "will_at", "cfg",
        "counters", "created", "dedupe", "journal", "unsent", "principal",
    )

    def __init__(self, client_id: str, cfg: MQTTConfig, counters: Counters, now: float) -> None:
        self.client_id = client_id
        self.cfg = cfg
        self.counters = counters
        self.version = 4
        self.link: Link | None = None
        self.subscriptions: dict[str, Subscription] = {}  # keyed by the filter as subscribed
        self.inflight: dict[int, Inflight] = {}
        # an empty tuple until something is queued (see queue_for_append): most sessions
        # never queue, and an empty deque is ~760 bytes of every idle connection
        self.queue: deque[Queued] | tuple[()] = ()
        self.next_pid = 1
        self.inbound_qos2: set[int] | frozenset[int] = _NO_IDS  # a set from the first one
        self.send_quota = cfg.max_inflight
        self.expiry_interval = 0
        self.expires_at: float | None = None
        self.will: Will | None = None
        self.will_at: float | None = None
        self.created = now
        # message ids already delivered, kept only while a takeover's relay runs
        self.dedupe: set[int] | None = None
        # the durable store, for sessions that outlive their connection (expiry > 0)
        self.journal: Store | None = None
        # in-flight packet ids not yet re-sent after a reconnect: the client's new
        # Receive Maximum may be lower than what was in flight [MQTT-4.9.0-2]. An empty
        # tuple until a resume needs the deque: an empty deque is ~760 bytes, a sixth of
        # an idle connection's memory (bench/e2e connection storm)
        self.unsent: deque[int] | tuple[()] = ()
        # who the connection that last attached is (authorization); None until one has
        self.principal: Principal | None = None

    @property
    def online(self) -> bool:
        return self.link is not None

    # -- delivery ----------------------------------------------------------------

    def deliver(self, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...], now: float) -> None:
        dedupe = self.dedupe
        if dedupe is not None:
            if msg.id in dedupe:
                return
            dedupe.add(msg.id)
        link = self.link
        if link is None:
            self._enqueue(msg, qos, retain, sub_ids)
            return
        if qos == 0:
            if link.congested:
                self.counters.dropped += 1
                return
            # no call for what has no per-delivery properties: MQTT 3.1.1, or nothing to add
            props = None if self.version != MQTT_5 else (
                msg.wire if not sub_ids and msg.expires_at is None
                else self._props(msg, sub_ids, now))
            if link.conn.send_publish(msg.topic, msg.payload, 0, retain, 0, props, False,
                                      msg.encoded if props is None or props is msg.wire else None):
                self.counters.publish_sent += 1
            else:
                self.counters.dropped += 1
            link.wake()
            return
        if self.queue or len(self.inflight) >= self.send_quota:
            self._enqueue(msg, qos, retain, sub_ids)
            return
        self._send_new(link, msg, qos, retain, sub_ids, now)
        link.wake()

    def _enqueue(self, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...]) -> None:
        if qos == 0 and not self.cfg.queue_qos0:
            self.counters.dropped += 1
            return
        if len(self.queue) >= self.cfg.max_queued_messages:
            self.counters.dropped += 1
            return
        self.queue_for_append().append((msg, qos, retain, sub_ids))
        journal = self.journal
        if journal is not None and qos:
            journal.put(self.client_id, msg, 0, 0, qos, retain, sub_ids)

    def queue_for_append(self) -> deque[Queued]:
        """The queue as a deque, made on first use."""
        queue = self.queue
        if queue.__class__ is tuple:
            queue = self.queue = deque()
        return queue  # type: ignore[return-value]

    def _send_new(self, link: Link, msg: Message, qos: int, retain: bool, sub_ids: tuple[int, ...],
                  now: float) -> None:
        pid = self._allocate_pid()
        journal = self.journal
        props = self._props(msg, sub_ids, now)
        if link.conn.send_publish(msg.topic, msg.payload, qos, retain, pid, props, False,
                                  msg.encoded if props is None or props is msg.wire else None):
            self.inflight[pid] = Inflight(msg, qos, retain, sub_ids)
            self.counters.publish_sent += 1
            if journal is not None:
                journal.put(self.client_id, msg, 1, pid, qos, retain, sub_ids)
        else:
            # too large for this client: dropped as if delivered [MQTT-3.1.2-25]
            self.counters.dropped += 1
            if journal is not None:
                journal.delete(self.client_id, msg)

    def _allocate_pid(self) -> int:
        pid = self.next_pid
        inflight = self.inflight
        while pid in inflight:
            pid = pid + 1 if pid < 65535 else 1
        self.next_pid = pid + 1 if pid < 65535 else 1
        return pid

    def _props(self, msg: Message, sub_ids: tuple[int, ...], now: float) -> bytes | None:
        """This delivery's encoded property block: the message's own block (the same
        object for every delivery, so a fan-out can share one encoding), or a copy with
        the Subscription Identifiers and the remaining expiry spliced in front."""
        if self.version != MQTT_5:
            return None
        block = msg.wire
        if not sub_ids and msg.expires_at is None:
            return block
        entries = subscription_ids_entries(sub_ids) if sub_ids else b""
        remaining = msg.remaining_expiry(now)
        if remaining is not None:
            entries += expiry_entry(remaining)
        return splice_properties(block, entries)

    def drain(self, now: float) -> None:
        """Send queued messages while there is flow-control credit."""
        link = self.link
        if link is None:
            return
        queue = self.queue
        sent = False
        while queue and len(self.inflight) < self.send_quota:
            msg, qos, retain, sub_ids = queue.popleft()  # type: ignore[union-attr]
            if msg.expired(now):
                self.counters.expired += 1
                if self.journal is not None and qos:
                    self.journal.delete(self.client_id, msg)
                continue
            if qos == 0:
                if link.conn.send_publish(msg.topic, msg.payload, 0, retain, 0,
                                          self._props(msg, sub_ids, now)):
                    self.counters.publish_sent += 1
            else:
                self._send_new(link, msg, qos, retain, sub_ids, now)
            sent = True
        # QoS 0 messages queued behind exhausted credit need no credit themselves
        while queue and queue[0][1] == 0:
            msg, qos, retain, sub_ids = queue.popleft()  # type: ignore[union-attr]
            if not msg.expired(now) and link.conn.send_publish(
                    msg.topic, msg.payload, 0, retain, 0, self._props(msg, sub_ids, now)):
                self.counters.publish_sent += 1
            sent = True
        if not queue:
            self.queue = ()  # let the drained deque go
        if sent:
            link.wake()

    def resume(self, now: float) -> None:
        """After CONNACK on a resumed session: re-send in-flight messages, then the queue.

        Unacknowledged PUBLISHes go again with DUP=1 and their packet ids; a QoS 2
        message whose PUBREC arrived gets its PUBREL again [MQTT-4.4.0-1]. Only as
        many as the client's Receive Maximum allows; the rest follow as acks free
        credit, before anything new.
        """
        link = self.link
        if link is None:
            return
        self.unsent = deque(self.inflight)
        self._resend(now)
        if not self.unsent:
            self.drain(now)
        link.wake()

    def _resend(self, now: float) -> None:
        link = self.link
        assert link is not None
        conn = link.conn
        unsent = self.unsent
        inflight = self.inflight
        while unsent and len(inflight) - len(unsent) < self.send_quota:
            pid = unsent.popleft()  # type: ignore[union-attr]
            item = inflight.get(pid)
            if item is None:
                continue
            if item.released:
                conn.send(Pubrel(pid))
                continue
            if item.msg.expired(now) or not conn.send_publish(
                    item.msg.topic, item.msg.payload, item.qos, item.retain, pid,
                    self._props(item.msg, item.sub_ids, now), dup=True):
                # expired, or too large for the client's new maximum packet size
                del inflight[pid]
                self.counters.expired += 1
                if self.journal is not None:
                    self.journal.delete(self.client_id, item.msg)
        if not unsent:
            self.unsent = ()
        link.wake()

    # -- acknowledgements ---------------------------------------------------------

    def acked(self, pid: int, now: float) -> bool:
        """PUBACK, or PUBCOMP; also PUBREC with an error code. Frees credit."""
        item = self.inflight.pop(pid, None)
        if item is None:
            return False
        if self.journal is not None:
            self.journal.delete(self.client_id, item.msg)
        if self.unsent:
            if self.link is not None:
                self._resend(now)
        elif self.queue:
            self.drain(now)
        return True

    def received(self, pid: int) -> bool:
        """PUBREC (success): the QoS 2 message moves to awaiting PUBCOMP."""
        item = self.inflight.get(pid)
        if item is None or item.qos != 2:
            return False
        item.released = True
        if self.journal is not None:
            self.journal.put(self.client_id, item.msg, 2, pid, item.qos, item.retain, item.sub_ids)
        return True

    def persist_all(self) -> None:
        """Journal the whole session (it just became ours, or just became persistent)."""
        journal = self.journal
        if journal is None:
            return
        journal.session_changed(self)
        for pid, item in self.inflight.items():
            journal.put(self.client_id, item.msg, 2 if item.released else 1, pid, item.qos,
                        item.retain, item.sub_ids)
        for msg, qos, retain, sub_ids in self.queue:
            if qos:
                journal.put(self.client_id, msg, 0, 0, qos, retain, sub_ids)

    def hold_qos2(self, pid: int) -> None:
        """An inbound QoS 2 PUBLISH routed and awaiting its PUBREL."""
        held = self.inbound_qos2
        if not held:
            held = self.inbound_qos2 = set()
        held.add(pid)  # type: ignore[union-attr]

    def reset_for_clean_start(self) -> None:
        self.unsent = ()
        self.inflight.clear()
        self.queue = ()
        self.inbound_qos2 = _NO_IDS
        self.next_pid = 1
