"""N shards under a router, run by supervisord: one broker to its clients.

Every test here runs the committed supervisor.conf from a private copy with
``numprocs`` rewritten to 4 (or left at the committed value where the count does not
matter), on port 0, and places its clients on chosen shards. The kernel spreads
connections over the SO_REUSEPORT group by a hash the test cannot steer, so a client is
placed by dialling: connect a TCP socket, ask the kernel which process accepted the
other end (``ss -tnp``: the row whose peer is our local address and whose process is
one of this broker's shards), and keep the socket if it landed where it should, else
close it (before any MQTT byte is sent) and dial again. paho then speaks MQTT over the
kept socket. That is how each test gets publishers and subscribers on every shard, and
sessions that move between shards.

The contract checked here, one host:

- a message reaches every matching subscriber on every shard, none lost, none duplicated,
  one publisher's messages in order, for QoS 0, 1 and 2;
- the retained store and shared subscriptions are host-wide;
- a client id has one session host-wide: a CONNECT on another shard takes it over
  (DISCONNECT 0x8E to the old connection, session present, queued messages follow it),
  and two racing CONNECTs never leave two live connections;
- a shard killed with SIGKILL does not stop the others, supervisord restarts it and it
  rejoins; persistent sessions (MQTT 5 session expiry > 0, 3.1.1 clean session 0), their
  subscriptions, their queued QoS 1/2 messages and the retained store survive that and a
  restart of the whole host;
- stopping is clean: exit status 0 everywhere, DISCONNECT 0x8B to MQTT 5 clients, no
  shared memory left behind, even after the router itself was killed.

No fixed ports and no sleeps to synchronise: every wait polls a condition with a
deadline.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.harness import UNHANDLED_MARKERS, broker_kind
from tests.system.supervision import Supervised, alive, make_supervised, poll

SHARDS = 4
HOST = "127.0.0.1"
SESSION_TAKEN_OVER = 0x8E
SERVER_SHUTTING_DOWN = 0x8B
STOPWAITSECS = 15  # supervisor.conf, [program:workers]
_ids = itertools.count()


def uid() -> str:
    return f"s{os.getpid()}x{next(_ids)}"


# ---------------------------------------------------------------------------------------
# Which shard holds a connection


class Msg(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    dup: bool
    retain: bool


class Broker:
    """A running supervisord + router + shards, seen from the test."""

    def __init__(self, sv: Supervised, info: dict[str, Any]) -> None:
        self.sv = sv
        self.refresh(info)

    def refresh(self, info: dict[str, Any]) -> None:
        self.info = info
        self.port = int(info["listeners"]["tcp"]["port"])
        self.workers = int(info["workers"])

    def shard_of(self, sock: socket.socket, timeout: float = 10.0) -> int | None:
        """The index of the shard that accepted the other end of ``sock``.

        None if no shard of this broker holds it within ``timeout`` (it waits in the
        accept queue of a shard that is down). Parses ``ss -tnpH``: the established row
        whose local address is the broker's and whose peer is ``sock``'s local address,
        owned by one of this supervisord's shard processes.
        """
        lhost, lport = sock.getsockname()[:2]
        rhost, rport = sock.getpeername()[:2]
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(
                ["ss", "-tnpH", "state", "established",
                 "(", "sport", "=", f":{rport}", "and", "dport", "=", f":{lport}", ")"],
                capture_output=True, text=True, check=True).stdout
            shards = self.sv.shard_pids()
            for line in out.splitlines():
                cols = line.split()
                # Recv-Q Send-Q Local Peer Process (no State column with a state filter)
                if len(cols) < 5 or cols[2] != f"{rhost}:{rport}" or cols[3] != f"{lhost}:{lport}":
                    continue
                owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
                found = {shards[p] for p in owners if p in shards}
                if found:
                    assert len(found) == 1, f"two shards hold one connection: {line}"
                    return found.pop()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)  # polling a condition with a deadline

    def dial(self, shard: int | None = None, exclude: Iterable[int] = (), attempts: int = 100,
             accept_timeout: float = 5.0) -> tuple[socket.socket, int]:
        """A TCP connection to the broker that landed on ``shard`` (any, if None) and not
        on a shard in ``exclude``. Nothing has been sent on it yet."""
        excluded = set(exclude)
        seen: dict[int | None, int] = defaultdict(int)
        for _ in range(attempts):
            s = socket.create_connection((HOST, self.port), timeout=10)
            k = self.shard_of(s, accept_timeout)
            seen[k] += 1
            if k is not None and (shard is None or k == shard) and k not in excluded:
                s.settimeout(None)
                return s, k
            s.close()
        raise AssertionError(f"no connection landed on shard {shard} (excluding {excluded}) in "
                             f"{attempts} attempts; landed: {dict(seen)}\n{self.sv.logs()}")

    def server_closed(self, c: Client) -> bool:
        """Whether the shard has closed its end of ``c``'s connection (any TCP state)."""
        lhost, lport = c.local
        out = subprocess.run(
            ["ss", "-tanpH", "(", "sport", "=", f":{self.port}", "and", "dport", "=",
             f":{lport}", ")"], capture_output=True, text=True, check=True).stdout
        return not any("pid=" in line for line in out.splitlines())


