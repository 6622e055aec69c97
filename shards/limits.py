"""Token buckets and rate-limited logging for connection and client limits.

Time is always passed in (the loop's clock), so the buckets are tested without
sleeping. A bucket is checked on the hot path (once per PUBLISH for the message
rate, once per read for the byte rate): :meth:`TokenBucket.take` is a few float
operations and never schedules anything; the caller pauses the socket only when
the bucket goes into deficit, and resumes it with one ``call_later`` for the time
the deficit takes to refill.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; starts full.

    :meth:`take` always takes (the work it pays for has already arrived): the level
    may go negative, and ``-level / rate`` is how long the caller should wait before
    taking again. That keeps the long-run rate exact even for items larger than the
    burst (a 1 MB publish under a 100 kB/s byte rate waits 10 s, it is not refused).
    """

    __slots__ = ("rate", "burst", "level", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens; return 0.0, or the seconds until the level is back at 0."""
        level = self.level + (now - self.stamp) * self.rate
        if level > self.burst:
            level = self.burst
        level -= n
        self.level = level
        self.stamp = now
        return 0.0 if level >= 0 else -level / self.rate

    def try_take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are there (admission: a refused item costs nothing)."""
        level = self.level + (now - self.stamp) * self.rate
        if level > self.burst:
            level = self.burst
        self.stamp = now
        if level < n:
            self.level = level
            return False
        self.level = level - n
        return True


def share(limit: int, shards: int) -> int:
    """A host-wide limit's per-shard part: ceil(limit / shards); 0 (unlimited) stays 0.

    Approximate by design: the kernel spreads connections over the SO_REUSEPORT group
    by hash, not evenly, so one shard may refuse while another has room. With 4 shards
    and a limit of 1000 each shard admits 250; the host admits between roughly 250 (all
    on one shard) and 1000.
    """
    if limit <= 0:
        return 0
    return math.ceil(limit / max(1, shards))


class LogLimiter:
    """Say at most one line per ``interval`` seconds; count what was not said."""

    __slots__ = ("interval", "next_at", "suppressed")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = -math.inf
        self.suppressed = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet. Otherwise log now; the value is how many were held back."""
        if now < self.next_at:
            self.suppressed += 1
            return None
        self.next_at = now + self.interval
        held, self.suppressed = self.suppressed, 0
        return held
