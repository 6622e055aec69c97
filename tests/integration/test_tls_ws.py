"""TLS (with client certificates), WebSocket, WSS and the PROXY protocol against a real
broker: mosquitto_pub/sub, MQTT.js, paho and raw byte-level clients, under both loops.

The listeners here are shoal's (Mosquitto has no WebSocket listener in this setup),
so the module is shoal-only.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.conftest import _finish
from tests.harness import Broker, start_shoal
from tests.integration import rawclient as raw
from tests.integration.pki import PKI
from tests.integration.transports import HOST, TLSRaw, WSRaw, client_ctx
from tests.wsframes import client_frame, upgrade_request

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

NODE_DIR = Path(__file__).resolve().parent.parent / "interop" / "node"
NODE = shutil.which("node")
needs_mqttjs = pytest.mark.skipif(
    not (NODE and (NODE_DIR / "node_modules" / "mqtt" / "package.json").exists()),
    reason="node or MQTT.js (scripts/install) is missing")
needs_mosquitto_clients = pytest.mark.skipif(
    not shutil.which("mosquitto_pub"), reason="mosquitto clients are not installed")

def tls_table(pki: PKI, verify: str, username: str) -> dict[str, Any]:
    return {"enabled": True, "bind": HOST, "port": 0, "certfile": str(pki.server_cert),
            "keyfile": str(pki.server_key), "cafile": str(pki.ca), "verify_client": verify,
            "peer_cert_as_username": username}


@pytest.fixture(scope="module")
def tb(loop_name: str, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """TLS requiring client certificates, WS, and WSS with optional client certificates."""
    b = start_shoal(tmp_path_factory.mktemp("tlsws"), {"listeners": {
        "tls": tls_table(pki, "required", "cn"),
        "ws": {"enabled": True, "bind": HOST, "port": 0},
        "wss": tls_table(pki, "optional", "san"),
    }}, loop=loop_name)
    try:
        yield b
    finally:
        _finish(b)


@pytest.fixture(scope="module")
def pb(loop_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """PROXY protocol on the TCP and WS listeners."""
    b = start_shoal(tmp_path_factory.mktemp("proxy"), {"listeners": {
        "tcp": {"proxy_protocol": True},
        "ws": {"enabled": True, "bind": HOST, "port": 0, "proxy_protocol": True},
    }}, loop=loop_name)
    try:
        yield b
    finally:
        _finish(b)


# ------------------------------------------------------------------------- helpers

def mqtt_connect(c: raw.RawClient, cid: str) -> None:
    c.send(raw.connect(cid))
    p = c.expect(raw.CONNACK)
    assert p.body[1] == 0, p


def recv_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return out
        if not chunk:
            return out
        out += chunk


def mosq(tool: str, port: int, pki: PKI, *args: str, cert: bool = True,
         timeout: float = 20) -> subprocess.CompletedProcess[str]:
    cmd = [tool, "-h", HOST, "-p", str(port), "--cafile", str(pki.ca), *args]
    if cert:
        cmd += ["--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------- TLS

@needs_mosquitto_clients
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_over_tls_with_a_client_certificate(tb: Broker, pki: PKI, uid: str,
                                                              version: str) -> None:
    port = tb.ports["tls"]
    t = f"{uid}/tls"
    r = mosq("mosquitto_pub", port, pki, "-V", version, "-i", f"{uid}p", "-t", t, "-m", "over tls",
             "-q", "1", "-r")
    assert r.returncode == 0, r.stderr
    r = mosq("mosquitto_sub", port, pki, "-V", version, "-i", f"{uid}s", "-t", t, "-C", "1",
             "-W", "10", "-q", "1")
    assert r.returncode == 0 and r.stdout.strip() == "over tls", r
    assert mosq("mosquitto_pub", port, pki, "-t", t, "-n", "-r", "-q", "1").returncode == 0


@needs_mosquitto_clients
def test_required_client_certificate_is_enforced(tb: Broker, pki: PKI, uid: str) -> None:
    port = tb.ports["tls"]
    r = mosq("mosquitto_pub", port, pki, "-i", f"{uid}n", "-t", f"{uid}/x", "-m", "x", cert=False)
    assert r.returncode != 0, r
    r = subprocess.run(["mosquitto_pub", "-h", HOST, "-p", str(port), "--cafile", str(pki.ca),
                        "--cert", str(pki.stranger_cert), "--key", str(pki.stranger_key),
                        "-i", f"{uid}m", "-t", f"{uid}/x", "-m", "x"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0, r
    with pytest.raises((ssl.SSLError, ConnectionResetError, raw.RawEOF, BrokenPipeError)):
        with TLSRaw(port, client_ctx(pki, cert=False)) as c:
            mqtt_connect(c, f"{uid}raw")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_2_and_1_3_work_and_1_1_is_refused(tb: Broker, pki: PKI, uid: str) -> None:
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_ctx(pki)
        ctx.minimum_version = ctx.maximum_version = v
        with TLSRaw(tb.ports["tls"], ctx) as c:
            assert c.sock.version() == v.name.replace("_", ".").replace("TLSv1.", "TLSv1.")
            mqtt_connect(c, f"{uid}{v.name}")
    # SECLEVEL=0 lets this client offer TLS 1.1 (checked against a server that allows
    # it), so the refusal is the broker's min_version, not the client's own policy
    ctx = client_ctx(pki)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        TLSRaw(tb.ports["tls"], ctx).close()


@pytest.mark.parametrize("port_name", ["tls", "wss"])
def test_garbage_on_a_tls_port_is_closed(tb: Broker, pki: PKI, uid: str, port_name: str) -> None:
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", raw.connect(uid),
                 b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", bytes(range(256)) * 8):
        with socket.create_connection((HOST, tb.ports[port_name]), timeout=5) as s:
            s.sendall(junk)
            recv_until_closed(s)  # an alert at most, then the close
    with TLSRaw(tb.ports["tls"], client_ctx(pki)) as c:  # the listener still serves
        mqtt_connect(c, f"{uid}after")
    assert "TLS handshake failed" in tb.log()


@needs_mosquitto_clients
def test_certificate_name_becomes_the_username(make_broker: Any, pki: PKI, uid: str) -> None:
    """With anonymous access off and no such user, a CONNECT carrying a username is refused
    as bad credentials, one without as not authorized: the certificate's CN counts."""
    b = make_broker({"mqtt": {"allow_anonymous": False},
                     "listeners": {"tls": tls_table(pki, "required", "cn")}})
    r = mosq("mosquitto_pub", b.ports["tls"], pki, "-i", f"{uid}c", "-t", f"{uid}/x", "-m", "x")
    assert r.returncode != 0
    with raw.RawClient(HOST, b.port) as c:
        c.send(raw.connect(f"{uid}plain"))
        assert c.expect(raw.CONNACK).body[1] != 0
    log = b.log()
    assert "refused CONNECT from 127.0.0.1" in log
    # the certificate's CN arrived as the username and was checked (and refused: no such user)
    assert f"({uid + 'c'!r}, user 'alice'): bad user name or password" in log, log[-3000:]
    assert f"({uid + 'plain'!r}, user None): not authorized" in log, log[-3000:]


