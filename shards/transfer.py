"""Sessions and messages as bytes: what crosses the bus in a takeover and goes to the store.

A message travels as the bus's PUBLISH frame body (one struct header plus raw
bytes, MQTT 5 properties pre-encoded). A session travels as one orjson document
whose messages are those frame bodies, base64-encoded (orjson has no bytes type
and sessions move rarely, so the 4/3 overhead does not matter).
"""

from __future__ import annotations

import base64
from typing import Any

from router.framing import PUBLISH_HEADER, decode_publish_fields, encode_publish
from shards.config import MQTTConfig
from shards.message import Message
from shards.protocol.packets import SubOptions
from shards.session import Counters, Inflight, Session
from shards.subs import Subscription

_pack_pub = PUBLISH_HEADER.pack


def message_to_bytes(msg: Message, flags: int = 0, group: str = "") -> bytes:
    if flags or group:
        return encode_publish(msg.id, msg.topic, msg.payload, msg.qos, msg.retain, msg.origin,
                              msg.expires_at, msg.props_block() or b"", flags, group)
    # The plain forward, once per message and destination set: framing.encode_publish's
    # layout packed here without its argument checks, which a Message has passed already
    # (its qos and the lengths of what a decoded PUBLISH holds fit the header's fields).
    # The property block travels as it is: the receiver splices it in without decoding.
    t = msg.topic.encode()
    o = msg.origin.encode()
    props = msg.props_block()
    expires_at = msg.expires_at
    if expires_at is None:
        head = _pack_pub(msg.id, 0.0, msg.qos | (4 if msg.retain else 0), 0, len(t), len(o), 0,
                         len(props) if props else 0)
    else:
        head = _pack_pub(msg.id, expires_at, msg.qos | (12 if msg.retain else 8), 0, len(t),
                         len(o), 0, len(props) if props else 0)
    if props:
        return b"".join((head, t, o, props, msg.payload))
    return b"".join((head, t, o, msg.payload))


def message_from_frame(body: bytes | memoryview, now: float) -> tuple[Message, int, str]:
    """The message in a PUBLISH frame body, with the frame's flags and share group.

    The property block is kept encoded (``Message.wire``): deliveries splice it into
    their PUBLISHes, and only a caller that reads ``Message.props`` pays for decoding it."""
    msg_id, topic, payload, qos, retain, origin, expires_at, props, flags, group = \
        decode_publish_fields(body)
    return Message(topic, payload, qos, retain, None, expires_at, origin, now, msg_id,
                   props or None), flags, group


def _b64(msg: Message) -> str:
    return base64.b64encode(message_to_bytes(msg)).decode()


def _unb64(text: str, now: float) -> Message:
    return message_from_frame(base64.b64decode(text), now)[0]


def session_to_dict(session: Session) -> dict[str, Any]:
    """Everything a session is, apart from its connection and will (those stay with
    the network connection that had them)."""
    return {
        "client_id": session.client_id,
        "version": session.version,
        "expiry": session.expiry_interval,
        "next_pid": session.next_pid,
        "qos2_in": sorted(session.inbound_qos2),
        "subs": [[key, sub.filter, sub.group, sub.opts.qos, sub.opts.no_local,
                  sub.opts.retain_as_published, sub.opts.retain_handling, sub.sub_id]
                 for key, sub in session.subscriptions.items()],
        "inflight": [[pid, _b64(item.msg), item.qos, item.retain, list(item.sub_ids), item.released]
                     for pid, item in session.inflight.items()],
        "queue": [[_b64(msg), qos, retain, list(sub_ids)] for msg, qos, retain, sub_ids in session.queue],
    }


def session_from_dict(data: dict[str, Any], cfg: MQTTConfig, counters: Counters,
                      now: float) -> tuple[Session, list[Subscription]]:
    """A Session and its subscriptions (not yet in any trie)."""
    session = Session(data["client_id"], cfg, counters, now)
    session.version = data["version"]
    session.expiry_interval = data["expiry"]
    session.next_pid = data["next_pid"]
    session.inbound_qos2 = set(data["qos2_in"])
    subs = []
    for key, filt, group, qos, no_local, rap, rh, sub_id in data["subs"]:
        sub = Subscription(session, filt, SubOptions(qos, no_local, rap, rh), sub_id, group)
        session.subscriptions[key] = sub
        subs.append(sub)
    for pid, blob, qos, retain, sub_ids, released in data["inflight"]:
        item = Inflight(_unb64(blob, now), qos, retain, tuple(sub_ids))
        item.released = released
        session.inflight[pid] = item
    for blob, qos, retain, sub_ids in data["queue"]:
        session.queue_for_append().append((_unb64(blob, now), qos, retain, tuple(sub_ids)))
    return session, subs
