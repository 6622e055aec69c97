"""The shard's event loop: sockets in, the sans-IO connection and the Shard in between.

This is the only module of a shard that does I/O. It follows the uvloop/asyncpg
habits: ``data_received`` feeds bytes to the connection and drains every whole
packet at once (no task per packet, no ``drain()``), and every connection's
output is written once per loop turn by a single flush callback, however many
packets the turn produced for it.

Shutdown (SIGTERM/SIGINT) is a written order with a deadline: stop accepting,
tell MQTT 5 clients DISCONNECT 0x8B (server shutting down), flush, close, exit.
Signal handlers only set the event that starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from pathlib import Path

from listeners.proxy import ProxyProtocolLayer
from listeners.tls import TlsLayer, peer_identity
from listeners.websocket import WebSocketLayer
from shards.config import Config
from shards.process import boot, run, run_dir_for
from shards.host import Host, LocalHost
from shards.listening import BINDERS, bind_listeners, tls_context
from shards.protocol.connection import CLOSED, MQTTConnection
from shards.protocol.errors import ProtocolError, Reason
from shards.protocol.packets import PUBLISH
from shards.hostlink import RouterHost, Welcome, join_router
from router.counters import COLUMN, HostCounters
from shards.limits import LogLimiter, TokenBucket, share
from shards.acl import AclError
from shards.jwtauth import JwtKeyError
from shards.security import Security
from shards.session import Session
from shards.shard import Shard
from shards.store import Store

log = logging.getLogger("shoal.worker")

# How often keepalive and connect deadlines, wills, expiries and $SYS are checked.
# Half a second keeps a 1 s keepalive's 1.5 s limit within ~0.5 s while costing a
# scan of every connection twice a second (about 3 ms for 10k connections).
TICK = 0.5
SHUTDOWN_DEADLINE = 10.0  # below supervisor's stopwaitsecs (15 s)
ROUTER_LOSS_GRACE = 1.0
# At most one log line this often about refused connections or throttled clients: a
# connection storm must not become a log storm (the counters in $SYS count every one).
LIMIT_LOG_INTERVAL = 10.0


class ClientProtocol(asyncio.Protocol):
    """One client connection: the Link the shard writes through."""

    __slots__ = ("worker", "transport", "conn", "session", "congested", "peer_username",
                 "cert_username", "disconnected_cleanly", "_dirty", "_closing", "_processing",
                 "listener", "admitted", "throttled", "msg_bucket", "byte_bucket", "_throttle_timer")
    # more than one output per connection (MQTT over QUIC's data streams): see flush_data
    multi = False

    def __init__(self, worker: Worker, cert_username: str = "none", listener: str = "tcp") -> None:
        self.worker = worker
        self.listener = listener
        self.admitted = False  # counted against the connection limits (set in connection_made)
        self.throttled = False  # reading paused by this client's own rate limit
        self._throttle_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.congested = False
        # the username a verified client certificate gives (TLS/WSS with
        # peer_cert_as_username); the shard uses it when CONNECT carries none
        self.peer_username: str | None = None
        self.cert_username = cert_username
        self.disconnected_cleanly = False
        self._dirty = False
        self._closing = False
        self._processing = False
        cfg = worker.cfg.mqtt
        self.conn = MQTTConnection(worker.loop.time(), max_packet_size=cfg.max_packet_size,
                                   connect_timeout=cfg.connect_timeout,
                                   receive_maximum=cfg.receive_maximum,
                                   topic_alias_maximum=cfg.topic_alias_maximum)
        limits = worker.cfg.limits
        now = worker.loop.time()
        # one second's worth of burst: a client may send its rate's worth at once
        rate = limits.message_rate
        self.msg_bucket = TokenBucket(rate, max(1.0, rate), now) if rate > 0 else None
        rate = limits.byte_rate
        self.byte_bucket = TokenBucket(rate, max(1.0, rate), now) if rate > 0 else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.worker.admit(self.listener):
            # over a connection limit: closed before anything is read, never a Link
            transport.abort()  # type: ignore[attr-defined]
            return
        self.admitted = True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.cert_username != "none":
            self.peer_username = peer_identity(transport.get_extra_info("peercert"),
                                               self.cert_username)
        self.worker.links.add(self)
        if self.worker.input_paused:
            transport.pause_reading()  # type: ignore[attr-defined]

    @property
    def peer(self) -> str:
        """host:port of the client, for log lines. Read when needed, not at accept: a PROXY
        protocol layer learns the real address only after the connection is made."""
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def data_received(self, data: bytes) -> None:
        worker = self.worker
        now = worker.loop.time()
        worker.bytes_in += len(data)
        conn = self.conn
        conn.receive_data(data, now)
        bucket = self.byte_bucket
        if bucket is not None:
            wait = bucket.take(len(data), now)
            if wait:
                self.throttle(wait)  # what arrived is still handled; the next read waits
        self.process(now)

    def process(self, now: float) -> None:
        """Drain every whole packet buffered in the connection (up to the message rate)."""
        conn = self.conn
        shard = self.worker.shard
        bucket = self.msg_bucket
        self._processing = True
        try:
            while True:
                packet = conn.next_packet()
                if packet is None:
                    break
                shard.handle(self, packet, now)
                if bucket is not None and packet.type == PUBLISH:
                    wait = bucket.take(1.0, now)
                    if wait:
                        # leave the rest buffered in the connection; resumed by unthrottle
                        self.throttle(wait)
                        break
        except ProtocolError as err:
            log.info("protocol error from %s (%r): 0x%02X %s", self.peer, conn.client_id,
                     err.reason, err.message)
            conn.fail(err)
            shard.end_link(self, now)
        finally:
            self._processing = False
        if conn.has_output():
            self.wake()

    def resume(self, now: float) -> None:
        # accepted inside process(): its loop goes on; accepted later: drain now
        if not self._processing and not self._closing and not self.throttled:
            self.process(now)

    def throttle(self, wait: float) -> None:
        """Over this client's message or byte rate: stop reading its socket for ``wait``
        seconds (back-pressure; TCP slows the client), then go on. One timer per
        throttling, never one per packet."""
        if self.throttled:
            return
        self.throttled = True
        transport = self.transport
        if transport is not None:
            transport.pause_reading()
        self.worker.note_throttled(self)
        self._throttle_timer = self.worker.loop.call_later(wait, self.unthrottle)

    def unthrottle(self) -> None:
        self.throttled = False
        self._throttle_timer = None
        transport = self.transport
        if self._closing or transport is None or transport.is_closing():
            return
        now = self.worker.loop.time()
        self.process(now)  # the packets left buffered when the bucket ran dry
        if not self.throttled and not self._closing and not self.worker.input_paused:
            transport.resume_reading()

    def wake(self) -> None:
        if not self._dirty:
            self._dirty = True
            self.worker.dirty.append(self)
            self.worker.schedule_flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        transport = self.transport
        if transport is not None:
            transport.pause_reading()  # after a close decision nothing more is read
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        if not self.admitted:
            return  # refused by a connection limit: it never was a Link
        self.admitted = False
        timer = self._throttle_timer
        if timer is not None:  # a long wait must not keep a closed connection alive
            timer.cancel()
            self._throttle_timer = None
        worker.release(self.listener)
        worker.links.discard(self)
        self.conn.state = CLOSED
        worker.shard.connection_lost(self, worker.loop.time())

    def pause_writing(self) -> None:
        # the kernel and transport buffers are full: QoS 0 to this client is dropped
        # and QoS 1/2 waits in the session's bounded queue
        self.congested = True

    def resume_writing(self) -> None:
        self.congested = False
        session = self.session
        if session is not None:
            session.drain(self.worker.loop.time())


class Worker:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, index: int = 0,
                 host: Host | None = None) -> None:
        self.cfg = cfg
        self.loop = loop
        # password hashes are verified on a few threads, never on the loop
        self.hash_pool = ThreadPoolExecutor(cfg.auth.hash_workers, thread_name_prefix="shoal-hash")
        # and remote backends are waited on by others, so a slow service cannot starve hashing
        io_threads = cfg.auth.http_workers if "http" in cfg.auth.backend_list() else 0
        if "postgresql" in cfg.auth.backend_list() or cfg.auth.pgsql_acl_query:
            io_threads += cfg.auth.pgsql_workers
        if "mysql" in cfg.auth.backend_list() or cfg.auth.mysql_acl_query:
            io_threads += cfg.auth.mysql_workers
        self.io_pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="shoal-authio")
        self.security = Security(cfg.auth, cfg.mqtt.allow_anonymous, cfg.runtime.data_dir,
                                 self.offload, self.offload_io, cfg.listeners)
        # start-up reads the user, ACL and banned files; a missing or invalid ACL stops us
        self.security.load(loop.time(), time.time())
        self.shard = Shard(cfg.mqtt, index, loop.time(), host or LocalHost(), self.security)
        self.store = Store(cfg.runtime.data_dir, index)
        self.shard.store = self.store
        self.shard.restore(loop.time())
        self.store.on_dirty = self.schedule_flush
        self.links: set[ClientProtocol] = set()
        self.dirty: list[ClientProtocol] = []
        self._flush_scheduled = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.servers: list[Any] = []  # asyncio servers and QUIC endpoints: close() stops accepting
        self.stopping = asyncio.Event()
        self.input_paused = False
        if isinstance(host, RouterHost):
            self._setup_limits(host.workers, host.counters)
        else:
            self._setup_limits(1, None)

    def _setup_limits(self, shards: int, counts: HostCounters | None) -> None:
        """Connection limits are host-wide: under a router every shard adds up the counts
        all shards publish (``counts``, router/counters.py) before admitting one; without
        them each of the ``shards`` shards keeps its share ceil(L / N)."""
        cfg = self.cfg
        now = self.loop.time()
        self.host_counts = counts
        split = 1 if self.host_counts is not None else shards
        self.max_connections = share(cfg.limits.max_connections, split)
        self.connections = 0
        self.listener_max: dict[str, int] = {}
        self.listener_connections: dict[str, int] = {}
        self.listener_rate: dict[str, TokenBucket] = {}
        for name in BINDERS:
            table = getattr(cfg.listeners, name)
            self.listener_max[name] = share(table.max_connections, split)
            self.listener_connections[name] = 0
            if table.max_connection_rate > 0:
                rate = table.max_connection_rate / shards
                self.listener_rate[name] = TokenBucket(rate, max(1.0, rate), now)
        self._refusal_log = LogLimiter(LIMIT_LOG_INTERVAL)
        self._throttle_log = LogLimiter(LIMIT_LOG_INTERVAL)

    def admit(self, listener: str) -> bool:
        """Count a new connection in, or refuse it (and count the refusal)."""
        cap = self.listener_max[listener]
        counts = self.host_counts
        if counts is None:
            total, count = self.connections, self.listener_connections[listener]
        else:
            total = counts.total(0) if self.max_connections else 0
            count = counts.total(COLUMN[listener]) if cap else 0
        why = None
        if self.max_connections and total >= self.max_connections:
            why = "limits.max_connections"
        elif cap and count >= cap:
            why = f"listeners.{listener}.max_connections"
        else:
            bucket = self.listener_rate.get(listener)
            if bucket is not None and not bucket.try_take(self.loop.time()):
                why = f"listeners.{listener}.max_connection_rate"
        if why is None:
            self.connections += 1
            self.listener_connections[listener] += 1
            if counts is not None:
                counts.count(self.shard.index, listener, 1)
            return True
        self.shard.counters.connections_refused += 1
        held = self._refusal_log.allow(self.loop.time())
        if held is not None:
            log.warning("shard %d refuses connections on %s: over %s (%d more refused since "
                        "the last such line)", self.shard.index, listener, why, held)
        return False

    def release(self, listener: str) -> None:
        self.connections -= 1
        self.listener_connections[listener] -= 1
        counts = self.host_counts
        if counts is not None:
            counts.count(self.shard.index, listener, -1)

    def note_throttled(self, link: ClientProtocol) -> None:
        self.shard.counters.clients_throttled += 1
        held = self._throttle_log.allow(self.loop.time())
        if held is not None:
            log.info("throttling %s (%r): over its message or byte rate (%d more throttlings "
                     "since the last such line)", link.peer, link.conn.client_id, held)

    def offload(self, fn: Callable[[], Any], then: Callable[[Any, float], None], now: float) -> None:
        """Run ``fn`` on a hash thread; ``then(result, now)`` back on the loop."""
        self._offload(self.hash_pool, fn, then)

    def offload_io(self, fn: Callable[[], Any], then: Callable[[Any, float], None], now: float) -> None:
        """Run blocking I/O (an HTTP request) on an I/O thread; ``then`` back on the loop."""
        self._offload(self.io_pool, fn, then)

    def _offload(self, pool: ThreadPoolExecutor, fn: Callable[[], Any],
                 then: Callable[[Any, float], None]) -> None:
        loop = self.loop

        def done(fut: Future[Any]) -> None:
            try:
                result = fut.result()
            except Exception:  # fn handles its own errors; this is a bug, keep the loop alive
                log.exception("offloaded work failed")
                result = None
            loop.call_soon_threadsafe(then, result, loop.time())

        pool.submit(fn).add_done_callback(done)

    def set_input_paused(self, paused: bool) -> None:
        """Stop (or resume) reading from every client: another shard cannot keep up with
        what we forward, and reading on would only grow buffers."""
        if paused == self.input_paused:
            return
        self.input_paused = paused
        log.info("shard %d %s reading from clients (bus back-pressure)", self.shard.index,
                 "pauses" if paused else "resumes")
        for link in self.links:
            transport = link.transport
            if transport is not None and not link._closing and not transport.is_closing():
                if paused:
                    transport.pause_reading()
                elif not link.throttled:  # a throttled link resumes when its timer fires
                    transport.resume_reading()
                if link.multi and (paused or not link.throttled):
                    link.pause_reading_all(paused)  # type: ignore[attr-defined]

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        # durable first: an ack written below may promise what the store now holds
        self.store.commit()
        self.shard.host.committed()
        dirty = self.dirty
        self.dirty = []
        out = 0
        for link in dirty:
            link._dirty = False
            transport = link.transport
            if transport is None or transport.is_closing():
                continue
            if link.multi:
                out += link.flush_data()  # type: ignore[attr-defined]
            data = link.conn.data_to_send()
            if data:
                out += len(data)
                transport.write(data)
            if link._closing:
                transport.close()
        self.bytes_out += out

    def tick(self) -> None:
        now = self.loop.time()
        for link in list(self.links):
            reason = link.conn.handle_timer(now)
            if reason is None:
                continue
            if reason == Reason.KEEP_ALIVE_TIMEOUT:
                log.info("keepalive timeout for %s (%r)", link.peer, link.conn.client_id)
                link.conn.disconnect(Reason.KEEP_ALIVE_TIMEOUT)
            else:
                log.info("no CONNECT from %s within %.1fs", link.peer, self.cfg.mqtt.connect_timeout)
                link.conn.state = CLOSED
            self.shard.end_link(link, now)
        self.shard.note_bytes(self.bytes_in, self.bytes_out)
        self.security.refresh(now, time.time())
        self.shard.tick(now)
        self.store.commit()  # changes that produced no output (offline queues, expiries)
        self.shard.host.committed()
        if not self.stopping.is_set():
            self.loop.call_later(TICK, self.tick)

    async def start(self) -> dict[str, dict[str, object]]:
        """One-process mode: the worker binds its own listeners (groups of one)."""
        bound = bind_listeners(self.cfg, 1)
        return await self.serve_sockets([(name, socks[0]) for name, _, _, socks in bound])

    async def serve_sockets(self, sockets: list[tuple[str, socket.socket]]) -> dict[str, dict[str, object]]:
        """Accept MQTT on already-listening sockets (bound here or handed over by the router)."""
        listeners: dict[str, dict[str, object]] = {}
        for name, sock in sockets:
            sock.setblocking(False)
            server = await SERVERS[name](self, sock)
            self.servers.append(server)
            host, port = sock.getsockname()[:2]
            listeners[name] = {"host": host, "port": port}
            log.info("shard %d accepting MQTT on %s %s:%d", self.shard.index, name, host, port)
        self.loop.call_later(TICK, self.tick)
        return listeners

    async def shutdown(self) -> None:
        """Stop accepting, tell v5 clients 0x8B, flush, close — within the deadline."""
        for server in self.servers:
            server.close()
        now = self.loop.time()
        for link in list(self.links):
            link.conn.disconnect(Reason.SERVER_SHUTTING_DOWN)
            self.shard.end_link(link, now)
        self.flush()
        deadline = self.loop.time() + SHUTDOWN_DEADLINE
        while self.links and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for link in list(self.links):
            if link.transport is not None:
                link.transport.abort()
        # every connection is gone: sessions are offline with their deadlines; keep them
        self.store.close()
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)


async def _serve_tcp(worker: Worker, sock: socket.socket) -> asyncio.AbstractServer:
    table = worker.cfg.listeners.tcp
    if table.proxy_protocol:
        def factory() -> asyncio.Protocol:
            return ProxyProtocolLayer(ClientProtocol(worker, listener="tcp"))
    else:
        def factory() -> asyncio.Protocol:
            return ClientProtocol(worker, listener="tcp")
    return await worker.loop.create_server(factory, sock=sock, backlog=table.backlog)


async def _serve_tls(worker: Worker, sock: socket.socket) -> asyncio.AbstractServer:
    # the loop runs the TLS record layer (uvloop: in C); a handshake that stalls is
    # bounded by the connect timeout, as a CONNECT that never comes would be
    table = worker.cfg.listeners.tls
    mode = table.peer_cert_as_username
    if table.proxy_protocol:
        # the PROXY header precedes the handshake: TLS is a layer under it
        ctx, timeout = tls_context(table), worker.cfg.mqtt.connect_timeout

        def factory() -> asyncio.Protocol:
            return ProxyProtocolLayer(TlsLayer(ClientProtocol(worker, mode, "tls"), ctx, timeout))
        return await worker.loop.create_server(factory, sock=sock, backlog=table.backlog)
    return await worker.loop.create_server(
        lambda: ClientProtocol(worker, mode, "tls"), sock=sock, backlog=table.backlog,
        ssl=tls_context(table), ssl_handshake_timeout=worker.cfg.mqtt.connect_timeout)


async def _serve_ws(worker: Worker, sock: socket.socket) -> asyncio.AbstractServer:
    table = worker.cfg.listeners.ws
    path, max_frame = table.path, table.max_frame_size
    if table.proxy_protocol:
        def factory() -> asyncio.Protocol:
            return ProxyProtocolLayer(WebSocketLayer(ClientProtocol(worker, listener="ws"), path, max_frame))
    else:
        def factory() -> asyncio.Protocol:
            return WebSocketLayer(ClientProtocol(worker, listener="ws"), path, max_frame)
    return await worker.loop.create_server(factory, sock=sock, backlog=table.backlog)


async def _serve_wss(worker: Worker, sock: socket.socket) -> asyncio.AbstractServer:
    table = worker.cfg.listeners.wss
    path, max_frame, mode = table.path, table.max_frame_size, table.peer_cert_as_username
    if table.proxy_protocol:
        ctx, timeout = tls_context(table), worker.cfg.mqtt.connect_timeout

        def factory() -> asyncio.Protocol:
            return ProxyProtocolLayer(TlsLayer(
                WebSocketLayer(ClientProtocol(worker, mode, "wss"), path, max_frame), ctx, timeout))
        return await worker.loop.create_server(factory, sock=sock, backlog=table.backlog)
    return await worker.loop.create_server(
        lambda: WebSocketLayer(ClientProtocol(worker, mode, "wss"), path, max_frame), sock=sock,
        backlog=table.backlog, ssl=tls_context(table),
        ssl_handshake_timeout=worker.cfg.mqtt.connect_timeout)


# how a shard serves a listening socket of each transport (see shards/listening.py)
async def _serve_quic(worker: Worker, sock: socket.socket) -> Any:
    # imported here: the QUIC glue builds on this module's ClientProtocol
    from shards.quiclink import serve_quic
    return await serve_quic(worker, sock)


SERVERS: dict[str, Callable[[Worker, socket.socket], Awaitable[Any]]] = {
    "tcp": _serve_tcp,
    "tls": _serve_tls,
    "ws": _serve_ws,
    "wss": _serve_wss,
    "quic": _serve_quic,
}


def write_ready_file(path: str, listeners: dict[str, dict[str, object]]) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "listeners": listeners}))
    os.replace(tmp, target)


async def serve(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    worker = Worker(cfg, loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    try:
        listeners = await worker.start()
    except OSError as err:  # a port in use, an unreadable certificate: say which, no traceback
        log.error("cannot start the listeners: %s", err)
        worker.store.close()
        return 1
    if cfg.runtime.ready_file:
        write_ready_file(cfg.runtime.ready_file, listeners)
    await worker.stopping.wait()
    log.info("shutting down")
    await worker.shutdown()
    log.info("stopped")
    return 0


async def serve_sharded(cfg: Config, index: int, welcome: Welcome, run_dir: str) -> int:
    """Router mode: sockets and peers come from the router; shard ``index`` of N."""
    loop = asyncio.get_running_loop()
    host = RouterHost(index, welcome, run_dir, loop)
    worker = Worker(cfg, loop, index, host)
    host.on_pending = worker.schedule_flush
    host.on_input_paused = worker.set_input_paused
    flapping = worker.security.flapping
    if flapping is not None:
        for client_id, left in welcome.flapping:  # bans the router holds from before our start
            flapping.ban(client_id, loop.time() + left)
    shard = worker.shard
    # shard 0 publishes the host-wide $SYS numbers the router sums up
    shard.sys_stats = (lambda now: host.sys_stats or shard.stats(now)) if index == 0 else None
    exit_code = 0

    def router_lost() -> None:
        # `supervisorctl stop all` signals router and shards at once, and the router's
        # close can arrive before our own SIGTERM: wait for it briefly before calling
        # this a failure (a restarted router makes a new socket group, so shards
        # restart with it rather than reconnect)
        loop.call_later(ROUTER_LOSS_GRACE, router_gone)

    def router_gone() -> None:
        nonlocal exit_code
        if worker.stopping.is_set():
            return
        log.error("lost the router connection; shard %d stops", index)
        exit_code = 1
        worker.stopping.set()

    host.on_router_lost = router_lost
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    await host.start(shard)
    names = [entry["name"] for entry in welcome.listeners]
    await worker.serve_sockets(list(zip(names, welcome.sockets)))
    host.ready()
    await worker.stopping.wait()
    log.info("shard %d shutting down", index)
    await worker.shutdown()
    await host.close()
    log.info("shard %d stopped", index)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description="Run one shoal shard.")
    parser.add_argument("--config", help="TOML config file (default: $SHOAL_CONFIG or embedded defaults)")
    parser.add_argument("--index", type=int, help="this shard's index under a router "
                        "(supervisor.conf passes %%(process_num)d); omit for a one-process broker")
    parser.add_argument("--workers", type=int, default=1,
                        help="how many shards run (supervisor.conf passes %%(numprocs)d)")
    args = parser.parse_args(argv)
    cfg = boot("shoal", args.config)
    if cfg is None:
        return 2
    try:
        # the ACL and JWT keys are read before anything starts: a broker without the
        # rules or keys asked for would allow too much (or refuse everyone)
        Security(cfg.auth, cfg.mqtt.allow_anonymous, cfg.runtime.data_dir).load(0.0, time.time())
    except (AclError, JwtKeyError) as err:
        print(f"shoal: {err}", file=sys.stderr)
        return 2
    if args.index is None:
        return run(cfg, serve(cfg))
    run_dir = run_dir_for(cfg)
    try:
        welcome = join_router(run_dir, args.index, args.workers)
    except (OSError, TimeoutError) as err:
        log.error("shard %d could not join the router: %s", args.index, err)
        return 1
    return run(cfg, serve_sharded(cfg, args.index, welcome, run_dir))