# ------------------------------------------------------------------------- WebSocket

def run_node(url: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    scenario = {"url": url, "timeout": 15000, "steps": steps}
    r = subprocess.run([str(NODE), "scenario.js", json.dumps(scenario)], cwd=str(NODE_DIR),
                       capture_output=True, timeout=30)
    events = [json.loads(line) for line in r.stdout.decode().splitlines() if line.startswith("{")]
    assert r.returncode == 0 and events[-1]["event"] == "done", (events[-20:], r.stderr[-2000:])
    assert not [e for e in events if e["event"] == "error"], events
    return events


@needs_mqttjs
@pytest.mark.parametrize("scheme", ["ws", "wss"])
@pytest.mark.parametrize("version", [4, 5])
def test_mqttjs_over_websocket(tb: Broker, pki: PKI, uid: str, scheme: str, version: int) -> None:
    url = f"{scheme}://localhost:{tb.ports[scheme]}/mqtt"
    opts: dict[str, Any] = {"protocolVersion": version}
    if scheme == "wss":
        opts["ca"] = pki.ca.read_text()
    t = f"{uid}/{scheme}"
    events = run_node(url, [
        {"op": "connect", "client": "sub", "options": {**opts, "clientId": f"{uid}s"}},
        {"op": "connect", "client": "pub", "options": {**opts, "clientId": f"{uid}p"}},
        {"op": "subscribe", "client": "sub", "topic": f"{t}/#", "qos": 2},
        {"op": "publish", "client": "pub", "topic": f"{t}/a", "payload": "one", "qos": 1},
        {"op": "publish", "client": "pub", "topic": f"{t}/b", "payload": "0123456789",
         "repeat": 30000, "qos": 2},
        {"op": "expect", "client": "sub", "count": 2},
        {"op": "end", "client": "sub"},
        {"op": "end", "client": "pub"},
    ])
    got = sorted((e["topic"], e["size"], e["qos"]) for e in events if e["event"] == "message")
    assert got == [(f"{t}/a", 3, 1), (f"{t}/b", 300000, 2)]


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_paho_over_websocket_reaches_a_tcp_subscriber(tb: Broker, pki: PKI, uid: str,
                                                      scheme: str) -> None:
    got = threading.Event()
    messages: list[bytes] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{uid}s")
    sub.on_message = lambda c, u, m: (messages.append(m.payload), got.set())
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(HOST, tb.port)
    sub.loop_start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{uid}p", transport="websockets",
                      protocol=paho.MQTTv5)
    pub.ws_set_options(path="/mqtt")
    if scheme == "wss":
        pub.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
    try:
        sub.subscribe(f"{uid}/p", qos=1)
        assert subscribed.wait(10)
        assert pub.connect("localhost", tb.ports[scheme]) == 0
        pub.loop_start()
        info = pub.publish(f"{uid}/p", b"x" * 70000, qos=1)  # a 64-bit-length frame
        info.wait_for_publish(10)
        assert got.wait(10) and messages == [b"x" * 70000]
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
        sub.loop_stop()


