"""Mixed MQTT workloads for locust (web UI or headless) against shoal or any MQTT broker.

    locust -f bench/locustfile.py --host mqtt://127.0.0.1:1883                 # web UI :8089
    locust -f bench/locustfile.py --host mqtt://127.0.0.1:1883 --headless \\
           -u 50 -r 10 -t 20s --only-summary

Each locust user is one MQTT 3.1.1 client on a plain socket (gevent-cooperative once locust
has patched the standard library), encoded with bench/loadgen's hand-written encoders. Every
CONNECT, SUBSCRIBE and PUBLISH is reported through ``events.request`` so locust's statistics,
charts and failure lists work: request type ``CONNECT``, ``SUBSCRIBE``, ``PUBLISH QoS0``
(time to hand it to the socket), ``PUBLISH QoS1`` (until PUBACK), ``DELIVER`` (publish to
delivery at a subscriber of this run, from the timestamp in the payload) and ``RECONNECT
STORM`` (drop and re-establish the connection, as a fleet does after a network blip).

Tunables (environment): ``MQTT_TOPICS`` number of topics the users share (default 20),
``MQTT_PAYLOAD`` bytes (default 64), ``MQTT_KEEPALIVE`` seconds (default 60).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import time
from urllib.parse import urlparse

import gevent
from gevent.event import AsyncResult
from locust import User, between, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.loadgen import (  # noqa: E402  (locust loads this file by path)
    connect_packet, publish_packet, read_varint, subscribe_packet,
)

TOPICS = int(os.environ.get("MQTT_TOPICS", "20"))
PAYLOAD = max(16, int(os.environ.get("MQTT_PAYLOAD", "64")))
KEEPALIVE = int(os.environ.get("MQTT_KEEPALIVE", "60"))
TIMEOUT = 10.0
STAMP = struct.Struct(">d")  # time.time() at publish, first 8 payload bytes


class MQTTError(Exception):
    pass


class MQTTClient:
    """A small blocking client: CONNECT/SUBSCRIBE/PUBLISH (QoS 0/1), a reader greenlet."""

    def __init__(self, host: str, port: int, client_id: str, fire) -> None:
        self.host, self.port, self.client_id, self.fire = host, port, client_id, fire
        self.sock: socket.socket | None = None
        self.reader: gevent.Greenlet | None = None
        self.waiting: dict[int, AsyncResult] = {}
        self.next_pid = 1
        self.received = 0

    def _pid(self) -> int:
        pid = self.next_pid
        self.next_pid = pid % 65535 + 1
        return pid

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(self.client_id, 4, KEEPALIVE, True))
        head = self._recv_exact(4)
        if head[0] != 0x20 or head[3] != 0:
            raise MQTTError(f"CONNACK {head.hex()}")
        self.sock.settimeout(None)
        self.waiting = {}
        self.reader = gevent.spawn(self._read_loop, self.sock)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))  # type: ignore[union-attr]
            if not chunk:
                raise MQTTError("connection closed")
            buf += chunk
        return buf

    def _read_loop(self, sock: socket.socket) -> None:
        buf = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                i, n = 0, len(buf)
                acks = bytearray()
                while i + 2 <= n:
                    rl, j = read_varint(buf, i + 1, n)
                    if rl < 0 or j + rl > n:
                        break
                    first, end = buf[i], j + rl
                    if first >> 4 == 3:
                        tl = (buf[j] << 8) | buf[j + 1]
                        p = j + 2 + tl
                        if first & 6:
                            acks += b"\x40\x02" + buf[p:p + 2]
                            p += 2
                        self.received += 1
                        if end - p >= 8:
                            sent = STAMP.unpack_from(buf, p)[0]
                            self.fire(request_type="DELIVER", name="locust/<n>",
                                      response_time=max(0.0, (time.time() - sent) * 1000),
                                      response_length=end - p, exception=None)
                    elif first >> 4 in (4, 9):  # PUBACK, SUBACK
                        pid = (buf[j] << 8) | buf[j + 1]
                        waiter = self.waiting.pop(pid, None)
                        if waiter is not None:
                            waiter.set(bytes(buf[j + 2:end]))
                    i = end
                buf = buf[i:]
                if acks:
                    sock.sendall(bytes(acks))
        except OSError:
            pass
        for w in self.waiting.values():
            w.set_exception(MQTTError("connection lost"))
        self.waiting = {}

    def _await(self, pid: int) -> bytes:
        res = AsyncResult()
        self.waiting[pid] = res
        return res

    def subscribe(self, topic: str, qos: int) -> None:
        pid = self._pid()
        res = self._await(pid)
        self.sock.sendall(subscribe_packet(pid, topic, qos))  # type: ignore[union-attr]
        codes = res.get(timeout=TIMEOUT)
        if any(c >= 0x80 for c in codes):
            raise MQTTError(f"SUBACK {codes.hex()}")

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        pid = self._pid() if qos else 0
        packet, _ = publish_packet(topic, payload, qos, pid)
        if not qos:
            self.sock.sendall(packet)  # type: ignore[union-attr]
            return
        res = self._await(pid)
        self.sock.sendall(packet)  # type: ignore[union-attr]
        res.get(timeout=TIMEOUT)

    def disconnect(self, clean: bool = True) -> None:
        if self.sock is None:
            return
        try:
            if clean:
                self.sock.sendall(b"\xe0\x00")
            self.sock.close()
        except OSError:
            pass
        if self.reader is not None:
            self.reader.join(timeout=1)
        self.sock = None


class MQTTUser(User):
    """One MQTT client: subscribes to one shared topic, publishes to random ones."""

    wait_time = between(0.05, 0.2)
    host = "mqtt://127.0.0.1:1883"

    def __init__(self, environment) -> None:
        super().__init__(environment)
        url = urlparse(self.host if "://" in self.host else f"mqtt://{self.host}")
        self.broker = (url.hostname or "127.0.0.1", url.port or 1883)
        self.client_id = f"locust-{os.getpid()}-{id(self) & 0xffffff:x}"
        self.client: MQTTClient | None = None

    def _fire(self, **kw) -> None:
        self.environment.events.request.fire(context={}, **kw)

    def _timed(self, request_type: str, name: str, fn, length: int = 0) -> bool:
        t0 = time.perf_counter()
        exc = None
        try:
            fn()
        except Exception as e:  # reported to locust, not raised: the user carries on
            exc = e
        self._fire(request_type=request_type, name=name,
                   response_time=(time.perf_counter() - t0) * 1000,
                   response_length=length, exception=exc)
        return exc is None

    def _connect(self) -> bool:
        self.client = MQTTClient(*self.broker, self.client_id, self._fire)
        if not self._timed("CONNECT", "connect", self.client.connect):
            self.client = None
            return False
        topic = f"locust/{random.randrange(TOPICS)}"
        return self._timed("SUBSCRIBE", "locust/<n>", lambda: self.client.subscribe(topic, 1))

    def on_start(self) -> None:
        self._connect()

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()

    def _payload(self) -> bytes:
        return STAMP.pack(time.time()) + bytes(PAYLOAD - STAMP.size)

    def _ensure(self) -> bool:
        return self.client is not None and self.client.sock is not None or self._connect()

    @task(10)
    def publish_qos0(self) -> None:
        if self._ensure():
            topic = f"locust/{random.randrange(TOPICS)}"
            self._timed("PUBLISH QoS0", "locust/<n>",
                        lambda: self.client.publish(topic, self._payload(), 0), PAYLOAD)

    @task(5)
    def publish_qos1(self) -> None:
        if self._ensure():
            topic = f"locust/{random.randrange(TOPICS)}"
            self._timed("PUBLISH QoS1", "locust/<n>",
                        lambda: self.client.publish(topic, self._payload(), 1), PAYLOAD)

    @task(1)
    def reconnect_storm(self) -> None:
        """Drop the connection without DISCONNECT and come straight back (with the others
        doing the same, a storm of reconnects hits the broker)."""
        if self.client is not None:
            self.client.disconnect(clean=False)
        t0 = time.perf_counter()
        ok = self._connect()
        self._fire(request_type="RECONNECT STORM", name="drop+connect+subscribe",
                   response_time=(time.perf_counter() - t0) * 1000, response_length=0,
                   exception=None if ok else MQTTError("reconnect failed"))
