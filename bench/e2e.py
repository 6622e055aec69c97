"""Side-by-side end-to-end benchmark: Mosquitto, shoal with 1 shard, shoal with 2 shards.

    python -m bench.e2e [--duration 10] [--warmup 2] [--quick] [--brokers mosquitto,shoal-1,shoal-2]
                        [--only standard,placement,storm,filters]

For each broker it runs, through bench/loadgen.py (raw sockets, hand-encoded MQTT 3.1.1,
batched writes, bulk parsing):

1. fan-in 10->1, QoS 0, 64-byte payload, flat out (at most ``--backlog`` messages sent but
   not yet delivered, split over the publishers, so queues and drain times stay bounded);
2. 1:1 x50 pairs, QoS 0, each pair its own topic, flat out;
2b. fan-out 1->100, QoS 0, flat out (msg/s counts deliveries);
3. fan-in 10->1, QoS 1, at most ``--window`` unacknowledged messages per publisher;
0. first, on the fresh broker: a connection storm of 10k idle clients (connect rate, broker
   CPU and RSS per connection, summed over every broker process);
3b. 1:1 x50 QoS 0 while 100k other subscriptions (exact and wildcard) are in place;
4. shoal-2 only: 1:1 x50 with every subscriber on its publisher's shard ("same shard") and
   with every subscriber on the other shard ("cross shard"), placed by mapping each client
   socket to the shard pid that accepted it (``ss -tnpH``); target cross <= 1.3x same in
   broker CPU per message.

Before the brokers it drives the same scenarios against a trivial forwarding sink
(loadgen's ``sink``) to show what the generator can do and what it costs per message.

Measured per run, over a window that starts after the warm-up: messages delivered per second
at the subscribers; broker CPU (utime+stime of every broker process from /proc/<pid>/stat)
per delivered message and in cores; messages per second per core of broker CPU
(= 1e6 / µs per message, the number that compares a 2-process broker with a 1-process one);
the generator's own CPU; latency percentiles (sampled; flat-out latency is mostly queueing);
the CPU other processes used on the broker's cores (the machine is shared); loss, duplicates
and gaps over the whole run after a drain. The ratios against Mosquitto are the result worth
quoting: absolute numbers move with the machine's load.

Pinning on 2 cores: 1-process brokers on core 0, the generator on core 1. shoal-2 (router +
2 shards) and the generator share both cores: compare its per-core throughput, not msg/s.

Writes bench/results/e2e-<date>.md and .json (git-ignored; quote results in notes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time

from bench import loadgen
from bench.brokers import REPO, Amqtt, Broker, Mosquitto, make
from bench.loadgen import Plan, Run, fan_in, fan_out, pairs, summarize

RESULTS = os.path.join(REPO, "bench", "results")
STALL_MS = 100  # a subscriber silent this long during a flat-out window is worth a flag
BROKER_CORE = 0
GEN_CORE = 1


# ------------------------------------------------------------------------------------------
# machine-level accounting


def cpu_busy(cpus: set[int]) -> float:
    """Busy seconds (everything but idle and iowait) summed over ``cpus``, from /proc/stat."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m and int(m.group(1)) in cpus:
                v = [int(x) for x in m.group(2).split()]
                # user nice system idle iowait irq softirq steal guest guest_nice
                total += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return total / tck


# ------------------------------------------------------------------------------------------
# shard placement for shoal-2


