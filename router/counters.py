"""Connections open on the host, per shard and listener, in one shared page.

One row per shard, one column per count (all connections, then one per listener), in a
memfd the router creates when it learns N and hands to every shard with its listening
sockets. Each shard writes only its own row, so no lock is needed; a shard deciding whether
to admit a connection adds up one column over N rows (N reads of ~30 ns). Two shards
admitting at the same instant can each see room for one more, so a host-wide limit can be
passed by at most N - 1 connections: close enough for a memory guard, and exact when the
host is not at its limit, unlike splitting the limit into N per-shard shares, which refuses
on a busy shard while another has room.

The router zeroes a shard's row before it welcomes that shard's next incarnation: a shard
that died took its connections with it.
"""

from __future__ import annotations

import mmap
import os

COLUMNS = ("total", "tcp", "tls", "ws", "wss", "quic")
COLUMN = {name: i for i, name in enumerate(COLUMNS)}
_WORD = 8


def size_for(workers: int) -> int:
    return max(mmap.PAGESIZE, workers * len(COLUMNS) * _WORD)


class HostCounters:
    """The table over any writable buffer of ``size_for(workers)`` bytes."""

    __slots__ = ("buf", "cells", "workers", "width")

    def __init__(self, buf: mmap.mmap | bytearray, workers: int) -> None:
        self.buf = buf
        self.cells = memoryview(buf).cast("q")
        self.workers = workers
        self.width = len(COLUMNS)

    @classmethod
    def create(cls, workers: int) -> tuple[HostCounters, int]:
        """A new zeroed table and the memfd holding it (to send to the shards)."""
        fd = os.memfd_create("shoal-connections", os.MFD_CLOEXEC)
        os.ftruncate(fd, size_for(workers))
        return cls(mmap.mmap(fd, size_for(workers)), workers), fd

    @classmethod
    def attach(cls, fd: int, workers: int) -> HostCounters:
        try:
            return cls(mmap.mmap(fd, size_for(workers)), workers)
        finally:
            os.close(fd)

    def add(self, shard: int, column: int, delta: int) -> None:
        self.cells[shard * self.width + column] += delta

    def count(self, shard: int, listener: str, delta: int) -> None:
        """A connection on ``listener`` opened (+1) or closed (-1): its column and the total."""
        cells, base = self.cells, shard * self.width
        cells[base] += delta
        cells[base + COLUMN[listener]] += delta

    def total(self, column: int) -> int:
        cells, width = self.cells, self.width
        n = 0
        for row in range(self.workers):
            n += cells[row * width + column]
        return n if n > 0 else 0

    def reset(self, shard: int) -> None:
        base = shard * self.width
        for column in range(self.width):
            self.cells[base + column] = 0

    def close(self) -> None:
        self.cells.release()
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
