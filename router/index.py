"""The host-wide topic index: which shards have a subscriber whose filter matches a topic.

Design note
===========

Question answered, by any shard, lock-free: ``match(topic) -> int``, a bitmask of the
shards (0..63) that have at least one subscription whose filter matches ``topic``. False
positives are allowed (a bus frame that finds no subscriber); false negatives never are.
One writer (the router) and many readers (the shards, in other processes) share the
tables through memory (POSIX shm in production, any writable buffer in tests).

Algorithm: shapes + one hash table
----------------------------------
Every filter has a *shape* ``(L, hash, plus_mask)``: ``L`` literal-or-``+`` levels, a
trailing ``#`` or not, and the positions of its ``+`` levels. The filter's 64-bit key is

    key(f) = TAG[L, hash] + sum_i c(i, level_i)      (mod 2**64)
    c(i, s) = xxh3_64(s, seed = secret + (i + 1) * golden)

where a ``+`` level is hashed like any other level (``c(i, b"+")``) and ``#`` is not a
level but part of ``TAG``. A shared open-addressing table maps key -> shard bitmask, and
a small table lists the shapes present. To match a topic of ``n`` levels the reader hashes
each level once (``h_i``), takes prefix sums ``P_k``, and for each present shape that can
apply (exact shapes with ``L == n``; ``#`` shapes with ``L <= n``, since ``a/#`` matches
``a``) forms the key of the one filter of that shape that could match:

    key = P_L + const(shape) - sum_{i in plus positions} h_i
    const(shape) = TAG[L, hash] + sum_{i in plus positions} c(i, b"+")

and probes the table. The answer is the OR of the values found. Because the key is a sum of
per-level hashes, no candidate string is ever built: a shape without ``+`` costs one
addition and one probe, a ``+`` costs one subtraction more. The sum of independent
position-seeded 64-bit hashes collides with probability ~2**-64 per pair; a collision can
only add bits (false positive). The seed is a per-index random secret stored in the
segment, so clients cannot aim collisions at it and every process computes the same keys
(Python's ``hash()`` is randomised per process and is never used).

``$`` rule [MQTT-4.7.2-1]: shapes whose first level is ``+`` and the bare ``#`` shape are
skipped for topics starting with ``$``; a whole shape is dropped at once.

Shared subscriptions: the broker registers a member's real filter with ``add`` (so its shard
is in ``match``) and ``add_group(group, filter)``, which goes into the same table under a
key drawn from a different seed over ``group NUL filter`` (exact lookup only, never via
shapes; NUL cannot occur in MQTT strings, so the encoding is unambiguous). ``pick_shard``
turns that bitmask and a message id into the one shard every publisher agrees on.

Complexity
----------
- ``match``: O(n) hashing of the topic's levels + O(S_n) probes, where S_n is the number of
  shapes applicable to a topic of n levels; independent of the number of filters. Probes
  are linear, the table is kept at load <= 0.5 (counting tombstones), so a probe reads
  about 1.5-2.5 slots. Measured numbers: bench/micro_index.py.
- ``add``/``remove``: O(levels) hashing + O(1) expected probe + one seqlock'd write.
  A repeated (filter, shard) pair changes no shared memory and no generation.
- ``remove_shard``: one vectorised pass over the table (numpy), O(capacity).
- growth / compaction: a vectorised rebuild into a new segment, O(capacity), amortised O(1)
  per add (the table doubles; after a rebuild the load is <= 0.25).

Measured (bench/micro_index.py, shared 2-core machine, 1k-1M filters, flat in N): a cache
miss costs ~3 µs with 10 shapes (~5 applicable per topic length) and ~6-9 µs with 40
(~15 applicable); a shard's dict-cache hit validated by ``generation()`` ~0.13 µs; add or
remove ~3-4 µs. Alternatives measured and not kept: building each candidate filter as a
string and hashing it (a join + hash per shape, slower than two int operations); generating
Python source per plan (~20% faster, but ~0.4 ms to compile each plan again on every change
of the shape set); a trie walk in shm (pointer chasing per level, cost grows with fan-out).

Memory
------
Shared: 16 bytes per slot (key u64 + bitmask u64) at a load between 0.25 and 0.5, so 32-64
bytes per distinct filter, plus 32 bytes per shape and a 128-byte header. Writer-private: 4
bytes per slot (the shape of each slot, numpy), plus a dict entry only for a (filter, shard)
subscribed more than once and for a filter coarsened by the shape budget. Nothing per
filter lives in Python objects: 1M filters measured 34 MB of shm + 8 MB private.

Reference counts
----------------
A bit is set on the first subscription of a shard to a key and cleared with the last: the
first one is the bit itself, the others are counted in the writer's ``_extra`` dict, so the
common case (one subscription per (key, shard)) costs no Python object at all.

Bounded match cost (shape budget)
---------------------------------
Match cost grows with the number of shapes, which subscribers choose; many clients with
odd ``+`` patterns could make every publish slow. Shapes without ``+`` are bounded by
construction (2 x 65). Shapes with ``+`` are limited to ``max_shapes``; a filter whose
``+`` shape is absent once the budget is full is stored *coarsened*, as the ``#`` filter of
its prefix before its first ``+`` (``a/b/+/c`` -> ``a/b/#``): a superset, so false positives
only. The writer remembers coarsened registrations to undo them on ``remove``.

Limits
------
- 64 shards (the bitmask is one u64); ``shard`` outside 0..63 raises ValueError.
- Shapes describe at most ``MAX_LEVELS`` = 64 levels (the ``+`` mask is one u64). A deeper
  filter is stored as the ``#`` filter of its first 64 levels: a superset, false positives
  only. Topics of any depth are matched.
- Keys 0 and 1 mark empty and deleted slots; a hash landing there is moved to 2 or 3 (both
  sides agree, the only effect is a 2**-63 false-positive chance).

Concurrency
-----------
A seqlock: header word ``GEN`` is odd while a write is in progress and grows by 2 per
published change. A reader reads GEN, does its lookup, reads GEN again and retries if it
changed or was odd; the writer never writes the last slot of the table, so even a torn
read terminates, and values computed from torn reads are discarded. A writer that stays
odd for STALL_SECONDS (dead mid-write) makes readers answer ``FULL_MASK`` rather than hang.
This relies on x86-64 ordering (stores are not reordered with stores, loads not with
loads); CPython emits no fences, so a weakly-ordered CPU would need them.

GEN is also the validator of the shards' local match caches: it changes on every change of
the answer set, and it is seeded from the wall clock at creation (ns x 2) so a restarted
router never re-issues a generation an old cache was keyed on.

Growth and rebuilds never happen in place: the writer builds a new, larger (or compacted)
data segment, publishes its name in the fixed-size *root* segment (its own seqlock), then
marks the old segment RETIRED and leaves its GEN odd for good. A reader of the old segment
fails its GEN check, sees RETIRED, re-opens the root by name and attaches the new segment;
a name already unlinked just makes it read the root again. The writer can therefore unlink
the old segment at once: mappings stay valid after unlink. If no root can be opened (router
down), readers answer ``FULL_MASK`` and retry every RETRY_SECONDS.
"""

