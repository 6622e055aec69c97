"""Drive a Shard without a loop or sockets: packets in, packets out, time passed in."""

from __future__ import annotations

from typing import Any

from shards.config import MQTTConfig
from shards.protocol.codec import decode, encode
from shards.protocol.connection import MQTTConnection
from shards.protocol.errors import ProtocolError
from shards.protocol.packets import MQTT_5, Connect, Packet, Properties, Publish, SubOptions, Subscribe
from shards.protocol.reader import FrameReader
from shards.session import Session
from shards.shard import Shard


class FakeLink:
    def __init__(self, shard: Shard, now: float = 0.0) -> None:
        cfg = shard.cfg
        self.shard = shard
        self.conn = MQTTConnection(now, max_packet_size=cfg.max_packet_size,
                                   connect_timeout=cfg.connect_timeout,
                                   receive_maximum=cfg.receive_maximum,
                                   topic_alias_maximum=cfg.topic_alias_maximum)
        self.session: Session | None = None
        self.congested = False
        self.peer = "test"
        self.peer_username: str | None = None
        self.disconnected_cleanly = False
        self.closed = False
        self.lost = False
        self.error: ProtocolError | None = None
        self._reader = FrameReader()
        self._processing = False
        self.version = 4

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def resume(self, now: float) -> None:
        # accepted inside send(): its loop goes on; accepted later (an answer that
        # came after send() returned): drain what arrived behind the CONNECT now
        if not self._processing:
            self._process(now)

    def send(self, packet: Packet, now: float = 0.0) -> None:
        """The client sends ``packet``; the shard handles it like the worker does."""
        if isinstance(packet, Connect):
            self.version = packet.protocol_level
        self.conn.receive_data(encode(packet, self.version), now)
        self._process(now)

    def _process(self, now: float) -> None:
        self._processing = True
        try:
            while (p := self.conn.next_packet()) is not None:
                self.shard.handle(self, p, now)
        except ProtocolError as err:
            self.error = err
            self.conn.fail(err)
            self.shard.end_link(self, now)
        finally:
            self._processing = False

    def received(self) -> list[Packet]:
        """Everything the broker wrote to this client since the last call."""
        self._reader.feed(self.conn.data_to_send())
        out = []
        while (frame := self._reader.next_frame()) is not None:
            out.append(decode(frame[0], frame[1], self.version))
        return out

    def drop(self, now: float = 0.0) -> None:
        """The network connection goes away (no DISCONNECT)."""
        if not self.lost:
            self.lost = True
            self.shard.connection_lost(self, now)


def make_shard(**overrides: Any) -> Shard:
    return Shard(MQTTConfig(**overrides), 0, 0.0)


def connect(shard: Shard, client_id: str, version: int = MQTT_5, now: float = 0.0,
            **kw: Any) -> FakeLink:
    link = FakeLink(shard, now)
    link.send(Connect(client_id, protocol_level=version, **kw), now)
    return link


def subscribe(link: FakeLink, filt: str, qos: int = 0, pid: int = 1, props: Properties | None = None,
              **opts: Any) -> list[Packet]:
    link.send(Subscribe(pid, [(filt, SubOptions(qos, **opts))], props))
    return link.received()


def publishes(packets: list[Packet]) -> list[Publish]:
    return [p for p in packets if isinstance(p, Publish)]
