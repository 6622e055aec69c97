"""Interoperability with MQTT.js (v5 and v3.1.1), the Node.js client.

Each test runs one ``node tests/interop/node/scenario.js SCENARIO_JSON`` process
that drives several MQTT.js clients through a list of steps and prints every event
as a JSON line; several checks share one process because node takes ~0.3 s to
start. The scenario sequences itself (each step waits for its acknowledgement),
so the test only reads the events afterwards and asserts on them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Broker

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parent.parent / "interop" / "node"
SCRIPT = NODE_DIR / "scenario.js"
NODE = shutil.which("node")
HAVE_MQTTJS = (NODE_DIR / "node_modules" / "mqtt" / "package.json").exists()
needs_mqttjs = pytest.mark.skipif(
    not (NODE and HAVE_MQTTJS),
    reason=("node is not installed" if not NODE else
            "MQTT.js is not installed: run scripts/install"))

V5 = {"protocolVersion": 5}
V311 = {"protocolVersion": 4}
VERSIONS = [pytest.param(5, id="v5"), pytest.param(4, id="v311")]


def run_scenario(b: Broker, steps: list[dict[str, Any]],
                 timeout_ms: int = 15000) -> list[dict[str, Any]]:
    scenario = {"url": f"mqtt://{b.host}:{b.port}", "timeout": timeout_ms, "steps": steps}
    r = subprocess.run([str(NODE), str(SCRIPT), json.dumps(scenario)], cwd=str(NODE_DIR),
                       capture_output=True, timeout=timeout_ms / 1000 + 10)
    events = [json.loads(line) for line in r.stdout.decode().splitlines() if line.startswith("{")]
    tail = json.dumps(events[-30:], indent=1) + "\n" + r.stderr.decode()[-2000:]
    assert r.returncode == 0 and events and events[-1]["event"] == "done", \
        f"scenario failed (exit {r.returncode}):\n{tail}"
    errors = [e for e in events if e["event"] == "error"]
    assert not errors, f"MQTT.js reported errors: {errors}"
    return events


def of(events: list[dict[str, Any]], event: str, client: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == event and (client is None or e.get("client") == client)]


def connect(name: str, client_id: str, version: int, **options: Any) -> dict[str, Any]:
    return {"op": "connect", "client": name,
            "options": {"protocolVersion": version, "clientId": client_id, **options}}


# ----------------------------------------------------------------------------- tests

@needs_mqttjs
@pytest.mark.parametrize("version", VERSIONS)
def test_qos_round_trip_and_retained(broker: Broker, uid: str, version: int) -> None:
    """Publish at QoS 0/1/2 to a QoS 2 subscription of the same protocol version and
    to a subscriber of the other version; a retained message reaches a client that
    subscribes later, with the retain flag set, and a live one does not have it."""
    other = 4 if version == 5 else 5
    t = f"{uid}/rt"
    events = run_scenario(broker, [
        connect("sub", f"{uid}-sub", version),
        connect("cross", f"{uid}-cross", other),
        connect("pub", f"{uid}-pub", version),
        {"op": "subscribe", "client": "sub", "topic": f"{t}/+", "qos": 2},
        {"op": "subscribe", "client": "cross", "topic": f"{t}/#", "qos": 1},
        {"op": "publish", "client": "pub", "topic": f"{t}/q0", "payload": "zero", "qos": 0},
        {"op": "publish", "client": "pub", "topic": f"{t}/q1", "payload": "one", "qos": 1},
        {"op": "publish", "client": "pub", "topic": f"{t}/q2", "payload": "two", "qos": 2},
        {"op": "publish", "client": "pub", "topic": f"{t}/keep", "payload": "kept", "qos": 1,
         "retain": True},
        # 300 KB: spans many TCP segments and reads on the broker's side
        {"op": "publish", "client": "pub", "topic": f"{t}/big", "payload": "0123456789",
         "repeat": 30000, "qos": 1},
        {"op": "expect", "client": "sub", "count": 5},
        {"op": "expect", "client": "cross", "count": 5},
        connect("late", f"{uid}-late", version),
        {"op": "subscribe", "client": "late", "topic": f"{t}/keep", "qos": 1},
        {"op": "expect", "client": "late", "count": 1},
        {"op": "end", "client": "sub"},
        {"op": "end", "client": "cross"},
        {"op": "end", "client": "late"},
        # clear the retained message so the shared broker does not keep it
        {"op": "publish", "client": "pub", "topic": f"{t}/keep", "payload": "", "qos": 1,
         "retain": True},
        {"op": "end", "client": "pub"},
    ])
    [suback] = of(events, "suback", "sub")
    assert suback["granted"][0]["qos"] == 2
    big = hashlib.sha256(b"0123456789" * 30000).hexdigest()
    got = {(m["topic"], m["payload"] or m["sha256"], m["qos"], m["retain"])
           for m in of(events, "message", "sub")}
    assert got == {(f"{t}/q0", "zero", 0, False), (f"{t}/q1", "one", 1, False),
                   (f"{t}/q2", "two", 2, False), (f"{t}/keep", "kept", 1, False),
                   (f"{t}/big", big, 1, False)}
    # QoS is the minimum of publication and subscription (1 for the cross-version client).
    cross = {(m["topic"], m["payload"] or m["sha256"], m["qos"]) for m in of(events, "message", "cross")}
    assert cross == {(f"{t}/q0", "zero", 0), (f"{t}/q1", "one", 1), (f"{t}/q2", "two", 1),
                     (f"{t}/keep", "kept", 1), (f"{t}/big", big, 1)}
    late = of(events, "message", "late")
    assert [(m["topic"], m["payload"], m["retain"]) for m in late] == [(f"{t}/keep", "kept", True)]


@needs_mqttjs
def test_v5_properties_pass_through(broker: Broker, uid: str) -> None:
    """User properties (order and repeated keys kept), content type, response topic,
    correlation data, payload format indicator and message expiry are forwarded
    to a v5 subscriber as they were published; a v3.1.1 subscriber gets the
    message without them."""
    t = f"{uid}/props"
    sent = {
        "userProperties": {"k": "v", "multi": ["1", "2"], "ünï": "cødé"},
        "contentType": "application/json",
        "responseTopic": f"{uid}/reply",
        "correlationData": "c0ffee00",
        "payloadFormatIndicator": True,
        "messageExpiryInterval": 3600,
    }
    events = run_scenario(broker, [
        connect("sub", f"{uid}-sub", 5),
        connect("old", f"{uid}-old", 4),
        connect("pub", f"{uid}-pub", 5),
        {"op": "subscribe", "client": "sub", "topic": t, "qos": 1},
        {"op": "subscribe", "client": "old", "topic": t, "qos": 1},
        {"op": "publish", "client": "pub", "topic": t, "payload": '{"a": 1}', "qos": 1,
         "properties": sent},
        {"op": "expect", "client": "sub", "count": 1},
        {"op": "expect", "client": "old", "count": 1},
    ])
    [m] = of(events, "message", "sub")
    props = m.get("properties") or {}
    assert m["payload"] == '{"a": 1}'
    assert props["userProperties"] == sent["userProperties"]
    assert props["contentType"] == "application/json"
    assert props["responseTopic"] == f"{uid}/reply"
    assert props["correlationData"] == {"hex": "c0ffee00"}
    assert props["payloadFormatIndicator"] is True
    # The broker must forward the remaining lifetime: at most what was sent, and not 0.
    assert 3590 <= props["messageExpiryInterval"] <= 3600
    [old] = of(events, "message", "old")
    assert old["payload"] == '{"a": 1}' and not old.get("properties")


@needs_mqttjs
def test_v5_subscription_options(broker: Broker, uid: str) -> None:
    """MQTT.js subscription options: No Local (own messages not sent back),
    subscription identifiers on delivered messages, Retain As Published (live
    retained messages keep the flag only with it), Retain Handling 2 (no retained
    messages on subscribe) against 0 (retained messages sent)."""
    t = f"{uid}/opts"
    events = run_scenario(broker, [
        connect("me", f"{uid}-me", 5),
        connect("other", f"{uid}-other", 5),
        {"op": "subscribe", "client": "me", "topic": f"{t}/nl", "qos": 1,
         "options": {"nl": True, "properties": {"subscriptionIdentifier": 7}}},
        {"op": "subscribe", "client": "me", "topic": f"{t}/rap/#", "qos": 1,
         "options": {"rap": True, "properties": {"subscriptionIdentifier": 9}}},
        {"op": "subscribe", "client": "me", "topic": f"{t}/norap/#", "qos": 1},
        {"op": "publish", "client": "me", "topic": f"{t}/nl", "payload": "own", "qos": 1},
        {"op": "publish", "client": "other", "topic": f"{t}/nl", "payload": "theirs", "qos": 1},
        {"op": "publish", "client": "other", "topic": f"{t}/rap/x", "payload": "r1", "qos": 1,
         "retain": True},
        {"op": "publish", "client": "other", "topic": f"{t}/norap/x", "payload": "r2", "qos": 1,
         "retain": True},
        {"op": "expect", "client": "me", "count": 3},
        {"op": "end", "client": "me"},
        connect("rh", f"{uid}-rh", 5),
        {"op": "subscribe", "client": "rh", "topic": f"{t}/rap/#", "qos": 1, "options": {"rh": 2}},
        {"op": "subscribe", "client": "rh", "topic": f"{t}/norap/#", "qos": 1, "options": {"rh": 0}},
        {"op": "publish", "client": "other", "topic": f"{t}/rap/live", "payload": "live", "qos": 1},
        {"op": "expect", "client": "rh", "count": 2},
        {"op": "end", "client": "rh"},
        {"op": "publish", "client": "other", "topic": f"{t}/rap/x", "payload": "", "retain": True,
         "qos": 1},
        {"op": "publish", "client": "other", "topic": f"{t}/norap/x", "payload": "", "retain": True,
         "qos": 1},
    ])
    me = [(m["topic"], m["payload"], m["retain"],
           (m.get("properties") or {}).get("subscriptionIdentifier"))
          for m in of(events, "message", "me")]
    assert me == [(f"{t}/nl", "theirs", False, 7), (f"{t}/rap/x", "r1", True, 9),
                  (f"{t}/norap/x", "r2", False, None)]
    rh = [(m["topic"], m["payload"], m["retain"]) for m in of(events, "message", "rh")]
    assert rh == [(f"{t}/norap/x", "r2", True), (f"{t}/rap/live", "live", False)]


@needs_mqttjs
def test_v5_topic_alias_from_client(broker: Broker, uid: str) -> None:
    """A publisher sets aliases explicitly (topic + alias, then alias only, then the
    alias rebound to another topic) and with autoUseTopicAlias; the subscriber,
    which allows the broker to use aliases towards it, sees the full topics."""
    t = f"{uid}/alias"
    events = run_scenario(broker, [
        connect("sub", f"{uid}-sub", 5, properties={"topicAliasMaximum": 5}),
        connect("pub", f"{uid}-pub", 5, autoUseTopicAlias=True),
        {"op": "subscribe", "client": "sub", "topic": f"{t}/#", "qos": 1},
        {"op": "publish", "client": "pub", "topic": f"{t}/first", "payload": "1", "qos": 1,
         "properties": {"topicAlias": 1}},
        {"op": "publish", "client": "pub", "topic": "", "payload": "2", "qos": 1,
         "properties": {"topicAlias": 1}},
        {"op": "publish", "client": "pub", "topic": f"{t}/second", "payload": "3", "qos": 0,
         "properties": {"topicAlias": 1}},
        {"op": "publish", "client": "pub", "topic": "", "payload": "4", "qos": 0,
         "properties": {"topicAlias": 1}},
        # autoUseTopicAlias: a topic already bound to an alias is sent as the alias alone
        {"op": "publish", "client": "pub", "topic": f"{t}/second", "payload": "5", "qos": 1},
        {"op": "expect", "client": "sub", "count": 5},
    ])
    [conn] = of(events, "connect", "pub")
    assert (conn["properties"] or {}).get("topicAliasMaximum", 0) >= 1, \
        f"broker must accept topic aliases for this test: {conn}"
    sent = [(e["topic"], e.get("alias")) for e in of(events, "sent", "pub")]
    assert sent == [(f"{t}/first", 1), ("", 1), (f"{t}/second", 1), ("", 1), ("", 1)], sent
    got = [(m["topic"], m["payload"]) for m in of(events, "message", "sub")]
    assert got == [(f"{t}/first", "1"), (f"{t}/first", "2"), (f"{t}/second", "3"),
                   (f"{t}/second", "4"), (f"{t}/second", "5")]


@needs_mqttjs
@pytest.mark.parametrize("version", VERSIONS)
def test_session_present_after_reconnect(broker: Broker, uid: str, version: int) -> None:
    """clean: false (v5: with a session expiry): the reconnect's CONNACK says
    session present, the subscription survived and QoS 1/2 messages published
    while away are delivered; a clean reconnect then finds no session."""
    t = f"{uid}/sess"
    cid = f"{uid}-persistent"
    keep: dict[str, Any] = {"clean": False}
    if version == 5:
        keep["properties"] = {"sessionExpiryInterval": 300}
    events = run_scenario(broker, [
        connect("pub", f"{uid}-pub", version),
        connect("s1", cid, version, **keep),
        {"op": "subscribe", "client": "s1", "topic": t, "qos": 2},
        {"op": "end", "client": "s1"},
        {"op": "publish", "client": "pub", "topic": t, "payload": "away-1", "qos": 1},
        {"op": "publish", "client": "pub", "topic": t, "payload": "away-2", "qos": 2},
        connect("s2", cid, version, **keep),
        {"op": "expect", "client": "s2", "count": 2},
        {"op": "end", "client": "s2"},
        connect("s3", cid, version, clean=True),
        {"op": "end", "client": "s3"},
    ])
    first, second, third = (of(events, "connect", c)[0] for c in ("s1", "s2", "s3"))
    assert first["sessionPresent"] is False
    assert second["sessionPresent"] is True
    assert third["sessionPresent"] is False
    got = [(m["payload"], m["qos"]) for m in of(events, "message", "s2")]
    assert got == [("away-1", 1), ("away-2", 2)]


@needs_mqttjs
@pytest.mark.parametrize("version", VERSIONS)
def test_will_on_dropped_connection(broker: Broker, uid: str, version: int) -> None:
    """A client whose TCP connection drops without DISCONNECT has its will
    published (v5: with its properties); one that ends cleanly does not."""
    t = f"{uid}/will"
    will_props = {"userProperties": {"why": "dropped"}, "contentType": "text/plain"}
    dropped_will: dict[str, Any] = {"topic": f"{t}/dropped", "payload": "gone", "qos": 1,
                                    "retain": False}
    if version == 5:
        dropped_will["properties"] = will_props
    events = run_scenario(broker, [
        connect("watch", f"{uid}-watch", version),
        {"op": "subscribe", "client": "watch", "topic": f"{t}/#", "qos": 1},
        connect("polite", f"{uid}-polite", version,
                will={"topic": f"{t}/polite", "payload": "should-not-appear", "qos": 1,
                      "retain": False}),
        {"op": "end", "client": "polite"},
        connect("victim", f"{uid}-victim", version, will=dropped_will),
        {"op": "destroy", "client": "victim"},
        {"op": "expect", "client": "watch", "count": 1},
        # a marker after the will: had the polite client's will been published, it
        # would (almost always) have come before this
        connect("pub", f"{uid}-pub", version),
        {"op": "publish", "client": "pub", "topic": f"{t}/marker", "payload": "m", "qos": 1},
        {"op": "expect", "client": "watch", "count": 2},
    ])
    msgs = of(events, "message", "watch")
    assert [(m["topic"], m["payload"]) for m in msgs] == [(f"{t}/dropped", "gone"), (f"{t}/marker", "m")]
    if version == 5:
        props = msgs[0].get("properties") or {}
        assert props["userProperties"] == {"why": "dropped"}
        assert props["contentType"] == "text/plain"