def server_pids_by_client_port(port: int) -> dict[int, int]:
    """client local port -> pid holding the server side of that connection to ``port``."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    found: dict[int, int] = {}
    for line in out.splitlines():
        m = re.search(r"\S+:(\d+)\s+\S+:(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+)", line)
        if m and int(m.group(1)) == port:
            found[int(m.group(2))] = int(m.group(3))
    return found


async def sockets_per_shard(host: str, port: int, shard_pids: dict[int, int], need: int,
                            timeout: float = 30.0) -> tuple[dict[int, list[socket.socket]], int]:
    """Connect until each shard holds ``need`` of our sockets; returns them and the attempts."""
    loop = asyncio.get_running_loop()
    by_pid = {pid: k for k, pid in shard_pids.items()}
    pools: dict[int, list[socket.socket]] = {k: [] for k in shard_pids}
    attempts = 0
    deadline = time.monotonic() + timeout
    while any(len(v) < need for v in pools.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not place {need} connections on every shard: "
                               f"{ {k: len(v) for k, v in pools.items()} }")
        missing = max(need - len(v) for v in pools.values())
        batch = []
        for _ in range(min(64, 2 * missing + 4)):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, (host, port))
            batch.append(s)
            attempts += 1
        pending = {s.getsockname()[1]: s for s in batch}
        t_end = time.monotonic() + 5
        while pending and time.monotonic() < t_end:
            seen = server_pids_by_client_port(port)
            for cport in list(pending):
                pid = seen.get(cport)
                if pid is not None:
                    s = pending.pop(cport)
                    k = by_pid.get(pid)
                    if k is not None and len(pools[k]) < need:
                        pools[k].append(s)
                    else:
                        s.close()
            if pending:
                await asyncio.sleep(0.02)
        for s in pending.values():  # never accepted by a known shard in time
            s.close()
    return pools, attempts


# ------------------------------------------------------------------------------------------
# one measurement


async def measure(broker: Broker, plan: Plan, warmup: float, duration: float, *,
                  broker_cpus: set[int], gen_shares: bool, idle: float,
                  pub_socks=None, sub_socks=None) -> dict:
    # rate-limited runs are for latency: sample every message
    run = Run(plan, broker.host, broker.port, sample_mask=0 if plan.rate else 7)
    t_setup = time.perf_counter()
    await run.open(pub_socks, sub_socks)
    setup_s = time.perf_counter() - t_setup
    run.start()
    await asyncio.sleep(warmup)
    a = run.snapshot()
    cpu_a, busy_a = broker.cpu(), cpu_busy(broker_cpus)
    run.sampling(True)
    # (t, delivered) every 100 ms through the window: the JSON keeps it to look at stalls
    series: list[tuple[float, int]] = [(0.0, 0)]
    t_end = a.t + duration
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        await asyncio.sleep(min(0.1, t_end - now))
        snap = run.snapshot()
        series.append((round(snap.t - a.t, 4), snap.received - a.received))
    b = run.snapshot()
    cpu_b, busy_b = broker.cpu(), cpu_busy(broker_cpus)
    run.sampling(False)
    # QoS 1: shoal acknowledges a forwarded message it could not confirm after 10 s, so
    # wait longer than that for the last acks before calling them missing
    totals = await run.stop(drain_timeout=15.0, idle=idle)
    await run.close()
    res = summarize(plan, a, b, totals)
    delivered = res["delivered_in_window"]
    window = res["window_s"]
    bcpu = cpu_b - cpu_a
    others = (busy_b - busy_a) - bcpu - (res["gen_cpu_s"] if gen_shares else 0.0)
    res.update({
        "scenario": plan.name,
        "broker": broker.name,
        "setup_s": setup_s,
        "broker_cpu_s": bcpu,
        "broker_cores": bcpu / window,
        "broker_us_per_msg": 1e6 * bcpu / delivered if delivered else None,
        "per_broker_core_per_s": delivered / bcpu if bcpu else None,
        "gen_us_per_msg": 1e6 * res["gen_cpu_s"] / delivered if delivered else None,
        "other_load_on_broker_cores": max(0.0, others) / window,
        "max_gap_ms": run.max_gap_ms(),
        "min_rate_100ms_per_s": min(((c1 - c0) / (t1 - t0) for (t0, c0), (t1, c1)
                                     in zip(series, series[1:]) if t1 - t0 >= 0.05), default=None),
        "series": series,
        "broker_alive": broker.alive(),
        "qos": plan.qos,
    })
    if plan.qos and (res["lost"] or res["dups"] or res["unacked"] or res["bad_acks"]):
        res["qos1_violation"] = True
    return res


# ------------------------------------------------------------------------------------------
# the whole comparison


# the groups --only picks from: the flat-out and latency runs; shoal-2's same/cross shard;
# the connection storm of idle clients; 1:1 pairs among many other subscriptions
SCENARIO_GROUPS = ("standard", "placement", "storm", "filters")


def backlog_per_publisher(args, publishers: int) -> int:
    """QoS 0 flat out: a total budget of messages in flight, split over the publishers (at
    least two write batches each), so 50 publishers do not queue 5x what 10 do."""
    return max(256, args.backlog // publishers)


def scenarios(args) -> list[Plan]:
    return [
        fan_in(10, name="fan-in 10->1 QoS 0", qos=0, payload=64,
               backlog=backlog_per_publisher(args, 10)),
        pairs(50, name="1:1 x50 QoS 0", qos=0, payload=64, backlog=backlog_per_publisher(args, 50)),
        # msg/s here counts deliveries; the cap is messages, so a tenth of the others' budget
        # keeps the deliveries in flight (x100) in the same range
        fan_out(100, name="fan-out 1->100 QoS 0", qos=0, payload=64,
                backlog=max(256, args.backlog // 10)),
        fan_in(10, name=f"fan-in 10->1 QoS 1 (window {args.window})", qos=1, payload=64,
               window=args.window),
    ] + ([] if args.quick else [
        pairs(1, name=f"latency: 1:1 QoS 0 at {args.latency_rate:,.0f} msg/s", qos=0, payload=64,
              rate=args.latency_rate),
    ])


def pin_self(cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)


class SysCounters:
    """shoal's own counters from its retained $SYS topics (sys_interval = 1 s in the bench
    config). They lag by up to ~3 s (shard heartbeat -> router sum -> shard 0 publish), so a
    read waits until publish/messages/received covers everything sent so far."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sent_so_far = 0
        self.last: dict[str, str] = {}

    async def read(self, timeout: float = 6.0) -> tuple[dict[str, str], bool]:
        deadline = time.monotonic() + timeout
        while True:
            got = await loadgen.fetch_retained(self.broker.host, self.broker.port,
                                               "$SYS/broker/#", wait=0.15)
            vals = {k[len("$SYS/broker/"):]: v.decode(errors="replace") for k, v in got.items()}
            fresh = int(vals.get("publish/messages/received", "-1")) >= self.sent_so_far
            if fresh or time.monotonic() > deadline:
                return vals, fresh
            await asyncio.sleep(0.3)

    async def delta(self, sent: int) -> dict:
        """Counters moved by a scenario that sent ``sent`` messages."""
        self.sent_so_far += sent
        vals, fresh = await self.read()
        out = {"fresh": fresh}
        for key in ("messages/dropped", "publish/messages/received", "publish/messages/sent"):
            try:
                out[key] = int(vals[key]) - int(self.last.get(key, 0))
            except (KeyError, ValueError):
                out[key] = None
        self.last = vals
        return out


