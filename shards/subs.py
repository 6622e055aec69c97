"""The shard's own subscription trie and its match cache.

Design: one trie node per topic level of a filter; a node holds the plain
subscribers whose filter ends there (``client id -> Subscription``) and the
shared groups whose filter ends there. Matching a topic of L levels visits, per
level, the exact child, the ``+`` child and the ``#`` child, so the cost is
O(L × branching through wildcards), independent of the number of filters that
cannot match. A leading ``+``/``#`` never matches a ``$`` topic [MQTT-4.7.2-1].

Most traffic repeats topics, so match results are cached per topic in a dict
that is dropped whenever the subscription set changes (a generation counter, as
in nats-server). The cache is bounded: when it is full it is cleared, which is
cheaper and simpler than LRU bookkeeping on the hot path.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from shards.protocol.packets import SubOptions

if TYPE_CHECKING:
    from shards.session import Session

# Enough distinct topics for a busy shard's working set; each entry is a small
# tuple. Clearing at the bound keeps memory flat under topic-churn attacks.
MATCH_CACHE_MAX = 65536


class Subscription:
    """One session's subscription to one filter (shared or not)."""

    __slots__ = ("session", "filter", "opts", "sub_id", "group")

    def __init__(self, session: Session, filt: str, opts: SubOptions, sub_id: int | None,
                 group: str | None) -> None:
        self.session = session
        self.filter = filt
        self.opts = opts
        self.sub_id = sub_id
        self.group = group


class SharedGroup:
    """Members of ``$share/<group>/<filter>``: each message goes to one of them."""

    __slots__ = ("name", "filter", "members", "next")

    def __init__(self, name: str, filt: str) -> None:
        self.name = name
        self.filter = filt
        self.members: dict[str, Subscription] = {}
        self.next = 0

    def pick(self, strategy: str) -> Subscription | None:
        """Prefer a connected member; fall back to any (its session queues)."""
        members = list(self.members.values())
        if not members:
            return None
        online = [m for m in members if m.session.online]
        pool = online or members
        if strategy == "random":
            return random.choice(pool)
        self.next = (self.next + 1) % len(pool)
        return pool[self.next]


class _Node:
    __slots__ = ("children", "subs", "groups")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[str, Subscription] = {}
        self.groups: dict[str, SharedGroup] = {}

    def empty(self) -> bool:
        return not (self.children or self.subs or self.groups)


class Target:
    """Where one message goes in one session, all of its matching filters merged.

    MQTT 5 lets a server send one copy for overlapping subscriptions if it uses
    the highest QoS and every subscription identifier [MQTT-3.3.4-2, -3.3.4-3];
    that is what we do, computed once per topic and cached. ``for_self`` is the
    target to use when the publisher is this session: ``self`` unless no-local
    subscriptions must be left out, ``None`` when all of them are no-local.
    """

    __slots__ = ("session", "qos", "rap", "sub_ids", "for_self")

    def __init__(self, session: Session, subs: list[Subscription], for_self: bool = False) -> None:
        self.session = session
        self.qos = max(s.opts.qos for s in subs)
        self.rap = any(s.opts.retain_as_published for s in subs)
        self.sub_ids = tuple(s.sub_id for s in subs if s.sub_id)
        self.for_self: Target | None = self
        if not for_self and any(s.opts.no_local for s in subs):
            local = [s for s in subs if not s.opts.no_local]
            self.for_self = Target(session, local, True) if local else None


def merge_targets(subs: list[Subscription]) -> tuple[Target, ...]:
    if len(subs) == 1:
        return (Target(subs[0].session, subs),)
    by_session: dict[int, list[Subscription]] = {}
    for s in subs:
        by_session.setdefault(id(s.session), []).append(s)
    return tuple(Target(group[0].session, group) for group in by_session.values())


# A cached match: per-session targets and the shared groups matching one topic.
Match = tuple[tuple[Target, ...], tuple[SharedGroup, ...]]


class SubscriptionTrie:
    def __init__(self) -> None:
        self._root = _Node()
        self._cache: dict[str, Match] = {}
        self.generation = 0
        self.count = 0

    # -- changes ---------------------------------------------------------

    def add(self, sub: Subscription) -> bool:
        """Insert or replace; returns True if this filter (and group) was new for the session."""
        node = self._root
        for level in sub.filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        cid = sub.session.client_id
        if sub.group is None:
            new = cid not in node.subs
            node.subs[cid] = sub
        else:
            group = node.groups.get(sub.group)
            if group is None:
                group = node.groups[sub.group] = SharedGroup(sub.group, sub.filter)
            new = cid not in group.members
            group.members[cid] = sub
        if new:
            self.count += 1
        self._changed()
        return new

    def remove(self, client_id: str, filt: str, group: str | None) -> bool:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in filt.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if group is None:
            if node.subs.pop(client_id, None) is None:
                return False
        else:
            g = node.groups.get(group)
            if g is None or g.members.pop(client_id, None) is None:
                return False
            if not g.members:
                del node.groups[group]
        self.count -= 1
        # prune empty branches so a churn of unique filters does not leak nodes
        for parent, level in reversed(path):
            if node.empty():
                del parent.children[level]
                node = parent
            else:
                break
        self._changed()
        return True

    def touch(self) -> None:
        """Subscriptions changed in place (their session was swapped): drop cached matches."""
        self._changed()

    def _changed(self) -> None:
        self.generation += 1
        if self._cache:
            self._cache = {}

    # -- matching --------------------------------------------------------

    def match(self, topic: str) -> Match:
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        subs: list[Subscription] = []
        groups: list[SharedGroup] = []
        levels = topic.split("/")
        self._walk(self._root, levels, 0, subs, groups, topic[:1] == "$")
        result: Match = (merge_targets(subs) if subs else (), tuple(groups))
        if len(self._cache) >= MATCH_CACHE_MAX:
            self._cache = {}
        self._cache[topic] = result
        return result

    def _walk(self, node: _Node, levels: list[str], i: int, subs: list[Subscription],
              groups: list[SharedGroup], dollar: bool) -> None:
        children = node.children
        if i == len(levels):
            if node.subs:
                subs.extend(node.subs.values())
            if node.groups:
                groups.extend(node.groups.values())
            # "a/#" matches "a" itself [MQTT-4.7.1-2]
            hash_node = children.get("#")
            if hash_node is not None:
                subs.extend(hash_node.subs.values())
                groups.extend(hash_node.groups.values())
            return
        wild = not (dollar and i == 0)
        if wild:
            hash_node = children.get("#")
            if hash_node is not None:
                subs.extend(hash_node.subs.values())
                groups.extend(hash_node.groups.values())
        child = children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, subs, groups, dollar)
        if wild:
            plus = children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, subs, groups, dollar)

    def filters(self) -> list[tuple[str, str | None, Any]]:
        """Every (filter, group, Subscription) — for stats and tests, not the hot path."""
        out: list[tuple[str, str | None, Any]] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            for s in node.subs.values():
                out.append((s.filter, None, s))
            for g in node.groups.values():
                for s in g.members.values():
                    out.append((s.filter, g.name, s))
            stack.extend(node.children.values())
        return out
