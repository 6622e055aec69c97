"""What a shard needs from the rest of its host, as a port.

The Shard is pure logic; everything that involves other shards goes through a
``Host``: claiming a client id host-wide (and getting the session back if
another shard held it), publishing subscription deltas to the shared topic
index (a SUBACK waits until the index has them, so a message published after
the SUBACK always finds the new subscriber), forwarding messages, relaying
deliveries during a takeover, and choosing which shard serves a shared group.

``LocalHost`` is the one-shard host: every answer is immediate. The router
mode's host lives in :mod:`shards.hostlink`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from shards.message import Message

# A subscription's contribution to the host-wide index: (filter, None) for "some
# session here subscribes to filter", (filter, group) for "a member of
# $share/group/filter is here".
IndexKey = tuple[str, "str | None"]
Continue = Callable[[float], None]
Claimed = Callable[["dict[str, Any] | None", float], None]


class Host(Protocol):
    index: int

    def claim(self, client_id: str, clean_start: bool, then: Claimed, now: float) -> None:
        """Make this shard the owner of ``client_id``; ``then(state, now)`` gets the
        session another shard gave up (None if there was none or clean_start).
        ``now`` is the caller's time, for a host that answers at once."""

    def released(self, client_id: str) -> None:
        """The session ended here: the id has no owner any more."""

    def claim_done(self, client_id: str) -> None:
        """The CONNECTs for ``client_id`` in progress here are all answered."""

    def disconnected(self, client_id: str, now: float) -> bool:
        """A connection of ``client_id`` ended (for flapping detection). False: count it
        here (the shard's own Flapping); True: the host counts it host-wide and bans."""

    def adopted(self, client_id: str) -> None:
        """A session received from another shard is in place, index keys included."""

    def subscribed(self, keys: list[IndexKey], then: Continue, now: float) -> None:
        """Keys new to this shard; ``then(now)`` once the host-wide index has them."""

    def unsubscribed(self, keys: list[IndexKey]) -> None:
        """Keys this shard no longer has any subscription for."""

    def forward(self, msg: Message) -> int:
        """Send ``msg`` to the other shards that need it; how many got it."""

    def serves_group(self, group: str, filt: str, msg: Message) -> bool:
        """Whether this shard delivers ``msg`` to shared group ``group`` (one shard per group)."""

    def relay(self, shard: int, client_id: str, msg: Message, qos: int, retain: bool,
              sub_ids: tuple[int, ...]) -> None:
        """Deliver to a session that just moved to ``shard``."""

    def awaiting(self, msg_id: int) -> bool:
        """Whether other shards have yet to confirm storing ``msg_id``."""

    def when_durable(self, msg_id: int, then: Continue, now: float) -> None:
        """``then(now)`` once every shard ``msg_id`` was forwarded to has stored it."""

    def committed(self) -> None:
        """This shard's store just committed: tell the shards waiting on it."""


class LocalHost:
    """The host of a one-shard broker."""

    index = 0

    def claim(self, client_id: str, clean_start: bool, then: Claimed, now: float) -> None:
        then(None, now)

    def released(self, client_id: str) -> None:
        pass

    def claim_done(self, client_id: str) -> None:
        pass

    def disconnected(self, client_id: str, now: float) -> bool:
        return False

    def adopted(self, client_id: str) -> None:
        pass

    def subscribed(self, keys: list[IndexKey], then: Continue, now: float) -> None:
        then(now)

    def unsubscribed(self, keys: list[IndexKey]) -> None:
        pass

    def forward(self, msg: Message) -> int:
        return 0

    def serves_group(self, group: str, filt: str, msg: Message) -> bool:
        return True

    def relay(self, shard: int, client_id: str, msg: Message, qos: int, retain: bool,
              sub_ids: tuple[int, ...]) -> None:
        raise RuntimeError("a one-shard host has no other shard to relay to")

    def awaiting(self, msg_id: int) -> bool:
        return False

    def when_durable(self, msg_id: int, then: Continue, now: float) -> None:
        then(now)

    def committed(self) -> None:
        pass
