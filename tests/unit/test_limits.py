"""Token buckets, per-shard shares and the log limiter, with time passed in."""

from __future__ import annotations

import pytest

from shards.limits import LogLimiter, TokenBucket, share


def test_bucket_starts_full_and_allows_its_burst() -> None:
    b = TokenBucket(10.0, 10.0, now=0.0)
    assert [b.take(1, 0.0) for _ in range(10)] == [0.0] * 10
    assert b.take(1, 0.0) == pytest.approx(0.1)  # one token short: 1/10 s to refill


def test_bucket_refills_at_rate_and_caps_at_burst() -> None:
    b = TokenBucket(10.0, 5.0, now=0.0)
    for _ in range(5):
        b.take(1, 0.0)
    assert b.take(1, 0.05) == pytest.approx(0.05)  # half a token had come back
    assert b.take(1, 100.0) == 0.0  # long idle: full again, but only burst tokens
    b.level = 5.0
    assert b.take(5, 100.0) == 0.0
    assert b.take(1, 100.0) > 0


def test_bucket_deficit_keeps_long_run_rate_exact() -> None:
    # 1,000 bytes/s; a client sending 4,000-byte chunks and waiting what it is told
    b = TokenBucket(1000.0, 1000.0, now=0.0)
    now, sent = 0.0, 0
    while now < 60.0:
        sent += 4000
        now += b.take(4000, now)
    assert sent / now == pytest.approx(1000.0, rel=0.1)


def test_try_take_refuses_without_spending() -> None:
    b = TokenBucket(2.0, 2.0, now=0.0)
    assert b.try_take(0.0) and b.try_take(0.0)
    assert not b.try_take(0.0)
    assert not b.try_take(0.25)  # half a token
    assert b.try_take(0.5)  # one token
    assert not b.try_take(0.5)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1.0, 0.0)


@pytest.mark.parametrize(("limit", "shards", "want"),
                         [(0, 4, 0), (1000, 1, 1000), (1000, 4, 250), (1001, 4, 251), (3, 8, 1)])
def test_share_is_ceil(limit: int, shards: int, want: int) -> None:
    assert share(limit, shards) == want


def test_log_limiter_counts_what_it_holds_back() -> None:
    lim = LogLimiter(10.0)
    assert lim.allow(0.0) == 0
    assert [lim.allow(t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert lim.allow(10.0) == 3
    assert lim.allow(10.5) is None


# ---- the worker's admission, on a stand-in worker (no sockets, clock passed in)

from types import SimpleNamespace  # noqa: E402

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from shards.config import load_config  # noqa: E402
from tests.harness import to_toml  # noqa: E402
from shards.session import Counters  # noqa: E402
from router.counters import HostCounters, size_for  # noqa: E402
from shards.worker import Worker  # noqa: E402


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


def _stand_in(config: dict, shards: int, counts: HostCounters | None = None,
              index: int = 0) -> SimpleNamespace:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shoal.toml"
        path.write_text(to_toml(config))
        cfg = load_config(path, env={})
    w = SimpleNamespace(cfg=cfg, loop=_Clock(),
                        shard=SimpleNamespace(counters=Counters(), index=index))
    Worker._setup_limits(w, shards, counts)  # type: ignore[arg-type]
    return w


def _admit(w: SimpleNamespace, listener: str = "tcp") -> bool:
    return Worker.admit(w, listener)  # type: ignore[arg-type]


def test_host_limit_is_shared_over_shards() -> None:
    w = _stand_in({"limits": {"max_connections": 10}}, shards=4)  # ceil(10/4) = 3 a shard
    assert [_admit(w) for _ in range(4)] == [True, True, True, False]
    assert w.shard.counters.connections_refused == 1
    Worker.release(w, "tcp")  # type: ignore[arg-type]
    assert _admit(w)


def test_host_limit_counted_over_every_shard_with_shared_counts() -> None:
    # with the router's table every shard sees the host's total: 10 in all, however the
    # kernel spread them (here 7 on one shard, 3 on the other)
    counts = HostCounters(bytearray(size_for(2)), 2)
    a = _stand_in({"limits": {"max_connections": 10}}, shards=2, counts=counts, index=0)
    b = _stand_in({"limits": {"max_connections": 10}}, shards=2, counts=counts, index=1)
    assert all(_admit(a) for _ in range(7))
    assert [_admit(b) for _ in range(4)] == [True, True, True, False]
    assert not _admit(a)
    Worker.release(a, "tcp")  # type: ignore[arg-type]
    assert _admit(b) and not _admit(a)


def test_listener_limit_counts_only_its_listener() -> None:
    w = _stand_in({"listeners": {"ws": {"enabled": True, "port": 0, "max_connections": 2}}},
                  shards=1)
    assert [_admit(w, "ws") for _ in range(3)] == [True, True, False]
    assert all(_admit(w, "tcp") for _ in range(10))


def test_connection_rate_per_shard() -> None:
    # 8/s over 2 shards: 4/s each, burst 4
    w = _stand_in({"listeners": {"tcp": {"max_connection_rate": 8.0}}}, shards=2)
    assert [_admit(w) for _ in range(5)] == [True] * 4 + [False]
    w.loop.now = 0.5  # two tokens back
    assert [_admit(w) for _ in range(3)] == [True, True, False]
    assert w.shard.counters.connections_refused == 2
