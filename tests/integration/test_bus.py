"""The shard-to-shard bus (router/bus.py) over real Unix sockets.

Two layers, both run under uvloop and plain asyncio:

- in one process, several Bus objects on one loop: handshake rules, protocol errors, the
  pending bound, reconnection after a graceful restart;
- real shard processes (this module run as ``python -m tests.integration.test_bus``): every
  pair of 3 shards exchanges frames in order, a peer killed with SIGKILL and restarted is
  reconnected and traffic resumes, and a peer that stops reading (SIGSTOP) does not make the
  sender's memory grow past the bound.

The child process speaks JSON lines: commands on stdin, events on stdout. Tests wait for
events with timeouts, never for fixed sleeps. Each frame is a PUBLISH whose msg_id is a
per-(sender, receiver) sequence number and whose payload is derived from it, so receivers
count gaps and reorders and detect corruption themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router.bus import Bus, socket_path
from router.framing import (
    CONTROL, HELLO, PUBLISH, FrameDecoder, Hello, decode_hello, decode_publish, encode_frame,
    encode_hello, encode_publish,
)

REPO = Path(__file__).resolve().parents[2]
LOOPS = ["uvloop", "asyncio"]
TIMEOUT = 20.0

pytestmark = pytest.mark.integration


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def payload_for(seq: int, size: int) -> bytes:
    return (seq.to_bytes(8, "big") * (size // 8 + 1))[:size]


@pytest.fixture
def run_dir() -> Iterator[str]:
    # Short, under /tmp: a Unix socket path must fit in 107 bytes.
    d = tempfile.mkdtemp(prefix="shoalbus", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ===========================================================================================
# In one process


def run(loop_name: str, main: Callable[[], Awaitable[None]], timeout: float = TIMEOUT) -> None:
    """Run ``main`` on a fresh loop; fail if the loop reported an unhandled exception."""
    errors: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=_loop_factory(loop_name)) as runner:
        runner.get_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        runner.run(asyncio.wait_for(main(), timeout))  # type: ignore[arg-type]
    assert not errors, errors


class Node:
    """A Bus in this process plus what it received and which peers it saw come and go."""

    def __init__(self, index: int, run_dir: str, peers: list[int], **kw: Any) -> None:
        self.got: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        self.events: asyncio.Queue[tuple[int, Hello | None]] = asyncio.Queue()
        self.backlog: list[tuple[int, Hello | None]] = []
        self.waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self.bus = Bus(index, run_dir, self.on_frame, on_peer=self.on_peer, **kw)
        self.bus.set_peers(peers)

    def on_frame(self, peer: int, ftype: int, body: bytes | memoryview) -> None:
        self.got[peer].append((ftype, bytes(body)))
        self._check()

    def on_peer(self, peer: int, hello: Hello | None) -> None:
        self.events.put_nowait((peer, hello))

    def _check(self) -> None:
        for cond, fut in list(self.waiters):
            if not fut.done() and cond():
                fut.set_result(None)
                self.waiters.remove((cond, fut))

    async def until(self, cond: Callable[[], bool]) -> None:
        if cond():
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((cond, fut))
        await fut

    async def peer_event(self, peer: int, up: bool) -> Hello | None:
        """The first unconsumed up (or down) event of ``peer``, in the order they happened."""
        for i, (p, hello) in enumerate(self.backlog):
            if p == peer and (hello is not None) == up:
                del self.backlog[i]
                return hello
        while True:
            p, hello = await self.events.get()
            if p == peer and (hello is not None) == up:
                return hello
            self.backlog.append((p, hello))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_mesh_in_one_process(loop_name: str, run_dir: str) -> None:
    async def main() -> None:
        nodes = [Node(i, run_dir, [0, 1, 2]) for i in range(3)]
        for n in nodes:
            await n.bus.start()
        for n in nodes:
            for j in range(3):
                if j != n.bus.index:
                    assert (await n.peer_event(j, up=True)).index == j  # type: ignore[union-attr]
        for n in nodes:
            for j in range(3):
                if j != n.bus.index:
                    for k in range(500):
                        assert n.bus.send(j, PUBLISH, f"{n.bus.index}>{j}:{k}".encode())
        for n in nodes:
            def complete(n: Node = n) -> bool:
                return all(len(n.got[j]) == 500 for j in range(3) if j != n.bus.index)
            await n.until(complete)
            for j, frames in n.got.items():
                assert frames == [(PUBLISH, f"{j}>{n.bus.index}:{k}".encode()) for k in range(500)]
        s = nodes[0].bus.stats()
        assert s["frames_sent"] == 1000 and s["frames_received"] == 1000
        assert s["frames_dropped"] == 0 and s["protocol_errors"] == 0
        assert s["peers"]["1"]["connects"] == 1
        assert nodes[0].bus.connected(2) and not nodes[0].bus.congested(2)
        for n in nodes:
            await n.bus.close()
        assert not os.listdir(run_dir)  # every bus removed its own socket file

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_frames_queued_before_the_peer_exists_arrive_in_order(loop_name: str, run_dir: str) -> None:
    async def main() -> None:
        a = Node(0, run_dir, [0, 1])
        for k in range(50):  # before start: no loop to flush on yet
            a.bus.send(1, CONTROL, b"early%d" % k)
        await a.bus.start()
        for k in range(50, 300):
            a.bus.send(1, PUBLISH, b"late%d" % k)
        await asyncio.sleep(0)  # let a flush run with nobody to write to
        assert not a.bus.connected(1)
        assert a.bus.stats()["peers"]["1"]["pending_frames"] == 300
        b = Node(1, run_dir, [0, 1])
        await b.bus.start()
        await b.until(lambda: len(b.got[0]) == 300)
        assert [body for _, body in b.got[0]] == (
            [b"early%d" % k for k in range(50)] + [b"late%d" % k for k in range(50, 300)])
        assert a.bus.stats()["frames_dropped"] == 0
        await a.bus.close()
        await b.bus.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_pending_bound_while_peer_is_down(loop_name: str, run_dir: str) -> None:
    async def main() -> None:
        a = Node(0, run_dir, [0, 1], max_pending=10_240)
        await a.bus.start()
        body = b"x" * 995  # 1000 bytes a frame with its header
        accepted = [a.bus.send(1, PUBLISH, body[:-4] + b"%04d" % k) for k in range(50)]
        assert accepted == [True] * 10 + [False] * 40
        s = a.bus.stats()
        assert (s["frames_dropped"], s["bytes_dropped"], s["pending_bytes"]) == (40, 40_000, 10_000)
        b = Node(1, run_dir, [0, 1])
        await b.bus.start()
        await b.until(lambda: len(b.got[0]) == 10)
        assert [body[-4:] for _, body in b.got[0]] == [b"%04d" % k for k in range(10)]
        assert a.bus.send(1, PUBLISH, b"after")  # room again once written
        await b.until(lambda: len(b.got[0]) == 11)
        await a.bus.close()
        await b.bus.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_graceful_restart_reconnects_and_keeps_order(loop_name: str, run_dir: str) -> None:
    async def main() -> None:
        low = Node(0, run_dir, [0, 1])
        high = Node(1, run_dir, [0, 1])
        await low.bus.start()
        await high.bus.start()
        first = await low.peer_event(1, up=True)
        await high.bus.close()
        await low.peer_event(1, up=False)
        for k in range(100):  # queued while the peer is away
            low.bus.send(1, PUBLISH, b"%d" % k)
        high2 = Node(1, run_dir, [0, 1])
        await high2.bus.start()
        again = await low.peer_event(1, up=True)
        assert again is not None and first is not None and again.epoch != first.epoch
        for k in range(100, 200):
            low.bus.send(1, PUBLISH, b"%d" % k)
        await high2.until(lambda: len(high2.got[0]) == 200)
        assert [body for _, body in high2.got[0]] == [b"%d" % k for k in range(200)]
        assert low.bus.stats()["peers"]["1"]["connects"] == 2
        await low.bus.close()
        await high2.bus.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_set_peers_removes_a_peer(loop_name: str, run_dir: str) -> None:
    async def main() -> None:
        a = Node(0, run_dir, [0, 1, 2])
        b = Node(1, run_dir, [0, 1])
        await a.bus.start()
        await b.bus.start()
        await a.peer_event(1, up=True)
        for _ in range(5):
            a.bus.send(2, PUBLISH, b"to nobody")
        a.bus.set_peers([0, 2])
        assert a.bus.peers() == [2]
        await b.peer_event(0, up=False)
        with pytest.raises(KeyError):
            a.bus.send(1, PUBLISH, b"x")
        a.bus.set_peers([0])
        assert a.bus.peers() == []
        s = a.bus.stats()
        assert s["frames_dropped"] == 5 and s["peers"] == {}  # the totals outlive the peer
        await a.bus.close()
        await b.bus.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_on_frame_error_is_logged_and_the_link_survives(loop_name: str, run_dir: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        got: list[bytes] = []

        def on_frame(peer: int, ftype: int, body: bytes | memoryview) -> None:
            if body == b"boom":
                raise RuntimeError("handler bug")
            got.append(bytes(body))
            if len(got) == 2:
                done.set()

        done = asyncio.Event()
        a = Node(0, run_dir, [0, 1])
        b = Bus(1, run_dir, on_frame)
        b.set_peers([0, 1])
        await a.bus.start()
        await b.start()
        for body in (b"one", b"boom", b"two"):
            a.bus.send(1, PUBLISH, body)
        await done.wait()
        assert got == [b"one", b"two"]
        assert b.stats()["peers"]["0"]["connects"] == 1
        await a.bus.close()
        await b.close()

    with caplog.at_level(logging.ERROR, logger="shoal.bus"):
        run(loop_name, main)
    assert any("on_frame failed" in r.message and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_send_refuses_a_frame_the_peer_would_refuse(loop_name: str, run_dir: str) -> None:
    async def main() -> None:
        a = Node(0, run_dir, [0, 1], max_frame_size=1000)
        await a.bus.start()
        a.bus.send(1, PUBLISH, b"x" * 999)
        with pytest.raises(ValueError):
            a.bus.send(1, PUBLISH, b"x" * 1000)
        await a.bus.close()

    run(loop_name, main)


async def _raw(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def _closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Everything the bus wrote before it dropped us; returns once it has."""
    return await asyncio.wait_for(reader.read(), TIMEOUT)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_handshake_and_protocol_errors_drop_the_link(loop_name: str, run_dir: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        n = Node(1, run_dir, [0, 1, 2], hello_timeout=0.3)
        await n.bus.start()
        path = socket_path(run_dir, 1)
        bad_first_frames = [
            encode_frame(PUBLISH, b"no hello first"),
            encode_frame(HELLO, encode_hello(0, 7, 1)),  # addressed to shard 7
            encode_frame(HELLO, encode_hello(2, 1, 1)),  # a higher index never dials a lower
            encode_frame(HELLO, encode_hello(5, 1, 1)[:-1]),  # truncated HELLO
            encode_frame(HELLO, bytes([99]) + encode_hello(0, 1, 1)[1:]),  # another bus version
            b"\x00\x00\x00\x00\x01",  # zero-length frame
        ]
        for i, data in enumerate(bad_first_frames, 1):
            reader, writer = await _raw(path)
            writer.write(data)
            assert await _closed_by_peer(reader) == b""  # not even a HELLO back
            writer.close()
            assert n.bus.stats()["protocol_errors"] == i

        # A valid HELLO from shard 0, the bus answers with its own; then an oversized frame.
        reader, writer = await _raw(path)
        writer.write(encode_frame(HELLO, encode_hello(0, 1, 1234, pid=77)))
        hello = await n.peer_event(0, up=True)
        assert hello is not None and (hello.pid, hello.epoch) == (77, 1234)
        writer.write(encode_frame(PUBLISH, b"fine") + b"\x7f\xff\xff\xff\x02")
        rest = await _closed_by_peer(reader)
        dec = FrameDecoder()
        dec.feed(rest)
        ftype, body = dec.next()  # type: ignore[misc]
        back = decode_hello(body)
        assert ftype == HELLO and (back.index, back.peer) == (1, 0)
        await n.peer_event(0, up=False)
        assert n.got[0] == [(PUBLISH, b"fine")]
        writer.close()

        # Silent after connecting: dropped once hello_timeout passes.
        reader, writer = await _raw(path)
        assert await _closed_by_peer(reader) == b""
        writer.close()
        assert n.bus.stats()["protocol_errors"] == len(bad_first_frames) + 1
        await n.bus.close()

    with caplog.at_level(logging.WARNING, logger="shoal.bus"):
        run(loop_name, main)
    assert any("no HELLO" in r.message for r in caplog.records)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_undeclared_peer_is_refused_once_peers_are_declared(loop_name: str, run_dir: str) -> None:
    async def main() -> None:
        n = Node(5, run_dir, [3, 5])
        await n.bus.start()
        reader, writer = await _raw(socket_path(run_dir, 5))
        writer.write(encode_frame(HELLO, encode_hello(2, 5, 1)))
        assert await _closed_by_peer(reader) == b""
        writer.close()
        await n.bus.close()

    run(loop_name, main)


def test_stale_socket_file_is_replaced_and_other_files_are_not(run_dir: str) -> None:
    async def main() -> None:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(socket_path(run_dir, 0))  # as a killed shard leaves it
        stale.close()
        n = Node(0, run_dir, [0])
        await n.bus.start()
        await n.bus.close()
        Path(socket_path(run_dir, 1)).write_text("not a socket")
        m = Node(1, run_dir, [1])
        with pytest.raises(RuntimeError, match="not a socket"):
            await m.bus.start()

    run("asyncio", main)
    with pytest.raises(ValueError, match="longer than"):
        Bus(0, "/tmp/" + "d" * 120, lambda p, t, b: None)


# ===========================================================================================
# Real shard processes


class ShardProc:
    """A child shard process driven over stdin/stdout JSON lines."""

    def __init__(self, index: int, run_dir: str, peers: list[int], loop_name: str,
                 log_dir: Path, **opts: int) -> None:
        self.index = index
        argv = [sys.executable, "-m", "tests.integration.test_bus", "--index", str(index),
                "--run-dir", run_dir, "--peers", ",".join(map(str, peers)), "--loop", loop_name]
        for k, v in opts.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        self.log_path = log_dir / f"shard{index}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._ids = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.wait(lambda e: e["ev"] == "ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(json.loads(line))
        self.queue.put(None)

    def cmd(self, **kw: Any) -> int:
        self._ids += 1
        kw["id"] = self._ids
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(kw).encode() + b"\n")
        self.proc.stdin.flush()
        return self._ids

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT) -> dict[str, Any]:
        for i, e in enumerate(self.seen):
            if pred(e):
                return self.seen.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                got = self.queue.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"shard {self.index}: no matching event in {timeout}s; "
                                     f"seen {self.seen[-10:]}\n{self.log()[-3000:]}") from None
            if got is None:
                raise AssertionError(f"shard {self.index} exited ({self.proc.poll()}):\n"
                                     + self.log()[-3000:])
            e = got
            if e["ev"] == "error":
                raise AssertionError(f"shard {self.index} reported {e}")
            if pred(e):
                return e
            self.seen.append(e)

    def request(self, **kw: Any) -> dict[str, Any]:
        i = self.cmd(**kw)
        return self.wait(lambda e: e.get("id") == i)

    def peer_up(self, peer: int, epoch_not: int | None = None) -> dict[str, Any]:
        return self.wait(lambda e: e["ev"] == "peer" and e["peer"] == peer and e["up"]
                         and e["epoch"] != epoch_not)

    def peer_down(self, peer: int) -> dict[str, Any]:
        return self.wait(lambda e: e["ev"] == "peer" and e["peer"] == peer and not e["up"])

    def got(self, peer: int, total: int) -> dict[str, Any]:
        """Wait until this shard has received ``total`` frames from ``peer`` (all time)."""
        return self.request(cmd="expect", peer=peer, total=total)

    def stats(self) -> dict[str, Any]:
        return self.request(cmd="stats")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def quit(self) -> None:
        if self.proc.poll() is None:
            self.request(cmd="quit")
            assert self.proc.wait(TIMEOUT) == 0, self.log()[-3000:]
        log = self.log()
        for marker in ("Traceback", "Exception in callback", "exception was never retrieved"):
            assert marker not in log, f"shard {self.index} logged an unhandled error:\n{log[-4000:]}"


