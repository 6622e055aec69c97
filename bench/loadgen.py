"""A load generator for MQTT brokers that is meant not to be the bottleneck.

Independent of the code under test: it never imports ``shards`` or ``router``; the few MQTT
3.1.1 / 5.0 packets it needs (CONNECT, CONNACK, SUBSCRIBE, SUBACK, PUBLISH, PUBACK, DISCONNECT)
are encoded and parsed by hand below.

How it stays cheap (FACTS.md: batching, not the language, decides most of the cost):

- every publisher pre-encodes a batch of PUBLISH packets once; sending patches only the
  timestamp + sequence (and, at QoS 1, the packet id) in place and writes the whole batch
  with one ``transport.write``;
- subscribers parse each received chunk in one pass, count PUBLISHes, check sequences and
  write all the QoS 1 PUBACKs of a chunk in one write;
- the payload (64 bytes by default) starts with ``>QII``: send time (``time.perf_counter_ns``,
  CLOCK_MONOTONIC, so comparable between processes of one host), publisher id, sequence.
  Latency is sampled (one message in ``sample_mask + 1``), loss and order are checked for
  every message.

Modes: flat out (QoS 0: write while the socket accepts, back off on ``pause_writing``; QoS 1:
at most ``window`` unacknowledged messages per publisher) or rate-limited (a total msg/s
spread over the publishers, sent in 1 ms ticks; QoS 1 still bounded by the window).

Library use (bench/e2e.py)::

    run = Run(fan_in(10, qos=0), host, port)
    await run.open(); run.start(); ...; a = run.snapshot(); ...; b = run.snapshot()
    totals = await run.stop(); await run.close()

Command line::

    python -m bench.loadgen run --port 1883 --scenario fanin --n 10 --qos 1 --duration 10
    python -m bench.loadgen run --port 1883 --scenario pairs --n 50 --procs 2
    python -m bench.loadgen sink --port 0 --ready-file /tmp/sink.json   # trivial forwarder

The ``sink`` is a minimal batched forwarder (exact-topic subscriptions only, QoS 1 acked at
once, raw packets forwarded unchanged). Driving the generator against it shows how fast the
generator itself can go and what it costs per message (bench/e2e.py does that first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

perf_ns = time.perf_counter_ns

MQTT_311 = 4
MQTT_5 = 5

STAMP = struct.Struct(">QII")  # send time ns, publisher id, sequence: the payload's first 16 bytes
PUBACK_HDR = b"\x40\x02"
# QoS 0 flat out with a backlog cap: a publisher that saw no progress for this long sends
# one more batch. Long next to a healthy broker's delivery gaps (ms), so it does not turn
# into a rate floor, short enough that a broker that dropped everything outstanding does not
# stall the run.
STALL_RESEND = 0.5


# ------------------------------------------------------------------------------------------
# hand-made MQTT encoder (only what a load generator needs)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(client_id: str, version: int = MQTT_311, keepalive: int = 300,
                   clean: bool = True) -> bytes:
    body = _str("MQTT") + bytes([version, 0x02 if clean else 0]) + struct.pack(">H", keepalive)
    if version == MQTT_5:
        # Receive Maximum 65535 so the broker may pipeline QoS 1 deliveries freely
        props = b"\x21\xff\xff"
        body += varint(len(props)) + props
    return _packet(0x10, body + _str(client_id))


def subscribe_packet(packet_id: int, topic: str, qos: int, version: int = MQTT_311) -> bytes:
    body = struct.pack(">H", packet_id)
    if version == MQTT_5:
        body += b"\x00"
    return _packet(0x82, body + _str(topic) + bytes([qos]))


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0,
                   version: int = MQTT_311) -> tuple[bytes, int]:
    """One PUBLISH and the offset of the field to patch (packet id at QoS 1, else payload)."""
    var = _str(topic)
    patch = len(var)
    if qos:
        var += struct.pack(">H", packet_id)
    if version == MQTT_5:
        var += b"\x00"  # no properties
    body = var + payload
    head = bytes([0x30 | (qos << 1)]) + varint(len(body))
    return head + body, len(head) + (patch if qos else len(var))


DISCONNECT = b"\xe0\x00"


def read_varint(buf: bytes, j: int, n: int) -> tuple[int, int]:
    """(value, index after it), or (-1, j) when the buffer ends inside it."""
    value = shift = 0
    while j < n:
        b = buf[j]
        j += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, j
        shift += 7
        if shift > 21:
            raise ValueError("malformed remaining length")
    return -1, j


# ------------------------------------------------------------------------------------------
# clients


class ProtocolFailure(Exception):
    pass


class WriteGate(asyncio.Protocol):
    """The write side's back-pressure, shared by the generator's client protocols:
    the transport pauses us, and ``await writable()`` waits until it resumes (or the
    connection is gone, as each protocol defines it)."""

    paused = False
    _resume: asyncio.Future | None = None

    def gone(self) -> bool:
        raise NotImplementedError

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    async def writable(self) -> None:
        while self.paused and not self.gone():
            self._resume = asyncio.get_running_loop().create_future()
            await self._resume


class _Client(WriteGate):
    """Shared by publishers and subscribers: handshake, control packets, back-pressure."""

    def __init__(self, client_id: str, version: int) -> None:
        self.client_id = client_id
        self.version = version
        self.v5 = version == MQTT_5
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack = loop.create_future()
        self.suback = loop.create_future()
        for fut in (self.connack, self.suback):  # nobody awaits a publisher's suback
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.buf = b""
        self.paused = False
        self._resume: asyncio.Future | None = None
        self.lost = False
        self.closing = False
        self.errors: list[str] = []

    # transport callbacks
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self.lost = True
        if not self.closing:
            self.errors.append(f"connection lost: {exc!r}")
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(ProtocolFailure(f"{self.client_id}: connection lost"))
        self._wake()

    def gone(self) -> bool:
        return self.lost

    def control(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 2:  # CONNACK
            code = body[1] if len(body) > 1 else 255
            if code:
                self.errors.append(f"CONNACK refused 0x{code:02x}")
                if not self.connack.done():
                    self.connack.set_exception(ProtocolFailure(f"CONNACK 0x{code:02x}"))
            elif not self.connack.done():
                self.connack.set_result(None)
        elif kind == 9:  # SUBACK: packet id, [props], granted codes
            j = 2
            if self.v5:
                plen, j = read_varint(body, j, len(body))
                j += plen
            codes = body[j:]
            if any(c >= 0x80 for c in codes):
                self.errors.append(f"SUBACK refused {codes.hex()}")
                if not self.suback.done():
                    self.suback.set_exception(ProtocolFailure(f"SUBACK {codes.hex()}"))
            elif not self.suback.done():
                self.suback.set_result(None)
        elif kind == 14:  # DISCONNECT from the server (MQTT 5)
            self.errors.append(f"DISCONNECT from broker {body[:1].hex()}")
        elif kind == 13:  # PINGRESP
            pass
        else:
            self.errors.append(f"unexpected packet type {kind}")

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(DISCONNECT)
            finally:
                self.transport.close()


class Subscriber(_Client):
    """Counts PUBLISHes, checks per-publisher sequences, acks QoS 1 in one write per chunk."""

    def __init__(self, client_id: str, version: int, topic: str, qos: int, n_pubs: int,
                 sample_mask: int = 7, expected=None) -> None:
        super().__init__(client_id, version)
        self.topic = topic
        self.qos = qos
        self.received = 0       # every PUBLISH, duplicates included
        self.dups = 0           # sequence at or below one already seen (duplicate or reordered)
        self.gaps = 0           # sequences skipped over (lost, or reordered: see dups)
        # next sequence expected from each publisher: a list, or a memoryview over shared
        # memory when publishers in other processes watch our progress (--procs)
        self.expected = expected if expected is not None else [0] * n_pubs
        self.sample_mask = sample_mask
        self.samples: list[int] | None = None  # latency samples in ns while sampling
        self.kept: list[int] = []
        self.feeds: list[Publisher] = []   # in-process publishers waiting on our progress
        self.last_rx = 0
        self.max_gap = 0        # longest time between two chunks with PUBLISHes while sampling, ns

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        count = gaps = dups = 0
        acks = bytearray() if self.qos else None
        exp = self.expected
        samples = self.samples
        mask = self.sample_mask
        unpack = STAMP.unpack_from
        v5 = self.v5
        now = perf_ns()
        while i + 2 <= n:
            first = buf[i]
            rl = buf[i + 1]
            j = i + 2
            if rl & 0x80:
                rl, j = read_varint(buf, i + 1, n)
                if rl < 0:
                    break
            end = j + rl
            if end > n:
                break
            if first >> 4 == 3:
                p = j + 2 + ((buf[j] << 8) | buf[j + 1])
                if first & 6:
                    acks += PUBACK_HDR
                    acks += buf[p:p + 2]
                    p += 2
                if v5:
                    plen = buf[p]
                    if plen < 0x80:
                        p += 1 + plen
                    else:
                        plen, p = read_varint(buf, p, n)
                        p += plen
                ts, pub, seq = unpack(buf, p)
                e = exp[pub]
                if seq == e:
                    exp[pub] = seq + 1
                elif seq > e:
                    gaps += seq - e
                    exp[pub] = seq + 1
                else:
                    dups += 1
                if samples is not None and not seq & mask:
                    samples.append(now - ts)
                count += 1
            else:
                self.control(first, bytes(buf[j:end]))
            i = end
        self.buf = buf[i:]
        if count:
            self.received += count
            self.gaps += gaps
            self.dups += dups
            if samples is not None and self.last_rx and now - self.last_rx > self.max_gap:
                self.max_gap = now - self.last_rx
            self.last_rx = now
            if acks:
                self.transport.write(bytes(acks))  # type: ignore[union-attr]
            for q in self.feeds:
                if q._progress is not None:
                    q.progressed()

    @property
    def unique(self) -> int:
        return self.received - self.dups


class Publisher(_Client):
    """Sends pre-encoded batches; QoS 1 keeps at most ``window`` messages unacknowledged."""

    def __init__(self, client_id: str, version: int, topic: str, pub_id: int, qos: int,
                 payload_size: int = 64, batch: int = 128, window: int = 100) -> None:
        super().__init__(client_id, version)
        if payload_size < STAMP.size:
            raise ValueError(f"payload must be at least {STAMP.size} bytes")
        self.topic = topic
        self.pub_id = pub_id
        self.qos = qos
        self.window = window
        self.batch = batch
        packet, patch = publish_packet(topic, bytes(payload_size), qos, 1, version)
        self.plen = len(packet)
        self.template = bytearray(packet * batch)
        self.patch_at = patch
        # QoS 1: packet id [+ empty properties] + stamp, patched in one call
        fmt = ">QII" if not qos else (">HxQII" if version == MQTT_5 else ">HQII")
        self.pack = struct.Struct(fmt).pack_into
        self.seq = 0            # messages written so far (= next sequence)
        self.next_pid = 1
        self.inflight: set[int] = set()
        self.acked = 0
        self.bad_acks = 0       # PUBACK for an id not in flight, or with a failure reason
        self.write_stalls = 0   # QoS 0 backlog waits that timed out (no progress for STALL_RESEND)
        self.running = False
        self.rate: float | None = None
        self.task: asyncio.Task | None = None
        self._drained: asyncio.Future | None = None
        # QoS 0 flat out: at most ``backlog`` messages sent but not yet seen (or skipped) by
        # the in-process subscribers of this topic, so the kernel's socket buffers (MBs per
        # connection) and the broker's queues do not fill with seconds of backlog
        self.backlog = 0
        self.watchers: list = []        # progress (Subscriber.expected) of our topic's subscribers
        self.remote = False             # some watched subscriber lives in another process: poll
        self._progress: asyncio.Future | None = None

    # --- sending

    def _make(self, k: int) -> bytes:
        buf = self.template
        pack = self.pack
        plen = self.plen
        off = self.patch_at
        seq = self.seq
        pub = self.pub_id
        ts = perf_ns()
        if self.qos:
            pid = self.next_pid
            inflight = self.inflight
            for x in range(k):
                pack(buf, off, pid, ts, pub, seq + x)
                inflight.add(pid)
                pid = pid + 1 if pid < 65535 else 1
                off += plen
            self.next_pid = pid
        else:
            for x in range(k):
                pack(buf, off, ts, pub, seq + x)
                off += plen
        self.seq = seq + k
        return bytes(buf[:k * plen]) if k < self.batch else bytes(buf)

    def _send(self, k: int) -> None:
        write = self.transport.write  # type: ignore[union-attr]
        while k > 0:
            m = k if k < self.batch else self.batch
            write(self._make(m))
            k -= m

    def _top_up(self) -> None:
        if self.running and self.rate is None and not self.paused and not self.lost:
            free = self.window - len(self.inflight)
            if free > 0:
                self._send(free)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.qos:
            self._top_up()

    def behind(self) -> int:
        """Messages sent that the slowest subscriber of our topic has neither seen nor skipped."""
        me = self.pub_id
        return self.seq - min(w[me] for w in self.watchers)

    def progressed(self) -> None:
        if self._progress is not None and not self._progress.done():
            self._progress.set_result(None)

    async def _flat_qos0(self) -> None:
        sleep = asyncio.sleep
        loop = asyncio.get_running_loop()
        cap = self.backlog if self.watchers else 0
        batch = self.batch
        while self.running and not self.lost:
            if self.paused:
                await self.writable()
                continue
            if cap and self.behind() + batch > cap:
                # wake on subscriber progress; after STALL_RESEND s without any, send one
                # batch anyway (a broker may have dropped all that is outstanding, and then
                # no progress would ever come)
                if self.remote:  # nobody can wake us: poll every 2 ms
                    waited = 0.0
                    while (self.running and waited < STALL_RESEND
                           and self.behind() + batch > cap):
                        await sleep(0.002)
                        waited += 0.002
                    if waited < STALL_RESEND:
                        continue
                    self.write_stalls += 1
                else:
                    self._progress = loop.create_future()
                    try:
                        await asyncio.wait_for(self._progress, STALL_RESEND)
                    except asyncio.TimeoutError:
                        self.write_stalls += 1
                    else:
                        continue
            self.transport.write(self._make(batch))  # type: ignore[union-attr]
            await sleep(0)

    async def _rated(self, rate: float) -> None:
        t0 = time.perf_counter()
        start = self.seq
        tick = 0.001
        while self.running and not self.lost:
            due = int((time.perf_counter() - t0) * rate) - (self.seq - start)
            if self.qos:
                due = min(due, self.window - len(self.inflight))
            if due > 0 and not self.paused:
                self._send(due)
            await asyncio.sleep(tick)

    def start(self, rate: float | None = None) -> None:
        self.running = True
        self.rate = rate
        if rate is not None:
            self.task = asyncio.ensure_future(self._rated(rate))
        elif self.qos:
            self._top_up()
        else:
            self.task = asyncio.ensure_future(self._flat_qos0())

    async def stop(self, timeout: float) -> None:
        """Stop sending; wait until the kernel took every byte and (QoS 1) every ack is in."""
        self.running = False
        if self.task is not None:
            await self.task
        deadline = time.perf_counter() + timeout
        while not self.lost and time.perf_counter() < deadline:
            if self.transport.get_write_buffer_size() == 0 and not self.inflight:  # type: ignore[union-attr]
                return
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._drained, 0.05)
            except asyncio.TimeoutError:
                pass

    # --- receiving

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        acked = bad = 0
        inflight = self.inflight
        while i + 2 <= n:
            first = buf[i]
            rl = buf[i + 1]
            j = i + 2
            if rl & 0x80:
                rl, j = read_varint(buf, i + 1, n)
                if rl < 0:
                    break
            end = j + rl
            if end > n:
                break
            if first == 0x40:  # PUBACK: id [reason [props]]
                pid = (buf[j] << 8) | buf[j + 1]
                if pid in inflight and (rl < 3 or buf[j + 2] < 0x80):
                    inflight.discard(pid)
                    acked += 1
                else:
                    inflight.discard(pid)
                    bad += 1
            else:
                self.control(first, bytes(buf[j:end]))
            i = end
        self.buf = buf[i:]
        if acked or bad:
            self.acked += acked
            self.bad_acks += bad
            if self.running:
                self._top_up()
            elif self._drained is not None and not self._drained.done() and not inflight:
                self._drained.set_result(None)


# ------------------------------------------------------------------------------------------
# plans and runs


@dataclass
class Plan:
    """Who publishes where and who subscribes to what."""

    name: str
    pubs: list[str]                 # topic of publisher i (its id is i)
    subs: list[str]                 # topic filter of subscriber j
    qos: int = 0
    payload: int = 64
    version: int = MQTT_311
    rate: float | None = None       # total msg/s over all publishers; None = flat out
    window: int = 100               # QoS 1: unacknowledged messages per publisher
    batch: int = 128                # packets per write when flat out
    backlog: int = 2000             # QoS 0 flat out: cap on sent-not-yet-delivered per publisher
                                    # (in-process subscribers only; 0 = none: kernel buffers fill)

    def part(self, k: int, parts: int) -> tuple[list[int], list[int]]:
        """Indices of the publishers and subscribers that process k of ``parts`` runs."""
        return (list(range(k, len(self.pubs), parts)), list(range(k, len(self.subs), parts)))


def fan_in(n: int = 10, name: str | None = None, **kw) -> Plan:
    return Plan(name or f"fan-in {n}->1", ["bench/fanin"] * n, ["bench/fanin"], **kw)


def fan_out(n: int = 100, name: str | None = None, **kw) -> Plan:
    """One publisher, ``n`` subscribers to its topic: every message is ``n`` deliveries."""
    return Plan(name or f"fan-out 1->{n}", ["bench/fanout"], ["bench/fanout"] * n, **kw)


def pairs(n: int = 50, name: str | None = None, **kw) -> Plan:
    topics = [f"bench/pair/{i}" for i in range(n)]
    return Plan(name or f"1:1 x{n}", topics, list(topics), **kw)


SCENARIOS = {"fanin": fan_in, "pairs": pairs, "fanout": fan_out}


def cpu_seconds() -> float:
    return time.process_time()


@dataclass
class Snapshot:
    t: float                        # perf_counter seconds
    received: int
    unique: int
    sent: int
    acked: int
    gen_cpu: float                  # this process's CPU seconds

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Totals:
    sent: int = 0
    acked: int = 0
    unacked: int = 0
    bad_acks: int = 0
    received: int = 0
    unique: int = 0
    dups: int = 0
    gaps: int = 0
    write_stalls: int = 0
    expected: int = 0               # deliveries owed: sent (QoS 0) or acked (QoS 1) x subscribers
    errors: list[str] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list)


class Run:
    """One plan (or one part of it) against one broker, driven step by step by the caller."""

    def __init__(self, plan: Plan, host: str, port: int, *, prefix: str | None = None,
                 part: tuple[int, int] = (0, 1), sample_mask: int = 7,
                 progress: list | None = None) -> None:
        self.plan = plan
        self.host = host
        self.port = port
        self.prefix = prefix or f"lg{os.getpid()}-{int(time.time() * 1000) % 100000000}"
        self.pub_idx, self.sub_idx = plan.part(*part)
        self.sample_mask = sample_mask
        # --procs: per subscriber of the plan, its progress array in shared memory
        self.progress = [memoryview(a).cast("B").cast("q") for a in progress] if progress else None
        self.pubs: list[Publisher] = []
        self.subs: list[Subscriber] = []

    async def _open(self, proto: _Client, sock: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            sock.setblocking(False)
            await loop.create_connection(lambda: proto, sock=sock)
        else:
            await loop.create_connection(lambda: proto, self.host, self.port)
        proto.transport.write(connect_packet(proto.client_id, self.plan.version))  # type: ignore[union-attr]
        await asyncio.wait_for(proto.connack, 10)

    async def open(self, pub_socks: dict[int, socket.socket] | None = None,
                   sub_socks: dict[int, socket.socket] | None = None) -> None:
        """Connect everybody; subscribers are subscribed (SUBACK received) on return.

        ``pub_socks``/``sub_socks`` map a publisher/subscriber index to an already connected
        socket (used to choose which shard each client lands on)."""
        p = self.plan
        pub_socks = pub_socks or {}
        sub_socks = sub_socks or {}
        self.subs = [Subscriber(f"{self.prefix}-s{j}", p.version, p.subs[j], p.qos, len(p.pubs),
                                self.sample_mask, self.progress[j] if self.progress else None)
                     for j in self.sub_idx]
        self.pubs = [Publisher(f"{self.prefix}-p{i}", p.version, p.pubs[i], i, p.qos, p.payload,
                               p.batch, p.window) for i in self.pub_idx]
        await asyncio.gather(*(self._open(s, sub_socks.get(j)) for s, j in zip(self.subs, self.sub_idx)))
        for n, s in enumerate(self.subs):
            s.transport.write(subscribe_packet(n + 1, s.topic, p.qos, p.version))  # type: ignore[union-attr]
        await asyncio.gather(*(asyncio.wait_for(s.suback, 10) for s in self.subs))
        await asyncio.gather(*(self._open(q, pub_socks.get(i)) for q, i in zip(self.pubs, self.pub_idx)))
        if p.qos == 0 and p.rate is None and p.backlog:
            # plans use exact topics only: a publisher's subscribers are those of its topic
            local = dict(zip(self.sub_idx, self.subs))
            for q in self.pubs:
                views, remote = [], False
                for j, topic in enumerate(p.subs):
                    if topic != q.topic:
                        continue
                    if j in local:
                        views.append(local[j].expected)
                        local[j].feeds.append(q)
                    elif self.progress is not None:
                        views.append(self.progress[j])
                        remote = True
                    else:  # a subscriber we cannot see: no cap for this publisher
                        views = []
                        break
                if views:
                    q.backlog, q.watchers, q.remote = p.backlog, views, remote

    def start(self) -> None:
        per = None
        if self.plan.rate is not None:
            per = self.plan.rate / len(self.plan.pubs)
        for q in self.pubs:
            q.start(per)

    def sampling(self, on: bool) -> None:
        for s in self.subs:
            if on and s.samples is None:
                s.samples = []
            elif not on and s.samples is not None:
                s.kept += s.samples
                s.samples = None

    def max_gap_ms(self) -> float:
        """Longest silence of any subscriber while sampling (a stall shows here)."""
        return max((s.max_gap for s in self.subs), default=0) / 1e6

    def snapshot(self) -> Snapshot:
        return Snapshot(time.perf_counter(), sum(s.received for s in self.subs),
                        sum(s.unique for s in self.subs), sum(q.seq for q in self.pubs),
                        sum(q.acked for q in self.pubs), cpu_seconds())

    def expected_deliveries(self) -> int:
        """Deliveries owed for what was sent: each message goes to every matching subscriber."""
        per_topic: dict[str, int] = {}
        for s in self.plan.subs:
            per_topic[s] = per_topic.get(s, 0) + 1
        return sum(per_topic.get(self.plan.pubs[q.pub_id], 0) * (q.acked if self.plan.qos else q.seq)
                   for q in self.pubs)

    async def stop(self, drain_timeout: float = 10.0, idle: float = 1.0) -> Totals:
        """Stop publishing, then wait until subscribers have everything or nothing arrives for
        ``idle`` seconds (QoS 0 may be dropped by the broker) or ``drain_timeout`` passes."""
        await asyncio.gather(*(q.stop(drain_timeout) for q in self.pubs))
        deadline = time.perf_counter() + drain_timeout
        last = -1
        last_change = time.perf_counter()
        while time.perf_counter() < deadline:
            got = sum(s.unique for s in self.subs)
            if self.plan_is_whole() and got >= self.expected_deliveries():
                break
            now = time.perf_counter()
            if got != last:
                last, last_change = got, now
            elif now - last_change > idle:
                break
            await asyncio.sleep(0.02)
        return self.totals()

    def plan_is_whole(self) -> bool:
        return len(self.pub_idx) == len(self.plan.pubs) and len(self.sub_idx) == len(self.plan.subs)

    def totals(self) -> Totals:
        t = Totals(expected=self.expected_deliveries())
        for q in self.pubs:
            t.sent += q.seq
            t.acked += q.acked
            t.unacked += len(q.inflight)
            t.bad_acks += q.bad_acks
            t.write_stalls += q.write_stalls
            t.errors += [f"{q.client_id}: {e}" for e in q.errors]
        for s in self.subs:
            t.received += s.received
            t.unique += s.unique
            t.dups += s.dups
            t.gaps += s.gaps
            t.errors += [f"{s.client_id}: {e}" for e in s.errors]
            t.latency_ns += s.kept + (s.samples or [])
        return t

    async def close(self) -> None:
        for c in (*self.pubs, *self.subs):
            c.close()
        await asyncio.sleep(0)


class _Probe(_Client):
    """Collects the PUBLISHes it receives as topic -> payload (for retained $SYS values)."""

    def __init__(self, client_id: str, version: int) -> None:
        super().__init__(client_id, version)
        self.got: dict[str, bytes] = {}

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        while i + 2 <= n:
            first = buf[i]
            rl, j = read_varint(buf, i + 1, n)
            if rl < 0 or j + rl > n:
                break
            end = j + rl
            if first >> 4 == 3:
                tl = (buf[j] << 8) | buf[j + 1]
                topic = bytes(buf[j + 2:j + 2 + tl]).decode(errors="replace")
                p = j + 2 + tl + (2 if first & 6 else 0)
                if self.v5:
                    plen, p = read_varint(buf, p, end)
                    p += plen
                self.got[topic] = bytes(buf[p:end])
            else:
                self.control(first, bytes(buf[j:end]))
            i = end
        self.buf = buf[i:]


async def fetch_retained(host: str, port: int, topic_filter: str, wait: float = 0.3,
                         version: int = MQTT_311) -> dict[str, bytes]:
    """Subscribe to ``topic_filter`` and return what arrives within ``wait`` s of the SUBACK."""
    loop = asyncio.get_running_loop()
    probe = _Probe(f"probe-{os.getpid()}-{time.monotonic_ns() % 10**9}", version)
    await loop.create_connection(lambda: probe, host, port)
    try:
        probe.transport.write(connect_packet(probe.client_id, version))  # type: ignore[union-attr]
        await asyncio.wait_for(probe.connack, 10)
        probe.transport.write(subscribe_packet(1, topic_filter, 0, version))  # type: ignore[union-attr]
        await asyncio.wait_for(probe.suback, 10)
        await asyncio.sleep(wait)
        return dict(probe.got)
    finally:
        probe.close()


def percentile(values: list[int], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(plan: Plan, a: Snapshot, b: Snapshot, totals: Totals) -> dict:
    """Rates over the window a..b, loss and latency over the whole run."""
    dt = b.t - a.t
    expected = totals.expected
    lost = max(0, expected - totals.unique)
    lat = totals.latency_ns
    return {
        "window_s": dt,
        "delivered_per_s": (b.received - a.received) / dt,
        "sent_per_s": (b.sent - a.sent) / dt,
        "delivered_in_window": b.received - a.received,
        "gen_cpu_s": b.gen_cpu - a.gen_cpu,
        "gen_cpu_pct": 100 * (b.gen_cpu - a.gen_cpu) / dt,
        "sent": totals.sent, "acked": totals.acked, "unacked": totals.unacked,
        "bad_acks": totals.bad_acks, "write_stalls": totals.write_stalls,
        "received": totals.received, "unique": totals.unique,
        "dups": totals.dups, "gaps": totals.gaps, "expected": expected, "lost": lost,
        "loss_pct": 100 * lost / expected if expected else 0.0,
        "latency_samples": len(lat),
        "p50_ms": (percentile(lat, 50) or 0) / 1e6 if lat else None,
        "p99_ms": (percentile(lat, 99) or 0) / 1e6 if lat else None,
        "errors": totals.errors[:20],
    }


# ------------------------------------------------------------------------------------------
# the trivial sink: a minimal batched forwarder to measure the generator against


class _SinkConn(asyncio.Protocol):
    def __init__(self, sink: "Sink") -> None:
        self.sink = sink
        self.buf = b""
        self.out: list[bytes] = []
        self.v5 = False
        self.transport: asyncio.Transport | None = None
        self.topics: list[str] = []

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(high=1024 * 1024)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        for t in self.topics:
            subs = self.sink.subs.get(t)
            if subs and self in subs:
                subs.remove(self)
        self.sink.conns.discard(self)
        if self in self.sink.congested:
            self.sink.congested.discard(self)
            self.sink.update_reading()

    def pause_writing(self) -> None:
        self.sink.congested.add(self)
        self.sink.update_reading()

    def resume_writing(self) -> None:
        self.sink.congested.discard(self)
        self.sink.update_reading()

    def queue(self, data: bytes) -> None:
        if not self.out:
            self.sink.dirty.append(self)
        self.out.append(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        subs_of = self.sink.subs
        last_topic = None
        targets: list = []
        while i + 2 <= n:
            first = buf[i]
            rl = buf[i + 1]
            j = i + 2
            if rl & 0x80:
                rl, j = read_varint(buf, i + 1, n)
                if rl < 0:
                    break
            end = j + rl
            if end > n:
                break
            kind = first >> 4
            if kind == 3:
                tl = (buf[j] << 8) | buf[j + 1]
                topic = buf[j + 2:j + 2 + tl]
                if topic != last_topic:
                    last_topic = topic
                    targets = subs_of.get(topic, ())
                if targets:
                    packet = buf[i:end]
                    for t in targets:
                        t.queue(packet)
                if first & 6:
                    p = j + 2 + tl
                    self.queue(PUBACK_HDR + buf[p:p + 2])
            elif kind == 1:
                self.v5 = buf[j + 6] == MQTT_5
                self.queue(b"\x20\x03\x00\x00\x00" if self.v5 else b"\x20\x02\x00\x00")
                self.sink.conns.add(self)
            elif kind == 8:
                pid = buf[j:j + 2]
                k = j + 2
                if self.v5:
                    plen, k = read_varint(buf, k, end)
                    k += plen
                codes = bytearray()
                while k < end:
                    tl = (buf[k] << 8) | buf[k + 1]
                    topic = bytes(buf[k + 2:k + 2 + tl])
                    codes.append(buf[k + 2 + tl] & 3)
                    k += 3 + tl
                    subs_of.setdefault(topic, []).append(self)
                    self.topics.append(topic)
                body = pid + (b"\x00" if self.v5 else b"") + bytes(codes)
                self.queue(b"\x90" + varint(len(body)) + body)
            elif kind == 12:
                self.queue(b"\xd0\x00")
            elif kind == 14:
                self.transport.close()  # type: ignore[union-attr]
            i = end
        self.buf = buf[i:]
        self.sink.schedule()


class Sink:
    """Minimal batched forwarder: exact topics, raw packets forwarded, one write per loop turn."""

    def __init__(self) -> None:
        self.subs: dict[bytes, list[_SinkConn]] = {}
        self.conns: set[_SinkConn] = set()
        self.dirty: list[_SinkConn] = []
        self.congested: set[_SinkConn] = set()
        self._scheduled = False
        self._reading = True

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self.dirty = self.dirty, []
        for c in dirty:
            out, c.out = c.out, []
            if c.transport is not None and not c.transport.is_closing():
                c.transport.write(b"".join(out))

    def update_reading(self) -> None:
        want = not self.congested
        if want == self._reading:
            return
        self._reading = want
        for c in self.conns:
            if c.transport is not None and not c.transport.is_closing() and not c.topics:
                (c.transport.resume_reading if want else c.transport.pause_reading)()


async def serve_sink(host: str, port: int, ready_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    sink = Sink()
    server = await loop.create_server(lambda: _SinkConn(sink), host, port, backlog=1024)
    actual = server.sockets[0].getsockname()[1]
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "listeners": {"tcp": {"host": host, "port": actual}}}, f)
        os.replace(tmp, ready_file)
    else:
        print(f"sink listening on {host}:{actual}", flush=True)
    stop = loop.create_future()
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


# ------------------------------------------------------------------------------------------
# command line, optionally over several processes


def run_loop(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _part(plan: Plan, host: str, port: int, part: tuple[int, int], prefix: str,
                go: float, warmup: float, duration: float, conn=None, progress=None) -> dict:
    """One process's share: open, wait for ``go`` (perf_counter), run, report."""
    run = Run(plan, host, port, prefix=prefix, part=part, progress=progress)
    await run.open()
    if conn is not None:  # tell the parent we are connected, learn the start time
        conn.send("ready")
        go = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    await asyncio.sleep(max(0.0, go - time.perf_counter()))
    run.start()
    await asyncio.sleep(max(0.0, go + warmup - time.perf_counter()))
    a = run.snapshot()
    run.sampling(True)
    await asyncio.sleep(max(0.0, go + warmup + duration - time.perf_counter()))
    b = run.snapshot()
    run.sampling(False)
    totals = await run.stop()
    await run.close()
    return {"a": a.as_dict(), "b": b.as_dict(), "totals": totals.__dict__}


