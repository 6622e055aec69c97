"""The retained-message store.

Retained messages are looked up by *filter* (when a client subscribes), so they
live in a trie keyed by topic level: an exact filter is a walk of L nodes; a
wildcard filter visits only the branches it can match, never the whole store.
Expired messages (MQTT 5 message expiry) are dropped lazily when found and by
:meth:`RetainedStore.expire`, which the shard calls from its periodic tick.
"""

from __future__ import annotations

from collections.abc import Iterator

from shards.message import Message


class _Node:
    __slots__ = ("children", "msg")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.msg: Message | None = None


class RetainedStore:
    def __init__(self, max_messages: int = 0) -> None:
        # 0 = unlimited; otherwise new topics beyond the bound are refused (the
        # existing ones can still be replaced or cleared).
        self.max_messages = max_messages
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def set(self, msg: Message) -> bool:
        """Store ``msg`` (an empty payload clears the topic). False if refused by the bound."""
        if not msg.payload:
            self.clear(msg.topic)
            return True
        node = self._root
        for level in msg.topic.split("/"):
            child = node.children.get(level)
            if child is None:
                if self.max_messages and self._count >= self.max_messages:
                    return False
                child = node.children[level] = _Node()
            node = child
        if node.msg is None:
            if self.max_messages and self._count >= self.max_messages:
                return False
            self._count += 1
        node.msg = msg
        return True

    def clear(self, topic: str) -> None:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.msg is None:
            return
        node.msg = None
        self._count -= 1
        for parent, level in reversed(path):
            if node.msg is None and not node.children:
                del parent.children[level]
                node = parent
            else:
                break

    def get(self, topic: str) -> Message | None:
        node = self._root
        for level in topic.split("/"):
            node = node.children.get(level)  # type: ignore[assignment]
            if node is None:
                return None
        return node.msg

    def match(self, filt: str, now: float) -> list[Message]:
        """Retained messages whose topic matches ``filt``, expired ones removed."""
        out: list[Message] = []
        expired: list[str] = []
        for msg in self._walk(self._root, filt.split("/"), 0):
            if msg.expired(now):
                expired.append(msg.topic)
            else:
                out.append(msg)
        for topic in expired:
            self.clear(topic)
        return out

    def _walk(self, node: _Node, levels: list[str], i: int) -> Iterator[Message]:
        if i == len(levels):
            if node.msg is not None:
                yield node.msg
            return
        level = levels[i]
        if level == "#":
            yield from self._all(node, skip_dollar=i == 0)
        elif level == "+":
            for name, child in node.children.items():
                if i == 0 and name.startswith("$"):
                    continue
                yield from self._walk(child, levels, i + 1)
        else:
            child = node.children.get(level)
            if child is not None:
                yield from self._walk(child, levels, i + 1)

    def _all(self, node: _Node, skip_dollar: bool) -> Iterator[Message]:
        # "a/#" includes "a" itself
        if node.msg is not None and not skip_dollar:
            yield node.msg
        stack = [(name, child) for name, child in node.children.items()
                 if not (skip_dollar and name.startswith("$"))]
        while stack:
            _, n = stack.pop()
            if n.msg is not None:
                yield n.msg
            stack.extend(n.children.items())

    def expire(self, now: float) -> int:
        dead = [m.topic for m in self._all(self._root, skip_dollar=False) if m.expired(now)]
        for topic in dead:
            self.clear(topic)
        return len(dead)

    def messages(self) -> list[Message]:
        return list(self._all(self._root, skip_dollar=False))