from __future__ import annotations

import os
import time
from itertools import accumulate
from typing import TYPE_CHECKING, Protocol

import numpy as np
import xxhash

if TYPE_CHECKING:
    from typing_extensions import Buffer  # bytearray, mmap, numpy arrays: any writable buffer

__all__ = [
    "FULL_MASK", "MAX_LEVELS", "MAX_SHARDS", "MemorySegments", "Segments", "TopicIndex", "pick_shard",
]

_xxh = xxhash.xxh3_64_intdigest

M64 = (1 << 64) - 1
MAX_SHARDS = 64
MAX_LEVELS = 64
# The conservative answer when the index cannot be read: every shard. Callers AND it with
# the set of live shards.
FULL_MASK = M64

# Default ``+``-shape budget. Real deployments use tens of shapes; 256 keeps the worst
# case near 256 probes (~60 µs) per cache miss while never coarsening a sane workload.
DEFAULT_MAX_SHAPES = 256
# Smallest table (slots): small enough for unit tests, big enough that a fresh router does
# not rebuild during its first subscriptions.
MIN_CAPACITY = 64
# Rebuild when live + deleted slots pass this fraction of the home slots; a rebuild sizes
# the table so that live keys are at most a quarter of it. Linear probing at 0.5 costs
# ~2.5 slot reads per miss, ~1.4 at 0.25.
MAX_LOAD_NUM, MAX_LOAD_DEN = 1, 2
# A writer odd for this long is taken as dead mid-write; readers stop waiting for it.
STALL_SECONDS = 0.2
# While no index is reachable, readers retry attaching at most this often.
RETRY_SECONDS = 0.05

_EMPTY = 0
_TOMB = 1
_GOLDEN = 0x9E3779B97F4A7C15
_GROUP_SALT = 0x5F3759DF2545F491

DATA_MAGIC = int.from_bytes(b"shoalIDX", "little")
ROOT_MAGIC = int.from_bytes(b"shoalRT1", "little")
LAYOUT_VERSION = 1

# Data segment header, in u64 words.
H_MAGIC = 0
H_LAYOUT = 1
H_GEN = 2        # seqlock; odd while writing; odd forever once retired
H_RETIRED = 3    # 1 once a newer segment replaced this one
H_EPOCH = 4
H_SECRET = 5     # hash seed of this index
H_CAP = 6        # home slots (power of two)
H_SLOTS = 7      # home slots + overflow tail (probes never wrap)
H_SHAPECAP = 8
H_NSHAPES = 9
H_SHAPEGEN = 10  # changes whenever the shape table changes
H_LIVE = 11
H_TOMBS = 12
H_OWNER = 13     # writer pid, for stale-segment cleanup
H_SEEN = 14      # OR of every shard bit ever set (diagnostics)
H_OWNER_START = 15  # the writer's start time (/proc), so a reused pid is not taken as it
HDR_WORDS = 16
SHAPE_WORDS = 4  # L, hash flag, plus mask, const

# Root segment: magic, seqlock, epoch, owner pid, name length, then the name.
R_MAGIC = 0
R_GEN = 1
R_EPOCH = 2
R_OWNER = 3
R_NAMELEN = 4
R_OWNER_START = 5
R_NAME_OFFSET = 64
ROOT_BYTES = 256
MAX_NAME = ROOT_BYTES - R_NAME_OFFSET

_OK, _RETRY, _DOWN = 0, 1, 2