@pytest.fixture
def shards(run_dir: str, tmp_path: Path) -> Iterator[Callable[..., ShardProc]]:
    started: list[ShardProc] = []

    def start(index: int, peers: list[int], loop_name: str, **opts: int) -> ShardProc:
        s = ShardProc(index, run_dir, peers, loop_name, tmp_path, **opts)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            try:
                s.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            s.proc.kill()
            s.proc.wait()


def exchange(procs: dict[int, ShardProc], count: int, size: int = 100) -> None:
    for i, p in procs.items():
        for j in procs:
            if j != i:
                p.request(cmd="send", peer=j, count=count, size=size)


def assert_clean(p: ShardProc) -> dict[str, Any]:
    s = p.stats()
    assert s["reorders"] == {} and s["gaps"] == {} and s["corrupt"] == 0, s
    assert s["bus"]["protocol_errors"] == 0
    return s


@pytest.mark.parametrize("loop_name", LOOPS)
def test_three_shards_every_pair_in_order(loop_name: str, shards: Callable[..., ShardProc]) -> None:
    procs = {i: shards(i, [0, 1, 2], loop_name) for i in range(3)}
    for i, p in procs.items():
        for j in procs:
            if j != i:
                p.peer_up(j)
    exchange(procs, 3000)
    exchange(procs, 20, size=100_000)  # large frames come through as memoryviews
    for i, p in procs.items():
        for j in procs:
            if j != i:
                p.got(j, 3020)
    for p in procs.values():
        s = assert_clean(p)
        assert s["bus"]["frames_sent"] == s["bus"]["frames_received"] == 2 * 3020
        assert s["bus"]["frames_dropped"] == 0
        p.quit()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_killed_peer_restarts_and_traffic_resumes(loop_name: str,
                                                 shards: Callable[..., ShardProc]) -> None:
    procs = {i: shards(i, [0, 1, 2], loop_name) for i in range(3)}
    for i, p in procs.items():
        for j in procs:
            if j != i:
                p.peer_up(j)
    exchange(procs, 1000)
    for i, p in procs.items():
        for j in procs:
            if j != i:
                p.got(j, 1000)
    old_epoch = procs[0].stats()["bus"]["peers"]["1"]["epoch"]

    # Shard 1 both dials (shard 2) and is dialled (by shard 0).
    procs[1].proc.kill()
    procs[1].proc.wait()
    procs[0].peer_down(1)
    procs[2].peer_down(1)
    for i in (0, 2):  # queued while shard 1 is gone: must arrive first, in order, once it is back
        r = procs[i].request(cmd="send", peer=1, count=200, size=100)
        assert r["accepted"] == 200
        assert procs[i].stats()["bus"]["peers"]["1"]["pending_frames"] == 200

    procs[1] = shards(1, [0, 1, 2], loop_name)
    procs[0].peer_up(1, epoch_not=old_epoch)
    procs[2].peer_up(1, epoch_not=old_epoch)
    procs[1].peer_up(0)
    procs[1].peer_up(2)
    for i in (0, 2):
        r = procs[1].got(i, 200)
        assert r["first_seq"] == 1000  # the queued frames, none lost, none before them
    exchange(procs, 500)
    for i, p in procs.items():
        for j in procs:
            if j != i:
                # Counts are per shard index across incarnations: the new shard 1 has the 200
                # queued + 500; everyone else has 1000 before the kill + 500 after.
                p.got(j, 700 if i == 1 else 1500)
    for i in (0, 2):
        s = assert_clean(procs[i])
        assert s["bus"]["peers"]["1"]["connects"] == 2
        assert s["bus"]["frames_dropped"] == 0
    assert_clean(procs[1])
    for p in procs.values():
        p.quit()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_stops_reading_does_not_grow_the_sender(
        loop_name: str, shards: Callable[..., ShardProc]) -> None:
    bound = 4 * 1024 * 1024
    sender = shards(0, [0, 1], loop_name, max_pending=bound, high_water=256 * 1024,
                    low_water=64 * 1024)
    receiver = shards(1, [0, 1], loop_name)
    sender.peer_up(1)
    receiver.peer_up(0)
    before = sender.stats()

    receiver.proc.send_signal(signal.SIGSTOP)  # a hung shard: alive, connected, not reading
    try:
        # 160 MiB offered; without the bound the sender would hold all of it.
        r = sender.request(cmd="send", peer=1, count=10_000, size=16 * 1024)
        sender.wait(lambda e: e["ev"] == "congestion" and e["peer"] == 1 and e["on"])
        during = sender.stats()
        peer = during["bus"]["peers"]["1"]
        assert peer["congested"] and during["congested"]
        assert r["dropped"] > 9_000 and r["accepted"] + r["dropped"] == 10_000
        assert peer["pending_bytes"] + peer["transport_bytes"] <= bound
        # At the peak of a flush the bound's worth of bytes exists up to three times: the
        # pending bodies, their join, and asyncio's copy into its own write buffer (measured:
        # 7 MiB under uvloop, 14.5 MiB under asyncio), plus allocator slack. Unbounded, it
        # would be the 160 MiB offered.
        grew = during["maxrss"] - before["maxrss"]
        assert grew < 6 * bound, f"sender peak RSS grew {grew} bytes (bound {bound})"
    finally:
        receiver.proc.send_signal(signal.SIGCONT)

    sender.wait(lambda e: e["ev"] == "congestion" and e["peer"] == 1 and not e["on"])
    receiver.got(0, r["accepted"])
    more = sender.request(cmd="send", peer=1, count=100, size=100)
    assert more["accepted"] == 100
    receiver.got(0, r["accepted"] + 100)
    s = receiver.stats()
    assert s["recv"] == {"0": r["accepted"] + 100}
    # Frames dropped at the bound leave holes in the sequence; nothing arrives out of order.
    assert s["reorders"] == {} and s["corrupt"] == 0 and s["gaps"]["0"] >= 1
    sender.quit()
    receiver.quit()