def test_raw_ws_fragments_ping_pong_and_close_handshake(tb: Broker, uid: str) -> None:
    with WSRaw(tb.ports["ws"]) as c:
        assert b"Sec-WebSocket-Protocol: mqtt" in c.response
        pkt = raw.connect(f"{uid}frag")
        # CONNECT split over three frames of one message, a ping between two of them
        c.sock.sendall(client_frame(2, pkt[:3], fin=False) + client_frame(9, b"ping!")
                       + client_frame(0, pkt[3:7], fin=False) + client_frame(0, pkt[7:]))
        assert c.expect(raw.CONNACK).body[1] == 0
        assert (0xA, b"ping!") in c.control
        # two packets in one frame, and a packet split across frames of separate messages
        both = raw.subscribe(1, [(f"{uid}/t", 0)]) + raw.publish(f"{uid}/t", b"hi")
        c.sock.sendall(client_frame(2, both[:5]) + client_frame(2, both[5:]))
        c.expect(raw.SUBACK)
        assert raw.parse_publish(c.expect(raw.PUBLISH), 4).payload == b"hi"
        c.sock.sendall(client_frame(8, struct.pack("!H", 1000) + b"bye"))
        assert c.read() is None  # the broker answers the close and ends the connection
        assert c.control[-1] == (8, struct.pack("!H", 1000))


@pytest.mark.parametrize("request_bytes, status", [
    (upgrade_request(protocol="chat"), b"400"),
    (upgrade_request(protocol=None), b"400"),
    (upgrade_request(path="/nope"), b"404"),
    (b"GET /mqtt HTTP/1.1\r\n" + b"X: y\r\n" * 2000, b"431"),
    (raw.connect("x") + b"\r\n\r\n", b"400"),
])
def test_bad_upgrade_is_answered_and_closed(tb: Broker, request_bytes: bytes, status: bytes) -> None:
    with socket.create_connection((HOST, tb.ports["ws"]), timeout=5) as s:
        try:
            s.sendall(request_bytes)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = recv_until_closed(s)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]


@pytest.mark.parametrize("frame, code", [
    (client_frame(1, b"text"), 1003),
    (client_frame(2, b"\x10\x00", masked=False), 1002),
    (client_frame(2, b"x", rsv=4), 1002),
    (client_frame(0, b"x"), 1002),
    (bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 40), 1009),
])
def test_bad_frames_get_a_close_frame_then_the_end(tb: Broker, uid: str, frame: bytes,
                                                   code: int) -> None:
    with WSRaw(tb.ports["ws"]) as c:
        mqtt_connect(c, f"{uid}bad")
        c.sock.sendall(frame)
        assert c.read() is None
        assert c.control and c.control[-1][0] == 8
        assert struct.unpack("!H", c.control[-1][1][:2])[0] == code
    assert "WebSocket error from 127.0.0.1" in tb.log()


