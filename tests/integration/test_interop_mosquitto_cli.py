"""Interoperability with the Mosquitto command-line clients (libmosquitto).

``mosquitto_sub`` runs with ``-d`` so that its "Subscribed (mid: ...)" line tells
us when the subscription is in place (no sleeps), and with ``-F`` so every
message is one line ``MSG|topic|qos|retain|user-properties|content-type|
response-topic|correlation-data|message-expiry|payload``.
Every client process is bounded by ``-W`` / a subprocess timeout and killed at
teardown if still alive.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Broker

pytestmark = pytest.mark.integration

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
# mosquitto_sub flushes stdout after each message but not after its debug lines,
# which we need to see as they happen: stdbuf (coreutils) makes stdout line-buffered.
STDBUF = shutil.which("stdbuf")
needs_cli = pytest.mark.skipif(
    not (MOSQUITTO_PUB and MOSQUITTO_SUB and STDBUF),
    reason="mosquitto_pub/mosquitto_sub (apt-get install mosquitto-clients) or stdbuf missing")

FMT = "MSG|%t|%q|%r|%P|%C|%R|%D|%E|%p"
VERSIONS = [pytest.param("mqttv311", id="v311"), pytest.param("mqttv5", id="v5")]
WAIT = 10.0  # seconds: the longest any single expected event may take


class Sub:
    """A running mosquitto_sub whose output lines are read by a thread."""

    def __init__(self, b: Broker, client_id: str, topics: list[str], *extra: str,
                 version: str = "mqttv311", qos: int = 0, lifetime: int = 20) -> None:
        args = [str(STDBUF), "-oL", str(MOSQUITTO_SUB), "-h", b.host, "-p", str(b.port), "-V", version,
                "-i", client_id, "-q", str(qos), "-d", "-F", FMT, "-W", str(lifetime)]
        for t in topics:
            args += ["-t", t]
        args += list(extra)
        self.args = args
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _next(self, deadline: float, what: str) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"mosquitto_sub: no {what} within {WAIT}s; output so far:\n"
                                 + "\n".join(self.seen)) from None
        if line is None:
            self.lines.put(None)
            raise AssertionError(f"mosquitto_sub exited ({self.proc.poll()}) before {what}; "
                                 "output:\n" + "\n".join(self.seen))
        self.seen.append(line)
        return line

    def wait_for(self, prefix: str, what: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            line = self._next(deadline, what)
            if line.startswith(prefix):
                return line

    def wait_subscribed(self) -> "Sub":
        self.wait_for("Subscribed (mid", "SUBACK")
        return self

    def wait_connected(self) -> "Sub":
        line = self.wait_for("Client ", "CONNACK")
        while "received CONNACK" not in line:
            line = self.wait_for("Client ", "CONNACK")
        assert line.rstrip().endswith("(0)"), line
        return self

    def messages(self, n: int) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        deadline = time.monotonic() + WAIT
        while len(out) < n:
            line = self._next(deadline, f"message {len(out) + 1} of {n}")
            if line.startswith("MSG|"):
                _, topic, qos, retain, uprops, ctype, rtopic, corr, expiry, payload = \
                    line.split("|", 9)
                out.append({"topic": topic, "qos": qos, "retain": retain, "props": uprops,
                            "ctype": ctype, "response_topic": rtopic, "correlation": corr,
                            "expiry": expiry, "payload": payload})
        return out

    def finish(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("mosquitto_sub did not exit:\n" + "\n".join(self.seen)) from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(WAIT)


@pytest.fixture
def subs() -> Iterator[list[Sub]]:
    started: list[Sub] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.kill()


def start_sub(subs: list[Sub], *args: Any, **kw: Any) -> Sub:
    s = Sub(*args, **kw)
    subs.append(s)
    return s


def pub(b: Broker, topic: str, message: str | None, *extra: str, version: str = "mqttv311",
        qos: int = 0, client_id: str | None = None, stdin: str | None = None) -> None:
    args = [str(MOSQUITTO_PUB), "-h", b.host, "-p", str(b.port), "-V", version, "-t", topic,
            "-q", str(qos)]
    if client_id:
        args += ["-i", client_id]
    if message is not None:
        args += ["-m", message]
    args += list(extra)
    r = subprocess.run(args, input=stdin.encode() if stdin is not None else None,
                       capture_output=True, timeout=WAIT)
    assert r.returncode == 0, f"{args} exited {r.returncode}: {r.stdout!r} {r.stderr!r}"


# ----------------------------------------------------------------------------- tests

@needs_cli
@pytest.mark.parametrize("version", VERSIONS + [pytest.param("mqttv31", id="v31")])
def test_pub_sub_each_qos(broker: Broker, uid: str, subs: list[Sub], version: str) -> None:
    """A QoS 2 subscription receives QoS 0, 1 and 2 publications at their own QoS."""
    topic = f"{uid}/qos"
    s = start_sub(subs, broker, f"{uid}-sub", [topic], "-C", "3", version=version, qos=2)
    s.wait_subscribed()
    for qos in (0, 1, 2):
        pub(broker, topic, f"payload-at-qos-{qos}", version=version, qos=qos)
    got = s.messages(3)
    assert sorted((m["payload"], m["qos"], m["retain"]) for m in got) == [
        ("payload-at-qos-0", "0", "0"), ("payload-at-qos-1", "1", "0"), ("payload-at-qos-2", "2", "0")]
    assert s.finish() == 0


@needs_cli
def test_subscription_qos_downgrades_delivery(broker: Broker, uid: str, subs: list[Sub]) -> None:
    """A QoS 1 subscription gets a QoS 2 publication at QoS 1 (min of the two)."""
    topic = f"{uid}/down"
    s = start_sub(subs, broker, f"{uid}-sub", [topic], "-C", "2", qos=1)
    s.wait_subscribed()
    pub(broker, topic, "two", qos=2)
    pub(broker, topic, "zero", qos=0)
    got = {m["payload"]: m["qos"] for m in s.messages(2)}
    assert got == {"two": "1", "zero": "0"}


@needs_cli
def test_many_lines_in_order(broker: Broker, uid: str, subs: list[Sub]) -> None:
    """mosquitto_pub -l publishes 300 QoS 1 messages on one connection; the
    subscriber receives all of them in order (4.6 ordering)."""
    topic = f"{uid}/lines"
    n = 300
    s = start_sub(subs, broker, f"{uid}-sub", [topic], "-C", str(n), qos=1)
    s.wait_subscribed()
    pub(broker, topic, None, "-l", qos=1, stdin="".join(f"line-{i}\n" for i in range(n)))
    assert [m["payload"] for m in s.messages(n)] == [f"line-{i}" for i in range(n)]
    assert s.finish() == 0


@needs_cli
def test_wildcard_filters(broker: Broker, uid: str, subs: list[Sub]) -> None:
    """'+' matches exactly one level: the first two messages to arrive must be the
    two matching ones, though non-matching ones were published before them."""
    s = start_sub(subs, broker, f"{uid}-sub", [f"{uid}/+/x"], "-C", "2")
    s.wait_subscribed()
    for topic in (f"{uid}/a/b/x", f"{uid}/b/y", f"{uid}/x", f"{uid}/a/x", f"{uid}/c/x"):
        pub(broker, topic, "m", qos=1)  # QoS 1: each is acknowledged before the next
    assert [m["topic"] for m in s.messages(2)] == [f"{uid}/a/x", f"{uid}/c/x"]


@needs_cli
@pytest.mark.parametrize("version", VERSIONS)
def test_retained_delivered_to_later_subscriber(broker: Broker, uid: str, subs: list[Sub],
                                                version: str) -> None:
    topic = f"{uid}/retained"
    pub(broker, topic, "kept", "-r", version=version, qos=1)
    s = start_sub(subs, broker, f"{uid}-late", [topic], "-C", "1", version=version)
    [m] = s.messages(1)
    assert (m["payload"], m["retain"]) == ("kept", "1")
    assert s.finish() == 0

    # A zero-length retained publish clears it: a new subscriber's first message is
    # then a live one published after its SUBACK, not the old retained one.
    pub(broker, topic, None, "-r", "-n", version=version, qos=1)
    s2 = start_sub(subs, broker, f"{uid}-later", [topic], "-C", "1", version=version)
    s2.wait_subscribed()
    pub(broker, topic, "live", version=version)
    [m] = s2.messages(1)
    assert (m["payload"], m["retain"]) == ("live", "0")


@needs_cli
def test_v5_properties_pass_through(broker: Broker, uid: str, subs: list[Sub]) -> None:
    """User properties (in order, duplicates kept), content type, response topic,
    correlation data and the message expiry (received value minus time waited:
    never more than was sent) reach a v5 subscriber; a v3.1.1 subscriber gets the
    same message without them."""
    topic = f"{uid}/props"
    s5 = start_sub(subs, broker, f"{uid}-v5", [topic], "-C", "1", version="mqttv5")
    s3 = start_sub(subs, broker, f"{uid}-v3", [topic], "-C", "1", version="mqttv311")
    s5.wait_subscribed()
    s3.wait_subscribed()
    pub(broker, topic, "with-props", "-D", "publish", "user-property", "k", "v",
        "-D", "publish", "user-property", "a", "1", "-D", "publish", "user-property", "k", "v2",
        "-D", "publish", "content-type", "text/plain",
        "-D", "publish", "response-topic", f"{uid}/reply",
        "-D", "publish", "correlation-data", "corr-42",
        "-D", "publish", "message-expiry-interval", "600", version="mqttv5", qos=1)
    [m5] = s5.messages(1)
    assert m5["payload"] == "with-props"
    assert m5["props"] == "k:v a:1 k:v2"
    assert m5["ctype"] == "text/plain"
    assert m5["response_topic"] == f"{uid}/reply"
    assert m5["correlation"] == "corr-42"
    assert 590 <= int(m5["expiry"]) <= 600, m5  # [MQTT-3.3.2-6]
    [m3] = s3.messages(1)
    assert (m3["payload"], m3["props"], m3["ctype"], m3["response_topic"], m3["expiry"]) == \
        ("with-props", "", "", "", "")


@needs_cli
@pytest.mark.parametrize("version", VERSIONS)
def test_will_on_sigkill(broker: Broker, uid: str, subs: list[Sub], version: str) -> None:
    """A client killed with SIGKILL (no DISCONNECT) has its will published."""
    will_topic = f"{uid}/will"
    watcher = start_sub(subs, broker, f"{uid}-watch", [will_topic], "-C", "1", version=version)
    watcher.wait_subscribed()
    extra = ["--will-topic", will_topic, "--will-payload", "gone", "--will-qos", "1"]
    if version == "mqttv5":
        extra += ["-D", "will", "user-property", "why", "killed",
                  "-D", "will", "content-type", "text/x-will"]
    victim = start_sub(subs, broker, f"{uid}-victim", [f"{uid}/nothing"], *extra, version=version)
    victim.wait_subscribed()
    victim.kill(signal.SIGKILL)
    [m] = watcher.messages(1)
    assert (m["topic"], m["payload"]) == (will_topic, "gone")
    if version == "mqttv5":
        assert (m["props"], m["ctype"]) == ("why:killed", "text/x-will")


@needs_cli
def test_no_will_after_clean_disconnect(broker: Broker, uid: str, subs: list[Sub]) -> None:
    """mosquitto_sub -C 1 sends DISCONNECT when done: its will is discarded. The
    watcher's first message must be the marker published after the victim exited."""
    will_topic = f"{uid}/will"
    watcher = start_sub(subs, broker, f"{uid}-watch", [will_topic], "-C", "1")
    watcher.wait_subscribed()
    victim = start_sub(subs, broker, f"{uid}-victim", [f"{uid}/trigger"], "-C", "1",
                       "--will-topic", will_topic, "--will-payload", "should-not-appear")
    victim.wait_subscribed()
    pub(broker, f"{uid}/trigger", "bye")
    assert victim.finish() == 0
    # A broker that wrongly published the will would almost always do it before
    # handling the marker's later connection (a race could only hide the bug).
    pub(broker, will_topic, "marker", qos=1)
    [m] = watcher.messages(1)
    assert m["payload"] == "marker"


@needs_cli
@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_session_queues_while_offline(broker: Broker, uid: str, subs: list[Sub],
                                                 version: str) -> None:
    """-c (clean session off; v5: session expiry) keeps the subscription while the
    client is away; QoS 1 messages published meanwhile are delivered on return."""
    topic = f"{uid}/offline"
    cid = f"{uid}-persist"
    session = ["-c"] + (["-x", "60"] if version == "mqttv5" else [])
    first = start_sub(subs, broker, cid, [topic], *session, "-E", version=version, qos=1)
    assert first.finish() == 0  # -E: exits once the SUBACK arrived
    pub(broker, topic, "while-away-1", version=version, qos=1)
    pub(broker, topic, "while-away-2", version=version, qos=1)
    again = start_sub(subs, broker, cid, [topic], *session, "-C", "2", version=version, qos=1)
    assert [m["payload"] for m in again.messages(2)] == ["while-away-1", "while-away-2"]
    assert again.finish() == 0
    # Clean up the session so that it does not linger in the shared broker.
    done = start_sub(subs, broker, cid, [topic], "-E", version=version)
    assert done.finish() == 0
