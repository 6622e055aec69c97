"""``shoal bench conn|pub|sub``: an emqtt-bench-compatible load tool on bench/loadgen's encoders.

Accepts emqtt-bench's flags (``-h -p -V -c -n -i -I -t -q -s -L -k -C -u -P -S --prefix
--shortids --ifaddr --quic``) and its topic templates (``%i`` client sequence number,
``%c`` client id, ``%u`` username). Prints one live line per second and a summary at the
end; optionally a CSV of the per-second rates and a PNG plot of them (matplotlib).

Kept cheap so it is not the bottleneck: every publisher pre-encodes a batch of PUBLISH
packets and patches only the packet id and the stamp (``b"shb1"`` + send time
``perf_counter_ns`` + client + sequence) before one ``write`` per batch; subscribers parse
whole chunks and ack (PUBACK / PUBREC / PUBCOMP) with one write per chunk; ``--procs N``
splits the clients over N processes whose per-second reports the parent adds up.

Differences from emqtt-bench, on purpose: ``-L`` is a total over all clients (``pub``: the
messages published, split evenly; ``sub``: the messages received, then it exits);
``--duration S`` stops S seconds after every client is connected (``conn --duration 0``
exits as soon as all are connected); latency is measured only for payloads that carry our
stamp (published by ``shoal bench pub`` with ``-s`` >= 20) and only within one host
(CLOCK_MONOTONIC).

Never imported by the broker: ``shards/cli.py`` imports it only when ``shoal bench`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import signal
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field

from bench.loadgen import (
    MQTT_5, WriteGate, _packet, _str, publish_packet, read_varint, run_loop, subscribe_packet,
    varint,
)

perf_ns = time.perf_counter_ns

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

MAGIC = b"shb1"
STAMP = struct.Struct(">4sQII")     # magic, send time ns, client seq, message seq
STAMP_SIZE = STAMP.size             # 20
CONNECT_TIMEOUT = 10.0
DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


# ------------------------------------------------------------------------------------------
# templates and packets


def expand(template: str, seq: int, client_id: str = "", username: str = "") -> str:
    """emqtt-bench's templates: %i client sequence number, %c client id, %u username."""
    out = []
    i = 0
    n = len(template)
    while i < n:
        ch = template[i]
        if ch == "%" and i + 1 < n:
            nxt = template[i + 1]
            if nxt == "i":
                out.append(str(seq))
            elif nxt == "c":
                out.append(client_id)
            elif nxt == "u":
                out.append(username)
            elif nxt == "%":
                out.append("%")
            else:
                out.append(template[i:i + 2])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def client_id(kind: str, seq: int, prefix: str | None, shortids: bool) -> str:
    """emqtt-bench's naming: ``<prefix>_bench_<kind>_<seq>``, ``<prefix><seq>`` with
    --shortids; the prefix defaults to the host name."""
    p = prefix if prefix is not None else socket.gethostname()
    return f"{p}{seq}" if shortids else f"{p}_bench_{kind}_{seq}"


def connect_packet(cid: str, version: int = 4, keepalive: int = 300, clean: bool = True,
                   username: str | None = None, password: str | None = None) -> bytes:
    """CONNECT for MQTT 3.1 (3, "MQIsdp"), 3.1.1 (4) or 5 with optional credentials."""
    flags = 0x02 if clean else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    name = "MQIsdp" if version == 3 else "MQTT"
    body = _str(name) + bytes([version, flags]) + struct.pack(">H", keepalive)
    if version == MQTT_5:
        props = b"\x21\xff\xff"  # Receive Maximum 65535
        body += varint(len(props)) + props
    body += _str(cid)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return _packet(0x10, body)


_PROP_SIZE = {**dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
              **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
              **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4)}


def receive_maximum(connack_body: bytes) -> int | None:
    """The Receive Maximum property of an MQTT 5 CONNACK body, if present."""
    b = connack_body
    plen, j = read_varint(b, 2, len(b))
    end = j + plen
    while 0 <= j < end:
        pid = b[j]
        j += 1
        if pid == 0x21:
            return (b[j] << 8) | b[j + 1]
        if pid in _PROP_SIZE:
            j += _PROP_SIZE[pid]
        elif pid == 0x0B:
            _, j = read_varint(b, j, end)
        elif pid == 0x26:  # string pair
            j += 2 + ((b[j] << 8) | b[j + 1])
            j += 2 + ((b[j] << 8) | b[j + 1])
        else:              # UTF-8 string or binary data
            j += 2 + ((b[j] << 8) | b[j + 1])
    return None


def make_payload(size: int) -> bytes:
    return bytes(size)


# ------------------------------------------------------------------------------------------
# per-process counters