def test_server_side_close_sends_a_close_frame(tb: Broker, uid: str) -> None:
    with WSRaw(tb.ports["ws"]) as c:
        c.send(raw.connect(f"{uid}x"))
        c.expect(raw.CONNACK)
        c.send(bytes.fromhex("f000"))  # reserved packet type 15: a protocol error
        assert c.read() is None
        assert c.control[-1] == (8, struct.pack("!H", 1000))


# ------------------------------------------------------------------------- PROXY protocol

def v2_header(src: str, sport: int) -> bytes:
    body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, "::1") \
        + struct.pack("!HH", sport, 1883)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x21, 0x21)) + struct.pack("!H", len(body)) + body


def test_proxy_v1_and_v2_give_the_real_address(pb: Broker, uid: str) -> None:
    # a well-formed CONNECT after the header is served
    with raw.RawClient(HOST, pb.port) as c:
        c.send(b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 1883\r\n")
        mqtt_connect(c, f"{uid}ok")
    # the address shows in the broker's log line for the connection
    for header, shown in ((b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 1883\r\n", "203.0.113.7:4242"),
                          (v2_header("2001:db8::7", 5151), "2001:db8::7:5151")):
        with raw.RawClient(HOST, pb.port) as c:
            c.send(header + bytes.fromhex("110e00044d5154540402003c00026331"))  # bad flags
            c.expect_eof()
        assert f"protocol error from {shown}" in pb.log(), pb.log()[-2000:]
    # the same over WebSocket: PROXY first, then the upgrade
    with socket.create_connection((HOST, pb.ports["ws"]), timeout=5) as s:
        s.sendall(b"PROXY TCP4 198.51.100.9 10.0.0.1 6060 8083\r\n")
        c = WSRaw(pb.ports["ws"], sock=s)
        c.send(raw.connect(f"{uid}ws"))
        c.expect(raw.CONNACK)
        c.send(bytes.fromhex("f000"))
        assert c.read() is None
    assert "protocol error from 198.51.100.9:6060" in pb.log()


@pytest.mark.parametrize("junk", [raw.connect("nohdr"), b"GARBAGE\r\n" + b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
                                  b"PROXY " + b"9" * 200])
def test_no_or_bad_proxy_header_is_closed(pb: Broker, junk: bytes) -> None:
    for port in (pb.port, pb.ports["ws"]):
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(junk)
            assert recv_until_closed(s) == b""
    assert "PROXY protocol error from 127.0.0.1" in pb.log()


def test_stalled_handshakes_and_headers_end_at_the_connect_timeout(make_broker: Any, pki: PKI) -> None:
    """No layer keeps a timer of its own: the MQTT connect timeout bounds a client that
    stops inside a WebSocket upgrade, a PROXY header or a TLS handshake."""
    b = make_broker({"mqtt": {"connect_timeout": 0.5}, "listeners": {
        "tcp": {"proxy_protocol": True},
        "ws": {"enabled": True, "bind": HOST, "port": 0},
        "tls": tls_table(pki, "none", "none") | {"cafile": ""},
    }})
    for port, partial in ((b.ports["ws"], upgrade_request()[:40]),
                          (b.ports["tcp"], b"PROXY TCP4 1.2.3.4"),
                          (b.ports["tls"], b"\x16\x03\x01")):
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.sendall(partial)
            assert recv_until_closed(s, timeout=10) == b""
    assert b.log().count("no CONNECT from") >= 2


def test_unreadable_certificate_stops_the_broker_with_a_clear_error(tmp_path: Path,
                                                                    loop_name: str) -> None:
    with pytest.raises(RuntimeError) as info:
        start_shoal(tmp_path, {"listeners": {"tls": {"enabled": True, "port": 0, "bind": HOST,
                                                     "certfile": str(tmp_path / "missing.pem")}}},
                    loop=loop_name)
    text = str(info.value)
    assert "exited with 1" in text and "cannot start the listeners: [listeners.tls]" in text
    assert "Traceback" not in text
