"""Microbenchmark of the shared topic index (router/index.py) over real POSIX shm.

For 1k, 10k, 100k and 1M filters, in two shape mixes (about 10 and about 40 shapes, the
range real deployments show), it reports:

- ``match``      µs per lookup by a reader attached in shm, random topics (mostly misses,
                 which cost the same as hits: every applicable shape is probed either way)
- ``hit``        µs per lookup of a topic that has subscribers
- ``cache``      µs per hit of a shard-style dict cache keyed by topic, validated by
                 ``generation()``
- ``add``/``remove``  µs per writer operation at that size (no rebuild in the window),
                 and the build rate including every growth rebuild
- ``appl``: shapes applicable to one topic length (probes per lookup), mean over lengths
- bytes per filter in shm and in the writer's private arrays, and the process's peak RSS

Usage: ``python -m bench.micro_index [--sizes 1000,10000,...] [--lookups N]``. Numbers are
medians of 5 runs on a noisy machine: compare runs of the same commit.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import time
from collections.abc import Callable

from router.shm import ShmTopicIndex

# Literal vocabulary per level: sizes chosen so 1M distinct filters exist for every mix
# (tenant / site / device / kind / metric / detail...).
VOCAB = [[f"v{i}x{j}" for j in range(n)] for i, n in enumerate([20, 200, 2000, 20, 50, 10, 10])]

# Shape templates: L = literal level, + and # as in MQTT. Weights give ~60% exact filters,
# the rest wildcard, as in deployments where devices subscribe to their own topics and
# services subscribe with wildcards.
MIX_10 = [("L/L/L", 20), ("L/L/L/L", 25), ("L/L/L/L/L", 15), ("L/#", 2), ("L/L/#", 5),
          ("L/L/L/#", 8), ("L/+/L/L", 10), ("L/L/+/L/L", 8), ("+/L/L", 4), ("L/+/+/L/L", 3)]
MIX_40 = MIX_10 + [
    ("L/L", 4), ("L/L/L/L/L/L", 4), ("L/L/L/L/L/L/L", 2), ("L/L/L/L/#", 3), ("L/+", 2),
    ("L/L/+", 2), ("L/+/L", 2), ("L/L/L/+", 2), ("L/L/L/+/L", 2), ("L/+/L/#", 2),
    ("L/L/+/#", 2), ("+/#", 1), ("+/L/#", 1), ("+/+/L/L", 1), ("L/+/L/L/L", 2),
    ("L/L/+/L/L/L", 1), ("L/L/L/+/L/L", 1), ("L/+/L/+/L", 1), ("+/L/L/L/L", 1), ("L/L/L/L/+", 1),
    ("L/+/+/L/#", 1), ("L/L/L/L/L/+", 1), ("L/L/+/+/L/L", 1), ("+/L/+/L", 1), ("L/+/L/L/L/L", 1),
    ("L/L/L/L/+/L", 1), ("L/L/+/L/+/L", 1), ("+/L/L/L/#", 1), ("L/+/L/L/#", 1), ("L/L/L/+/#", 1),
]


def make_filters(n: int, mix: list[tuple[str, int]], rng: random.Random) -> list[str]:
    shapes = [s.split("/") for s, _ in mix]
    weights = [w for _, w in mix]
    out: set[str] = set()
    while len(out) < n:
        for shape in rng.choices(shapes, weights, k=n - len(out)):
            out.add("/".join(rng.choice(VOCAB[i]) if lv == "L" else lv for i, lv in enumerate(shape)))
    return list(out)


def make_topics(n: int, rng: random.Random) -> list[str]:
    return ["/".join(rng.choice(VOCAB[i]) for i in range(rng.choice([3, 4, 4, 5, 5, 6]))) for _ in range(n)]


def concrete(filt: str, rng: random.Random) -> str:
    """A topic that ``filt`` matches."""
    out: list[str] = []
    for i, lv in enumerate(filt.split("/")):
        if lv == "#":
            out.extend(rng.choice(VOCAB[j]) for j in range(i, min(i + 2, len(VOCAB))))
            break
        out.append(rng.choice(VOCAB[i]) if lv == "+" else lv)
    return "/".join(out)


def per_call(fn: Callable[[], None], calls: int) -> float:
    """Median µs per call over 5 runs of ``fn`` (which makes ``calls`` calls)."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def bench(size: int, mix_name: str, mix: list[tuple[str, int]], lookups: int, tag: str) -> dict[str, float]:
    rng = random.Random(size)
    filters = make_filters(size + 20_000, mix, rng)
    base, spare = filters[:size], filters[size:]
    writer = ShmTopicIndex.create(tag, capacity=1024)
    try:
        t0 = time.perf_counter()
        for i, f in enumerate(base):
            writer.add(f, i % 16)
        build = (time.perf_counter() - t0) / size * 1e6
        reader = ShmTopicIndex.attach(tag)
        topics = make_topics(lookups, rng)
        hits = [concrete(f, rng) for f in rng.sample(base, min(lookups, size))]
        match = reader.match

        def run_match() -> None:
            for t in topics:
                match(t)

        def run_hits() -> None:
            for t in hits:
                match(t)

        cache: dict[str, int] = {}
        cache_gen = [reader.generation()]
        generation = reader.generation
        for t in topics[:1000]:
            cache[t] = match(t)
        hot = topics[:1000] * (lookups // 1000)

        def run_cache() -> None:
            for t in hot:
                g = generation()
                if g != cache_gen[0]:
                    cache.clear()
                    cache_gen[0] = g
                m = cache.get(t)
                if m is None:
                    m = cache[t] = match(t)

        for t in hits[:200]:
            assert match(t), t
        st = writer.stats()
        # add/remove in a window without a rebuild: the steady-state cost
        free = (st["capacity"] // 2) - st["keys"] - st["tombstones"]
        k = min(len(spare), 10_000, max(0, free - 1))
        epoch = st["epoch"]
        t0 = time.perf_counter()
        for i in range(k):
            writer.add(spare[i], 3)
        add = (time.perf_counter() - t0) / max(k, 1) * 1e6
        t0 = time.perf_counter()
        for i in range(k):
            writer.remove(spare[i], 3)
        remove = (time.perf_counter() - t0) / max(k, 1) * 1e6
        assert writer.stats()["epoch"] == epoch or k == 0
        res = {
            "match": per_call(run_match, len(topics)),
            "hit": per_call(run_hits, len(hits)),
            "cache": per_call(run_cache, len(hot)),
            "build": build,
            "add": add,
            "remove": remove,
            "shapes": st["shapes"],
            "shm_B": st["shm_bytes"] / st["keys"],
            "priv_B": st["private_bytes"] / st["keys"],
            "cap": st["capacity"],
        }
        applicable = [len(p[1]) + len(p[2]) for p in reader._plans.values()]
        res["probes"] = statistics.mean(applicable) if applicable else 0
        reader.close()
        return res
    finally:
        writer.unlink()
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--lookups", type=int, default=20_000)
    args = ap.parse_args()
    tag = f"bench{os.getpid()}"
    print(f"{'filters':>8} {'mix':>4} {'shapes':>6} {'appl':>6} {'match µs':>9} {'hit µs':>7} "
          f"{'cache µs':>9} {'build µs':>9} {'add µs':>7} {'rm µs':>6} {'shm B/f':>8} {'priv B/f':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        for name, mix in (("10", MIX_10), ("40", MIX_40)):
            r = bench(size, name, mix, args.lookups, tag)
            print(f"{size:>8} {name:>4} {r['shapes']:>6} {r['probes']:>6.1f} {r['match']:>9.2f} "
                  f"{r['hit']:>7.2f} {r['cache']:>9.3f} {r['build']:>9.2f} {r['add']:>7.2f} "
                  f"{r['remove']:>6.2f} {r['shm_B']:>8.1f} {r['priv_B']:>8.1f}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB (includes the benchmark's own filter strings)")


if __name__ == "__main__":
    main()