@dataclass
class Counters:
    connected: int = 0      # currently connected
    conn_ok: int = 0        # CONNACK accepted, cumulative
    conn_fail: int = 0      # refused, timed out, or could not connect
    disconnected: int = 0   # lost after being connected (not by us)
    subscribed: int = 0
    sent: int = 0           # PUBLISH written
    acked: int = 0          # PUBACK / PUBCOMP received
    received: int = 0       # PUBLISH received
    errors: list[str] = field(default_factory=list)
    lat: list[int] = field(default_factory=list)   # latency samples (ns) since the last report

    def note(self, msg: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(msg)


class Client(WriteGate):
    def __init__(self, bench: "Bench", seq: int, cid: str) -> None:
        self.bench = bench
        self.c = bench.counters
        self.seq = seq
        self.cid = cid
        self.v5 = bench.opts.version == MQTT_5
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack = loop.create_future()
        self.suback = loop.create_future()
        for f in (self.connack, self.suback):
            f.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.buf = b""
        self.quic = None  # the QuicStreamClient when running over QUIC
        self.up = False
        self.closing = False
        self.paused = False
        self._resume: asyncio.Future | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        if self.up:
            self.up = False
            self.c.connected -= 1
            if not self.closing:
                self.c.disconnected += 1
                self.c.note(f"{self.cid}: connection lost {exc!r}")
        for f in (self.connack, self.suback):
            if not f.done():
                f.set_exception(ConnectionError(f"{self.cid}: connection lost"))
        self._wake()

    def gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def control(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 2:
            code = body[1] if len(body) > 1 else 255
            if self.connack.done():
                return
            if code:
                self.connack.set_exception(ConnectionError(f"CONNACK refused 0x{code:02x}"))
            else:
                if self.v5 and isinstance(self, Publisher) and self.window:
                    rm = receive_maximum(body)
                    if rm:  # never more in flight than the broker accepts
                        self.window = min(self.window, rm)
                self.connack.set_result(None)
        elif kind == 9:
            j = 2
            if self.v5:
                plen, j = read_varint(body, j, len(body))
                j += plen
            codes = body[j:]
            if not self.suback.done():
                if any(c >= 0x80 for c in codes):
                    self.suback.set_exception(ConnectionError(f"SUBACK refused {codes.hex()}"))
                else:
                    self.suback.set_result(None)
        elif kind == 14:
            self.c.note(f"{self.cid}: DISCONNECT from broker {body[:1].hex()}")

    def close(self) -> None:
        self.closing = True
        t = self.transport
        if t is not None and not t.is_closing():
            try:
                if self.up:
                    t.write(DISCONNECT)
            finally:
                t.close()
        if self.quic is not None:
            self.quic.close()  # closing stream 0 ends an EMQX-style connection anyway; be explicit

    # default parser: control packets only
    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        while i + 2 <= n:
            rl, j = read_varint(buf, i + 1, n)
            if rl < 0 or j + rl > n:
                break
            self.control(buf[i], bytes(buf[j:j + rl]))
            i = j + rl
        self.buf = buf[i:]


class Subscriber(Client):
    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        count = 0
        acks = bytearray()
        v5 = self.v5
        lat = self.c.lat
        mask = self.bench.sample_mask
        unpack = STAMP.unpack_from
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
            kind = first >> 4
            if kind == 3:
                p = j + 2 + ((buf[j] << 8) | buf[j + 1])
                qos = (first >> 1) & 3
                if qos:
                    acks += b"\x40\x02" if qos == 1 else b"\x50\x02"
                    acks += buf[p:p + 2]
                    p += 2
                if v5:
                    plen, p = read_varint(buf, p, end)
                    p += plen
                if end - p >= STAMP_SIZE and buf[p:p + 4] == MAGIC:
                    _, ts, _, mseq = unpack(buf, p)
                    if not mseq & mask:
                        lat.append(now - ts)
                count += 1
            elif first == 0x62:  # PUBREL -> PUBCOMP
                acks += b"\x70\x02"
                acks += buf[j:j + 2]
            else:
                self.control(first, bytes(buf[j:end]))
            i = end
        self.buf = buf[i:]
        if acks:
            self.transport.write(bytes(acks))  # type: ignore[union-attr]
        if count:
            self.c.received += count
            self.bench.on_received()


class Publisher(Client):
    def __init__(self, bench: "Bench", seq: int, cid: str, topic: str, quota: int) -> None:
        super().__init__(bench, seq, cid)
        o = bench.opts
        self.qos = o.qos
        self.quota = quota              # 0: unlimited
        self.window = o.inflight if o.qos else 0
        self.batch = bench.batch
        payload = make_payload(o.size)
        self.stamped = o.size >= STAMP_SIZE
        packet, patch = publish_packet(topic, payload, o.qos, 1, o.version)
        if o.retain:
            packet = bytes([packet[0] | 1]) + packet[1:]
        self.plen = len(packet)
        self.template = bytearray(packet * self.batch)
        # patch offsets: packet id (QoS > 0) and the stamp at the payload's start
        head = self.plen - o.size
        self.pid_at = patch if o.qos else -1
        self.stamp_at = head
        self.mseq = 0                   # messages written
        self.next_pid = 1
        self.inflight: set[int] = set()
        self.done = asyncio.get_running_loop().create_future()
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _make(self, k: int) -> bytes:
        buf = self.template
        plen = self.plen
        stamp = STAMP.pack_into if self.stamped else None
        ts = perf_ns()
        me = self.seq
        m = self.mseq
        off = 0
        if self.qos:
            pid = self.next_pid
            inflight = self.inflight
            pid_at = self.pid_at
            for x in range(k):
                struct.pack_into(">H", buf, off + pid_at, pid)
                inflight.add(pid)
                pid = pid + 1 if pid < 65535 else 1
                if stamp:
                    stamp(buf, off + self.stamp_at, MAGIC, ts, me, m + x)
                off += plen
            self.next_pid = pid
        elif stamp:
            at = self.stamp_at
            for x in range(k):
                stamp(buf, off + at, MAGIC, ts, me, m + x)
                off += plen
        self.mseq = m + k
        return bytes(buf[:k * plen]) if k < self.batch else bytes(buf)

    def can_send(self) -> int:
        """How many messages may go now (quota, window, back-pressure)."""
        if self.paused or not self.up or self.transport is None or self.transport.is_closing():
            return 0
        k = self.batch
        if self.quota:
            k = min(k, self.quota - self.mseq)
        if self.window:
            k = min(k, self.window - len(self.inflight))
        return max(k, 0)

    def send(self, k: int) -> None:
        write = self.transport.write  # type: ignore[union-attr]
        while k > 0:
            m = min(k, self.batch)
            write(self._make(m))
            self.c.sent += m
            k -= m
        self.check_done()

    def check_done(self) -> None:
        if self.quota and self.mseq >= self.quota and not self.inflight and not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        acked = 0
        rel = bytearray()
        inflight = self.inflight
        while i + 2 <= n:
            first = buf[i]
            rl, j = read_varint(buf, i + 1, n)
            if rl < 0 or j + rl > n:
                break
            end = j + rl
            if first == 0x40 or first == 0x70:  # PUBACK / PUBCOMP
                pid = (buf[j] << 8) | buf[j + 1]
                if rl >= 3 and buf[j + 2] >= 0x80:
                    self.c.note(f"{self.cid}: publish refused 0x{buf[j + 2]:02x}")
                if pid in inflight:
                    inflight.discard(pid)
                    acked += 1
            elif first == 0x50:  # PUBREC -> PUBREL
                rel += b"\x62\x02"
                rel += buf[j:j + 2]
            else:
                self.control(first, bytes(buf[j:end]))
            i = end
        self.buf = buf[i:]
        if rel:
            self.transport.write(bytes(rel))  # type: ignore[union-attr]
        if acked:
            self.c.acked += acked
            self.check_done()
            self.bench.kick(self)


# ------------------------------------------------------------------------------------------
# one process's share of the clients


@dataclass
class Opts:
    """Everything a worker process needs (picklable)."""
    mode: str
    host: str
    port: int
    version: int
    count: int
    start: int
    interval_ms: float          # between connections (over all processes)
    pub_interval_ms: float      # between publishes of one client; 0 = flat out
    topic: str
    qos: int
    size: int
    retain: bool
    limit: int
    keepalive: int
    clean: bool
    username: str | None
    password: str | None
    prefix: str | None
    shortids: bool
    ifaddr: list[str]
    ssl: bool
    inflight: int               # QoS > 0: unacknowledged messages per client
    duration: float | None
    sample: int
    batch: int
    quic: bool = False          # MQTT over QUIC: one QUIC connection per client, MQTT on stream 0


class Bench:
    """The clients of process ``part`` of ``parts`` (client k goes to process k % parts)."""

    def __init__(self, opts: Opts, part: int = 0, parts: int = 1) -> None:
        self.opts = opts
        self.part = part
        self.parts = parts
        self.counters = Counters()
        self.sample_mask = max(1, opts.sample) - 1 if (opts.sample & (opts.sample - 1)) == 0 else 0
        self.batch = opts.batch
        self.clients: list[Client] = []
        self.mine = list(range(part, opts.count, parts))
        self.stop_event = asyncio.Event()
        self.all_up = asyncio.Event()
        self.local_limit = 0     # sub -L in single-process mode
        self._ticker: asyncio.Task | None = None
        self.ready = 0           # clients fully set up (connected [+ subscribed])

    # --- connections

    def _quota(self, k: int) -> int:
        o = self.opts
        if o.mode != "pub" or not o.limit:
            return 0
        base, extra = divmod(o.limit, o.count)
        return base + (1 if k < extra else 0)

    def _make_client(self, k: int) -> Client:
        o = self.opts
        seq = o.start + k + 1
        cid = client_id(o.mode, seq, o.prefix, o.shortids)
        if o.mode == "pub":
            topic = expand(o.topic, seq, cid, o.username or "")
            return Publisher(self, seq, cid, topic, self._quota(k))
        if o.mode == "sub":
            return Subscriber(self, seq, cid)
        return Client(self, seq, cid)

    async def _connect(self, k: int, cl: Client) -> None:
        o = self.opts
        loop = asyncio.get_running_loop()
        c = self.counters
        local = None
        if o.ifaddr:
            local = (o.ifaddr[k % len(o.ifaddr)], 0)
        sslctx = None
        if o.ssl:
            sslctx = ssl.create_default_context()
            sslctx.check_hostname = False
            sslctx.verify_mode = ssl.CERT_NONE
        try:
            if o.quic:
                # bench/ may use the transport layer; runtime code never imports bench/.
                from listeners.quicclient import QuicConnectError, QuicStreamClient
                try:
                    cl.quic = await QuicStreamClient.connect(
                        o.host, o.port, alpn="mqtt", verify=False,
                        local_host=local[0] if local else None, timeout=CONNECT_TIMEOUT)
                except QuicConnectError as e:
                    raise ConnectionError(str(e)) from None
                cl.quic.open_stream(cl)
            else:
                await asyncio.wait_for(loop.create_connection(lambda: cl, o.host, o.port,
                                                              local_addr=local, ssl=sslctx),
                                       CONNECT_TIMEOUT)
            cl.transport.write(connect_packet(cl.cid, o.version, o.keepalive, o.clean,  # type: ignore[union-attr]
                                              o.username, o.password))
            await asyncio.wait_for(cl.connack, CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            c.conn_fail += 1
            c.note(f"{cl.cid}: connect failed: {e!r}")
            cl.close()
            return
        cl.up = True
        c.connected += 1
        c.conn_ok += 1
        if isinstance(cl, Subscriber):
            topic = expand(o.topic, cl.seq, cl.cid, o.username or "")
            cl.transport.write(subscribe_packet(1, topic, o.qos, o.version))  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(cl.suback, CONNECT_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError) as e:
                c.note(f"{cl.cid}: subscribe failed: {e!r}")
                return
            c.subscribed += 1
        self.ready += 1
        if isinstance(cl, Publisher):
            self.kick(cl)

    async def connect_all(self) -> None:
        o = self.opts
        gap = o.interval_ms / 1000.0 * self.parts
        t0 = time.perf_counter()
        tasks = []
        for n, k in enumerate(self.mine):
            if self.stop_event.is_set():
                break
            cl = self._make_client(k)
            self.clients.append(cl)
            tasks.append(asyncio.ensure_future(self._connect(k, cl)))
            if gap:
                delay = t0 + (n + 1) * gap - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        if tasks:
            await asyncio.gather(*tasks)
        self.all_up.set()

    # --- publishing

    def kick(self, q: "Publisher") -> None:
        """Flat out: send what the window/quota allow now."""
        if self.opts.mode == "pub" and not self.opts.pub_interval_ms and not self.stop_event.is_set():
            k = q.can_send()
            if k:
                q.send(k)

    async def _flat(self) -> None:
        """Flat-out QoS 0 (QoS > 0 is driven by the acks): keep every socket busy."""
        while not self.stop_event.is_set():
            busy = False
            for q in self.clients:  # grows while connect_all() runs
                if not isinstance(q, Publisher):
                    continue
                k = q.can_send()
                if k:
                    q.send(k)
                    busy = True
            await asyncio.sleep(0 if busy else 0.001)

    async def _rated(self) -> None:
        """Every 1 ms tick, each publisher sends what it owes at 1000/-I msg/s."""
        rate = 1000.0 / self.opts.pub_interval_ms
        started: dict[int, tuple[float, int]] = {}
        tick = 0.001 if rate > 100 else 0.005
        while not self.stop_event.is_set():
            now = time.perf_counter()
            for q in self.clients:
                if not isinstance(q, Publisher) or not q.up:
                    continue
                st = started.get(q.seq)
                if st is None:
                    st = started[q.seq] = (now, q.mseq)
                    due = 1  # the first message at once, like emqtt-bench
                else:
                    due = int((now - st[0]) * rate) + 1 - (q.mseq - st[1])
                if due > 0:
                    k = min(due, q.can_send())
                    if k > 0:
                        q.send(k)
            await asyncio.sleep(tick)

    def on_received(self) -> None:
        if self.local_limit and self.counters.received >= self.local_limit:
            self.stop_event.set()

    async def pings(self) -> None:
        ka = self.opts.keepalive
        if not ka:
            return
        while not self.stop_event.is_set():
            try:
                await asyncio.wait_for(self.stop_event.wait(), ka / 2)
            except asyncio.TimeoutError:
                for cl in self.clients:
                    if cl.up and cl.transport is not None and not cl.transport.is_closing():
                        cl.transport.write(PINGREQ)

    async def run(self) -> None:
        """Connect, publish/hold until stopped (stop_event) or done; then close cleanly."""
        o = self.opts
        tasks = [asyncio.ensure_future(self.pings())]
        if o.mode == "pub":
            tasks.append(asyncio.ensure_future(self._rated() if o.pub_interval_ms else self._flat()))
        connecting = asyncio.ensure_future(self.connect_all())
        if o.mode == "pub" and o.limit:
            await connecting
            pubs = [c for c in self.clients if isinstance(c, Publisher) and c.up]
            waits = [asyncio.ensure_future(self._until_done(pubs))]
            waits.append(asyncio.ensure_future(self.stop_event.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        else:
            await self.stop_event.wait()
        self.stop_event.set()
        if not connecting.done():
            connecting.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, connecting, return_exceptions=True)
        # let written bytes leave and (QoS > 0) acks come in before DISCONNECT
        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline and any(
                isinstance(c, Publisher) and c.up and c.inflight for c in self.clients):
            await asyncio.sleep(0.01)
        while time.perf_counter() < deadline and any(
                c.transport is not None and not c.transport.is_closing()
                and c.transport.get_write_buffer_size() for c in self.clients):
            await asyncio.sleep(0.01)
        for cl in self.clients:
            cl.close()
        await asyncio.sleep(0.05)

    async def _until_done(self, pubs: list[Publisher]) -> None:
        for q in pubs:
            while not q.done.done():
                if not q.up:
                    break
                try:
                    await asyncio.wait_for(asyncio.shield(q.done), 0.2)
                except asyncio.TimeoutError:
                    pass

    def report(self) -> dict:
        """Cumulative counters plus the latency samples since the last report."""
        c = self.counters
        lat, c.lat = c.lat, []
        return {"connected": c.connected, "conn_ok": c.conn_ok, "conn_fail": c.conn_fail,
                "disconnected": c.disconnected, "subscribed": c.subscribed, "sent": c.sent,
                "acked": c.acked, "received": c.received, "lat": lat,
                "errors": list(c.errors), "ready": self.ready, "all_up": self.all_up.is_set()}


# ------------------------------------------------------------------------------------------
# reporting


def pct(sorted_values: list[int], q: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k] / 1e6


SUM_KEYS = ("connected", "conn_ok", "conn_fail", "disconnected", "subscribed", "sent",
            "acked", "received", "ready")


class Reporter:
    """Adds up reports, prints a line per second and the summary, writes CSV/PNG."""

    def __init__(self, opts: Opts, out=sys.stdout, csv_path: str | None = None,
                 png_path: str | None = None, quiet: bool = False) -> None:
        self.o = opts
        self.out = out
        self.csv_path = csv_path
        self.png_path = png_path
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self.prev = {k: 0 for k in SUM_KEYS}
        self.prev_t = self.t0
        self.rows: list[dict] = []
        self.all_lat: list[int] = []
        self.keep_every = 1
        self.announced_ready = False
        self.errors: list[str] = []

    def total(self, reports: list[dict]) -> dict:
        tot = {k: sum(r[k] for r in reports) for k in SUM_KEYS}
        tot["lat"] = [x for r in reports for x in r["lat"]]
        tot["errors"] = [e for r in reports for e in r["errors"]][:20]
        return tot

    def tick(self, tot: dict) -> None:
        now = time.perf_counter()
        dt = max(now - self.prev_t, 1e-9)
        lat = sorted(tot["lat"])
        self._keep(lat)
        row = {"t": round(now - self.t0, 3),
               "connected": tot["connected"],
               "conn_per_s": (tot["conn_ok"] - self.prev["conn_ok"]) / dt,
               "conn_fail": tot["conn_fail"],
               "sent_per_s": (tot["sent"] - self.prev["sent"]) / dt,
               "acked_per_s": (tot["acked"] - self.prev["acked"]) / dt,
               "recv_per_s": (tot["received"] - self.prev["received"]) / dt,
               "p50_ms": pct(lat, 50) if lat else None,
               "p95_ms": pct(lat, 95) if lat else None,
               "p99_ms": pct(lat, 99) if lat else None}
        self.rows.append(row)
        self.prev = {k: tot[k] for k in SUM_KEYS}
        self.prev_t = now
        self.errors = tot["errors"]
        if not self.quiet:
            self.out.write(self.line(row) + "\n")
            self.out.flush()

    def _keep(self, lat: list[int]) -> None:
        # bounded memory for the summary's percentiles: thin out past 1M samples
        if self.keep_every > 1:
            lat = lat[::self.keep_every]
        self.all_lat.extend(lat)
        if len(self.all_lat) > 1_000_000:
            self.all_lat = self.all_lat[::2]
            self.keep_every *= 2

    def announce_ready(self, tot: dict) -> None:
        if not self.announced_ready and tot["ready"] >= self.o.count:
            self.announced_ready = True
            what = {"sub": "subscribed", "pub": "connected", "conn": "connected"}[self.o.mode]
            self.out.write(f"ready: {tot['ready']} {what}\n")
            self.out.flush()

    def line(self, r: dict) -> str:
        o = self.o
        parts = [f"[{r['t']:7.1f}s]", f"connected={r['connected']}"]
        if o.mode == "conn" or r["conn_per_s"]:
            parts.append(f"conn/s={r['conn_per_s']:.0f}")
        if r["conn_fail"]:
            parts.append(f"failed={r['conn_fail']}")
        if o.mode == "pub":
            parts.append(f"sent/s={r['sent_per_s']:.0f}")
            if o.qos:
                parts.append(f"acked/s={r['acked_per_s']:.0f}")
        if o.mode == "sub":
            parts.append(f"recv/s={r['recv_per_s']:.0f}")
            if r["p50_ms"] is not None:
                parts.append(f"lat p50={r['p50_ms']:.2f} p95={r['p95_ms']:.2f} "
                             f"p99={r['p99_ms']:.2f} ms")
        return " ".join(parts)

    def summary(self, tot: dict) -> dict:
        elapsed = time.perf_counter() - self.t0
        lat = sorted(self.all_lat)  # the last tick() already took tot["lat"]
        s = {"mode": self.o.mode, "elapsed_s": round(elapsed, 3), "clients": self.o.count,
             "connected": tot["conn_ok"], "conn_failed": tot["conn_fail"],
             "disconnected": tot["disconnected"], "subscribed": tot["subscribed"],
             "sent": tot["sent"], "acked": tot["acked"], "received": tot["received"],
             "sent_per_s": tot["sent"] / elapsed if elapsed else 0.0,
             "recv_per_s": tot["received"] / elapsed if elapsed else 0.0,
             "latency_samples": len(lat)}
        if lat:
            for q in (50, 90, 95, 99):
                s[f"p{q}_ms"] = round(pct(lat, q), 3)
            s["max_ms"] = round(lat[-1] / 1e6, 3)
        s["errors"] = tot["errors"]
        return s

    def print_summary(self, s: dict) -> None:
        w = self.out.write
        w(f"summary: {s['mode']} {s['elapsed_s']:.1f}s clients={s['clients']} "
          f"connected={s['connected']} failed={s['conn_failed']} "
          f"disconnected={s['disconnected']}")
        if s["mode"] == "sub":
            w(f" subscribed={s['subscribed']}")
        if s["mode"] == "pub":
            w(f" sent={s['sent']} ({s['sent_per_s']:.0f}/s)")
            if self.o.qos:
                w(f" acked={s['acked']}")
        if s["mode"] == "sub":
            w(f" received={s['received']} ({s['recv_per_s']:.0f}/s)")
            if s["latency_samples"]:
                w(f" latency ms p50={s['p50_ms']} p90={s['p90_ms']} p95={s['p95_ms']} "
                  f"p99={s['p99_ms']} max={s['max_ms']} (n={s['latency_samples']})")
        w("\n")
        for e in s["errors"][:5]:
            w(f"  error: {e}\n")
        self.out.flush()

    def write_files(self) -> None:
        if self.csv_path:
            keys = list(self.rows[0]) if self.rows else ["t"]
            with open(self.csv_path, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=keys)
                wr.writeheader()
                for r in self.rows:
                    wr.writerow({k: ("" if v is None else v) for k, v in r.items()})
        if self.png_path:
            plot_rates(self.rows, self.png_path, f"shoal bench {self.o.mode}")


def plot_rates(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label in (("conn_per_s", "connects/s"), ("sent_per_s", "sent/s"),
                       ("acked_per_s", "acked/s"), ("recv_per_s", "received/s")):
        ys = [r[key] for r in rows]
        if any(ys):
            ax.plot(t, ys, label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("per second")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(r["p99_ms"] is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(t, [r["p99_ms"] for r in rows], "k:", label="p99 latency ms")
        ax2.set_ylabel("p99 latency (ms)")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# drivers: one process, or --procs N


def _stop_condition(o: Opts, tot: dict, all_up_since: float | None) -> bool:
    if o.mode == "sub" and o.limit and tot["received"] >= o.limit:
        return True
    if o.duration is not None and all_up_since is not None \
            and time.perf_counter() - all_up_since >= o.duration:
        return True
    return False


async def _single(o: Opts, rep: Reporter) -> dict:
    bench = Bench(o)
    if o.mode == "sub":
        bench.local_limit = o.limit
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, bench.stop_event.set)
    runner = asyncio.ensure_future(bench.run())
    stopped = asyncio.ensure_future(bench.stop_event.wait())
    all_up_since = None
    next_tick = time.perf_counter() + 1.0
    while not runner.done():
        await asyncio.wait([runner, stopped],
                           timeout=min(0.05, max(0.0, next_tick - time.perf_counter())),
                           return_when=asyncio.FIRST_COMPLETED)
        if bench.ready >= o.count or bench.all_up.is_set():
            if all_up_since is None:
                all_up_since = time.perf_counter()
            rep.announce_ready({"ready": bench.ready})
        now = time.perf_counter()
        if now >= next_tick:
            rep.tick(rep.total([bench.report()]))
            next_tick += 1.0
        if _stop_condition(o, {"received": bench.counters.received}, all_up_since):
            bench.stop_event.set()
    await runner
    stopped.cancel()
    tot = rep.total([bench.report()])
    rep.tick(tot)
    return tot


def _child(conn, o: Opts, part: int, parts: int) -> None:
    async def main() -> None:
        bench = Bench(o, part, parts)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides
        loop.add_signal_handler(signal.SIGTERM, bench.stop_event.set)

        def on_msg() -> None:
            try:
                msg = conn.recv()
            except EOFError:
                msg = "stop"
            if msg == "stop":
                bench.stop_event.set()
        loop.add_reader(conn.fileno(), on_msg)
        runner = asyncio.ensure_future(bench.run())
        while not runner.done():
            await asyncio.wait([runner], timeout=0.1)
            conn.send(("tick", bench.report()))
        await runner
        loop.remove_reader(conn.fileno())
        conn.send(("done", bench.report()))
    run_loop(main())
    conn.close()


def _multi(o: Opts, procs: int, rep: Reporter) -> dict:
    import multiprocessing as mp
    from multiprocessing.connection import wait
    ctx = mp.get_context("spawn")
    pipes, children = [], []
    for k in range(procs):
        parent, child = ctx.Pipe()
        pr = ctx.Process(target=_child, args=(child, o, k, procs), daemon=True)
        pr.start()
        child.close()
        pipes.append(parent)
        children.append(pr)
    latest: dict[int, dict] = {}
    pending_lat: list[int] = []
    done: set[int] = set()
    stopping = False
    interrupted = []
    old = signal.signal(signal.SIGINT, lambda *a: interrupted.append(1))
    all_up_since = None
    next_tick = time.perf_counter() + 1.0
    try:
        while len(done) < procs:
            live = [p for i, p in enumerate(pipes) if i not in done]
            for p in wait(live, timeout=0.05):
                i = pipes.index(p)
                try:
                    kind, r = p.recv()
                except EOFError:
                    done.add(i)
                    continue
                pending_lat += r["lat"]
                latest[i] = r
                if kind == "done":
                    done.add(i)
            if len(latest) == procs:
                tot = rep.total(list(latest.values()))
                if tot["ready"] >= o.count or all(r["all_up"] for r in latest.values()):
                    if all_up_since is None:
                        all_up_since = time.perf_counter()
                    rep.announce_ready(tot)
                if not stopping and (interrupted or _stop_condition(o, tot, all_up_since)):
                    stopping = True
                    for i, p in enumerate(pipes):
                        if i not in done:
                            try:
                                p.send("stop")
                            except OSError:
                                pass
            if time.perf_counter() >= next_tick and latest:
                tot = rep.total(list(latest.values()))
                tot["lat"], pending_lat = pending_lat, []
                rep.tick(tot)
                next_tick += 1.0
    finally:
        signal.signal(signal.SIGINT, old)
        for pr in children:
            pr.join(5)
    tot = rep.total(list(latest.values()))
    tot["lat"] = pending_lat
    rep.tick(tot)
    return tot


# ------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    """emqtt-bench's flags (``-h`` is the host, so help is ``--help`` only)."""
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("-h", "--host", default="localhost", help="broker host (default localhost)")
    p.add_argument("-p", "--port", type=int, default=None,
                   help="broker port (default 1883, 8883 with -S, 14567 with --quic)")
    p.add_argument("-V", "--version", type=int, choices=(3, 4, 5), default=5,
                   help="MQTT protocol level: 3 (3.1), 4 (3.1.1), 5 (default 5)")
    p.add_argument("-c", "--count", type=int, default=200, help="number of clients (default 200)")
    p.add_argument("-n", "--startnumber", type=int, default=0,
                   help="client sequence numbers start after this (default 0: the first is 1)")
    p.add_argument("-i", "--interval", type=float, default=10,
                   help="ms between two connections, over all processes (default 10)")
    p.add_argument("-u", "--username", default=None)
    p.add_argument("-P", "--password", default=None)
    p.add_argument("-k", "--keepalive", type=int, default=300, help="keep alive, s (default 300)")
    p.add_argument("-C", "--clean", type=_bool, default=True, help="clean start (default true)")
    p.add_argument("-S", "--ssl", action="store_true", help="TLS (no certificate verification)")
    p.add_argument("--prefix", default=None, help="client id prefix (default: the host name)")
    p.add_argument("--shortids", action="store_true", help="client id = <prefix><seq>")
    p.add_argument("--ifaddr", default="",
                   help="local source addresses, comma separated (client k binds address k %% n)")
    p.add_argument("--quic", action="store_true", help="MQTT over QUIC (ALPN mqtt, no certificate "
                   "verification; one QUIC connection per client; default port 14567)")
    if mode in ("pub", "sub"):
        p.add_argument("-t", "--topic", required=True,
                       help="topic (filter for sub); %%i seq, %%c client id, %%u username")
        p.add_argument("-q", "--qos", type=int, choices=(0, 1, 2), default=0)
    if mode == "pub":
        p.add_argument("-I", "--interval_of_msg", dest="interval_of_msg", type=float, default=1000,
                       help="ms between two publishes of one client (default 1000; 0 = flat out)")
        p.add_argument("-s", "--size", type=int, default=256,
                       help="payload bytes (default 256; >= 20 carries a latency stamp)")
        p.add_argument("-r", "--retain", type=_bool, default=False)
        p.add_argument("-F", "--inflight", type=int, default=20,
                       help="QoS 1/2: unacknowledged messages per client (default 20: Mosquitto "
                            "silently drops QoS 2 beyond its max_inflight_messages 20; MQTT 5: "
                            "also at most the broker's Receive Maximum)")
        p.add_argument("-L", "--limit", type=int, default=0,
                       help="total messages to publish over all clients, then exit (0: no limit)")
        p.add_argument("--batch", type=int, default=64, help="packets per write (default 64)")
    if mode == "sub":
        p.add_argument("-L", "--limit", type=int, default=0,
                       help="exit once this many messages were received in total (0: no limit)")
        p.add_argument("--sample", type=int, default=1, choices=(1, 2, 4, 8, 16, 32, 64),
                       help="latency: sample one message in N (per publisher sequence)")
    p.add_argument("--duration", type=float, default=None,
                   help="stop this many seconds after every client is up (default: run until "
                        "-L is reached or Ctrl-C)")
    p.add_argument("--procs", type=int, default=1, help="split the clients over N processes")
    p.add_argument("--csv", default=None, metavar="FILE", help="per-second rates as CSV")
    p.add_argument("--png", default=None, metavar="FILE", help="plot of the rates (matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON too")
    p.add_argument("--quiet", action="store_true", help="no per-second lines")


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {s!r}")


def opts_from_args(mode: str, a: argparse.Namespace) -> Opts:
    return Opts(
        mode=mode, host=a.host, port=a.port or (14567 if a.quic else 8883 if a.ssl else 1883),
        version=a.version,
        count=a.count, start=a.startnumber, interval_ms=a.interval,
        pub_interval_ms=getattr(a, "interval_of_msg", 0.0), topic=getattr(a, "topic", ""),
        qos=getattr(a, "qos", 0), size=getattr(a, "size", 0), retain=getattr(a, "retain", False),
        limit=getattr(a, "limit", 0), keepalive=a.keepalive, clean=a.clean,
        username=a.username, password=a.password, prefix=a.prefix, shortids=a.shortids,
        ifaddr=[x for x in a.ifaddr.split(",") if x], ssl=a.ssl,
        inflight=getattr(a, "inflight", 20), duration=a.duration,
        sample=getattr(a, "sample", 1), batch=getattr(a, "batch", 64), quic=a.quic)


def run(mode: str, a: argparse.Namespace) -> int:
    if a.quic and a.ssl:
        print("shoal bench: --quic already means TLS 1.3; drop --ssl", file=sys.stderr)
        return EXIT_USAGE
    if a.count < 1 or a.procs < 1:
        print("shoal bench: -c and --procs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    o = opts_from_args(mode, a)
    if mode == "pub" and o.limit and o.limit < o.count:
        o.count = o.limit  # every client publishes at least one message
    if a.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("shoal bench: --png needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return EXIT_USAGE
    rep = Reporter(o, csv_path=a.csv, png_path=a.png, quiet=a.quiet)
    procs = min(a.procs, o.count)
    tot = _multi(o, procs, rep) if procs > 1 else run_loop(_single(o, rep))
    s = rep.summary(tot)
    rep.print_summary(s)
    if a.json:
        import json
        print(json.dumps(s))
    rep.write_files()
    if s["connected"] == 0 or s["conn_failed"]:
        return EXIT_FAILED
    return EXIT_OK


def build_parser(prog: str = "shoal bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="emqtt-bench-compatible MQTT load: "
                                 "conn (hold connections), pub (publish), sub (subscribe).")
    sub = ap.add_subparsers(dest="mode", metavar="{conn,pub,sub}", required=True)
    helps = {"conn": "open connections at -i ms intervals and hold them",
             "pub": "publish from -c clients, one message every -I ms each",
             "sub": "subscribe -c clients and count what arrives (latency from pub's stamp)"}
    for m in ("conn", "pub", "sub"):
        add_arguments(sub.add_parser(m, add_help=False, help=helps[m], description=helps[m]), m)
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m bench.emqtt") -> int:
    a = build_parser(prog).parse_args(argv)
    return run(a.mode, a)


if __name__ == "__main__":
    sys.exit(main())