def _child(conn, plan, host, port, part, prefix, warmup, duration, cpus, progress) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    res = run_loop(_part(plan, host, port, part, prefix, 0.0, warmup, duration, conn, progress))
    conn.send(res)
    conn.close()


def run_multi(plan: Plan, host: str, port: int, procs: int, warmup: float, duration: float,
              cpus: set[int] | None = None) -> dict:
    """Run ``plan`` split over ``procs`` processes; sums their windows (same perf_counter
    clock: CLOCK_MONOTONIC is system-wide) into one summary."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    prefix = f"lg{os.getpid()}"
    # each subscriber's per-publisher progress, shared so that QoS 0 publishers in any
    # process can keep their backlog cap
    progress = [ctx.RawArray("q", len(plan.pubs)) for _ in plan.subs]
    pipes, children = [], []
    for k in range(procs):
        parent, child = ctx.Pipe()
        pr = ctx.Process(target=_child, args=(child, plan, host, port, (k, procs),
                                              f"{prefix}-{k}", warmup, duration, cpus, progress))
        pr.start()
        pipes.append(parent)
        children.append(pr)
    for p in pipes:
        if p.recv() != "ready":
            raise RuntimeError("a generator process failed to connect")
    go = time.perf_counter() + 0.2
    for p in pipes:
        p.send(go)
    results = [p.recv() for p in pipes]
    for pr in children:
        pr.join()
    a = Snapshot(**{k: (max if k == "t" else sum)(r["a"][k] for r in results) for k in results[0]["a"]})
    b = Snapshot(**{k: (min if k == "t" else sum)(r["b"][k] for r in results) for k in results[0]["b"]})
    tot = Totals()
    for r in results:
        for k, v in r["totals"].items():
            setattr(tot, k, getattr(tot, k) + v)
    out = summarize(plan, a, b, tot)
    out["procs"] = procs
    return out


def build_plan(args) -> Plan:
    return SCENARIOS[args.scenario](args.n, qos=args.qos, payload=args.payload,
                                    version=args.mqtt, rate=args.rate, window=args.window,
                                    batch=args.batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="drive a broker and print a JSON summary")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--scenario", choices=sorted(SCENARIOS), default="fanin")
    r.add_argument("--n", type=int, default=10, help="publishers (fanin) or pairs (pairs)")
    r.add_argument("--qos", type=int, choices=(0, 1), default=0)
    r.add_argument("--payload", type=int, default=64)
    r.add_argument("--mqtt", type=int, choices=(4, 5), default=4, help="protocol level")
    r.add_argument("--rate", type=float, default=None, help="total msg/s (default: flat out)")
    r.add_argument("--window", type=int, default=100, help="QoS 1 unacked per publisher")
    r.add_argument("--batch", type=int, default=128, help="packets per write, flat out")
    r.add_argument("--warmup", type=float, default=2.0)
    r.add_argument("--duration", type=float, default=10.0)
    r.add_argument("--procs", type=int, default=1)
    r.add_argument("--cpus", default="", help="pin generator processes, e.g. 1 or 0,1")
    s = sub.add_parser("sink", help="run the trivial forwarding sink")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--ready-file", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "sink":
        run_loop(serve_sink(args.host, args.port, args.ready_file))
        return 0
    cpus = {int(c) for c in args.cpus.split(",") if c} or None
    plan = build_plan(args)
    if args.procs > 1:
        out = run_multi(plan, args.host, args.port, args.procs, args.warmup, args.duration, cpus)
    else:
        if cpus:
            os.sched_setaffinity(0, cpus)
        res = run_loop(_part(plan, args.host, args.port, (0, 1), f"lg{os.getpid()}",
                             time.perf_counter(), args.warmup, args.duration))
        out = summarize(plan, Snapshot(**res["a"]), Snapshot(**res["b"]), Totals(**res["totals"]))
    out["plan"] = plan.name
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
