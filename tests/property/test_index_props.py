"""Hypothesis: the shared topic index against a naive matcher, after random adds/removes.

With the full shape budget the answer must equal the naive one (64-bit keys do not collide
in these sizes); with a tiny budget (coarsened filters) it must contain it. Either way a
missing bit would be a lost message.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.index import MemorySegments, TopicIndex

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORDS = ["a", "b", "c", "", "$x", "ü"]
level = st.sampled_from(WORDS)
topic = st.lists(level, min_size=1, max_size=5).map("/".join)
filter_ = st.one_of(
    st.just("#"),
    st.builds(lambda ls, h: "/".join(ls + (["#"] if h else [])),
              st.lists(st.one_of(level, st.just("+")), min_size=1, max_size=5), st.booleans()),
)
shard = st.integers(0, 63)
group = st.sampled_from(["g1", "g2", "$queue"])
op = st.one_of(
    st.tuples(st.just("add"), filter_, shard),
    st.tuples(st.just("remove"), st.integers(0, 1 << 16)),
    st.tuples(st.just("add_group"), group, filter_, shard),
    st.tuples(st.just("remove_group"), st.integers(0, 1 << 16)),
    st.tuples(st.just("remove_shard"), shard),
)


def naive(filt: str, topic: str) -> bool:
    if topic[:1] == "$" and filt[:1] in ("+", "#"):
        return False
    f = filt.split("/")
    t = topic.split("/")
    for i, lv in enumerate(f):
        if lv == "#" and i == len(f) - 1:
            return True
        if i >= len(t) or (lv != "+" and lv != t[i]):
            return False
    return len(f) == len(t)


def apply(ops: list[tuple[Any, ...]], idx: TopicIndex) -> tuple[Counter[tuple[str, int]],
                                                                 Counter[tuple[str, str, int]]]:
    subs: Counter[tuple[str, int]] = Counter()
    groups: Counter[tuple[str, str, int]] = Counter()
    for o in ops:
        if o[0] == "add":
            idx.add(o[1], o[2])
            subs[(o[1], o[2])] += 1
        elif o[0] == "remove" and subs:
            # remove only what was added: the broker never unsubscribes twice
            key = sorted(subs)[o[1] % len(subs)]
            idx.remove(*key)
            subs[key] -= 1
            if not subs[key]:
                del subs[key]
        elif o[0] == "add_group":
            idx.add_group(o[1], o[2], o[3])
            groups[(o[1], o[2], o[3])] += 1
        elif o[0] == "remove_group" and groups:
            gkey = sorted(groups)[o[1] % len(groups)]
            idx.remove_group(*gkey)
            groups[gkey] -= 1
            if not groups[gkey]:
                del groups[gkey]
        elif o[0] == "remove_shard":
            idx.remove_shard(o[1])
            subs = Counter({k: c for k, c in subs.items() if k[1] != o[1]})
            groups = Counter({k: c for k, c in groups.items() if k[2] != o[1]})
    return subs, groups


def expected(subs: Counter[tuple[str, int]], t: str) -> int:
    m = 0
    for f, s in subs:
        if naive(f, t):
            m |= 1 << s
    return m


@SETTINGS
@given(st.lists(op, max_size=60), st.lists(topic, min_size=1, max_size=20))
def test_match_equals_naive(ops: list[tuple[Any, ...]], topics: list[str]) -> None:
    segs = MemorySegments()
    idx = TopicIndex(segs, capacity=4)  # small: growth and compaction happen mid-sequence
    reader = TopicIndex(segs, writer=False)
    subs, groups = apply(ops, idx)
    for t in topics + [f for f, _ in subs if "+" not in f and "#" not in f]:
        want = expected(subs, t)
        assert idx.match(t) == want, t
        assert reader.match(t) == want, t
    for g, f, _ in list(groups) + [("g1", "never", 0)]:
        want = 0
        for (g2, f2, s2) in groups:
            if (g2, f2) == (g, f):
                want |= 1 << s2
        assert reader.group_shards(g, f) == want
    st_ = idx.stats()
    assert st_["keys"] == len({f for f, _ in subs}) + len({(g, f) for g, f, _ in groups})


@SETTINGS
@given(st.lists(op, max_size=60), st.lists(topic, min_size=1, max_size=20))
def test_coarsened_index_never_misses(ops: list[tuple[Any, ...]], topics: list[str]) -> None:
    idx = TopicIndex(capacity=4, max_shapes=1)
    subs, _ = apply(ops, idx)
    for t in topics:
        want = expected(subs, t)
        assert idx.match(t) & want == want, t
    if not subs:
        assert idx.stats()["shapes"] == 0 and idx.match("a") == 0
