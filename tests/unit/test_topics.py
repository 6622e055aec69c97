"""Topic names, filters, shared prefixes and the reference matcher (spec 4.7, 4.8)."""

from __future__ import annotations

import pytest

from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.topics import (
    MAX_TOPIC_BYTES, matches, parse_shared, validate_topic_filter, validate_topic_name,
)


@pytest.mark.parametrize("topic", ["a", "a/b", "/", "/a", "a/", "a//b", "$SYS/x", "ü/ß", "a b", " "])
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


@pytest.mark.parametrize("topic", ["", "+", "#", "a/+", "a/#", "a+b", "a#", "a/\x00"])
def test_invalid_topic_names(topic: str) -> None:
    with pytest.raises(ProtocolError) as e:
        validate_topic_name(topic)
    assert e.value.reason == Reason.TOPIC_NAME_INVALID


def test_topic_name_length_limit() -> None:
    validate_topic_name("a" * MAX_TOPIC_BYTES)
    with pytest.raises(ProtocolError):
        validate_topic_name("a" * (MAX_TOPIC_BYTES + 1))
    # The limit is on UTF-8 bytes, not code points.
    with pytest.raises(ProtocolError):
        validate_topic_name("é" * (MAX_TOPIC_BYTES // 2 + 1))


def test_topic_name_level_limit() -> None:
    validate_topic_name("a/b/c", max_levels=3)
    with pytest.raises(ProtocolError):
        validate_topic_name("a/b/c/d", max_levels=3)
    validate_topic_name("/".join("x" * 1000), max_levels=0)


@pytest.mark.parametrize("filt", ["a", "#", "+", "a/#", "a/+", "+/+", "+/#", "/+", "a//+", "$SYS/#",
                                  "a/+/c/#", "/", "$share/g/a"])
def test_valid_topic_filters(filt: str) -> None:
    validate_topic_filter(filt)


@pytest.mark.parametrize("filt", ["", "a#", "#/a", "a/#/b", "a/b#", "a+", "+a", "a/+b/c", "##", "++",
                                  "a/\x00"])
def test_invalid_topic_filters(filt: str) -> None:
    with pytest.raises(ProtocolError) as e:
        validate_topic_filter(filt)
    assert e.value.reason == Reason.TOPIC_FILTER_INVALID


def test_topic_filter_limits() -> None:
    validate_topic_filter("a/+/#", max_levels=3)
    with pytest.raises(ProtocolError):
        validate_topic_filter("a/+/b/#", max_levels=3)
    with pytest.raises(ProtocolError):
        validate_topic_filter("+" + "/+" * (MAX_TOPIC_BYTES // 2 + 1))


@pytest.mark.parametrize("filt, expected", [
    ("$share/g/a/b", ("g", "a/b")),
    ("$share/group-1/#", ("group-1", "#")),
    ("$share/g//", ("g", "/")),
    ("$queue/a/b", ("$queue", "a/b")),
    ("$queue/+", ("$queue", "+")),
    ("a/b", (None, "a/b")),
    ("$share", (None, "$share")),
    ("$sharex/g/a", (None, "$sharex/g/a")),
    ("$SYS/#", (None, "$SYS/#")),
    ("share/g/a", (None, "share/g/a")),
])
def test_parse_shared(filt: str, expected: tuple[str | None, str]) -> None:
    assert parse_shared(filt) == expected


@pytest.mark.parametrize("filt", ["$share/g", "$share//x", "$share/g+/x", "$share/#/x", "$share/+/x",
                                  "$share/g/", "$share/", "$queue/"])
def test_parse_shared_malformed(filt: str) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_shared(filt)
    assert e.value.reason == Reason.TOPIC_FILTER_INVALID


@pytest.mark.parametrize("filt, topic, expected", [
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a", False),
    ("a/+", "a/", True),
    ("a/+", "a/b/c", False),
    ("+/+", "/", True),
    ("+", "/", False),
    ("/+", "/a", True),
    ("a/#", "a", True),
    ("a/#", "a/", True),
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("+/#", "a", True),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d", False),
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/+", "sport/", True),
    # [MQTT-4.7.2-1]: wildcards at the first level never match '$' topics.
    ("#", "$SYS/x", False),
    ("+/x", "$SYS/x", False),
    ("+", "$", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/+", "$SYS/x", True),
    ("$SYS", "$SYS", True),
    ("a/$b", "a/$b", True),
    ("+/$b", "a/$b", True),
])
def test_matches(filt: str, topic: str, expected: bool) -> None:
    assert matches(filt, topic) is expected
