"""router/counters.py over a plain buffer and over a memfd shared by two mappings."""

from __future__ import annotations

import os

from router.counters import COLUMN, HostCounters, size_for


def test_rows_add_up_per_column_and_reset_per_shard() -> None:
    t = HostCounters(bytearray(size_for(3)), 3)
    for shard, n in ((0, 2), (1, 3), (2, 1)):
        for _ in range(n):
            t.add(shard, 0, 1)
            t.add(shard, COLUMN["tcp"], 1)
    t.add(2, COLUMN["quic"], 1)
    assert t.total(0) == 6 and t.total(COLUMN["tcp"]) == 6 and t.total(COLUMN["quic"]) == 1
    t.reset(1)
    assert t.total(0) == 3
    t.add(0, 0, -5)  # a late decrement after a reset never makes the host count negative
    assert t.total(0) == 0


def test_count_moves_the_listener_column_and_the_total_together() -> None:
    t = HostCounters(bytearray(size_for(2)), 2)
    t.count(0, "quic", 1)
    t.count(1, "quic", 1)
    t.count(1, "tls", 1)
    assert t.total(COLUMN["quic"]) == 2 and t.total(COLUMN["tls"]) == 1 and t.total(0) == 3
    t.count(1, "quic", -1)
    assert t.total(COLUMN["quic"]) == 1 and t.total(0) == 2


def test_a_memfd_table_is_shared_between_mappings() -> None:
    router, fd = HostCounters.create(2)
    shard = HostCounters.attach(os.dup(fd), 2)
    try:
        shard.add(1, COLUMN["ws"], 4)
        assert router.total(COLUMN["ws"]) == 4
        router.reset(1)
        assert shard.total(COLUMN["ws"]) == 0
    finally:
        shard.close()
        router.close()
        os.close(fd)
