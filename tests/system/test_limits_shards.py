"""Host-wide connection limits on 4 shards: counted over every shard, whichever one the
kernel hands a connection to (router/counters.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import broker_kind
from tests.integration import rawclient as rc
from tests.integration.rawclient import RawClient, RawEOF
from tests.system.supervision import Supervised, make_supervised, poll

pytestmark = [pytest.mark.system]

SHARDS = 4
LIMIT = 6


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[Supervised, int]]:
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    sv = make_supervised(tmp_path, SHARDS, runtime=f"[limits]\nmax_connections = {LIMIT}\n")
    try:
        info = sv.wait_ready()
        poll(lambda: len(sv.shard_pids()) == SHARDS, 30, "all shards running")
        yield sv, int(info["listeners"]["tcp"]["port"])
        assert sv.shutdown() == 0
    finally:
        sv.kill_all()
        sv.cleanup_shm()


def _try(port: int, client_id: str) -> RawClient | None:
    """A connected client, or None if the broker closed the connection unanswered."""
    c = RawClient("127.0.0.1", port)
    c.send(rc.connect(client_id, version=5))
    try:
        c.expect(rc.CONNACK)
    except (RawEOF, ConnectionError):
        c.close()
        return None
    return c


def test_the_host_admits_exactly_its_limit_over_all_shards(limited: tuple[Supervised, int]) -> None:
    sv, port = limited
    # With N per-shard shares (ceil(6/4) = 2 each) the kernel's uneven spread would refuse
    # some of the first six; counted host-wide, all six get in and every further one is
    # refused, on whichever shard it lands.
    kept = [_try(port, f"lim{i}") for i in range(LIMIT)]
    assert all(c is not None for c in kept), [c is not None for c in kept]
    extra = [_try(port, f"over{i}") for i in range(8)]
    assert all(c is None for c in extra)
    # a connection that ends frees its place, on any shard
    kept[0].close()  # type: ignore[union-attr]

    def admitted_again() -> bool:
        c = _try(port, "again")
        if c is None:
            return False
        kept[0] = c
        return True
    poll(admitted_again, 10, "a freed place to be taken again")
    for c in kept:
        if c is not None:
            c.close()
    text = "".join(sv.log(f"shard-{k}.log") for k in range(SHARDS))
    assert "over limits.max_connections" in text


def test_flapping_is_counted_over_every_shard(tmp_path: Path) -> None:
    """A client that keeps reconnecting lands on a random shard each time (the kernel hashes
    its new source port); the router counts its disconnects host-wide and every shard then
    refuses it with 0x8A."""
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    sv = make_supervised(tmp_path, SHARDS, runtime=(
        "[auth]\nflapping_max_count = 4\nflapping_window = 60.0\nflapping_ban_time = 60.0\n"))
    try:
        port = int(sv.wait_ready()["listeners"]["tcp"]["port"])
        poll(lambda: len(sv.shard_pids()) == SHARDS, 30, "all shards running")
        for _ in range(4):
            c = _try(port, "flappy")
            assert c is not None
            c.send(rc.disconnect(5))
            assert c.read() is None  # the broker closes after the DISCONNECT
            c.close()

        def refused_everywhere() -> bool:
            # every new connection, on whichever shard, is refused with 0x8A
            for _ in range(SHARDS * 2):
                c = RawClient("127.0.0.1", port)
                c.send(rc.connect("flappy", version=5))
                p = c.read()
                c.close()
                if p is None or p.type != rc.CONNACK or rc.parse_connack(p, 5).code != 0x8A:
                    return False
            return True
        poll(refused_everywhere, 10, "the flapping ban to reach every shard")
        assert "banned on every shard" in sv.log("router.log")
        # a shard restarted during the ban learns of it when it joins the router
        pids = {k: p for p, k in sv.shard_pids().items()}
        for k in range(SHARDS):
            os.kill(pids[k], signal.SIGKILL)
        poll(lambda: len(sv.shard_pids()) == SHARDS
             and not set(sv.shard_pids()) & set(pids.values()), 30, "every shard restarted")
        poll(lambda: sv.log("router.log").count("joined") >= 2 * SHARDS, 30,
             "the restarted shards to rejoin")
        # at once, not after retries: an accepted attempt would count as a new disconnect
        # and the router would ban the id again, hiding a shard that forgot the ban
        assert refused_everywhere()
        assert sv.shutdown() == 0
    finally:
        sv.kill_all()
        sv.cleanup_shm()
