"""The host-wide topic index: semantics over plain memory, then real shm across processes."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import random
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import posix_ipc
import pytest

from router import index as index_mod
from router.index import FULL_MASK, MAX_LEVELS, MemorySegments, TopicIndex, pick_shard
from router.shm import SHM_DIR, ShmTopicIndex, base_name, cleanup_stale

_ids = itertools.count()
SPAWN = mp.get_context("spawn")  # a fresh interpreter: its own hash randomisation, no fork state


def naive(filt: str, topic: str) -> bool:
    if topic[:1] == "$" and filt[:1] in ("+", "#"):
        return False
    f = filt.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#" and i == len(f) - 1:
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def shm_entries(tag: str) -> list[str]:
    prefix = base_name(tag)[1:]
    return sorted(e for e in os.listdir(SHM_DIR) if e == prefix or e.startswith(prefix + "."))


@pytest.fixture
def tag() -> Iterator[str]:
    """A host tag unique to this test; the test must leave no segment of it behind."""
    t = f"ut{os.getpid()}x{next(_ids)}"
    yield t
    left = shm_entries(t)
    for e in left:
        posix_ipc.unlink_shared_memory("/" + e)
    assert not left, f"segments left in {SHM_DIR}: {left}"


# ---------------------------------------------------------------------------- semantics

CASES = [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/b", "a", False), ("a/b", "a/b/c", False),
    ("a/+", "a/b", True), ("a/+", "a/", True), ("a/+", "a", False), ("a/+", "a/b/c", False),
    ("+", "a", True), ("+", "", True), ("+", "a/b", False), ("+/+", "/", True),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("a/#", "b", False), ("a/#", "ab", False),
    ("#", "a", True), ("#", "/", True), ("+/#", "a", True), ("+/b/#", "x/b", True),
    ("+/b/#", "x/c", False), ("a/+/c/#", "a/x/c", True), ("a/+/c/#", "a/x/d/e", False),
    ("/a", "/a", True), ("/+", "/a", True), ("+/a", "/a", True), ("a//b", "a//b", True),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("+", "$", False),
    ("$SYS/#", "$SYS/x", True), ("$SYS/+", "$SYS/x", True), ("$SYS/#", "$SYS", True),
    ("a/+", "$a/b", False), ("$a/+", "$a/b", True), ("ü/+/€", "ü/x/€", True),
]


@pytest.mark.parametrize("filt,topic,expected", CASES)
def test_match_semantics(filt: str, topic: str, expected: bool) -> None:
    assert naive(filt, topic) is expected  # the reference agrees with the spec table
    idx = TopicIndex()
    idx.add(filt, 5)
    idx.add("unrelated/+/x", 9)
    assert idx.match(topic) == (1 << 5 if expected else 0)


def test_many_filters_many_shards_equal_naive() -> None:
    rng = random.Random(7)
    words = ["a", "b", "c", "", "$SYS", "dev"]
    filters: list[tuple[str, int]] = []
    idx = TopicIndex(capacity=8)
    for _ in range(600):
        n = rng.randint(1, 5)
        levels = [rng.choice(words + ["+"]) for _ in range(n)]
        if rng.random() < 0.3:
            levels.append("#")
        f = "/".join(levels)
        s = rng.randrange(64)
        filters.append((f, s))
        idx.add(f, s)
    for _ in range(500):
        topic = "/".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        want = 0
        for f, s in filters:
            if naive(f, topic):
                want |= 1 << s
        assert idx.match(topic) == want, topic


def test_deep_filters_and_topics_are_conservative() -> None:
    idx = TopicIndex()
    deep = "/".join(["x"] * (MAX_LEVELS + 6))
    idx.add(deep, 1)
    idx.add("/".join(["y"] * MAX_LEVELS + ["#"]), 2)
    idx.add("/".join(["z"] * (MAX_LEVELS + 3)) + "/+", 3)
    assert idx.match(deep) == 1 << 1
    # a topic sharing the first 64 levels: a false positive, never a negative
    assert idx.match("/".join(["x"] * (MAX_LEVELS + 1))) == 1 << 1
    assert idx.match("/".join(["x"] * (MAX_LEVELS - 1))) == 0
    assert idx.match("/".join(["y"] * (MAX_LEVELS + 40))) == 1 << 2
    assert idx.match("/".join(["z"] * (MAX_LEVELS + 4))) == 1 << 3
    idx.remove(deep, 1)
    idx.remove("/".join(["z"] * (MAX_LEVELS + 3)) + "/+", 3)
    assert idx.match(deep) == 0
    assert idx.stats()["keys"] == 1


def test_refcounts_per_key_and_shard() -> None:
    idx = TopicIndex()
    idx.add("a/+", 1)
    idx.add("a/+", 1)
    idx.add("a/+", 2)
    idx.remove("a/+", 1)
    assert idx.match("a/x") == 0b110
    idx.remove("a/+", 2)
    assert idx.match("a/x") == 0b10
    idx.remove("a/+", 1)
    assert idx.match("a/x") == 0
    idx.remove("a/+", 1)  # unknown: ignored
    idx.remove("never/added", 3)
    assert idx.stats()["keys"] == 0 and idx.stats()["shapes"] == 0


def test_generation_changes_only_when_answers_may() -> None:
    idx = TopicIndex()
    g0 = idx.generation()
    assert g0 % 2 == 0
    idx.add("a/b", 1)
    g1 = idx.generation()
    assert g1 > g0 and g1 % 2 == 0
    idx.add("a/b", 1)  # a second subscription of the same shard changes no answer
    idx.remove("a/b", 1)
    assert idx.generation() == g1
    idx.remove("a/b", 1)
    assert idx.generation() > g1


def test_remove_shard() -> None:
    idx = TopicIndex(capacity=8)
    for i in range(300):
        idx.add(f"t/{i}", 4)
        idx.add(f"t/{i}", 4)
        idx.add("t/+", 4)
        if i % 3 == 0:
            idx.add(f"t/{i}", 6)
    idx.add("q/+/r", 4)
    idx.add_group("g", "t/+", 4)
    idx.add_group("g", "t/+", 6)
    idx.remove_shard(4)
    assert idx.match("t/3") == 1 << 6
    assert idx.match("t/4") == 0
    assert idx.match("q/x/r") == 0
    assert idx.group_shards("g", "t/+") == 1 << 6
    assert idx.stats()["shapes"] == 1  # only t/<literal> of shard 6 is left
    idx.add("t/4", 4)  # counts of the dropped shard are gone, not merely hidden
    idx.remove("t/4", 4)
    assert idx.match("t/4") == 0
    idx.remove_shard(6)
    assert idx.stats()["keys"] == 0


def test_groups_are_exact_and_separate() -> None:
    idx = TopicIndex()
    idx.add_group("g1", "a/+", 2)
    idx.add_group("g1", "a/+", 2)
    idx.add_group("g1", "a/+", 3)
    idx.add_group("g2", "a/+", 5)
    assert idx.group_shards("g1", "a/+") == 0b1100
    assert idx.group_shards("g2", "a/+") == 1 << 5
    assert idx.group_shards("g1", "a/x") == 0  # never via shapes
    assert idx.match("a/x") == 0  # groups are not plain subscriptions
    idx.remove_group("g1", "a/+", 2)
    assert idx.group_shards("g1", "a/+") == 0b1100
    idx.remove_group("g1", "a/+", 2)
    idx.remove_group("g1", "a/+", 3)
    assert idx.group_shards("g1", "a/+") == 0


def test_pick_shard_is_deterministic_and_inside_the_mask() -> None:
    mask = 0b1011_0100
    picks = [pick_shard(mask, i) for i in range(400)]
    assert set(picks) == {2, 4, 5, 7}
    assert all(picks.count(s) == 100 for s in (2, 4, 5, 7))
    assert pick_shard(0, 3) == -1
    assert pick_shard(1 << 63, 12345) == 63


def test_shard_range_and_reader_is_read_only() -> None:
    segs = MemorySegments()
    idx = TopicIndex(segs)
    with pytest.raises(ValueError):
        idx.add("a", 64)
    with pytest.raises(ValueError):
        idx.add("a", -1)
    reader = TopicIndex(segs, writer=False)
    with pytest.raises(PermissionError):
        reader.add("a", 1)
    with pytest.raises(FileNotFoundError):
        TopicIndex(MemorySegments(), writer=False)


# ---------------------------------------------------------------------------- growth

def test_growth_rebuilds_and_readers_follow() -> None:
    segs = MemorySegments()
    idx = TopicIndex(segs, capacity=8)
    reader = TopicIndex(segs, writer=False)
    idx.add("keep/+", 1)
    assert reader.match("keep/x") == 2
    epoch0 = idx.stats()["epoch"]
    for i in range(5000):
        idx.add(f"f/{i}/x", i % 64)
        if i % 500 == 0:
            assert reader.match(f"f/{i}/x") == 1 << (i % 64)
            assert reader.generation() == idx.generation()
    st = idx.stats()
    assert st["epoch"] > epoch0 + 3 and st["capacity"] >= 4 * 5001 // 2
    assert list(segs.buffers) == [idx._name]  # every replaced segment was unlinked
    assert reader.match("keep/x") == 2
    for i in range(0, 5000, 7):
        assert reader.match(f"f/{i}/x") == 1 << (i % 64)


def test_shape_table_grows() -> None:
    idx = TopicIndex(max_shapes=1000)
    filters = []
    for n in range(1, 9):
        for plus in range(1 << n):
            f = "/".join("+" if plus >> i & 1 else f"l{i}" for i in range(n))
            filters.append(f)
            idx.add(f, n)
    assert idx.stats()["shapes"] == sum(1 << n for n in range(1, 9))
    topic = "/".join(f"l{i}" for i in range(5))
    assert idx.match(topic) == 1 << 5
    for f in filters:
        idx.remove(f, f.count("/") + 1)
    assert idx.stats()["shapes"] == 0 and idx.stats()["keys"] == 0


def test_shape_budget_coarsens_without_false_negatives() -> None:
    idx = TopicIndex(max_shapes=2)
    filters = ["a/+/c", "a/b/+", "a/+/+", "+/b/c", "x/y/+/z", "x/y/+/+/w", "a/b/c"]
    for s, f in enumerate(filters):
        idx.add(f, s)
    assert idx.stats()["shapes"] <= 2 + 2 * (MAX_LEVELS + 1)
    rng = random.Random(1)
    for _ in range(300):
        topic = "/".join(rng.choice("abcxyzw") for _ in range(rng.randint(1, 5)))
        want = sum(1 << s for s, f in enumerate(filters) if naive(f, topic))
        got = idx.match(topic)
        assert got & want == want, topic
    assert idx.match("q/b/c") == 1 << 3  # '+/b/c' -> '#': still no $ topics
    assert idx.match("$q/b/c") == 0
    for s, f in enumerate(filters):
        idx.remove(f, s)
    assert idx.stats()["keys"] == 0 and idx.stats()["shapes"] == 0
    assert not idx._coarse and not idx._extra


def test_churn_keeps_the_table_compact() -> None:
    idx = TopicIndex(capacity=8)
    rng = random.Random(3)
    live: list[str] = []
    for i in range(20_000):
        if live and rng.random() < 0.5:
            idx.remove(live.pop(rng.randrange(len(live))), 1)
        else:
            live.append(f"c/{i}/+")
            idx.add(live[-1], 1)
        st = idx.stats()
        assert (st["keys"] + st["tombstones"]) * 2 <= st["capacity"]
    assert idx.stats()["keys"] == len(live)
    assert idx.stats()["capacity"] <= max(64, 8 * len(live))
    for f in live:
        assert idx.match(f.replace("+", "z")) == 2


# ---------------------------------------------------------------------------- seqlock edges

def test_reader_retries_then_gives_up_on_a_writer_dead_mid_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "STALL_SECONDS", 0.01)
    segs = MemorySegments()
    idx = TopicIndex(segs)
    idx.add("a", 1)
    reader = TopicIndex(segs, writer=False)
    assert reader.match("a") == 2
    hdr = idx._mv
    hdr[index_mod.H_GEN] += 1  # a write that never ends
    assert reader.match("a") == FULL_MASK
    assert reader.generation() % 2 == 1
    monkeypatch.setattr(index_mod, "STALL_SECONDS", 60.0)
    assert reader.match("a") == FULL_MASK  # at once: that writer was given up on
    hdr[index_mod.H_GEN] += 1
    assert reader.match("a") == 2


def test_unlinked_index_answers_full_mask_until_a_new_one_appears(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "RETRY_SECONDS", 0.0)
    segs = MemorySegments()
    idx = TopicIndex(segs)
    idx.add("a", 1)
    reader = TopicIndex(segs, writer=False)
    assert reader.match("a") == 2
    g_old = reader.generation()
    idx.unlink()
    assert reader.match("a") == FULL_MASK
    assert reader.group_shards("g", "a") == FULL_MASK
    # a restarted router: new index, new generation, same segments object
    idx2 = TopicIndex(segs)
    idx2.add("b", 3)
    g = reader.generation()
    assert g != g_old and g % 2 == 0
    assert reader.match("a") == 0 and reader.match("b") == 8
    reader.close()
    assert reader.match("b") == FULL_MASK


# ---------------------------------------------------------------------------- real shm

def _child_reader(tag: str, conn: Connection) -> None:
    idx = ShmTopicIndex.attach(tag)
    try:
        conn.send(("ready", idx.generation()))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "match":
                conn.send(idx.match(msg[1]))
            elif msg[0] == "group":
                conn.send(idx.group_shards(msg[1], msg[2]))
            elif msg[0] == "gen":
                conn.send(idx.generation())
    finally:
        idx.close()


def _start_reader(tag: str) -> tuple[Any, Connection]:
    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=_child_reader, args=(tag, child), daemon=True)
    p.start()
    assert parent.poll(60), "reader did not start"
    assert parent.recv()[0] == "ready"
    return p, parent


def _ask(conn: Connection, *msg: object) -> int:
    conn.send(msg)
    assert conn.poll(30)
    return int(conn.recv())


def test_shm_writer_and_reader_process(tag: str) -> None:
    idx = ShmTopicIndex.create(tag, capacity=16)
    try:
        idx.add("home/+/temp", 3)
        idx.add_group("g", "home/+/temp", 5)
        p, conn = _start_reader(tag)
        try:
            assert _ask(conn, "match", "home/k/temp") == 1 << 3
            assert _ask(conn, "group", "g", "home/+/temp") == 1 << 5
            assert _ask(conn, "gen") == idx.generation()
            idx.add("home/#", 7)
            assert _ask(conn, "match", "home/k/temp") == (1 << 3) | (1 << 7)
            # growth while the reader is attached: it follows to the new segment
            epoch = idx.stats()["epoch"]
            for i in range(3000):
                idx.add(f"dev/{i}", i % 64)
            assert idx.stats()["epoch"] > epoch
            assert len(shm_entries(tag)) == 2  # root + the current data segment
            assert _ask(conn, "match", "dev/2999") == 1 << (2999 % 64)
            assert _ask(conn, "match", "home/k/temp") == (1 << 3) | (1 << 7)
            assert _ask(conn, "gen") == idx.generation()
            idx.remove_shard(7)
            assert _ask(conn, "match", "home/k/temp") == 1 << 3
        finally:
            conn.send(("stop",))
            p.join(30)
        assert p.exitcode == 0
    finally:
        idx.unlink()
        idx.close()


def test_shm_unlink_after_close_and_twice(tag: str) -> None:
    idx = ShmTopicIndex.create(tag, capacity=16)
    idx.add("a", 1)
    reader = ShmTopicIndex.attach(tag)
    with pytest.raises(PermissionError):
        reader.unlink()
    idx.close()  # the router's shutdown order: close, then unlink
    assert reader.match("a") == 2
    idx.unlink()
    idx.unlink()
    assert not shm_entries(tag)
    assert reader.match("a") == FULL_MASK  # retired: the router is gone
    reader.close()


def test_shm_attach_needs_an_index(tag: str) -> None:
    with pytest.raises(FileNotFoundError):
        ShmTopicIndex.attach(tag)
    with pytest.raises(ValueError):
        ShmTopicIndex.attach("bad/tag")


def _child_writer_crashes(tag: str) -> None:
    idx = ShmTopicIndex.create(tag, capacity=16)
    idx.add("x/+", 1)
    os._exit(0)  # a router killed: nothing unlinked


def _child_writer_holds(tag: str, conn: Connection) -> None:
    idx = ShmTopicIndex.create(tag, capacity=16)
    conn.send("up")
    conn.recv()
    idx.unlink()
    idx.close()


def test_create_cleans_a_crashed_writer_and_refuses_a_live_one(tag: str) -> None:
    p = SPAWN.Process(target=_child_writer_crashes, args=(tag,))
    p.start()
    p.join(60)
    assert len(shm_entries(tag)) == 2
    # a reader still attached to the dead router's index
    stale = ShmTopicIndex.attach(tag)
    assert stale.match("x/y") == 2
    idx = ShmTopicIndex.create(tag)
    try:
        assert idx.match("x/y") == 0
        assert stale.match("x/y") == 0  # retired by create: followed to the new index
        idx.add("x/+", 4)
        assert stale.match("x/y") == 1 << 4
    finally:
        stale.close()
        idx.unlink()
        idx.close()

    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=_child_writer_holds, args=(tag, child))
    p.start()
    try:
        assert parent.poll(60) and parent.recv() == "up"
        with pytest.raises(FileExistsError):
            ShmTopicIndex.create(tag)
        assert cleanup_stale(base_name(tag)) == []  # a live writer's segments stay
    finally:
        parent.send("done")
        p.join(30)


def test_cleanup_stale_removes_dead_and_foreign_segments(tag: str) -> None:
    p = SPAWN.Process(target=_child_writer_crashes, args=(tag,))
    p.start()
    p.join(60)
    foreign = posix_ipc.SharedMemory(base_name(tag) + ".zz", posix_ipc.O_CREX, size=64)
    foreign.close_fd()
    before = shm_entries(tag)
    assert len(before) == 3
    assert sorted(cleanup_stale(base_name(tag))) == ["/" + e for e in before]
    assert not shm_entries(tag)


# ---------------------------------------------------------------------------- stress

def _child_stress_reader(tag: str, conn: Connection, fixed_topic: str) -> None:
    idx = ShmTopicIndex.attach(tag)
    checks = misses = late = 0
    epochs = {idx.stats()["epoch"]}
    conn.send("ready")
    try:
        while True:
            m = idx.match(fixed_topic)
            checks += 1
            if not m & (1 << 3) or not idx.group_shards("g", "fixed/+/t") & (1 << 3):
                misses += 1
            epochs.add(idx._mv[index_mod.H_EPOCH])
            if conn.poll():
                msg = conn.recv()
                if msg == "stop":
                    break
                topic, shard = msg  # the writer added a filter for it just before sending
                if not idx.match(topic) & (1 << shard):
                    late += 1
    finally:
        conn.send((checks, misses, late, len(epochs)))
        idx.close()


def test_stress_no_false_negative_during_concurrent_writes(tag: str) -> None:
    idx = ShmTopicIndex.create(tag, capacity=8)
    try:
        idx.add("fixed/+/t", 3)
        idx.add_group("g", "fixed/+/t", 3)
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_child_stress_reader, args=(tag, child, "fixed/x/t"), daemon=True)
        p.start()
        assert parent.poll(60) and parent.recv() == "ready"
        rng = random.Random(11)
        noise: list[tuple[str, int]] = []
        for i in range(30_000):
            r = rng.random()
            if r < 0.45 or not noise:
                # literal noise plus random shapes, so shape rows appear, move and vanish
                shape = "/".join(rng.choice(["+", "n"]) for _ in range(rng.randint(1, 6)))
                f = rng.choice([f"n/{i}", f"n/+/{i}", f"fixed/{i}/+", f"+/x/{i}", "fixed/#", shape,
                                shape + "/#"])
                s = rng.randrange(64)
                idx.add(f, s)
                noise.append((f, s))
            elif r < 0.9:
                f, s = noise.pop(rng.randrange(len(noise)))
                idx.remove(f, s)
            elif r < 0.99:
                # a new subscription, often of a new shape, must be visible at once (SUBACK)
                tail = "/".join(rng.choice(["+", "q"]) for _ in range(rng.randint(1, 4)))
                hashed = rng.random() < 0.3
                idx.add(f"sub/{i}/{tail}" + ("/#" if hashed else ""), 3)  # shard 3 is never dropped
                parent.send((f"sub/{i}/{tail.replace('+', 'z')}" + ("/z/z" if hashed else ""), 3))
            else:
                idx.remove_shard(rng.choice([s for s in range(64) if s != 3]))
        parent.send("stop")
        assert parent.poll(60)
        checks, misses, late, epochs = parent.recv()
        p.join(30)
        assert misses == 0 and late == 0
        print("stress:", checks, "checks", epochs, "segments seen")
        assert checks > 100 and epochs > 1, (checks, epochs)
    finally:
        idx.unlink()
        idx.close()
