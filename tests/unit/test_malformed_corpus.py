"""Every entry of tests/corpus/malformed.json is refused with exactly its reason code.

Each entry is a whole packet (fixed header included) sent by a client; version 0
means "the first packet on a new connection", otherwise the packet follows a
successful CONNECT at that protocol level. The same file drives the black-box
tests against a real broker, so entries must stay self-contained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shards.protocol.codec import decode
from shards.protocol.errors import ProtocolError
from shards.protocol.reader import FrameReader

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "malformed.json"
ENTRIES: list[dict[str, Any]] = json.loads(CORPUS.read_text())


def test_corpus_shape() -> None:
    assert len(ENTRIES) >= 40
    names = [e["name"] for e in ENTRIES]
    assert len(names) == len(set(names)), "entry names must be unique"
    for e in ENTRIES:
        assert set(e) == {"name", "version", "hex", "reason", "note"}, e["name"]
        assert e["version"] in (0, 3, 4, 5), e["name"]
        assert 0x80 <= e["reason"] <= 0xA2, e["name"]
        assert e["note"], e["name"]
        # Only what a client may send: a broker test can replay every entry.
        assert (bytes.fromhex(e["hex"])[0] >> 4) not in (2, 9, 11, 13), e["name"]
        if e["version"] == 0:
            assert bytes.fromhex(e["hex"])[0] >> 4 == 1, e["name"]


def test_corpus_covers_each_reason() -> None:
    assert {e["reason"] for e in ENTRIES} >= {0x81, 0x82, 0x84, 0x90}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_malformed_entry(entry: dict[str, Any]) -> None:
    data = bytes.fromhex(entry["hex"])
    # Whole packet in one feed, and byte by byte: the verdict must not depend on framing.
    for feeds in ([data], [data[i:i + 1] for i in range(len(data))]):
        reader = FrameReader()
        with pytest.raises(ProtocolError) as excinfo:
            frame = None
            for chunk in feeds:
                reader.feed(chunk)
                frame = reader.next_frame()
                if frame is not None:
                    break
            assert frame is not None, "a complete packet must produce a frame"
            assert reader.buffered() == 0, "the entry must be exactly one packet"
            decode(frame[0], frame[1], entry["version"])
        assert excinfo.value.reason == entry["reason"], excinfo.value.message
