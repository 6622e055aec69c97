"""Topic names, topic filters and shared-subscription prefixes (spec 4.7, 4.8).

This is the reference definition of what a topic is and what a filter matches.
The shard's trie and the router's shared index are the fast implementations;
their tests compare against :func:`matches` here.
"""

from __future__ import annotations

from .errors import ProtocolError, Reason

# A topic travels as a UTF-8 string with a two-byte length prefix (spec 1.5.4).
MAX_TOPIC_BYTES = 65535

SHARE_PREFIX = "$share/"
QUEUE_PREFIX = "$queue/"
# The group name reported for the legacy "$queue/" prefix (EMQX, HiveMQ): every
# "$queue/" subscriber of one filter forms one shared group.
QUEUE_GROUP = "$queue"


def _bad_name(message: str) -> ProtocolError:
    return ProtocolError(Reason.TOPIC_NAME_INVALID, message)


def _bad_filter(message: str) -> ProtocolError:
    return ProtocolError(Reason.TOPIC_FILTER_INVALID, message)


def _too_long(text: str) -> bool:
    # A str of n code points encodes to at most 4n bytes, so most topics skip the encode.
    return len(text) * 4 > MAX_TOPIC_BYTES and len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES


def validate_topic_name(topic: str, max_levels: int = 0) -> None:
    """Raise TOPIC_NAME_INVALID unless ``topic`` may be published to.

    ``max_levels`` = 0 means no limit on the number of '/'-separated levels.
    """
    if not topic:
        raise _bad_name("empty topic name")  # [MQTT-4.7.3-1]
    if "+" in topic or "#" in topic:
        raise _bad_name("wildcard in topic name")  # [MQTT-3.3.2-2]
    if "\x00" in topic:
        raise _bad_name("U+0000 in topic name")  # [MQTT-4.7.3-2]
    if _too_long(topic):
        raise _bad_name("topic name longer than 65535 bytes")
    if max_levels and topic.count("/") >= max_levels:
        raise _bad_name(f"topic name has more than {max_levels} levels")


def validate_topic_filter(filt: str, max_levels: int = 0) -> None:
    """Raise TOPIC_FILTER_INVALID unless ``filt`` is a well-formed filter.

    '#' must be the whole of the last level; '+' must be the whole of its level
    (spec 4.7.1). A shared filter is validated after :func:`parse_shared` strips
    its prefix.
    """
    if not filt:
        raise _bad_filter("empty topic filter")  # [MQTT-4.7.3-1]
    if "\x00" in filt:
        raise _bad_filter("U+0000 in topic filter")  # [MQTT-4.7.3-2]
    if _too_long(filt):
        raise _bad_filter("topic filter longer than 65535 bytes")
    if "+" in filt or "#" in filt:
        levels = filt.split("/")
        last = len(levels) - 1
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != last):
                raise _bad_filter("'#' must be alone in the last level")  # [MQTT-4.7.1-1]
            if "+" in level and level != "+":
                raise _bad_filter("'+' must be alone in its level")  # [MQTT-4.7.1-2]
    if max_levels and filt.count("/") >= max_levels:
        raise _bad_filter(f"topic filter has more than {max_levels} levels")


def parse_shared(filt: str) -> tuple[str | None, str]:
    """Split a shared subscription into (group, filter); (None, filt) if not shared.

    "$share/g/a/b" -> ("g", "a/b"); "$queue/a/b" -> ("$queue", "a/b").
    """
    if filt.startswith(SHARE_PREFIX):
        rest = filt[len(SHARE_PREFIX):]
        slash = rest.find("/")
        if slash < 0:
            raise _bad_filter("shared subscription without a topic filter")  # [MQTT-4.8.2-2]
        group, inner = rest[:slash], rest[slash + 1:]
        if not group:
            raise _bad_filter("empty share name")  # [MQTT-4.8.2-1]
        if "+" in group or "#" in group:
            raise _bad_filter("wildcard in share name")  # [MQTT-4.8.2-2]
        if not inner:
            raise _bad_filter("shared subscription with an empty topic filter")
        return group, inner
    if filt.startswith(QUEUE_PREFIX):
        inner = filt[len(QUEUE_PREFIX):]
        if not inner:
            raise _bad_filter("$queue subscription with an empty topic filter")
        return QUEUE_GROUP, inner
    return None, filt


def matches(filt: str, topic: str) -> bool:
    """Whether ``filt`` (already stripped of any $share prefix) matches ``topic``.

    '+' matches exactly one level (possibly empty); '#' matches its parent level
    and everything below it ("a/#" matches "a"). Filters starting with a
    wildcard never match topics starting with '$' [MQTT-4.7.2-1].
    """
    if topic[:1] == "$" and filt[:1] in ("+", "#"):
        return False
    if "+" not in filt and "#" not in filt:
        return filt == topic
    flevels = filt.split("/")
    tlevels = topic.split("/")
    n = len(tlevels)
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= n:
            return False
        if f != "+" and f != tlevels[i]:
            return False
    return len(flevels) == n
