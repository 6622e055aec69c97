"""The router: the control plane of one host.

It owns the shared-memory topic index (its only writer, creator and unlinker),
the host-wide registry of which shard owns which client id, and the listening
sockets. No PUBLISH passes through it.

Start-up and hand-off. Each shard connects to ``run_dir/router.sock`` and says
hello with its index and the worker count supervisord gave it (``%(numprocs)d``).
The first hello fixes the count N; the router then creates every listener's
SO_REUSEPORT group, N sockets bound in a fixed order, and keeps them for its
whole life: closing a member would reset its queued connections and move the
last member into its slot (FACTS), so a restarting shard gets the same socket
back and the group's order never changes. Socket k goes to shard k with
``send_fds``; the same Unix connection then carries framed orjson CONTROL
messages: subscription deltas (acknowledged once applied to the index, so a
shard can send SUBACK), client-id claims and releases, readiness, heartbeats
with stats.

A shard that stops heartbeating for ``runtime.hung_shard_timeout`` seconds is killed so that
supervisord restarts it (supervisord only notices exits). A shard that says a
different worker count from the first one is reported as a mismatch; so is a
configured shard that is not running.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from router.framing import CONTROL, FrameDecoder, decode_control, encode_control, encode_frame
from router.counters import HostCounters
from router.shm import ShmTopicIndex
from shards.listening import bind_listeners
from shards.security import Flapping

log = logging.getLogger("shoal.router")

HEARTBEAT = 1.0  # shards report this often
MISSING_REPORT = 30.0  # how often a missing shard is reported again
HANDSHAKE_TIMEOUT = 5.0
SOCKET_NAME = "router.sock"


def host_tag(run_dir: str) -> str:
    """Names this host's shared memory: the same run_dir always gives the same tag
    (so a restarted router finds and cleans its predecessor's segments), two brokers
    with different run_dirs never collide."""
    return hashlib.blake2b(os.path.realpath(run_dir).encode(), digest_size=6).hexdigest()


class ShardSlot:
    __slots__ = ("index", "pid", "protocol", "last_hb", "stats", "ready", "keys", "gone_at")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.protocol: ControlProtocol | None = None
        self.last_hb = 0.0
        self.stats: dict[str, Any] = {}
        self.ready = False
        self.keys: set[tuple[str, str | None]] = set()
        self.gone_at: float | None = None


class ControlProtocol(asyncio.Protocol):
    def __init__(self, router: Router, slot: ShardSlot) -> None:
        self.router = router
        self.slot = slot
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        try:
            for ftype, body in self.decoder:
                if ftype == CONTROL:
                    self.router.on_control(self.slot, decode_control(body))
        except Exception:
            log.exception("bad control stream from shard %d; dropping it", self.slot.index)
            if self.transport is not None:
                self.transport.close()

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(CONTROL, encode_control(message)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.on_shard_gone(self.slot, self)


class Router:
    def __init__(self, cfg: Any, loop: asyncio.AbstractEventLoop, run_dir: str) -> None:
        self.cfg = cfg
        self.loop = loop
        self.run_dir = run_dir
        self.tag = host_tag(run_dir)
        self.index: ShmTopicIndex | None = None
        self.workers: int | None = None
        self.slots: dict[int, ShardSlot] = {}
        self.registry: dict[str, int] = {}
        self.listeners: list[tuple[str, str, int, list[socket.socket]]] = []
        self.stopping = asyncio.Event()
        self._lsock: socket.socket | None = None
        self._ready_written = False
        self._last_missing_report = 0.0
        self.started = loop.time()
        self.mismatches: list[str] = []
        self._claims = 0
        # connections open per shard and listener, shared with the shards (router/counters.py)
        self.counters: HostCounters | None = None
        self.counters_fd = -1
        auth = cfg.auth
        # flapping is counted here, over every shard's disconnects
        self.flapping = (Flapping(auth.flapping_max_count, auth.flapping_window,
                                  auth.flapping_ban_time, auth.flapping_max_tracked)
                         if auth.flapping_max_count else None)

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.index = ShmTopicIndex.create(self.tag)
        path = os.path.join(self.run_dir, SOCKET_NAME)
        if os.path.exists(path):
            os.unlink(path)  # a dead router's socket: nobody can be listening on it
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(128)
        lsock.setblocking(False)
        self._lsock = lsock
        self.loop.create_task(self._accept_loop())
        self.loop.call_later(HEARTBEAT, self._watch)
        log.info("router up: run_dir %s, shared memory tag %s", self.run_dir, self.tag)

    async def stop(self) -> None:
        if self._lsock is not None:
            self._lsock.close()
            try:
                os.unlink(os.path.join(self.run_dir, SOCKET_NAME))
            except FileNotFoundError:
                pass
        for slot in self.slots.values():
            if slot.protocol is not None and slot.protocol.transport is not None:
                slot.protocol.transport.close()
        for _, _, _, socks in self.listeners:
            for s in socks:
                s.close()
        if self.index is not None:
            self.index.close()
            self.index.unlink()
            self.index = None
        if self.counters is not None:
            self.counters.close()
            os.close(self.counters_fd)
            self.counters = None
        log.info("router stopped; shared memory unlinked")

    # -- the listening socket groups -------------------------------------------------

    def _make_listeners(self, n: int) -> None:
        self.counters, self.counters_fd = HostCounters.create(n)
        self.listeners = bind_listeners(self.cfg, n)
        for name, host, port, socks in self.listeners:
            log.info("%s listener %s:%d: %d sockets in one SO_REUSEPORT group", name, host, port,
                     len(socks))

    # -- shard hand-shake ---------------------------------------------------------------

    async def _accept_loop(self) -> None:
        assert self._lsock is not None
        while not self.stopping.is_set():
            try:
                conn, _ = await self.loop.sock_accept(self._lsock)
            except OSError:
                return
            self.loop.create_task(self._handshake(conn))

    async def _handshake(self, conn: socket.socket) -> None:
        decoder = FrameDecoder()
        hello: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                while hello is None:
                    data = await self.loop.sock_recv(conn, 65536)
                    if not data:
                        raise ConnectionError("closed during hello")
                    decoder.feed(data)
                    for ftype, body in decoder:
                        if ftype == CONTROL:
                            hello = decode_control(body)
                            break
            if decoder.buffered():
                raise ConnectionError("a shard sends nothing after hello until it is welcomed")
            self._welcome(conn, hello)
        except Exception as err:
            log.warning("shard hand-shake failed: %s", err)
            conn.close()

    def _welcome(self, conn: socket.socket, hello: dict[str, Any]) -> None:
        k = int(hello["shard"])
        n = int(hello["workers"])
        pid = int(hello["pid"])
        if self.workers is None:
            self.workers = n
            self._make_listeners(n)
        elif n != self.workers:
            # refused: accepting it would hand it a running shard's socket and index
            msg = (f"shard {k} (pid {pid}) was started for {n} workers but this router runs "
                   f"{self.workers}: restart the whole broker after changing numprocs")
            log.error("worker count mismatch, refusing the shard: %s", msg)
            self.mismatches.append(msg)
            conn.close()
            return
        if not 0 <= k < self.workers:
            log.error("refusing shard %d: only %d workers are configured", k, self.workers)
            conn.close()
            return
        slot = self.slots.get(k) or ShardSlot(k)
        self.slots[k] = slot
        if slot.protocol is not None and slot.protocol.transport is not None:
            slot.protocol.transport.close()  # an older incarnation that has not gone yet
        slot.pid = pid
        slot.last_hb = self.loop.time()
        slot.ready = False
        slot.gone_at = None
        # the previous incarnation's connections died with it
        assert self.counters is not None
        self.counters.reset(k)
        welcome = {
            "op": "welcome", "workers": self.workers, "tag": self.tag,
            "listeners": [{"name": name, "host": host, "port": port}
                          for name, host, port, _ in self.listeners],
            "counters": True,  # the last descriptor is the connection counters' memfd
            # flapping bans in force, so a restarted shard refuses those ids too
            "flapping": (self.flapping.active_bans(self.loop.time())
                         if self.flapping is not None else []),
        }
        fds = [socks[k].fileno() for _, _, _, socks in self.listeners] + [self.counters_fd]
        conn.setblocking(True)
        socket.send_fds(conn, [encode_frame(CONTROL, encode_control(welcome))], fds)
        conn.setblocking(False)
        protocol = ControlProtocol(self, slot)
        slot.protocol = protocol
        self.loop.create_task(self.loop.connect_accepted_socket(lambda: protocol, sock=conn))
        log.info("shard %d (pid %d) joined", k, pid)

    def on_shard_gone(self, slot: ShardSlot, protocol: ControlProtocol) -> None:
        if slot.protocol is protocol:
            slot.protocol = None
            slot.ready = False
            slot.gone_at = self.loop.time()
            # its index keys and registry entries stay: its persistent sessions come
            # back with it, and peers' bus buffers hold what was sent meanwhile
            log.warning("shard %d (pid %d) disconnected", slot.index, slot.pid)

    # -- control messages ----------------------------------------------------------------

    def on_control(self, slot: ShardSlot, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "subs":
            self._apply_subs(slot, msg)
        elif op == "disconnected":
            flapping = self.flapping
            if flapping is not None and flapping.disconnected(msg["cid"], self.loop.time()):
                log.warning("client %r banned on every shard for %.3gs: %d disconnects within "
                            "%.3gs", msg["cid"], flapping.ban_time, flapping.max_count,
                            flapping.window)
                ban = {"op": "flapping", "cid": msg["cid"], "for": flapping.ban_time}
                for other in self.slots.values():
                    self._send(other, ban)
        elif op == "claim":
            cid = msg["cid"]
            prev = self.registry.get(cid, -1)
            self.registry[cid] = slot.index
            # claims are numbered in the one order every shard must respect: of two
            # racing CONNECTs for one id, the later claim wins
            self._claims += 1
            self._send(slot, {"op": "claimed", "seq": msg["seq"], "n": self._claims,
                              "prev": prev if prev != slot.index else -1})
        elif op == "own":
            # a restarted shard's stored sessions: those claimed elsewhere meanwhile are
            # stale copies (the claimant gave up waiting and began a new session)
            stale = []
            for cid in msg["cids"]:
                owner = self.registry.setdefault(cid, slot.index)
                if owner != slot.index and self._alive(owner):
                    stale.append(cid)
                else:
                    self.registry[cid] = slot.index
            if stale:
                self._send(slot, {"op": "disown", "cids": stale})
        elif op == "release":
            cid = msg["cid"]
            if self.registry.get(cid) == slot.index:
                del self.registry[cid]
        elif op == "hb":
            slot.last_hb = self.loop.time()
            slot.stats = msg.get("stats", {})
        elif op == "ready":
            slot.ready = True
            self._maybe_ready()
        else:
            log.warning("unknown control op %r from shard %d", op, slot.index)

    def _apply_subs(self, slot: ShardSlot, msg: dict[str, Any]) -> None:
        index = self.index
        assert index is not None
        k = slot.index
        keys = slot.keys
        if msg.get("reset"):
            # a (re)started shard states everything it has: replace, adding before
            # removing so that no key is ever briefly absent
            wanted = {(f, g) for f, g in msg.get("add", [])}
            for key in wanted - keys:
                _index_add(index, key, k)
            for key in keys - wanted:
                _index_remove(index, key, k)
            slot.keys = wanted
        else:
            for f, g in msg.get("add", []):
                if (f, g) not in keys:
                    keys.add((f, g))
                    _index_add(index, (f, g), k)
            for f, g in msg.get("del", []):
                if (f, g) in keys:
                    keys.discard((f, g))
                    _index_remove(index, (f, g), k)
        if "seq" in msg:
            self._send(slot, {"op": "ack", "seq": msg["seq"]})

    def _alive(self, index: int) -> bool:
        slot = self.slots.get(index)
        return slot is not None and slot.protocol is not None

    def _send(self, slot: ShardSlot, msg: dict[str, Any]) -> None:
        if slot.protocol is not None:
            slot.protocol.send(msg)

    # -- readiness, watchdog, host-wide stats ------------------------------------------------

    def _maybe_ready(self) -> None:
        if self._ready_written or self.workers is None:
            return
        if sum(1 for s in self.slots.values() if s.ready) < self.workers:
            return
        self._ready_written = True
        log.info("all %d shards ready", self.workers)
        ready_file = self.cfg.runtime.ready_file
        if ready_file:
            info = {
                "pid": os.getpid(), "workers": self.workers,
                "shards": {str(k): s.pid for k, s in sorted(self.slots.items())},
                "listeners": {name: {"host": host, "port": port}
                              for name, host, port, _ in self.listeners},
            }
            tmp = ready_file + ".tmp"
            Path(tmp).write_text(json.dumps(info))
            os.replace(tmp, ready_file)

    def _watch(self) -> None:
        if self.stopping.is_set():
            return
        now = self.loop.time()
        if self.flapping is not None:
            self.flapping.prune(now)
        hung_after = self.cfg.runtime.hung_shard_timeout
        for slot in self.slots.values():
            if slot.protocol is not None and now - slot.last_hb > hung_after and slot.pid:
                log.error("shard %d (pid %d) sent no heartbeat for %.0fs: killing it so that "
                          "supervisord restarts it", slot.index, slot.pid, now - slot.last_hb)
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                slot.last_hb = now
        if self.workers is not None and now - self._last_missing_report > MISSING_REPORT:
            # a restart takes supervisord a second or two: report only lasting absences
            missing = [k for k in range(self.workers)
                       if (k not in self.slots and now - self.started > MISSING_REPORT)
                       or (k in self.slots and self.slots[k].gone_at is not None
                           and now - self.slots[k].gone_at > hung_after)]
            if missing:
                log.error("configured %d workers but shards %s are not running",
                          self.workers, missing)
                self._last_missing_report = now
        # shard 0 publishes $SYS for the whole host
        zero = self.slots.get(0)
        if zero is not None:
            self._send(zero, {"op": "sys", "stats": self.host_stats()})
        self.loop.call_later(HEARTBEAT, self._watch)

    def host_stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for slot in self.slots.values():
            if slot.protocol is None:
                continue
            for key, value in slot.stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if key in ("uptime",):
                        total[key] = max(total.get(key, 0), value)
                    else:
                        total[key] = total.get(key, 0) + value
                else:
                    total.setdefault(key, value)
        total["shards/running"] = sum(1 for s in self.slots.values() if s.protocol is not None)
        total["shards/configured"] = self.workers or 0
        return total


def _index_add(index: ShmTopicIndex, key: tuple[str, str | None], shard: int) -> None:
    filt, group = key
    if group is None:
        index.add(filt, shard)
    else:
        index.add_group(group, filt, shard)


def _index_remove(index: ShmTopicIndex, key: tuple[str, str | None], shard: int) -> None:
    filt, group = key
    if group is None:
        index.remove(filt, shard)
    else:
        index.remove_group(group, filt, shard)