def pick_shard(mask: int, token: int) -> int:
    """The one shard of ``mask`` that every process picks for ``token`` (e.g. a message id).

    Pure integer arithmetic, so all shards agree; -1 when the mask is empty.
    """
    count = mask.bit_count()
    if not count:
        return -1
    k = token % count
    while k:
        mask &= mask - 1
        k -= 1
    return (mask & -mask).bit_length() - 1


def process_start(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (/proc), 0 if unknown.

    Recorded beside the writer's pid: in a container a restarted router often gets the
    same pid as the one that crashed, and must not mistake the old segments for live ones.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tail(cap: int) -> int:
    # Overflow slots after the home slots, so probes never wrap (the reader's step is a
    # bare `i += 1`). A run that would reach the last slot triggers a rebuild instead;
    # at load <= 0.5 the longest run in 2**21 slots is well under 200.
    return 32 + 8 * cap.bit_length()


def _segment_words(cap: int, shapecap: int) -> int:
    return HDR_WORDS + SHAPE_WORDS * shapecap + 2 * (cap + _tail(cap))


def _words(buf: Buffer) -> memoryview:
    return memoryview(buf).cast("B").cast("Q")


def _encode(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates: still hash something stable
        return text.encode("utf-8", "surrogatepass")


class Segments(Protocol):
    """Where the index's buffers live: plain memory for tests, POSIX shm in production."""

    def create_root(self) -> Buffer: ...

    def open_root(self) -> Buffer | None: ...

    def unlink_root(self) -> None: ...

    def create(self, epoch: int, nbytes: int) -> tuple[str, Buffer]: ...

    def open(self, name: str) -> Buffer | None: ...

    def close(self, buf: Buffer) -> None: ...

    def unlink(self, name: str) -> None: ...


class MemorySegments:
    """Segments in process memory. A writer and readers built on the same object behave
    like processes sharing shm (readers keep the buffers they hold after ``unlink``)."""

    def __init__(self) -> None:
        self.buffers: dict[str, bytearray] = {}
        self.root: bytearray | None = None

    def create_root(self) -> bytearray:
        if self.root is not None:
            raise FileExistsError("root already exists")
        self.root = bytearray(ROOT_BYTES)
        return self.root

    def open_root(self) -> bytearray | None:
        return self.root

    def unlink_root(self) -> None:
        self.root = None

    def create(self, epoch: int, nbytes: int) -> tuple[str, bytearray]:
        name = f"mem.{epoch}"
        if name in self.buffers:
            raise FileExistsError(name)
        buf = bytearray(nbytes)
        self.buffers[name] = buf
        return name, buf

    def open(self, name: str) -> bytearray | None:
        return self.buffers.get(name)

    def close(self, buf: Buffer) -> None:
        pass

    def unlink(self, name: str) -> None:
        self.buffers.pop(name, None)


def read_root(root: memoryview) -> tuple[str, int] | None:
    """(data segment name, epoch) from a root view, or None if it holds none.

    ``root`` is the u64 view of the root buffer; the name is read under its seqlock.
    """
    raw = root.cast("B")
    for _ in range(1000):
        g = root[R_GEN]
        if g & 1:
            os.sched_yield()
            continue
        if root[R_MAGIC] != ROOT_MAGIC:
            return None
        n = root[R_NAMELEN]
        epoch = root[R_EPOCH]
        name = bytes(raw[R_NAME_OFFSET:R_NAME_OFFSET + min(n, MAX_NAME)])
        if root[R_GEN] == g:
            return (name.decode(), epoch) if n else None
    return None


class TopicIndex:
    """Filter index shared by one writer and many readers; see the module docstring.

    ``TopicIndex()`` is a writer over private memory (unit tests). ``TopicIndex(segments)``
    creates the index in ``segments``; ``TopicIndex(segments, writer=False)`` attaches a
    reader to the index published there (FileNotFoundError if none).
    """

    def __init__(self, segments: Segments | None = None, *, capacity: int = 1 << 10,
                 max_shapes: int = DEFAULT_MAX_SHAPES, writer: bool = True) -> None:
        self._segments: Segments = segments if segments is not None else MemorySegments()
        self._writer = writer
        self._buf: Buffer | None = None
        self._root_buf: Buffer | None = None  # writer only: the root it publishes through
        self._root: memoryview | None = None
        self._name = ""
        self._mv: memoryview = memoryview(bytearray(8 * HDR_WORDS)).cast("Q")
        self._keys: memoryview = self._mv
        self._vals: memoryview = self._mv
        self._mask = 0
        self._secret = -1
        self._plans: dict[int, tuple[int, tuple[tuple[int, int], ...],
                                     tuple[tuple[int, int, tuple[int, ...]], ...]]] = {}
        self._shape_rows: tuple[tuple[int, int, int, int], ...] = ()
        self._shape_gen = -1
        self._gen_seen = -1
        self._spins = 0
        self._stall_since = 0.0
        self._stuck = -1  # an odd GEN we stopped waiting for: never wait for it again
        self._down_until = 0.0
        self._creator = False
        self._unlinked = False
        if writer:
            self._init_writer(capacity, max_shapes)
        elif not self._reattach():
            raise FileNotFoundError("no topic index is published in these segments")

    # ------------------------------------------------------------------ derived hashing

    def _derive(self, secret: int) -> None:
        if secret == self._secret:
            return
        self._secret = secret
        seeds = tuple((secret + (i + 1) * _GOLDEN) & M64 for i in range(MAX_LEVELS))
        self._seedp = tuple(seeds[:k] for k in range(MAX_LEVELS + 1))
        self._plus = tuple(_xxh(b"+", s) for s in seeds)
        self._tags = tuple((_xxh(bytes((0, n, 0)), secret), _xxh(bytes((0, n, 1)), secret))
                           for n in range(MAX_LEVELS + 1))
        self._group_seed = secret ^ _GROUP_SALT

    def _key(self, levels: list[bytes], n: int, hashed: int) -> int:
        k = (sum(map(_xxh, levels, self._seedp[n])) + self._tags[n][hashed]) & M64
        return k if k > 1 else k + 2

    def _group_key(self, group: str, filt: str) -> int:
        k = _xxh(_encode(group) + b"\x00" + _encode(filt), self._group_seed)
        return k if k > 1 else k + 2

    def _shape_const(self, n: int, hashed: int, plus: int) -> int:
        c = self._tags[n][hashed]
        for i in range(n):
            if plus >> i & 1:
                c += self._plus[i]
        return c & M64

    # ------------------------------------------------------------------ reader side

    def generation(self) -> int:
        """Changes whenever any answer may have changed; key local caches on it."""
        g = self._mv[H_GEN]
        if g & 1:
            return self._generation_slow(g)
        return g

    def _generation_slow(self, g: int) -> int:
        if self._mv[H_RETIRED] and self._reattach_limited():
            return self._mv[H_GEN]
        return g

    def match(self, topic: str) -> int:
        """Bitmask of the shards with a subscription matching ``topic`` (a superset)."""
        levels = _encode(topic).split(b"/")
        n = len(levels)
        pkey = n if n <= MAX_LEVELS else MAX_LEVELS + 1
        if topic[:1] == "$":
            pkey = -1 - pkey
        while True:
            hdr = self._mv
            g = hdr[H_GEN]
            if g != self._gen_seen:
                r = self._sync(g)
                if r:
                    if r == _DOWN:
                        return FULL_MASK
                    continue
            plan = self._plans.get(pkey)
            if plan is None:
                plan = self._plan(n, pkey < 0)
            need, plain, plussed = plan
            h = list(map(_xxh, levels, self._seedp[need]))
            p = list(accumulate(h, initial=0))
            keys = self._keys
            vals = self._vals
            mask = self._mask
            m = 0
            for n_, c in plain:
                k = (p[n_] + c) & M64
                if k < 2:
                    k += 2
                i = k & mask
                while True:
                    kk = keys[i]
                    if kk == k:
                        m |= vals[i]
                        break
                    if not kk:
                        break
                    i += 1
            for n_, c, pos in plussed:
                k = p[n_] + c
                for j in pos:
                    k -= h[j]
                k &= M64
                if k < 2:
                    k += 2
                i = k & mask
                while True:
                    kk = keys[i]
                    if kk == k:
                        m |= vals[i]
                        break
                    if not kk:
                        break
                    i += 1
            if hdr[H_GEN] == g:
                return m

    def group_shards(self, group: str, filt: str) -> int:
        """Bitmask of the shards with members of ``$share/group/filt`` (exact lookup)."""
        while True:
            hdr = self._mv
            g = hdr[H_GEN]
            if g != self._gen_seen:
                r = self._sync(g)
                if r:
                    if r == _DOWN:
                        return FULL_MASK
                    continue
            k = self._group_key(group, filt)
            keys = self._keys
            i = k & self._mask
            m = 0
            while True:
                kk = keys[i]
                if kk == k:
                    m = self._vals[i]
                    break
                if not kk:
                    break
                i += 1
            if hdr[H_GEN] == g:
                return m

    def _sync(self, g: int) -> int:
        """Bring the reader up to generation ``g``: _OK, _RETRY or _DOWN."""
        hdr = self._mv
        if g & 1:
            if hdr[H_RETIRED]:
                self._spins = 0
                return _RETRY if self._reattach_limited() else _DOWN
            # A write is in progress: a few µs normally; yield so a writer sharing our CPU
            # can finish, and give up on one that died mid-write.
            if g == self._stuck:
                return _DOWN
            self._spins += 1
            if self._spins == 1:
                self._stall_since = time.monotonic()
            elif self._spins > 16:
                os.sched_yield()
                if time.monotonic() - self._stall_since > STALL_SECONDS:
                    self._spins = 0
                    self._stuck = g
                    return _DOWN
            return _RETRY
        self._spins = 0
        sg = hdr[H_SHAPEGEN]
        if sg != self._shape_gen:
            shapecap = hdr[H_SHAPECAP]
            count = min(hdr[H_NSHAPES], shapecap)
            base = HDR_WORDS
            rows = []
            for r in range(count):
                o = base + SHAPE_WORDS * r
                rows.append((hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]))
            if hdr[H_GEN] != g:
                return _RETRY
            self._shape_rows = tuple(rows)
            self._shape_gen = sg
            self._plans = {}
        self._gen_seen = g
        return _OK

    def _plan(self, n: int, dollar: bool) -> tuple[int, tuple[tuple[int, int], ...],
                                                   tuple[tuple[int, int, tuple[int, ...]], ...]]:
        """Shapes that can match a topic of ``n`` levels, ready for the probe loop."""
        plain: list[tuple[int, int]] = []
        plussed: list[tuple[int, int, tuple[int, ...]]] = []
        need = 0
        for length, hashed, plus, const in self._shape_rows:
            # defensive: whatever a row says, it never indexes past the topic's levels
            if length > MAX_LEVELS or (length > n if hashed else length != n):
                continue
            if dollar and (plus & 1 or (hashed and length == 0)):
                continue  # [MQTT-4.7.2-1]
            need = max(need, length)
            if plus:
                plussed.append((length, const, tuple(i for i in range(length) if plus >> i & 1)))
            else:
                plain.append((length, const))
        plan = (need, tuple(plain), tuple(plussed))
        nk = min(n, MAX_LEVELS + 1)
        self._plans[-1 - nk if dollar else nk] = plan
        return plan

    def _reattach_limited(self) -> bool:
        now = time.monotonic()
        if now < self._down_until:
            return False
        if self._reattach():
            self._down_until = 0.0
            return True
        self._down_until = now + RETRY_SECONDS
        return False

    def _reattach(self) -> bool:
        """Attach the data segment the root names now; False if there is none."""
        root_buf = self._segments.open_root()
        if root_buf is None:
            return False
        root = _words(root_buf)
        try:
            for attempt in range(64):
                if attempt:
                    os.sched_yield()
                found = read_root(root)
                if found is None:
                    return False
                name, epoch = found
                buf = self._segments.open(name)
                if buf is None:
                    continue  # replaced and unlinked since we read the root
                mv = _words(buf)
                if (len(mv) < HDR_WORDS or mv[H_MAGIC] != DATA_MAGIC or mv[H_LAYOUT] != LAYOUT_VERSION
                        or mv[H_RETIRED] or mv[H_EPOCH] != epoch):
                    del mv
                    self._segments.close(buf)
                    continue
                self._bind(buf, name, mv)
                return True
            return False
        finally:
            del root
            self._segments.close(root_buf)

    def _bind(self, buf: Buffer, name: str, mv: memoryview, close_old: bool = True) -> None:
        old = self._buf
        self._keys = self._vals = self._mv = mv
        self._buf = None
        if old is not None and close_old:
            self._segments.close(old)
        cap = mv[H_CAP]
        slots = mv[H_SLOTS]
        ko = HDR_WORDS + SHAPE_WORDS * mv[H_SHAPECAP]
        self._buf = buf
        self._name = name
        self._keys = mv[ko:ko + slots]
        self._vals = mv[ko + slots:ko + 2 * slots]
        self._mask = cap - 1
        self._derive(mv[H_SECRET])
        self._gen_seen = -1
        self._shape_gen = -1
        self._plans = {}

    def close(self) -> None:
        """Drop this process's mappings (the segments stay until the writer's ``unlink``)."""
        root_buf, self._root_buf, self._root = self._root_buf, None, None
        if root_buf is not None:
            self._segments.close(root_buf)
        empty = memoryview(bytearray(8 * HDR_WORDS)).cast("Q")
        empty[H_GEN] = 1
        empty[H_RETIRED] = 1
        self._mv = self._keys = self._vals = empty
        buf, self._buf = self._buf, None
        if buf is not None:
            self._segments.close(buf)
        self._writer = False
        self._down_until = float("inf")  # closed: never re-attach, answer FULL_MASK

    def __enter__(self) -> TopicIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer side

    def _init_writer(self, capacity: int, max_shapes: int) -> None:
        self._creator = True
        self._derive(int.from_bytes(os.urandom(8), "little"))
        self._max_shapes = max_shapes
        self._min_cap = _pow2(max(MIN_CAPACITY, 2 * capacity))
        # (key << 6 | shard) -> subscriptions beyond the first (the first is the bit)
        self._extra: dict[int, int] = {}
        # (natural key << 6 | shard) -> registrations stored under the coarsened key
        self._coarse: dict[int, int] = {}
        # shape id (sid) bookkeeping; sids are stable, rows in shm move on removal
        self._sid_of: dict[int, int] = {}
        self._sid_shape: list[int] = []
        self._sid_refs: list[int] = []
        self._sid_row: list[int] = []
        self._row_sid: list[int] = []
        self._free_sids: list[int] = []
        self._nplus = 0
        self._epoch = 0
        self._root_buf = self._segments.create_root()
        root = self._root = _words(self._root_buf)
        root[R_MAGIC] = ROOT_MAGIC
        root[R_OWNER] = os.getpid()
        root[R_OWNER_START] = process_start(os.getpid())
        cap = self._min_cap
        slots = cap + _tail(cap)
        name, buf = self._new_segment(cap, 16, time.time_ns() << 1)
        self._slot_sid = np.full(slots, -1, np.int32)
        self._publish(name, buf)

    def _require_writer(self) -> None:
        if not self._writer:
            raise PermissionError("this TopicIndex is a reader (or closed)")

    @staticmethod
    def _check_shard(shard: int) -> int:
        if not 0 <= shard < MAX_SHARDS:
            raise ValueError(f"shard {shard} outside 0..{MAX_SHARDS - 1}")
        return 1 << shard

    def _natural(self, filt: str) -> tuple[int, int, int, int, list[bytes]]:
        """(key, levels, hash flag, plus mask, level bytes) of a filter as stored."""
        levels = _encode(filt).split(b"/")
        hashed = 0
        if levels[-1] == b"#":
            levels.pop()
            hashed = 1
        if len(levels) > MAX_LEVELS:
            del levels[MAX_LEVELS:]  # deeper than a shape can say: its 64-level prefix + '#'
            hashed = 1
        n = len(levels)
        plus = 0
        if b"+" in levels:
            for i, lv in enumerate(levels):
                if lv == b"+":
                    plus |= 1 << i
        return self._key(levels, n, hashed), n, hashed, plus, levels

    def _coarse_key(self, levels: list[bytes], plus: int) -> tuple[int, int]:
        n = (plus & -plus).bit_length() - 1  # levels before the first '+'
        return self._key(levels[:n], n, 1), n

    def add(self, filt: str, shard: int) -> None:
        """Register one subscription of ``shard`` to ``filt`` (the real, unshared filter)."""
        self._require_writer()
        self._check_shard(shard)
        key, n, hashed, plus, levels = self._natural(filt)
        skey = n | hashed << 7 | plus << 8
        if plus and skey not in self._sid_of and self._nplus >= self._max_shapes:
            ck, cn = self._coarse_key(levels, plus)
            x = key << 6 | shard
            self._coarse[x] = self._coarse.get(x, 0) + 1
            self._add_key(ck, cn | 1 << 7, shard)
        else:
            self._add_key(key, skey, shard)

    def remove(self, filt: str, shard: int) -> None:
        """Undo one ``add(filt, shard)``; unknown pairs are ignored."""
        self._require_writer()
        bit = self._check_shard(shard)
        key, n, hashed, plus, levels = self._natural(filt)
        slot = self._find(key)[0]
        if slot >= 0 and self._vals[slot] & bit:
            self._drop(slot, key, shard)
            return
        x = key << 6 | shard
        c = self._coarse.get(x)
        if c:
            if c == 1:
                del self._coarse[x]
            else:
                self._coarse[x] = c - 1
            ck = self._coarse_key(levels, plus)[0]
            slot = self._find(ck)[0]
            if slot >= 0 and self._vals[slot] & bit:
                self._drop(slot, ck, shard)

    def add_group(self, group: str, filt: str, shard: int) -> None:
        """Register one member on ``shard`` of the shared subscription ``$share/group/filt``."""
        self._require_writer()
        self._check_shard(shard)
        self._add_key(self._group_key(group, filt), -1, shard)

    def remove_group(self, group: str, filt: str, shard: int) -> None:
        self._require_writer()
        bit = self._check_shard(shard)
        key = self._group_key(group, filt)
        slot = self._find(key)[0]
        if slot >= 0 and self._vals[slot] & bit:
            self._drop(slot, key, shard)

    def _find(self, key: int) -> tuple[int, int]:
        """(slot holding key or -1, first slot an insert would use)."""
        keys = self._keys
        i = key & self._mask
        free = -1
        while True:
            kk = keys[i]
            if kk == key:
                return i, free
            if kk == _EMPTY:
                return -1, (i if free < 0 else free)
            if kk == _TOMB and free < 0:
                free = i
            i += 1

    def _add_key(self, key: int, skey: int, shard: int) -> None:
        bit = 1 << shard
        slot, free = self._find(key)
        hdr = self._mv
        vals = self._vals
        if slot >= 0:
            v = vals[slot]
            if v & bit:
                x = key << 6 | shard
                self._extra[x] = self._extra.get(x, 0) + 1
                return
            g = hdr[H_GEN]
            hdr[H_GEN] = g + 1
            vals[slot] = v | bit
            hdr[H_SEEN] |= bit
            hdr[H_GEN] = g + 2
            return
        sid = self._sid_of.get(skey, -1) if skey >= 0 else -1
        new_shape = skey >= 0 and sid < 0
        cap = self._mask + 1
        reuse = self._keys[free] == _TOMB
        if free >= len(self._keys) - 1:
            # the run reached the end of the tail: only a bigger table shortens it
            self._migrate(2 * cap, hdr[H_SHAPECAP])
            self._add_key(key, skey, shard)
            return
        if not reuse and (hdr[H_LIVE] + hdr[H_TOMBS] + 1) * MAX_LOAD_DEN > cap * MAX_LOAD_NUM:
            self._migrate(self._cap_for(hdr[H_LIVE]), hdr[H_SHAPECAP])
            self._add_key(key, skey, shard)
            return
        if new_shape and hdr[H_NSHAPES] >= hdr[H_SHAPECAP]:
            self._migrate(cap, 2 * hdr[H_SHAPECAP])
            self._add_key(key, skey, shard)
            return
        if new_shape:
            sid = self._new_sid(skey)
        keys = self._keys
        g = hdr[H_GEN]
        hdr[H_GEN] = g + 1
        try:
            if new_shape:
                self._write_shape_row(sid)
            keys[free] = key
            vals[free] = bit
            if reuse:
                hdr[H_TOMBS] -= 1
            hdr[H_LIVE] += 1
            hdr[H_SEEN] |= bit
        finally:
            hdr[H_GEN] = g + 2
        self._slot_sid[free] = sid
        if sid >= 0:
            self._sid_refs[sid] += 1

    def _drop(self, slot: int, key: int, shard: int) -> None:
        """Remove one subscription of ``shard`` from the key in ``slot`` (its bit is set)."""
        x = key << 6 | shard
        c = self._extra.get(x)
        if c:
            if c == 1:
                del self._extra[x]
            else:
                self._extra[x] = c - 1
            return
        hdr = self._mv
        keys = self._keys
        vals = self._vals
        v = vals[slot] & ~(1 << shard)
        g = hdr[H_GEN]
        hdr[H_GEN] = g + 1
        try:
            vals[slot] = v
            if not v:
                keys[slot] = _TOMB
                hdr[H_LIVE] -= 1
                hdr[H_TOMBS] += 1
                if keys[slot + 1] == _EMPTY:
                    # No probe path crosses a deleted slot followed by an empty one, so
                    # the deleted run ending here can become empty again.
                    j = slot
                    while j >= 0 and keys[j] == _TOMB:
                        keys[j] = _EMPTY
                        hdr[H_TOMBS] -= 1
                        j -= 1
                sid = int(self._slot_sid[slot])
                self._slot_sid[slot] = -1
                if sid >= 0:
                    self._sid_refs[sid] -= 1
                    if not self._sid_refs[sid]:
                        self._drop_shape(sid)
        finally:
            hdr[H_GEN] = g + 2

    def remove_shard(self, shard: int) -> None:
        """Forget every subscription of ``shard`` (it died or was drained)."""
        self._require_writer()
        bit = self._check_shard(shard)
        self._extra = {x: c for x, c in self._extra.items() if x & 63 != shard}
        self._coarse = {x: c for x, c in self._coarse.items() if x & 63 != shard}
        keys, vals = self._arrays()
        idx = np.flatnonzero(vals & np.uint64(bit))
        if not idx.size:
            return
        newv = vals[idx] & np.uint64(M64 ^ bit)
        dead = idx[newv == 0]
        sids = self._slot_sid[dead]
        counts = np.bincount(sids[sids >= 0]) if dead.size else np.zeros(0, np.int64)
        hdr = self._mv
        g = hdr[H_GEN]
        hdr[H_GEN] = g + 1
        try:
            vals[idx] = newv
            keys[dead] = _TOMB
            hdr[H_LIVE] -= int(dead.size)
            hdr[H_TOMBS] += int(dead.size)
            self._slot_sid[dead] = -1
            for sid in np.flatnonzero(counts).tolist():
                self._sid_refs[sid] -= int(counts[sid])
                if not self._sid_refs[sid]:
                    self._drop_shape(sid)
        finally:
            hdr[H_GEN] = g + 2
        del keys, vals, idx, newv, dead
        cap = self._mask + 1
        live = hdr[H_LIVE]
        if hdr[H_TOMBS] * 8 > cap or (cap > self._min_cap and live * 16 < cap):
            self._migrate(self._cap_for(live), hdr[H_SHAPECAP])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views of the key and value arrays, for bulk work (they pin the mapping:
        drop them before the segment is closed)."""
        mv = self._mv
        slots = mv[H_SLOTS]
        ko = HDR_WORDS + SHAPE_WORDS * mv[H_SHAPECAP]
        assert self._buf is not None
        a = np.frombuffer(memoryview(self._buf), dtype=np.uint64, count=ko + 2 * slots)
        return a[ko:ko + slots], a[ko + slots:ko + 2 * slots]

    def _cap_for(self, live: int) -> int:
        return max(self._min_cap, _pow2(4 * live))

    # shapes ---------------------------------------------------------------------------

    def _new_sid(self, skey: int) -> int:
        if self._free_sids:
            sid = self._free_sids.pop()
            self._sid_shape[sid] = skey
            self._sid_refs[sid] = 0
        else:
            sid = len(self._sid_shape)
            self._sid_shape.append(skey)
            self._sid_refs.append(0)
            self._sid_row.append(-1)
        self._sid_of[skey] = sid
        if skey >> 8:
            self._nplus += 1
        return sid

    def _write_shape_row(self, sid: int) -> None:
        """Append the shape ``sid`` to the shm table (inside a write)."""
        hdr = self._mv
        row = hdr[H_NSHAPES]
        skey = self._sid_shape[sid]
        n, hashed, plus = skey & 127, skey >> 7 & 1, skey >> 8
        o = HDR_WORDS + SHAPE_WORDS * row
        hdr[o] = n
        hdr[o + 1] = hashed
        hdr[o + 2] = plus
        hdr[o + 3] = self._shape_const(n, hashed, plus)
        hdr[H_NSHAPES] = row + 1
        hdr[H_SHAPEGEN] += 1
        self._sid_row[sid] = row
        self._row_sid.append(sid)

    def _drop_shape(self, sid: int) -> None:
        """Remove shape ``sid`` from the shm table (inside a write): the last row moves."""
        hdr = self._mv
        row = self._sid_row[sid]
        last = hdr[H_NSHAPES] - 1
        if row != last:
            o, ol = HDR_WORDS + SHAPE_WORDS * row, HDR_WORDS + SHAPE_WORDS * last
            for w in range(SHAPE_WORDS):
                hdr[o + w] = hdr[ol + w]
            moved = self._row_sid[last]
            self._row_sid[row] = moved
            self._sid_row[moved] = row
        self._row_sid.pop()
        hdr[H_NSHAPES] = last
        hdr[H_SHAPEGEN] += 1
        skey = self._sid_shape[sid]
        del self._sid_of[skey]
        if skey >> 8:
            self._nplus -= 1
        self._sid_row[sid] = -1
        self._free_sids.append(sid)

    # segments -------------------------------------------------------------------------

    def _new_segment(self, cap: int, shapecap: int, gen: int) -> tuple[str, Buffer]:
        self._epoch += 1
        name, buf = self._segments.create(self._epoch, 8 * _segment_words(cap, shapecap))
        mv = _words(buf)
        mv[H_MAGIC] = DATA_MAGIC
        mv[H_LAYOUT] = LAYOUT_VERSION
        mv[H_GEN] = gen
        mv[H_EPOCH] = self._epoch
        mv[H_SECRET] = self._secret
        mv[H_CAP] = cap
        mv[H_SLOTS] = cap + _tail(cap)
        mv[H_SHAPECAP] = shapecap
        mv[H_OWNER] = os.getpid()
        mv[H_OWNER_START] = process_start(os.getpid())
        return name, buf

    def _publish(self, name: str, buf: Buffer) -> None:
        """Point the root at ``name`` and switch the writer to it."""
        raw = name.encode()
        if len(raw) > MAX_NAME:
            raise ValueError(f"segment name longer than {MAX_NAME} bytes: {name!r}")
        root = self._root
        assert root is not None  # writers always hold their root
        g = root[R_GEN]
        root[R_GEN] = g + 1
        rb = root.cast("B")
        rb[R_NAME_OFFSET:R_NAME_OFFSET + len(raw)] = raw
        root[R_NAMELEN] = len(raw)
        root[R_EPOCH] = self._epoch
        root[R_GEN] = g + 2
        self._bind(buf, name, _words(buf), close_old=False)

    def _layout(self, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Where the live keys go in a table of ``cap`` home slots: (positions, keys,
        values, shape ids, cap), cap doubled until the longest run fits the tail."""
        keys, vals = self._arrays()
        live = np.flatnonzero(keys > _TOMB)
        k = keys[live]
        v = vals[live]
        s = self._slot_sid[live]
        while True:
            home = (k & np.uint64(cap - 1)).astype(np.int64)
            order = np.argsort(home, kind="stable")
            home = home[order]
            step = np.arange(home.size, dtype=np.int64)
            # Linear probing without wrap-around, in home order: each key lands on its
            # home slot or right after the previous key, whichever is later.
            pos = np.maximum.accumulate(home - step) + step if home.size else home
            if not pos.size or pos[-1] < cap + _tail(cap) - 1:
                return pos, k[order], v[order], s[order], cap
            cap *= 2

    def _migrate(self, cap: int, shapecap: int) -> None:
        """Rebuild into a new segment (grown, shrunk or compacted) and retire the old."""
        old_mv = self._mv
        pos, k, v, s, cap = self._layout(cap)
        g = old_mv[H_GEN]
        name, buf = self._new_segment(cap, shapecap, g + 2)
        mv = _words(buf)
        slots = cap + _tail(cap)
        nshapes = old_mv[H_NSHAPES]
        for w in range(HDR_WORDS, HDR_WORDS + SHAPE_WORDS * nshapes):
            mv[w] = old_mv[w]
        for w in (H_NSHAPES, H_SHAPEGEN, H_SEEN):
            mv[w] = old_mv[w]
        mv[H_LIVE] = int(k.size)
        mv[H_TOMBS] = 0
        a = np.frombuffer(memoryview(buf), dtype=np.uint64)
        ko = HDR_WORDS + SHAPE_WORDS * shapecap
        a[ko + pos] = k
        a[ko + slots + pos] = v
        del a, mv
        sid = np.full(slots, -1, np.int32)
        sid[pos] = s
        old_buf, old_name = self._buf, self._name
        self._slot_sid = sid
        self._publish(name, buf)
        # Readers of the old segment fail their GEN check from here on and re-attach.
        old_mv[H_RETIRED] = 1
        old_mv[H_GEN] = g + 1
        del old_mv
        if old_buf is not None:
            self._segments.close(old_buf)
        self._segments.unlink(old_name)

    def unlink(self) -> None:
        """Writer shutdown: retire the index (readers answer FULL_MASK) and remove its names.

        Works before or after ``close`` and is idempotent; readers may not unlink.
        """
        if not self._creator:
            raise PermissionError("only the writer that created the index unlinks it")
        if self._unlinked:
            return
        buf = self._buf if self._buf is not None else self._segments.open(self._name)
        if buf is not None:
            mv = _words(buf)
            if mv[H_MAGIC] == DATA_MAGIC and mv[H_SECRET] == self._secret:
                mv[H_RETIRED] = 1
                mv[H_GEN] = mv[H_GEN] | 1
            del mv
            if buf is not self._buf:
                self._segments.close(buf)
        self._segments.unlink(self._name)
        self._segments.unlink_root()
        self._unlinked = True
        self._writer = False

    # stats ----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Sizes for benchmarks and the dashboard."""
        mv = self._mv
        cap, slots, shapecap = mv[H_CAP], mv[H_SLOTS], mv[H_SHAPECAP]
        return {
            "generation": mv[H_GEN], "epoch": mv[H_EPOCH], "capacity": cap, "slots": slots,
            "keys": mv[H_LIVE], "tombstones": mv[H_TOMBS], "shapes": mv[H_NSHAPES],
            "shm_bytes": 8 * _segment_words(cap, shapecap),
            "private_bytes": int(self._slot_sid.nbytes) if self._writer else 0,
        }
