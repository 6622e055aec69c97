"""Microbenchmark of the shard-to-shard bus (router/framing.py, router/bus.py).

- ``codec``: µs to encode and decode one publish frame body, and to cut one frame out of a
  received stream with FrameDecoder (no sockets).
- ``throughput``: two processes, shard 0 sends 100-byte PUBLISH frames (5-byte header + body)
  to shard 1 as fast as back-pressure allows, a batch per loop turn; frames/s from the first
  send to the receiver's report that it has them all. Receiver modes: ``count`` (on_frame
  only counts: the bus alone) and ``decode`` (on_frame also runs decode_publish, what a
  shard pays before matching).
- ``rtt``: one frame at a time, echoed by the receiver; p50/p99 round trip.

Usage: ``python -m bench.micro_bus [--loop uvloop|asyncio|both] [--frames N] [--rtt N]``.
FACTS.md measured the raw socket (no framing, no bus) at 1.53 M frames/s batched and
340 k unbatched, round trip p50 19-27 µs: compare with the same machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from typing import Any

from router.bus import Bus
from router.framing import (
    CONTROL, PUBLISH, FrameDecoder, decode_control, decode_publish, encode_control, encode_frame,
    encode_publish,
)

FRAME_SIZE = 100
TOPIC = "bench/topic/x"
ORIGIN = "pub"
_FIXED = len(encode_publish(0, TOPIC, b"", 0, False, ORIGIN, None, b"", 0)) + 5
PAYLOAD = b"x" * (FRAME_SIZE - _FIXED)
BATCH = 1000  # frames queued per loop turn by the sender: one flush each


def _runner(loop_name: str) -> asyncio.Runner:
    if loop_name == "uvloop":
        import uvloop
        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def _us(fn: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def bench_codec() -> dict[str, float]:
    args = (12345, "sensors/room1/temperature", b"x" * 64, 1, False, "client-abc", None, b"", 0)
    body = encode_publish(*args)
    shared = encode_publish(12345, "sensors/room1/temperature", b"x" * 64, 1, False, "client-abc",
                            1.7e9, b"\x23\x00\x05", 2, "group-a")
    n = 200_000
    out = {
        "encode_publish": _us(lambda: encode_publish(*args), n),
        "decode_publish": _us(lambda: decode_publish(body), n),
        "encode_publish shared+expiry+props": _us(
            lambda: encode_publish(12345, "sensors/room1/temperature", b"x" * 64, 1, False,
                                   "client-abc", 1.7e9, b"\x23\x00\x05", 2, "group-a"), n),
        "decode_publish shared+expiry+props": _us(lambda: decode_publish(shared), n),
    }
    frame = encode_frame(PUBLISH, encode_publish(1, TOPIC, PAYLOAD, 0, False, ORIGIN, None, b"", 0))
    assert len(frame) == FRAME_SIZE
    stream = frame * 2621  # about one 256 KiB read
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]

    def cut() -> None:
        dec = FrameDecoder()
        for c in chunks:
            dec.feed(c)
            nxt = dec.next
            while nxt() is not None:
                pass
    out["FrameDecoder per frame"] = _us(cut, 20) / 2621
    return out


# -- two processes -------------------------------------------------------------------------

async def _receiver(run_dir: str, mode: str) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state: dict[str, Any] = {"n": 0, "target": -1, "cpu": 0.0}

    def on_frame(peer: int, ftype: int, body: bytes | memoryview) -> None:
        if ftype == PUBLISH:
            if mode == "decode":
                decode_publish(body)
            elif mode == "echo":
                bus.send(peer, PUBLISH, body if type(body) is bytes else bytes(body))
                return
            state["n"] += 1
            if state["n"] == state["target"]:
                cpu = time.process_time() - state["cpu"]
                bus.send(peer, CONTROL, encode_control({"have": state["n"], "cpu": cpu}))
                state["n"] = 0
        elif ftype == CONTROL:
            msg = decode_control(body)
            if msg.get("quit"):
                done.set_result(None)
            else:
                state["target"] = msg["expect"]
                state["cpu"] = time.process_time()

    bus = Bus(1, run_dir, on_frame)
    bus.set_peers([0])
    await bus.start()
    await done
    await bus.close()


class _Sender:
    def __init__(self, run_dir: str) -> None:
        self.bus = Bus(0, run_dir, self.on_frame, on_peer=self.on_peer,
                       on_congestion=self.on_congestion)
        self.up = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.reply: asyncio.Future[Any] | None = None

    def on_peer(self, peer: int, hello: object) -> None:
        if hello is not None:
            self.up.set()

    def on_congestion(self, peer: int, congested: bool) -> None:
        if congested:
            self.writable.clear()
        else:
            self.writable.set()

    def on_frame(self, peer: int, ftype: int, body: bytes | memoryview) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_result((ftype, body))

    async def request(self, ftype: int, body: bytes) -> Any:
        self.reply = asyncio.get_running_loop().create_future()
        self.bus.send(1, ftype, body)
        return await self.reply

    async def throughput(self, frames: int) -> tuple[float, float, float]:
        """frames/s, and CPU µs per frame of the sender and of the receiver."""
        bus = self.bus
        body = encode_publish(1, TOPIC, PAYLOAD, 0, False, ORIGIN, None, b"", 0)
        bus.send(1, CONTROL, encode_control({"expect": frames}))
        self.reply = asyncio.get_running_loop().create_future()
        send = bus.send
        t0 = time.perf_counter()
        c0 = time.process_time()
        left = frames
        while left:
            if not self.writable.is_set():
                await self.writable.wait()
            k = min(BATCH, left)
            for _ in range(k):
                send(1, PUBLISH, body)
            left -= k
            await asyncio.sleep(0)
        _, reply = await self.reply
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        assert bus.stats()["frames_dropped"] == 0
        return frames / elapsed, cpu / frames * 1e6, decode_control(reply)["cpu"] / frames * 1e6

    async def rtt(self, rounds: int) -> list[float]:
        body = encode_publish(1, TOPIC, PAYLOAD, 0, False, ORIGIN, None, b"", 0)
        out = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await self.request(PUBLISH, body)
            out.append(time.perf_counter() - t0)
        return out


def _spawn(run_dir: str, loop_name: str, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.micro_bus", "--role", "receiver",
                             "--run-dir", run_dir, "--loop", loop_name, "--mode", mode])


async def _sender_main(run_dir: str, loop_name: str, mode: str, frames: int, rounds: int
                       ) -> dict[str, float]:
    proc = _spawn(run_dir, loop_name, mode)
    s = _Sender(run_dir)
    s.bus.set_peers([1])
    await s.bus.start()
    try:
        await asyncio.wait_for(s.up.wait(), 20)
        out: dict[str, float] = {}
        if mode == "echo":
            await s.rtt(2000)  # warm up
            samples = sorted(await s.rtt(rounds))
            out["rtt p50 µs"] = samples[len(samples) // 2] * 1e6
            out["rtt p99 µs"] = samples[int(len(samples) * 0.99)] * 1e6
        else:
            await s.throughput(min(frames, 100_000))  # warm up
            runs = sorted([await s.throughput(frames) for _ in range(3)])
            rate, cpu_tx, cpu_rx = runs[1]  # the median run by rate
            out[f"frames/s ({mode})"] = rate
            out["  sender CPU µs/frame"] = cpu_tx
            out["  receiver CPU µs/frame"] = cpu_rx
        s.bus.send(1, CONTROL, encode_control({"quit": True}))
        await asyncio.sleep(0)
    finally:
        await s.bus.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loop", choices=["uvloop", "asyncio", "both"], default="both")
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--rtt", type=int, default=20_000)
    ap.add_argument("--role", default="sender", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="count", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "receiver":
        with _runner(args.loop) as r:
            r.run(_receiver(args.run_dir, args.mode))
        return

    print(f"codec ({len(PAYLOAD)}-byte payload in a {FRAME_SIZE}-byte frame for the socket runs)")
    for name, us in bench_codec().items():
        print(f"  {name:40s} {us:7.3f} µs")
    loops = ["uvloop", "asyncio"] if args.loop == "both" else [args.loop]
    for loop_name in loops:
        print(f"two processes, {loop_name}, {FRAME_SIZE}-byte frames, batch {BATCH}/turn")
        for mode in ("count", "decode", "echo"):
            run_dir = tempfile.mkdtemp(prefix="shoalbench", dir="/tmp")
            try:
                with _runner(loop_name) as r:
                    res = r.run(_sender_main(run_dir, loop_name, mode, args.frames, args.rtt))
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
            for name, v in res.items():
                print(f"  {name:40s} {v:12,.2f}" if v < 100 else f"  {name:40s} {v:12,.0f}")


if __name__ == "__main__":
    main()
