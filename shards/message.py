"""An application message as the broker routes it.

One ``Message`` is built per accepted PUBLISH and shared by every delivery of
it (local subscribers, queues, forwarded copies), so nothing here is specific to
a subscriber: per-delivery QoS, retain flag, packet id and subscription ids live
in the session. ``props`` holds only the properties that travel with the
message (user properties, content type, payload format, response topic,
correlation data); topic alias and subscription ids are per-hop and the message
expiry is kept as an absolute deadline so the forwarded interval can shrink.
"""

from __future__ import annotations

import math

from shards.protocol.codec import decode_properties, encode_properties
from shards.protocol.packets import Prop, Properties

_EMPTY_BLOCK = b"\x00"  # a property length of 0

# Properties of an incoming PUBLISH that are per-hop, not part of the message.
_HOP_PROPS = (Prop.TOPIC_ALIAS, Prop.SUBSCRIPTION_IDENTIFIER, Prop.MESSAGE_EXPIRY_INTERVAL)


class Message:
    __slots__ = ("topic", "payload", "qos", "retain", "_props", "wire", "expires_at", "origin",
                 "created", "id", "encoded")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties | None,
                 expires_at: float | None, origin: str, created: float, msg_id: int = 0,
                 wire: bytes | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        # The properties exist in one or both of two forms: a dict (as a PUBLISH decoded
        # them) and ``wire``, the encoded block (length + properties) that goes into every
        # outgoing PUBLISH and bus frame. A message forwarded by another shard arrives with
        # the block only, and is delivered without ever decoding it: decoding and
        # re-encoding properties cost more than the rest of the hop (bench/micro_forward).
        self._props: Properties | None = props or None
        if wire is None and props:
            # made here, once, so that every delivery reads an attribute rather than
            # calling a method: most messages with properties come with their block
            wire = encode_properties(props)
        self.wire: bytes | None = wire if wire and wire != _EMPTY_BLOCK else None
        self.expires_at = expires_at
        self.origin = origin  # publishing client id, for no-local
        self.created = created
        # host-wide unique (the publishing shard's index in the high bits): used to
        # pick one shard per shared group and to drop duplicates during a takeover
        self.id = msg_id
        # encodings shared by the deliveries of a fan-out, keyed by (version, qos, retain,
        # dup); only set up when a message has more than one target
        self.encoded: dict[tuple[int, int, bool, bool], tuple[bytes, bytes | None]] | None = None

    @property
    def props(self) -> Properties | None:
        """The properties as a dict, decoded from the block on first use."""
        props = self._props
        if props is None and self.wire is not None:
            props = self._props = decode_properties(self.wire) or None
        return props

    def props_block(self) -> bytes | None:
        """The encoded property block (``wire``); None without properties."""
        return self.wire

    @classmethod
    def from_publish(cls, topic: str, payload: bytes, qos: int, retain: bool, props: Properties,
                     origin: str, now: float, msg_id: int = 0, wire: bytes | None = None) -> Message:
        """``wire`` is the PUBLISH's property block as received, reused when it holds
        only properties that travel with the message."""
        expires_at = None
        if props:
            expiry = props.get(Prop.MESSAGE_EXPIRY_INTERVAL)
            if expiry is not None:
                expires_at = now + expiry
            if any(k in props for k in _HOP_PROPS):
                props = {k: v for k, v in props.items() if k not in _HOP_PROPS}
                wire = None
        else:
            wire = None
        return cls(topic, payload, qos, retain, props, expires_at, origin, now, msg_id, wire)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def remaining_expiry(self, now: float) -> int | None:
        """The Message Expiry Interval to forward: received value minus time waited."""
        if self.expires_at is None:
            return None
        # the small epsilon keeps float noise in (now + interval) - now from rounding up
        # past the interval the publisher sent [MQTT-3.3.2-6]
        return max(1, math.ceil(self.expires_at - now - 1e-6))

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {self.payload[:32]!r}, qos={self.qos}, retain={self.retain})"