# ===========================================================================================
# The child shard: python -m tests.integration.test_bus --index K --run-dir D --peers 0,1,2


class Child:
    def __init__(self, args: argparse.Namespace) -> None:
        self.index = args.index
        self.bus = Bus(args.index, args.run_dir, self.on_frame, on_peer=self.on_peer,
                       on_congestion=self.on_congestion, max_pending=args.max_pending,
                       high_water=args.high_water, low_water=args.low_water)
        self.bus.set_peers(int(i) for i in args.peers.split(","))
        self.seq_out: dict[int, int] = defaultdict(int)
        self.epochs: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.recv: dict[int, int] = defaultdict(int)
        self.gaps: dict[int, int] = defaultdict(int)
        self.reorders: dict[int, int] = defaultdict(int)
        self.corrupt = 0
        self.expect: dict[int, list[tuple[int, int]]] = defaultdict(list)  # peer -> (total, id)
        self.done = asyncio.Event()

    @staticmethod
    def emit(**kw: Any) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    def on_peer(self, peer: int, hello: Hello | None) -> None:
        if hello is not None and self.epochs.get(peer) != hello.epoch:
            # A new incarnation numbers its frames from 0 again.
            self.epochs[peer] = hello.epoch
            self.last.pop(peer, None)
        self.emit(ev="peer", peer=peer, up=hello is not None,
                  epoch=hello.epoch if hello else None, pid=hello.pid if hello else None)

    def on_congestion(self, peer: int, congested: bool) -> None:
        self.emit(ev="congestion", peer=peer, on=congested)

    def on_frame(self, peer: int, ftype: int, body: bytes | memoryview) -> None:
        f = decode_publish(body)
        seq = f.msg_id
        if (f.topic != f"from/{peer}/to/{self.index}" or
                f.payload != payload_for(seq, len(f.payload))):
            self.corrupt += 1
        last = self.last.get(peer)
        if last is None:
            self.first[peer] = seq
        elif seq <= last:
            self.reorders[peer] += 1
        elif seq != last + 1:
            self.gaps[peer] += 1
        self.last[peer] = seq
        self.recv[peer] += 1
        waiting = self.expect.get(peer)
        if waiting:
            self._answer(peer)

    def _answer(self, peer: int) -> None:
        still = []
        for total, cid in self.expect[peer]:
            if self.recv[peer] >= total:
                self.emit(ev="got", id=cid, peer=peer, total=self.recv[peer],
                          first_seq=self.first.get(peer))
            else:
                still.append((total, cid))
        self.expect[peer] = still

    async def send(self, peer: int, count: int, size: int) -> tuple[int, int]:
        accepted = dropped = 0
        topic = f"from/{self.index}/to/{peer}"
        for k in range(count):
            seq = self.seq_out[peer]
            self.seq_out[peer] = seq + 1
            body = encode_publish(seq, topic, payload_for(seq, size), 0, False, "c", None, b"", 0)
            if self.bus.send(peer, PUBLISH, body):
                accepted += 1
            else:
                dropped += 1
            if k % 500 == 499:
                await asyncio.sleep(0)  # spread over loop turns, as a shard's reads would
        return accepted, dropped

    async def handle(self, msg: dict[str, Any]) -> None:
        cid = msg["id"]
        cmd = msg["cmd"]
        if cmd == "send":
            accepted, dropped = await self.send(msg["peer"], msg["count"], msg["size"])
            self.emit(ev="sent", id=cid, accepted=accepted, dropped=dropped)
        elif cmd == "expect":
            self.expect[msg["peer"]].append((msg["total"], cid))
            self._answer(msg["peer"])
        elif cmd == "stats":
            stats = self.bus.stats()
            self.emit(ev="stats", id=cid, bus=stats,
                      congested=any(self.bus.congested(p) for p in self.bus.peers()),
                      gaps=self.gaps, reorders=self.reorders, corrupt=self.corrupt,
                      recv=self.recv,
                      maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        elif cmd == "quit":
            await self.bus.close()
            self.emit(ev="quit", id=cid)
            self.done.set()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()

        def on_error(loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
            loop.default_exception_handler(ctx)
            self.emit(ev="error", message=str(ctx.get("message")), exc=repr(ctx.get("exception")))

        loop.set_exception_handler(on_error)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await self.bus.start()
        self.emit(ev="ready", pid=os.getpid())
        while not self.done.is_set():
            line = await reader.readline()
            if not line:  # the test went away
                await self.bus.close()
                return
            await self.handle(json.loads(line))


def _child_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--peers", required=True)
    ap.add_argument("--loop", choices=LOOPS, required=True)
    ap.add_argument("--max-pending", type=int, default=8 * 1024 * 1024)
    ap.add_argument("--high-water", type=int, default=1024 * 1024)
    ap.add_argument("--low-water", type=int, default=256 * 1024)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s shard{args.index} %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
        runner.run(Child(args).main())


if __name__ == "__main__":
    _child_main()