def rss_kb(pids: list[int]) -> int:
    """Resident set size summed over processes (router + shards for shoal-N), in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def raise_fd_limit() -> None:
    """10k clients are 10k descriptors here and in the broker (which inherits the limit):
    use the hard limit, as shards/process.py does."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Idle(asyncio.Protocol):
    """A client that connects, maybe subscribes, and then only holds its connection."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.connack = loop.create_future()
        self.subacks = 0
        self.want_subacks = 0
        self.subscribed = loop.create_future()
        for fut in (self.connack, self.subscribed):
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        for fut in (self.connack, self.subscribed):
            if not fut.done():
                fut.set_exception(loadgen.ProtocolFailure("connection lost"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        j = 0
        n = len(buf)
        while j + 2 <= n:
            try:
                length, k = loadgen.read_varint(buf, j + 1, n)
            except Exception:
                break  # the length is not all here yet
            if k + length > n:
                break
            kind = buf[j] >> 4
            if kind == 2 and not self.connack.done():
                code = buf[k + 1] if length > 1 else 255
                if code:
                    self.connack.set_exception(loadgen.ProtocolFailure(f"CONNACK 0x{code:02x}"))
                else:
                    self.connack.set_result(None)
            elif kind == 9:
                if any(c >= 0x80 for c in buf[k + 2:k + length]):
                    if not self.subscribed.done():
                        self.subscribed.set_exception(loadgen.ProtocolFailure("SUBACK refused"))
                self.subacks += 1
                if self.subacks == self.want_subacks and not self.subscribed.done():
                    self.subscribed.set_result(None)
            j = k + length
        self.buf = buf[j:]

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(loadgen.DISCONNECT)
            self.transport.close()


async def open_idle(host: str, port: int, n: int, prefix: str, concurrency: int = 100,
                    keepalive: int = 600) -> tuple[list[_Idle], int, list[float]]:
    """Connect ``n`` clients, at most ``concurrency`` handshakes at a time (the brokers'
    listen backlogs are 100 or more, so none overflows and no SYN waits for a retransmit).
    Returns the clients that got a CONNACK, the number that failed, and the time of each
    CONNACK (perf_counter)."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    clients: list[_Idle] = []
    times: list[float] = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            c = _Idle()
            try:
                await loop.create_connection(lambda: c, host, port)
                c.transport.write(loadgen.connect_packet(f"{prefix}{i}", keepalive=keepalive))  # type: ignore[union-attr]
                await asyncio.wait_for(c.connack, 30)
            except (OSError, asyncio.TimeoutError, loadgen.ProtocolFailure):
                failed += 1
                c.close()
                return
            times.append(time.perf_counter())
            clients.append(c)

    await asyncio.gather(*(one(i) for i in range(n)))
    return clients, failed, times


async def connection_storm(broker: Broker, n: int, broker_cpus: set[int]) -> dict:
    """``n`` idle clients connect as fast as the broker takes them (100 handshakes in flight):
    connect rate, broker CPU per connection, and resident memory per connection (RSS of every
    broker process after the storm minus before, over the clients connected)."""
    pids = broker.pids()
    rss0 = rss_kb(pids)
    cpu0, gen0 = broker.cpu(), loadgen.cpu_seconds()
    t0 = time.perf_counter()
    clients, failed, times = await open_idle(broker.host, broker.port, n,
                                             f"storm{os.getpid()}-")
    t1 = time.perf_counter()
    cpu1, gen1 = broker.cpu(), loadgen.cpu_seconds()
    # let the broker finish what the last CONNACKs started (allocations settle), then read
    await asyncio.sleep(1.0)
    rss1 = rss_kb(pids)
    ok = len(clients)
    for c in clients:
        c.close()
    elapsed = (max(times) if times else t1) - t0
    return {
        "broker": broker.name, "clients": n, "connected": ok, "failed": failed,
        "elapsed_s": elapsed, "connects_per_s": ok / elapsed if elapsed > 0 else None,
        "broker_us_per_connect": 1e6 * (cpu1 - cpu0) / ok if ok else None,
        "gen_us_per_connect": 1e6 * (gen1 - gen0) / ok if ok else None,
        "rss_before_kb": rss0, "rss_after_kb": rss1,
        "kb_per_connection": (rss1 - rss0) / ok if ok else None,
        "broker_alive": broker.alive(), "processes": len(pids),
    }