class _Pinned(mqtt.Client):
    """paho over a socket the test connected (and placed) itself.

    paho has no public way to take a connected socket; ``_create_socket_connection`` is
    the one method it calls to make one (paho 2.x), so it hands over ours.
    """

    def __init__(self, sock: socket.socket, **kw: Any) -> None:
        super().__init__(**kw)
        self._given: socket.socket | None = sock

    def _create_socket_connection(self) -> socket.socket:  # type: ignore[override]
        sock, self._given = self._given, None
        if sock is None:
            raise OSError("a pinned client does not reconnect")
        return sock


@dataclass
class Client:
    broker: Broker
    sock: socket.socket
    shard: int
    client_id: str = field(default_factory=lambda: f"c-{uid()}")
    version: int = 5
    clean: bool = True
    expiry: int = 0
    messages: list[Msg] = field(default_factory=list)
    connack: tuple[int, bool] | None = None
    gone: tuple[bool, int] | None = None  # (DISCONNECT packet from the server?, reason)
    subacks: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.local = self.sock.getsockname()[:2]
        proto = mqtt.MQTTv5 if self.version == 5 else mqtt.MQTTv311
        kw: dict[str, Any] = {}
        if self.version != 5:
            kw["clean_session"] = self.clean
        # no automatic reconnect: a client that reconnected by itself would take its
        # session back from the connection that took it over
        self.c = _Pinned(self.sock, callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=self.client_id, protocol=proto, reconnect_on_failure=False,
                         **kw)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = (rc.value, bool(flags.session_present))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.gone = (bool(flags.is_disconnect_packet_from_server), rc.value)

    def _on_message(self, client: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:
        self.messages.append(Msg(m.topic, bytes(m.payload), m.qos, bool(m.dup), bool(m.retain)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self.subacks[mid] = [r.value for r in rcs]

    # -- life cycle -------------------------------------------------------------------

    def send_connect(self) -> None:
        """Send CONNECT (paho writes it at once) without waiting for CONNACK."""
        if self.version == 5:
            props = Properties(PacketTypes.CONNECT)
            if self.expiry:
                props.SessionExpiryInterval = self.expiry
            self.c.connect(HOST, self.broker.port, keepalive=60, clean_start=self.clean,
                           properties=props)
        else:
            self.c.connect(HOST, self.broker.port, keepalive=60)
        self.c.loop_start()

    def connect(self, timeout: float = 20.0) -> Client:
        self.send_connect()
        poll(lambda: self.connack is not None or self.gone is not None, timeout,
             f"CONNACK for {self.client_id} on shard {self.shard}", self.broker.sv.logs)
        assert self.connack is not None and self.connack[0] == 0, (self.connack, self.gone)
        return self

    @property
    def session_present(self) -> bool:
        assert self.connack is not None
        return self.connack[1]

    @property
    def live(self) -> bool:
        return self.connack is not None and self.connack[0] == 0 and self.gone is None

    def subscribe(self, topic: str, qos: int) -> None:
        rc, mid = self.c.subscribe(topic, qos=qos)
        assert rc == 0 and mid is not None, rc
        poll(lambda: mid in self.subacks, 20, f"SUBACK for {topic} on shard {self.shard}",
             self.broker.sv.logs)
        assert self.subacks[mid] == [qos], self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == 0, info.rc
        return info

    def disconnect(self) -> None:
        """A clean DISCONNECT, and wait until the shard has closed its end."""
        self.c.disconnect()
        self.c.loop_stop()
        poll(lambda: self.broker.server_closed(self), 20,
             f"the shard to close {self.client_id}'s connection", self.broker.sv.logs)

    def close(self) -> None:
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()
        try:
            self.sock.close()
        except OSError:
            pass

    def payloads(self, topic_prefix: str = "") -> list[bytes]:
        return [m.payload for m in list(self.messages) if m.topic.startswith(topic_prefix)]


def wait_all_published(infos: Iterable[mqtt.MQTTMessageInfo], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "a PUBLISH was not acknowledged in time"


def check_streams(msgs: list[Msg], expected: dict[str, int], *, dup_ok: bool = False) -> str:
    """Whether ``msgs`` (payloads ``<publisher>:<seq>``) hold, per publisher, seq 0..n-1 in
    order. Repeats are an error unless ``dup_ok`` and the repeat carries DUP (QoS 1 resent
    after a reconnect). Returns "" if so, else what is wrong."""
    per: dict[str, list[int]] = defaultdict(list)
    problems = []
    for m in msgs:
        pub, _, seq = m.payload.decode().rpartition(":")
        n = int(seq)
        if n in per[pub]:
            if not (dup_ok and m.dup):
                problems.append(f"{pub}:{n} delivered again (dup flag {m.dup})")
            continue
        per[pub].append(n)
    for pub, n in expected.items():
        got = per.get(pub, [])
        if got != list(range(n)):
            missing = sorted(set(range(n)) - set(got))
            problems.append(f"{pub}: {len(got)} of {n}, missing {missing[:10]}, "
                            f"out of order: {got != sorted(got)}")
    extra = set(per) - set(expected)
    if extra:
        problems.append(f"from unexpected publishers {extra}")
    return "; ".join(problems)


# ---------------------------------------------------------------------------------------
# Fixtures


def _start(tmp_path_factory: pytest.TempPathFactory, numprocs: int | None) -> Broker:
    sv = make_supervised(tmp_path_factory.mktemp("sh"), numprocs)
    try:
        info = sv.wait_ready(60)
        broker = Broker(sv, info)
        # the ready file names the shards this supervisord runs
        by_index = {int(k): int(v) for k, v in info["shards"].items()}
        assert {pid: k for k, pid in by_index.items()} == sv.shard_pids(), (info, sv.shard_pids())
        return broker
    except BaseException:
        sv.kill_all()
        sv.cleanup_shm()
        raise


def _finish(broker: Broker) -> None:
    broker.sv.kill_all()
    broker.sv.cleanup_shm()


class Tracker:
    """Clients a test made, closed at the end whatever happened."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.clients: list[Client] = []

    def client(self, shard: int | None = None, exclude: Iterable[int] = (), **kw: Any) -> Client:
        sock, k = self.broker.dial(shard, exclude)
        c = Client(self.broker, sock, k, **kw)
        self.clients.append(c)
        return c.connect()

    def unconnected(self, shard: int | None = None, exclude: Iterable[int] = (),
                    **kw: Any) -> Client:
        sock, k = self.broker.dial(shard, exclude)
        c = Client(self.broker, sock, k, **kw)
        self.clients.append(c)
        return c

    def spread(self, roles: Iterable[str], **kw: Any) -> dict[str, list[Client]]:
        """One connected client per role on every shard: {role: [client on shard 0, ...]}.

        Each is dialled until the kernel put it on its shard (see :meth:`Broker.dial`)."""
        n = self.broker.workers
        out = {role: [self.client(k, client_id=f"{role}{k}-{uid()}", **kw) for k in range(n)]
               for role in roles}
        for role, clients in out.items():
            assert sorted(c.shard for c in clients) == list(range(n)), role
            assert all(self.broker.shard_of(c.sock) == c.shard for c in clients), role
        return out

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients = []


def _skip_unless_shoal() -> None:
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One 4-shard broker for the tests that leave it as they found it."""
    _skip_unless_shoal()
    broker = _start(tmp_path_factory, SHARDS)
    try:
        yield broker
        _no_unhandled_errors(broker.sv)
    finally:
        _finish(broker)


@pytest.fixture
def host(shared_broker: Broker) -> Iterator[Tracker]:
    t = Tracker(shared_broker)
    yield t
    t.close()


@pytest.fixture
def own_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    """A 4-shard broker of the test's own, for tests that kill or stop things."""
    _skip_unless_shoal()
    broker = _start(tmp_path_factory, SHARDS)
    t = Tracker(broker)
    try:
        yield t
        _no_unhandled_errors(broker.sv)
    finally:
        t.close()
        _finish(broker)


def _no_unhandled_errors(sv: Supervised) -> None:
    """A test fails when a process logged an error its event loop swallowed."""
    for path in sorted((sv.here / "var/log").glob("*.log")):
        text = path.read_text(errors="replace")
        found = [m for m in UNHANDLED_MARKERS if m in text]
        assert not found, f"{path.name} logged {found}:\n{text[-4000:]}"


# ---------------------------------------------------------------------------------------
# One host, one broker: delivery across shards


@pytest.mark.system
@pytest.mark.timeout(120)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_subscriber_gets_every_message_from_every_shard(host: Tracker, qos: int) -> None:
    clients = host.spread(["sub", "pub"])
    subs, pubs = clients["sub"], clients["pub"]
    base = f"fan/{uid()}/q{qos}"
    for s in subs:
        s.subscribe(f"{base}/#", qos)
    n = 50
    infos = []
    for i in range(n):
        for p in pubs:
            infos.append(p.publish(f"{base}/{p.shard}", f"p{p.shard}:{i}".encode(), qos))
    wait_all_published(infos)
    expected = {f"p{p.shard}": n for p in pubs}
    total = n * len(pubs)
    # a last message from each publisher: once it is in, everything before it is too
    # (one publisher's messages keep their order), so late duplicates would show
    for s in subs:
        poll(lambda: len(s.messages) >= total, 30,
             f"subscriber on shard {s.shard} to get {total} messages",
             lambda: f"got {len(s.messages)}: {check_streams(s.messages, expected)}")
    marks = [p.publish(f"{base}/{p.shard}", f"p{p.shard}:{n}".encode(), qos) for p in pubs]
    wait_all_published(marks)
    for s in subs:
        poll(lambda: len(s.messages) >= total + len(pubs), 30,
             f"the end markers at shard {s.shard}")
    done = {pub: n + 1 for pub in expected}
    for s in subs:
        assert check_streams(s.messages, done) == "", f"subscriber on shard {s.shard}"
        assert not [m for m in s.messages if m.dup], "DUP without any reconnect"
        assert {m.qos for m in s.messages} == {qos}
        assert len(s.messages) == total + len(pubs)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_retained_messages_are_host_wide_and_clear_everywhere(host: Tracker) -> None:
    base = f"ret/{uid()}"
    pubs = host.spread(["pub"])["pub"]
    infos = [p.publish(f"{base}/data/{p.shard}", f"kept by shard {p.shard}".encode(), 1,
                       retain=True) for p in pubs]
    wait_all_published(infos)
    wanted = {f"{base}/data/{k}": f"kept by shard {k}".encode() for k in range(SHARDS)}

    # a new subscriber on every shard gets the retained message of every shard
    for k in range(SHARDS):
        s = host.client(k)
        s.subscribe(f"{base}/data/#", 1)
        poll(lambda: len(s.messages) >= SHARDS, 20, f"retained messages at shard {k}",
             lambda: str(s.messages))
        got = {m.topic: m.payload for m in s.messages}
        assert got == wanted, f"shard {k}"
        assert all(m.retain for m in s.messages)

    # one shard clears them all (an empty retained payload), then sets a sentinel
    clearer = pubs[1]
    wait_all_published([clearer.publish(t, b"", 1, retain=True) for t in wanted])
    wait_all_published([clearer.publish(f"{base}/sentinel", b"s", 1, retain=True)])

    # every shard sends a new subscriber the retained messages of its first SUBSCRIBE
    # before answering its second: once the sentinel is in, a leftover would be too
    for k in range(SHARDS):
        s = host.client(k)
        s.subscribe(f"{base}/data/#", 1)
        s.subscribe(f"{base}/sentinel", 1)
        poll(lambda: any(m.topic.endswith("sentinel") for m in s.messages), 20,
             f"the retained sentinel at shard {k}")
        assert [m.topic for m in s.messages] == [f"{base}/sentinel"], f"shard {k} kept a cleared one"


@pytest.mark.system
@pytest.mark.timeout(120)
def test_shared_subscriptions_deliver_once_per_group_across_shards(host: Tracker) -> None:
    topic = f"shared/{uid()}"
    pub = host.client(0)
    # group g: a member on every shard; group h: members on two shards
    g = [host.client(k) for k in range(SHARDS)]
    h = [host.client(k) for k in (1, 3)]
    plain = host.client(2)
    for m in g:
        m.subscribe(f"$share/g/{topic}", 1)
    for m in h:
        m.subscribe(f"$share/h/{topic}", 1)
    plain.subscribe(topic, 1)
    assert len({m.shard for m in g}) == SHARDS and len({m.shard for m in h}) == 2

    n = 200
    wait_all_published([pub.publish(topic, f"m:{i}".encode(), 1) for i in range(n)])
    poll(lambda: len(plain.messages) >= n, 30, "the plain subscriber to get every message")
    for name, group in (("g", g), ("h", h)):
        poll(lambda: sum(len(m.messages) for m in group) >= n, 30,
             f"group {name} to get every message",
             lambda: str([(m.shard, len(m.messages)) for m in group]))
    # an end marker: the plain subscriber gets it after everything else
    wait_all_published([pub.publish(topic, b"end:0", 1)])
    poll(lambda: len(plain.messages) >= n + 1, 30, "the end marker")
    for name, group in (("g", g), ("h", h)):
        poll(lambda: any(x.payload == b"end:0" for m in group for x in m.messages), 30,
             f"the end marker in group {name}")

    assert check_streams(plain.messages, {"m": n, "end": 1}) == ""
    for name, group in (("g", g), ("h", h)):
        payloads = [x.payload for m in group for x in m.messages]
        assert len(payloads) == n + 1, f"group {name}: {len(payloads)} deliveries for {n + 1}"
        assert sorted(payloads) == sorted([f"m:{i}".encode() for i in range(n)] + [b"end:0"])
        counts = {m.shard: len(m.messages) for m in group}
        assert all(counts.values()), f"group {name}: a member shard got nothing: {counts}"


# ---------------------------------------------------------------------------------------
# Sessions move between shards


@pytest.mark.system
@pytest.mark.timeout(120)
def test_takeover_moves_the_session_to_another_shard(host: Tracker) -> None:
    cid = f"x-{uid()}"
    topic = f"takeover/{uid()}"
    pubs = host.spread(["pub"])["pub"]

    x1 = host.client(client_id=cid, clean=True, expiry=300)
    x1.subscribe(topic, 1)
    a = x1.shard

    # the same client id again, on a new socket that landed on another shard
    x2 = host.client(exclude=[a], client_id=cid, clean=False, expiry=300)
    b = x2.shard
    assert b != a
    assert x2.session_present, "the session did not follow the client to another shard"
    poll(lambda: x1.gone is not None, 20, f"the old connection on shard {a} to be closed")
    assert x1.gone == (True, SESSION_TAKEN_OVER), \
        f"old connection: expected DISCONNECT 0x8E, got {x1.gone} (from server?, reason)"

    # published from every shard after the CONNACK: all reach the new connection
    n = 20
    wait_all_published([p.publish(topic, f"a{p.shard}:{i}".encode(), 1)
                        for i in range(n) for p in pubs])
    expected = {f"a{p.shard}": n for p in pubs}
    poll(lambda: len(x2.messages) >= n * len(pubs), 30, f"messages at shard {b}",
         lambda: check_streams(x2.messages, expected))
    assert check_streams(x2.messages, expected) == ""
    assert x1.messages == []

    # offline: the session stays on shard b and queues; the client comes back elsewhere
    x2.disconnect()
    wait_all_published([p.publish(topic, f"q{p.shard}:{i}".encode(), 1)
                        for i in range(n) for p in pubs])
    x3 = host.client(exclude=[b], client_id=cid, clean=False, expiry=300)
    assert x3.shard != b
    assert x3.session_present
    queued = {f"q{p.shard}": n for p in pubs}
    poll(lambda: len(x3.messages) >= n * len(pubs), 30,
         f"the messages queued on shard {b} to reach shard {x3.shard}",
         lambda: check_streams(x3.messages, queued))
    assert check_streams(x3.messages, queued, dup_ok=True) == ""


@pytest.mark.system
@pytest.mark.timeout(180)
def test_racing_connects_on_two_shards_leave_one_connection(host: Tracker) -> None:
    pub = host.client(0)
    for rnd, (b, c) in enumerate([(1, 2), (3, 0), (2, 3)]):
        cid = f"race-{uid()}"
        topic = f"race/{uid()}"
        first = host.client(client_id=cid, clean=True, expiry=300)
        first.subscribe(topic, 1)
        first.disconnect()

        one = host.unconnected(b, client_id=cid, clean=False, expiry=300)
        two = host.unconnected(c, client_id=cid, clean=False, expiry=300)
        one.send_connect()
        two.send_connect()
        pair = (one, two)

        def settled() -> bool:
            # each has its CONNACK or is gone; no CONNACK still pending
            return all(x.connack is not None or x.gone is not None for x in pair) and \
                sum(x.live for x in pair) <= 1 and any(x.gone is not None for x in pair)

        def state() -> str:
            return f"round {rnd}: " + ", ".join(
                f"shard {x.shard}: connack {x.connack} gone {x.gone}" for x in pair)

        poll(settled, 30, "the two CONNECTs to settle", state)
        live = [x for x in pair if x.live]
        assert len(live) == 1, state()
        winner = live[0]
        loser = pair[1 - pair.index(winner)]
        assert loser.gone is not None
        if loser.connack is not None and loser.connack[0] == 0:
            assert loser.gone == (True, SESSION_TAKEN_OVER), state()
        assert winner.session_present, f"the session was lost in the race: {state()}"

        wait_all_published([pub.publish(topic, b"r:0", 1), pub.publish(topic, b"r:1", 1)])
        poll(lambda: len(winner.messages) >= 2, 20, "the message at the surviving connection",
             state)
        assert check_streams(winner.messages, {"r": 2}) == "", state()
        assert loser.messages == [], state()
        assert winner.live and not loser.live, state()
        winner.disconnect()


# ---------------------------------------------------------------------------------------
# Killing a shard


def _wait_restarted(broker: Broker, name: str, old_pid: int, timeout: float = 60) -> int:
    seen: list[Any] = []

    def restarted() -> bool:
        state, pid = broker.sv.status().get(name, ("?", None))
        seen.append((state, pid))
        return state == "RUNNING" and pid is not None and pid != old_pid

    poll(restarted, timeout, f"supervisord to restart {name} (was pid {old_pid})",
         lambda: f"{seen[-3:]}\n{broker.sv.logs()}")
    pid = broker.sv.status()[name][1]
    assert pid is not None
    return pid


def _pid_of_shard(broker: Broker, k: int) -> int:
    """The pid of shard ``k`` now (supervisorctl shows none while it is STARTING)."""
    pids = [pid for pid, index in broker.sv.shard_pids().items() if index == k]
    assert len(pids) == 1, f"shard {k}: processes {pids}"
    return pids[0]


def _serving(broker: Broker, t: Tracker, shard: int, attempts: int = 200) -> Client:
    """A connected client on ``shard``; connections queued at a restarting shard wait."""
    sock, k = broker.dial(shard, attempts=attempts, accept_timeout=1.0)
    c = Client(broker, sock, k)
    t.clients.append(c)
    return c.connect()


@pytest.mark.system
@pytest.mark.timeout(180)
def test_kill9_of_a_shard_under_traffic(own_host: Tracker) -> None:
    t = own_host
    broker = t.broker
    topic = f"kill/{uid()}"
    pub = t.client(0)
    subs = {k: t.client(k) for k in (1, 2, 3)}
    for s in subs.values():
        s.subscribe(topic, 1)

    # The publisher keeps paho's window of unacknowledged QoS 1 messages full instead of
    # waiting for each PUBACK: a message forwarded to the shard that dies may be
    # acknowledged late, which must not stop the flow to the shards that live.
    stop = threading.Event()
    sent: list[mqtt.MQTTMessageInfo] = []
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            for i in itertools.count():
                if stop.is_set():
                    return
                sent.append(pub.publish(topic, f"k:{i}".encode(), 1))
                stop.wait(0.004)  # pacing the load, not synchronising
        except BaseException as err:  # reported by the test thread
            errors.append(err)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        poll(lambda: all(len(s.messages) >= 20 for s in subs.values()), 30, "traffic to flow")

        victim = 2
        name = f"workers:shard-{victim}"
        old_pid = _pid_of_shard(broker, victim)
        os.kill(old_pid, signal.SIGKILL)
        poll(lambda: not alive(old_pid), 10, f"shard {victim} to die")
        at_kill = {k: len(s.messages) for k, s in subs.items()}

        # the other shards keep serving: their subscribers keep receiving ...
        for k in (1, 3):
            poll(lambda: len(subs[k].messages) >= at_kill[k] + 50, 30,
                 f"shard {k}'s subscriber to keep receiving after shard {victim} died",
                 lambda: f"published {len(sent)}, unacknowledged "
                         f"{sum(not i.is_published() for i in sent)}\n{broker.sv.logs()}")
        # ... and new connections to them work
        for k in (0, 1, 3):
            fresh = _serving(broker, t, k)
            fresh.subscribe(topic, 1)
            poll(lambda: len(fresh.messages) >= 10, 30, f"a new subscriber on shard {k}")

        # supervisord restarts the killed shard, and it rejoins
        new_pid = _wait_restarted(broker, name, old_pid)
        assert broker.sv.shard_pids().get(new_pid) == victim
        back = _serving(broker, t, victim)
        back.subscribe(topic, 1)
        poll(lambda: len(back.messages) >= 10, 30, f"the restarted shard {victim} to get traffic",
             broker.sv.logs)
        assert not errors, errors
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    wait_all_published(sent, 60)

    # the subscribers that never lost their shard lost nothing
    last = len(sent)
    for k in (1, 3):
        poll(lambda: len(subs[k].messages) >= last, 30, f"shard {k}'s subscriber to catch up",
             lambda: check_streams(subs[k].messages, {"k": last}))
        assert check_streams(subs[k].messages, {"k": last}) == "", f"subscriber on shard {k}"


def _persistent_pair(t: Tracker, shard: int, topic: str) -> tuple[str, str]:
    """A v5 client (session expiry 300) and a 3.1.1 client (clean session 0), both on
    ``shard``, subscribed QoS 1 to ``topic``, then disconnected cleanly."""
    v5, v3 = f"p5-{uid()}", f"p3-{uid()}"
    a = t.client(shard, client_id=v5, clean=True, expiry=300)
    b = t.client(shard, client_id=v3, version=4, clean=False)
    for c in (a, b):
        c.subscribe(topic, 1)
        c.disconnect()
    return v5, v3


def _reconnect_pair(t: Tracker, v5: str, v3: str, topic: str, n: int,
                    exclude: Iterable[int] = ()) -> None:
    a = t.client(exclude=exclude, client_id=v5, clean=False, expiry=300)
    b = t.client(client_id=v3, version=4, clean=False)
    for c, what in ((a, "MQTT 5, session expiry 300"), (b, "MQTT 3.1.1, clean session 0")):
        assert c.session_present, f"{what}: the session did not survive (now on shard {c.shard})"
        poll(lambda: len(c.messages) >= n, 30, f"{what}: the queued messages",
             lambda: check_streams(c.messages, {"q": n}))
        assert check_streams(c.messages, {"q": n}, dup_ok=True) == "", what
        assert all(m.topic == topic for m in c.messages)


@pytest.mark.system
@pytest.mark.timeout(180)
def test_persistent_sessions_survive_kill9_of_their_shard(own_host: Tracker) -> None:
    """Needs the embedded store (shards/store.py, data under runtime.data_dir)."""
    t = own_host
    broker = t.broker
    victim = 1
    topic = f"persist/{uid()}"
    v5, v3 = _persistent_pair(t, victim, topic)
    pub = t.client(3)
    n = 10
    wait_all_published([pub.publish(topic, f"q:{i}".encode(), 1) for i in range(n)])
    wait_all_published([pub.publish(f"{topic}/kept", b"retained", 1, retain=True)])

    name = f"workers:shard-{victim}"
    old_pid = _pid_of_shard(broker, victim)
    os.kill(old_pid, signal.SIGKILL)
    _wait_restarted(broker, name, old_pid)
    _serving(broker, t, victim)  # it accepts, so it has rejoined the router and its peers

    _reconnect_pair(t, v5, v3, topic, n, exclude=[victim])
    late = t.client(victim)
    late.subscribe(f"{topic}/kept", 1)
    poll(lambda: len(late.messages) >= 1, 20, "the retained message at the restarted shard")
    assert late.messages[0].payload == b"retained"


@pytest.mark.system
@pytest.mark.timeout(180)
def test_messages_published_while_a_shard_is_down_reach_its_persistent_sessions(
        own_host: Tracker) -> None:
    """PUBACKed QoS 1 messages for the offline persistent sessions of a shard that was just
    SIGKILLed (published before supervisord has it back) are not lost either."""
    t = own_host
    broker = t.broker
    victim = 2
    topic = f"down/{uid()}"
    v5, v3 = _persistent_pair(t, victim, topic)
    pub = t.client(0)
    old_pid = _pid_of_shard(broker, victim)
    os.kill(old_pid, signal.SIGKILL)
    poll(lambda: not alive(old_pid), 10, f"shard {victim} to die")
    n = 10
    # at once: a restart takes supervisord and Python far longer than these take to send
    wait_all_published([pub.publish(topic, f"q:{i}".encode(), 1) for i in range(n)], 60)

    _wait_restarted(broker, f"workers:shard-{victim}", old_pid)
    _serving(broker, t, victim)
    _reconnect_pair(t, v5, v3, topic, n, exclude=[victim])


@pytest.mark.system
@pytest.mark.timeout(180)
def test_persistent_sessions_and_retained_survive_a_whole_host_restart(own_host: Tracker) -> None:
    """Needs the embedded store (shards/store.py, data under runtime.data_dir)."""
    t = own_host
    broker = t.broker
    sv = broker.sv
    topic = f"restart/{uid()}"
    v5, v3 = _persistent_pair(t, 2, topic)
    pub = t.client(0)
    n = 10
    wait_all_published([pub.publish(topic, f"q:{i}".encode(), 1) for i in range(n)])
    wait_all_published([pub.publish(f"{topic}/kept/{k}", f"r{k}".encode(), 1, retain=True)
                        for k in range(3)])
    t.close()

    stop = sv.ctl("stop", "all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    poll(lambda: all(state == "STOPPED" for state, _ in sv.status().values()), 30,
         "every program to stop", sv.logs)
    sv.ready_path.unlink()
    start = sv.ctl("start", "all")
    assert start.returncode == 0, start.stdout + start.stderr
    broker.refresh(sv.wait_ready(60))  # a new router: port 0 means a new port

    _reconnect_pair(t, v5, v3, topic, n)
    for k in range(SHARDS):
        s = t.client(k)
        s.subscribe(f"{topic}/kept/#", 1)
        poll(lambda: len(s.messages) >= 3, 20, f"the retained messages at shard {k}")
        assert sorted(m.payload for m in s.messages) == [b"r0", b"r1", b"r2"]


# ---------------------------------------------------------------------------------------
# Stopping, and the router's own failures


def _exit_lines(sv: Supervised) -> list[str]:
    text = (sv.here / "var/log/supervisord.log").read_text(errors="replace")
    return re.findall(r"(?:stopped|exited): \S+ \(.*?\)", text)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_stop_all_is_clean_and_leaves_no_shared_memory(tmp_path_factory: pytest.TempPathFactory) -> None:
    _skip_unless_shoal()
    here = tmp_path_factory.mktemp("sh")
    sv = make_supervised(here, SHARDS, start=False)
    before = sv.shm_segments()
    assert not before, f"segments of an earlier broker in {here}: {before}"
    sv.start()
    try:
        broker = Broker(sv, sv.wait_ready(60))
        running = sv.shm_segments()
        assert running, f"no /dev/shm segment named shoal-{sv.tag}: is the tag computed right?"
        t = Tracker(broker)
        for k in range(SHARDS):  # a client on every shard
            t.client(k)

        stop = sv.ctl("stop", "all")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        poll(lambda: all(state == "STOPPED" for state, _ in sv.status().values()), 30,
             "every program to stop", sv.logs)
        t.close()
        lines = _exit_lines(sv)
        names = ["router", *(f"shard-{k}" for k in range(SHARDS))]
        problems = [f"{name} did not exit 0" for name in names
                    if f"stopped: {name} (exit status 0)" not in lines]
        problems += [f"{name}.log: {marker!r}" for name in names
                     for marker in UNHANDLED_MARKERS if marker in sv.log(f"{name}.log")]
        left = sv.shm_segments()
        if left:
            problems.append(f"shared memory left behind: {sorted(left)}")
        assert not problems, \
            f"`supervisorctl stop all` was not clean: {problems}\n{lines}\n{sv.logs()}"
        assert sv.shutdown() == 0
    finally:
        sv.kill_all()
        sv.cleanup_shm()


@pytest.mark.system
@pytest.mark.timeout(180)
def test_kill9_of_the_router(own_host: Tracker) -> None:
    t = own_host
    broker = t.broker
    sv = broker.sv
    fresh = sv.shm_segments()
    assert fresh, f"no /dev/shm segment named shoal-{sv.tag}"
    old = int(broker.info["pid"])
    sv.ready_path.unlink()
    os.kill(old, signal.SIGKILL)
    _wait_restarted(broker, "router", old)

    # the shards come back under the new router (rejoining or restarted); it reports ready
    info = sv.wait_ready(90)
    assert int(info["pid"]) != old and info["workers"] == SHARDS
    broker.refresh(info)
    poll(lambda: sorted(sv.shard_pids().values()) == list(range(SHARDS)), 30,
         "a shard process for every index", sv.logs)
    assert len(sv.shm_segments()) <= len(fresh), \
        f"the new router kept its predecessor's segments: {sv.shm_segments()} (fresh: {fresh})"

    topic = f"router/{uid()}"
    subs = [_serving(broker, t, k) for k in range(SHARDS)]
    for s in subs:
        s.subscribe(topic, 1)
    pub = _serving(broker, t, 0)
    wait_all_published([pub.publish(topic, f"r:{i}".encode(), 1) for i in range(5)])
    for s in subs:
        poll(lambda: len(s.messages) >= 5, 30, f"messages at shard {s.shard}")
        assert check_streams(s.messages, {"r": 5}) == ""
    t.close()

    stop = sv.ctl("stop", "all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    poll(lambda: all(state == "STOPPED" for state, _ in sv.status().values()), 30,
         "every program to stop", sv.logs)
    assert sv.shm_segments() == set(), "stale or duplicate segments left after a clean stop"


@pytest.mark.system
@pytest.mark.timeout(120)
def test_a_hung_shard_is_killed_by_the_router_and_restarted(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """supervisord only notices exits: a shard whose loop stops (SIGSTOP here) must be
    killed by the router's heartbeat watchdog so that supervisord restarts it."""
    _skip_unless_shoal()
    sv = make_supervised(tmp_path_factory.mktemp("hung"), 2, runtime="hung_shard_timeout = 2.0\n")
    try:
        sv.wait_ready(60)
        pids = sv.shard_pids()  # pid -> index
        hung_pid = next(pid for pid, k in pids.items() if k == 1)
        os.kill(hung_pid, signal.SIGSTOP)
        poll(lambda: not alive(hung_pid), 30, "the router to kill the hung shard", sv.logs)
        assert "sent no heartbeat" in sv.log("router.log"), sv.log("router.log")
        poll(lambda: sorted(sv.shard_pids().values()) == [0, 1]
             and hung_pid not in sv.shard_pids(), 30, "supervisord to restart shard 1", sv.logs)
        poll(lambda: "shard 1 (pid" in sv.log("router.log").split("sent no heartbeat")[-1]
             and "joined" in sv.log("router.log").split("sent no heartbeat")[-1], 30,
             "the restarted shard to rejoin the router", sv.logs)
    finally:
        sv.kill_all()
        sv.cleanup_shm()


@pytest.mark.system
@pytest.mark.timeout(120)
def test_a_shard_started_for_another_worker_count_is_reported(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The committed numprocs (2), and a third shard started by hand saying 3 workers."""
    _skip_unless_shoal()
    sv = make_supervised(tmp_path_factory.mktemp("sh"))
    stray: subprocess.Popen[bytes] | None = None
    try:
        broker = Broker(sv, sv.wait_ready(60))
        n = broker.workers
        before = sv.shard_pids()
        with open(sv.here / "stray.log", "wb") as out:
            stray = subprocess.Popen(
                [sys.executable, "-m", "shards", "--index", str(n), "--workers", str(n + 1)],
                cwd=str(sv.here), env=sv.env, stdout=out, stderr=subprocess.STDOUT)
        poll(lambda: "worker count mismatch" in sv.log("router.log"), 30,
             "the router to log the worker count mismatch",
             lambda: sv.logs() + (sv.here / "stray.log").read_text(errors="replace"))
        # refused: the stray shard ends; reported: the mismatch is logged (checked above)
        try:
            stray.wait(30)
        except subprocess.TimeoutExpired:
            pass
        # the running broker is not disturbed
        assert sv.shard_pids() == before
        t = Tracker(broker)
        try:
            topic = f"mismatch/{uid()}"
            subs = [t.client(k) for k in range(n)]
            for s in subs:
                s.subscribe(topic, 1)
            pub = t.client(0)
            wait_all_published([pub.publish(topic, b"m:0", 1)])
            for s in subs:
                poll(lambda: len(s.messages) >= 1, 20, f"the message at shard {s.shard}")
        finally:
            t.close()
    finally:
        if stray is not None and stray.poll() is None:
            stray.kill()
            stray.wait()
        sv.kill_all()
        sv.cleanup_shm()


@pytest.mark.system
@pytest.mark.timeout(120)
def test_stopping_the_workers_sends_disconnect_0x8b(own_host: Tracker) -> None:
    t = own_host
    sv = t.broker.sv
    clients = [t.client(k) for k in range(SHARDS)]
    started = time.monotonic()
    stop = sv.ctl("stop", "workers:*")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    for c in clients:
        poll(lambda: c.gone is not None, STOPWAITSECS, f"the client on shard {c.shard} to be "
             "disconnected")
        assert c.gone == (True, SERVER_SHUTTING_DOWN), \
            f"shard {c.shard}: expected DISCONNECT 0x8B, got {c.gone} (from server?, reason)"
    assert time.monotonic() - started < STOPWAITSECS
    lines = _exit_lines(sv)
    for k in range(SHARDS):
        assert f"stopped: shard-{k} (exit status 0)" in lines, lines