async def settle(broker: Broker, timeout: float = 15.0) -> None:
    """Wait until the broker is nearly idle (under 5% of a core over 0.25 s), at most
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = broker.cpu()
        await asyncio.sleep(0.25)
        if broker.cpu() - c0 < 0.0125:
            return


def noise_filters(n: int) -> list[str]:
    """``n`` distinct filters, half exact and half with wildcards, none matching the pairs'
    topics (bench/pair/<i>) but sharing their first level, so they sit in the same branch."""
    return [f"bench/noise/{i}/x" if i % 2 else f"bench/noise/+/{i}/#" for i in range(n)]


async def many_filters(broker: Broker, args, broker_cpus: set[int], shares: bool) -> dict:
    """1:1 x50 QoS 0 flat out while ``args.filters`` other subscriptions (1,000 per idle
    client, 100 per SUBSCRIBE) are in place: what a big subscription table costs a publish."""
    n = args.filters
    per_client = 1000
    filters = noise_filters(n)
    groups = [filters[k:k + per_client] for k in range(0, n, per_client)]
    t0 = time.perf_counter()
    clients, failed, _ = await open_idle(broker.host, broker.port, len(groups), f"noise{os.getpid()}-")
    if failed:
        for c in clients:
            c.close()
        raise RuntimeError(f"{failed} of {len(groups)} subscribing clients failed to connect")
    try:
        for c, group in zip(clients, groups):
            chunks = [group[k:k + 100] for k in range(0, len(group), 100)]
            c.want_subacks = len(chunks)
            c.transport.write(b"".join(  # type: ignore[union-attr]
                subscribe_many_packet(pid + 1, chunk) for pid, chunk in enumerate(chunks)))
        await asyncio.wait_for(asyncio.gather(*(c.subscribed for c in clients)), 300)
        subscribe_s = time.perf_counter() - t0
        plan = pairs(50, name=f"1:1 x50 QoS 0, {n:,} other filters", qos=0, payload=64,
                     backlog=backlog_per_publisher(args, 50))
        r = await measure(broker, plan, args.warmup, args.duration, broker_cpus=broker_cpus,
                          gen_shares=shares, idle=args.idle)
    finally:
        for c in clients:
            c.close()
    r["filters"] = n
    r["subscribe_s"] = subscribe_s
    return r


def subscribe_many_packet(packet_id: int, filters: list[str], qos: int = 0) -> bytes:
    """One MQTT 3.1.1 SUBSCRIBE carrying every filter of ``filters``."""
    body = packet_id.to_bytes(2, "big") + b"".join(
        len(f.encode()).to_bytes(2, "big") + f.encode() + bytes([qos]) for f in filters)
    return bytes([0x82]) + loadgen.varint(len(body)) + body


async def run_broker(name: str, args, log) -> tuple[list[dict], dict]:
    broker = make(name)
    all_cpus = set(range(os.cpu_count() or 1))
    if broker.shares_cores or len(all_cpus) < 2:
        broker_cpus, gen_cpus, shares = all_cpus, all_cpus, True
    else:
        broker_cpus, gen_cpus, shares = {BROKER_CORE}, {GEN_CORE}, False
    pin_self(gen_cpus)
    info: dict = {"broker": name, "broker_cpus": sorted(broker_cpus),
                  "gen_cpus": sorted(gen_cpus), "shares_cores": shares, "problems": []}
    rows: list[dict] = []
    if name == "mosquitto":
        info["version"] = Mosquitto.version()
    counters = SysCounters(broker) if name.startswith("shoal-") else None
    try:
        broker.start(broker_cpus)
        broker.mark_logs()
        # a fresh broker: every counter is 0 until its first $SYS publish
        if "storm" in args.only and broker.alive():
            # first, on a fresh broker: memory freed by earlier scenarios would be reused by
            # the new connections and hide their cost
            log(f"  {name}: connection storm, {args.storm_clients:,} idle clients ...")
            try:
                st = await connection_storm(broker, args.storm_clients, broker_cpus)
                info["storm"] = st
                log(f"    {st['connected']:,} connected ({st['failed']} failed) at "
                    f"{fmt(st['connects_per_s'])}/s, {fmt(st['kb_per_connection'], '.2f')} KB RSS "
                    f"each, {fmt(st['broker_us_per_connect'], '.0f')} µs broker CPU each")
            except Exception as err:
                info["problems"].append(f"connection storm: {type(err).__name__}: {err}")
                log(f"    failed: {err!r}")
            await settle(broker)  # closing 10k connections is work the next window must not see
        for plan in (scenarios(args) if "standard" in args.only else []):
            if not broker.alive():
                info["problems"].append(f"broker died before {plan.name}")
                break
            log(f"  {name}: {plan.name} ...")
            try:
                r = await measure(broker, plan, args.warmup, args.duration,
                                  broker_cpus=broker_cpus, gen_shares=shares, idle=args.idle)
            except Exception as err:  # report and go on with the next scenario
                info["problems"].append(f"{plan.name}: {type(err).__name__}: {err}")
                log(f"    failed: {err!r}")
                continue
            if counters is not None:
                r["broker_counters"] = await counters.delta(r["sent"])
            rows.append(r)
            log("    " + short(r))
        if getattr(broker, "shards", 1) == 2 and not args.no_placement and "placement" in args.only:
            for qos in (0, 1):
                for same in (True, False):
                    label = "same shard" if same else "cross shard"
                    log(f"  {name}: 1:1 x{args.placement_pairs} QoS {qos} {label} ...")
                    try:
                        r = await placed_pairs(broker, args, same, qos, broker_cpus, shares)
                    except Exception as err:
                        info["problems"].append(f"{label} QoS {qos}: {type(err).__name__}: {err}")
                        log(f"    failed: {err!r}")
                        continue
                    if counters is not None:
                        r["broker_counters"] = await counters.delta(r["sent"])
                    rows.append(r)
                    log("    " + short(r))
        if "filters" in args.only and broker.alive():
            log(f"  {name}: 1:1 x50 QoS 0 with {args.filters:,} other filters ...")
            try:
                r = await many_filters(broker, args, broker_cpus, shares)
                if counters is not None:
                    r["broker_counters"] = await counters.delta(r["sent"])
                rows.append(r)
                log(f"    subscribed in {r['subscribe_s']:.1f} s; " + short(r))
            except Exception as err:
                info["problems"].append(f"many filters: {type(err).__name__}: {err}")
                log(f"    failed: {err!r}")
    finally:
        info["log_during_run"] = broker.log_lines(since=broker.log_marks)
        sizes = broker.log_sizes()
        info["problems"] += broker.stop()
        info["log_at_stop"] = broker.log_lines(since=sizes)
        broker.cleanup()
    return rows, info


async def placed_pairs(broker, args, same: bool, qos: int, broker_cpus, shares) -> dict:
    """1:1 pairs, half of the publishers on each shard; every subscriber on its publisher's
    shard (same) or on the other one (cross)."""
    n = args.placement_pairs
    half = n // 2
    pools, attempts = await sockets_per_shard(broker.host, broker.port, broker.shard_pids, n)
    s0, s1 = pools[0], pools[1]
    pub_socks, sub_socks = {}, {}
    for i in range(n):
        home, other = (s0, s1) if i < half else (s1, s0)
        pub_socks[i] = home.pop()
        sub_socks[i] = (home if same else other).pop()
    for s in s0 + s1:
        s.close()
    label = "same shard" if same else "cross shard"
    extra = f" (window {args.window})" if qos else ""
    plan = pairs(n, name=f"1:1 x{n} QoS {qos}{extra}, {label}", qos=qos, payload=64,
                 backlog=backlog_per_publisher(args, n), window=args.window)
    r = await measure(broker, plan, args.warmup, args.duration, broker_cpus=broker_cpus,
                      gen_shares=shares, idle=args.idle, pub_socks=pub_socks, sub_socks=sub_socks)
    r["placement"] = label
    r["connect_attempts"] = attempts
    return r


def short(r: dict) -> str:
    us = r["broker_us_per_msg"]
    return (f"{r['delivered_per_s']:,.0f} msg/s, broker {us:.2f} µs/msg "
            f"({r['broker_cores']:.2f} cores), gen {r['gen_cpu_pct']:.0f}%, "
            f"loss {r['lost']} ({r['loss_pct']:.2f}%), dups {r['dups']}"
            if us is not None else f"{r['delivered_per_s']:,.0f} msg/s")


# ------------------------------------------------------------------------------------------
# report


def fmt(v, spec=",.0f", none="–") -> str:
    return none if v is None else format(v, spec)


def loss_cell(r: dict) -> str:
    s = f"{r['lost']:,} ({r['loss_pct']:.2f}%)"
    c = r.get("broker_counters")
    if c and c.get("messages/dropped") is not None and (r["lost"] or c["messages/dropped"]):
        s += f"; broker counted {c['messages/dropped']:,} dropped{'' if c['fresh'] else ' (stale)'}"
    if r["qos"]:
        extra = []
        if r["dups"]:
            extra.append(f"{r['dups']} dup")
        if r["unacked"]:
            extra.append(f"{r['unacked']} unacked")
        if r["bad_acks"]:
            extra.append(f"{r['bad_acks']} bad acks")
        if extra:
            s += " " + ", ".join(extra)
        if r.get("qos1_violation"):
            s += " **QoS 1 VIOLATION**"
    return s


def latency_cell(r: dict) -> str:
    if r["p50_ms"] is None:
        return "–"
    spec = ".2f" if r["p99_ms"] < 10 else ".1f"
    return f"{format(r['p50_ms'], spec)} / {format(r['p99_ms'], spec)}"


def report(meta: dict, calib: list[dict], rows: list[dict], infos: list[dict]) -> str:
    out = []
    w = out.append
    w(f"# shoal vs Mosquitto, end to end — {meta['date']}")
    w("")
    w(f"- commit `{meta['commit']}`{' (+ uncommitted changes)' if meta['dirty'] else ''}; "
      f"{meta['machine']}; Python {meta['python']}; {meta['mosquitto']}")
    if meta.get("amqtt"):
        w(f"- also {meta['amqtt']} (pure-Python asyncio broker, MQTT 3.1.1 only; one process, "
          "pinned like Mosquitto)")
    w(f"- window {meta['duration']} s after {meta['warmup']} s warm-up per scenario; "
      f"64-byte payloads; MQTT 3.1.1; QoS 0 flat out with at most {meta['backlog']:,} messages "
      f"sent but not yet delivered (split over the publishers, ≥ 256 each); "
      f"QoS 1 window {meta['window']} per publisher")
    w("- pinning: mosquitto and shoal-1 on core 0, generator on core 1. **shoal-2: router + 2 "
      "shards and the generator share both cores** — compare it by *msg/s per broker core* "
      "(delivered msg/s ÷ broker CPU-seconds per second), not by msg/s")
    w("- loss is over the whole run after draining; QoS 0 loss is allowed at the broker, "
      "QoS 1 loss, duplicates or missing acks are not. *broker counted*: shoal's own "
      "`$SYS/broker/messages/dropped` over the scenario")
    w("- latency is sampled send→receive; flat out it is mostly the queueing the in-flight "
      "budget allows, the rate-limited run (if any) is the one to read for latency")
    w("- *other load on broker cores*: CPU that processes other than the broker (and the "
      "generator, where it shares them) used on the broker's cores, in cores — this machine "
      "is shared; rows with a high value are less trustworthy")
    w("")
    w("## Generator check (against a trivial forwarding sink on core 0)")
    w("")
    w("| scenario | delivered msg/s | generator CPU (% of its core) | generator µs/msg | "
      "one-core generator capacity ≈ msg/s |")
    w("|---|---:|---:|---:|---:|")
    for r in calib:
        us = r["gen_us_per_msg"]
        w(f"| {r['scenario']} | {fmt(r['delivered_per_s'])} | {r['gen_cpu_pct']:.0f}% | "
          f"{fmt(us, '.2f')} | {fmt(1e6 / us if us else None)} |")
    w("")
    w(meta["gen_verdict"])
    w("")
    w("## Results")
    w("")
    w("| scenario | broker | delivered msg/s | ×mosq msg/s | broker µs/msg | broker CPU (cores) "
      "| msg/s per broker core | ×mosq per core | loss (lost, %) | gen CPU | p50 / p99 ms "
      "| other load on broker cores | longest silence ms |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    base = {r["scenario"]: r for r in rows if r["broker"] == "mosquitto"}
    for r in rows:
        if r.get("placement"):
            continue
        m = base.get(r["scenario"])
        ratio = r["delivered_per_s"] / m["delivered_per_s"] if m and m["delivered_per_s"] else None
        pc = r.get("per_broker_core_per_s")
        mpc = m.get("per_broker_core_per_s") if m else None
        pratio = pc / mpc if pc and mpc else None
        lat = latency_cell(r)
        w(f"| {r['scenario']} | {r['broker']}{' (shares cores)' if r['broker'] == 'shoal-2' else ''} "
          f"| {fmt(r['delivered_per_s'])} | {fmt(ratio, '.2f')} | {fmt(r['broker_us_per_msg'], '.2f')} "
          f"| {r['broker_cores']:.2f} | {fmt(pc)} | {fmt(pratio, '.2f')} | {loss_cell(r)} "
          f"| {r['gen_cpu_pct']:.0f}% | {lat} | {r['other_load_on_broker_cores']:.2f} "
          f"| {r['max_gap_ms']:.0f} |")
    placed = [r for r in rows if r.get("placement")]
    if placed:
        w("")
        w(f"## shoal-2: same shard vs cross shard (1:1 x{meta['placement_pairs']}, flat out)")
        w("")
        w("Every client is placed by the shard that accepted its connection (`ss -tnpH`: the "
          "server side's pid). Same shard: each subscriber on its publisher's shard, half of "
          "the pairs on each shard. Cross shard: each subscriber on the other shard.")
        w("")
        w("| QoS | placement | delivered msg/s | broker µs/msg | broker CPU (cores) "
          "| msg/s per broker core | loss | gen CPU | p50 / p99 ms | connections tried |")
        w("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
        for r in placed:
            lat = latency_cell(r)
            w(f"| {r['qos']} | {r['placement']} | {fmt(r['delivered_per_s'])} "
              f"| {fmt(r['broker_us_per_msg'], '.2f')} | {r['broker_cores']:.2f} "
              f"| {fmt(r['per_broker_core_per_s'])} | {loss_cell(r)} | {r['gen_cpu_pct']:.0f}% "
              f"| {lat} | {r['connect_attempts']} |")
        w("")
        for qos in (0, 1):
            by = {r["placement"]: r for r in placed if r["qos"] == qos}
            if "same shard" in by and "cross shard" in by:
                s_us = by["same shard"]["broker_us_per_msg"]
                c_us = by["cross shard"]["broker_us_per_msg"]
                if s_us and c_us:
                    ratio = c_us / s_us
                    w(f"- QoS {qos}: cross-shard / same-shard broker CPU per message "
                      f"**{ratio:.2f}×** (target ≤ 1.3×: {'met' if ratio <= 1.3 else 'NOT met'})")
    storms = [i["storm"] for i in infos if i.get("storm")]
    if storms:
        w("")
        w(f"## Connection storm ({storms[0]['clients']:,} idle clients, MQTT 3.1.1, "
          "100 handshakes in flight)")
        w("")
        w("Connect rate from the first connection attempt to the last CONNACK; RSS is VmRSS of "
          "every broker process (router + shards for shoal-N) 1 s after the last CONNACK minus "
          "before the storm, over the clients connected.")
        w("")
        w("| broker | connected | failed | connects/s | ×mosq | broker µs/connect | "
          "KB RSS per connection | ×mosq | RSS before → after (MB) |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        mq = next((x for x in storms if x["broker"] == "mosquitto"), None)
        for x in storms:
            rr = x["connects_per_s"] / mq["connects_per_s"] if mq and mq["connects_per_s"] and \
                x["connects_per_s"] else None
            mr = x["kb_per_connection"] / mq["kb_per_connection"] if mq and \
                mq["kb_per_connection"] and x["kb_per_connection"] is not None else None
            w(f"| {x['broker']} | {x['connected']:,} | {x['failed']} | {fmt(x['connects_per_s'])} "
              f"| {fmt(rr, '.2f')} | {fmt(x['broker_us_per_connect'], '.0f')} "
              f"| {fmt(x['kb_per_connection'], '.2f')} | {fmt(mr, '.2f')} "
              f"| {x['rss_before_kb'] / 1024:.1f} → {x['rss_after_kb'] / 1024:.1f} |")
    w("")
    w("## Broker processes and logs")
    w("")
    for info in infos:
        w(f"### {info['broker']} (broker CPUs {info['broker_cpus']}, generator CPUs {info['gen_cpus']})")
        w("")
        for p in info.get("problems", []):
            w(f"- problem: {p}")
        during = info.get("log_during_run", [])
        at_stop = info.get("log_at_stop", [])
        w(f"- log lines while running: {len(during)}; at stop: {len(at_stop)}")
        for line in during[:30]:
            w(f"    - `{line[:300]}`")
        for line in at_stop[:10]:
            w(f"    - (stop) `{line[:300]}`")
        w("")
    flags = [r for r in rows if r.get("qos1_violation")]
    w("## Flags")
    w("")
    if flags:
        for r in flags:
            w(f"- **QoS 1 violation on {r['broker']} in {r['scenario']}**: lost {r['lost']}, "
              f"dups {r['dups']}, unacked {r['unacked']}, bad acks {r['bad_acks']}, "
              f"acked {r['acked']}, unique received {r['unique']}")
    else:
        w("- no QoS 1 loss, duplicates or missing acks")
    for r in rows:
        if r["max_gap_ms"] >= STALL_MS:
            w(f"- {r['broker']} / {r['scenario']}: a subscriber got nothing for "
              f"{r['max_gap_ms']:.0f} ms during the window (slowest 100 ms: "
              f"{fmt(r['min_rate_100ms_per_s'])} msg/s)")
        if r["gen_cpu_pct"] > 85:
            w(f"- {r['broker']} / {r['scenario']}: generator at {r['gen_cpu_pct']:.0f}% "
              "of a core — it may have limited this run")
        if r.get("errors"):
            w(f"- {r['broker']} / {r['scenario']}: client errors: {r['errors'][:5]}")
        if not r["broker_alive"]:
            w(f"- {r['broker']} died during {r['scenario']}")
    w("")
    return "\n".join(out)


def chart(rows: list[dict], path: str, title: str) -> None:
    """Grouped bars: delivered msg/s per scenario (same-/cross-shard rows left out), one bar
    per broker, each labelled with its ratio to Mosquitto."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if not r.get("placement")]
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    brokers = list(dict.fromkeys(r["broker"] for r in rows))
    val = {(r["scenario"], r["broker"]): r["delivered_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(7, 2.4 * len(scen)), 4.8))
    width = 0.8 / max(1, len(brokers))
    for k, b in enumerate(brokers):
        xs = [i + (k - (len(brokers) - 1) / 2) * width for i in range(len(scen))]
        ys = [val.get((s, b), 0) for s in scen]
        bars = ax.bar(xs, ys, width, label=b)
        for bar, s in zip(bars, scen):
            m = val.get((s, "mosquitto"))
            v = val.get((s, b))
            if m and v:
                ax.annotate(f"{v / m:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(scen)))
    ax.set_xticklabels(scen, fontsize=8)
    ax.set_ylabel("delivered msg/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_info() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=REPO, capture_output=True, text=True).stdout.strip())
        return commit or "?", dirty
    except OSError:
        return "?", False


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}"


async def calibrate(args, log) -> list[dict]:
    """The generator against the trivial sink: its capacity and µs per message."""
    sink = make("sink")
    all_cpus = set(range(os.cpu_count() or 1))
    two = len(all_cpus) >= 2
    sink_cpus = {BROKER_CORE} if two else all_cpus
    pin_self({GEN_CORE} if two else all_cpus)
    sink.start(sink_cpus)
    rows = []
    try:
        for plan in (scenarios(args) if "standard" in args.only else []):
            if plan.rate is not None or (args.quick and plan.name.startswith("1:1")):
                continue  # --quick: 1:1 costs the generator what fan-in does
            log(f"  sink: {plan.name} ...")
            r = await measure(sink, plan, args.warmup, args.duration, broker_cpus=sink_cpus,
                              gen_shares=not two, idle=args.idle)
            rows.append(r)
            log("    " + short(r))
    finally:
        sink.stop()
        sink.cleanup()
    return rows


def generator_verdict(calib: list[dict], rows: list[dict]) -> str:
    """Was the generator the bottleneck? Its CPU in every run, and its capacity on the sink."""
    worst = max((r["gen_cpu_pct"] for r in rows), default=0.0)
    text = (f"Generator CPU in the broker runs peaked at {worst:.0f}% of its core "
            f"(it idles while it waits for the broker). ")
    costs = [r["gen_us_per_msg"] for r in calib if r.get("gen_us_per_msg")]
    peak = max((r["delivered_per_s"] for r in rows if not r["broker"].startswith("shoal-2")),
               default=0.0)
    if costs:
        text += (f"Against the sink it cost {min(costs):.2f}–{max(costs):.2f} µs per message, so "
                 f"one core could drive ≈ {1e6 / max(costs):,.0f}–{1e6 / min(costs):,.0f} msg/s; "
                 f"the fastest pinned broker run delivered {peak:,.0f} msg/s. ")
    ok = worst < 85 and (not costs or 1e6 / max(costs) > 1.3 * peak)
    return text + ("The generator is not the bottleneck." if ok
                   else "**The generator may be a bottleneck in some runs: see Flags.**")


async def main_async(args) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # SIGTERM cancels the run: every broker is stopped by the finally blocks on the way out
    # (and by brokers.py's atexit hook if something slips through)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    t0 = time.monotonic()
    now = dt.datetime.now()
    commit, dirty = git_info()
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "dirty": dirty,
        "machine": machine(), "python": platform.python_version(),
        "mosquitto": Mosquitto.version(), "duration": args.duration, "warmup": args.warmup,
        "backlog": args.backlog, "window": args.window, "quick": args.quick,
        "placement_pairs": args.placement_pairs,
        "argv": sys.argv[1:],
        "amqtt": Amqtt.version() if "amqtt" in args.brokers.split(",") else None,
    }
    calib: list[dict] = []
    if not args.no_calibrate:
        log("generator check against the trivial sink")
        calib = await calibrate(args, log)
    rows: list[dict] = []
    infos: list[dict] = []
    for name in args.brokers.split(","):
        log(f"{name}")
        try:
            r, info = await run_broker(name, args, log)
        except Exception as err:
            log(f"  {name} failed: {err!r}")
            infos.append({"broker": name, "problems": [repr(err)], "broker_cpus": [],
                          "gen_cpus": []})
            continue
        rows += r
        infos.append(info)
    meta["gen_verdict"] = generator_verdict(calib, rows)
    meta["elapsed_s"] = time.monotonic() - t0
    text = report(meta, calib, rows, infos)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    md = os.path.join(RESULTS, f"e2e-{stamp}.md")
    with open(md, "w") as f:
        f.write(text + f"\n_elapsed {meta['elapsed_s']:.0f} s_\n")
    with open(os.path.join(RESULTS, f"e2e-{stamp}.json"), "w") as f:
        json.dump({"meta": meta, "calibration": calib, "rows": rows, "brokers": infos}, f,
                  indent=1, default=str)
    if args.png:
        png = os.path.join(RESULTS, f"e2e-{stamp}.png") if args.png is True else args.png
        try:
            chart(rows, png, f"delivered msg/s, MQTT 3.1.1, {meta['date']} "
                             f"(labels: ratio to mosquitto)")
            log(f"wrote {png}")
        except ImportError:
            log("no PNG: matplotlib is not installed (pip install matplotlib)")
    log(f"wrote {md} (+ .json) in {meta['elapsed_s']:.0f} s")
    bad = any(r.get("qos1_violation") for r in rows)
    return 1 if bad else 0


def main(argv: list[str] | None = None, prog: str = "python -m bench.e2e",
         default_brokers: str = "mosquitto,shoal-1,shoal-2") -> int:
    ap = argparse.ArgumentParser(prog=prog,
                                 description="shoal vs Mosquitto, end to end, side by side")
    ap.add_argument("--duration", type=float, default=10.0, help="measurement window, s")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up before the window, s")
    ap.add_argument("--quick", action="store_true", help="3 s windows, 1 s warm-up")
    ap.add_argument("--brokers", default=default_brokers,
                    help=f"comma-separated: mosquitto, amqtt, shoal-N (default {default_brokers})")
    ap.add_argument("--backlog", type=int, default=20000,
                    help="QoS 0 flat out: most messages in flight (sent, not yet delivered), "
                         "split over the publishers, at least 256 each")
    ap.add_argument("--window", type=int, default=100, help="QoS 1: unacked per publisher")
    ap.add_argument("--latency-rate", type=float, default=5000.0,
                    help="msg/s of the rate-limited latency run (skipped with --quick)")
    ap.add_argument("--placement-pairs", type=int, default=50,
                    help="pairs in the shoal-2 same/cross shard runs")
    ap.add_argument("--no-placement", action="store_true", help="skip same/cross shard runs")
    ap.add_argument("--no-calibrate", action="store_true", help="skip the generator check")
    ap.add_argument("--storm-clients", type=int, default=None,
                    help="idle clients in the connection storm (default 10000; 2000 with --quick)")
    ap.add_argument("--filters", type=int, default=None,
                    help="other subscriptions in the many-filters run (default 100000; "
                         "10000 with --quick)")
    ap.add_argument("--only", default=",".join(SCENARIO_GROUPS),
                    help="comma-separated scenario groups to run: "
                         f"{', '.join(SCENARIO_GROUPS)} (default all)")
    ap.add_argument("--png", nargs="?", const=True, default=None, metavar="FILE",
                    help="bar chart of msg/s per scenario and broker (matplotlib); default "
                         "file bench/results/e2e-<date>-<time>.png")
    args = ap.parse_args(argv)
    args.only = {g.strip() for g in args.only.split(",") if g.strip()}
    if args.only - set(SCENARIO_GROUPS):
        ap.error(f"unknown scenario group(s): {', '.join(sorted(args.only - set(SCENARIO_GROUPS)))}")
    # drain: QoS 0 loss is declared only after the subscribers got nothing for this long
    # (shoal has been seen to deliver in bursts a second or more apart under overload)
    args.idle = 3.0
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if args.storm_clients is None:
        args.storm_clients = 2000 if args.quick else 10_000
    if args.filters is None:
        args.filters = 10_000 if args.quick else 100_000
    raise_fd_limit()  # before any broker starts: they inherit it
    try:
        return loadgen.run_loop(main_async(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("interrupted: brokers stopped", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
