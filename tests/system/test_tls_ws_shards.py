"""TLS (with client certificates), WebSocket and WSS work on every shard under supervisord.

The committed supervisor.conf with two shards, a router that binds the TLS, WS and
WSS socket groups and hands socket k to shard k. Connections are opened on each
listener until both shards have served one: each does a full MQTT round trip
(CONNECT, SUBSCRIBE, PUBLISH, the message back) and then a deliberate protocol error,
whose log line in var/log/shard-<k>.log tells which shard served it.

supervisord runs ``python3 -m shards``; PYTHONPATH points it at this checkout rather
than whichever checkout is pip-installed.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest

from tests.harness import UNHANDLED_MARKERS, broker_kind
from tests.integration import rawclient as raw
from tests.integration.pki import PKI, make_pki
from tests.integration.transports import TLSRaw, WSRaw, client_ctx
from tests.system.supervision import REPO, Supervised, make_supervised, poll

pytestmark = pytest.mark.system
SHARDS = 2
MAX_ATTEMPTS = 64  # the kernel's hash puts all of them on one shard with odds 2**-63


def _tls(pki: PKI, verify: str) -> str:
    return (f"enabled = true\nbind = \"127.0.0.1\"\nport = 0\ncertfile = {json.dumps(str(pki.server_cert))}\n"
            f"keyfile = {json.dumps(str(pki.server_key))}\ncafile = {json.dumps(str(pki.ca))}\n"
            f"verify_client = \"{verify}\"\npeer_cert_as_username = \"cn\"\n")


@pytest.fixture
def sv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Supervised, PKI]]:
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    here = tmp_path_factory.mktemp("svtls")
    pki = make_pki(here / "pki")
    s = make_supervised(here, numprocs=SHARDS, start=False)
    config = here / "shoal.toml"
    config.write_text(config.read_text()
                      + "[listeners.tls]\n" + _tls(pki, "required")
                      + "[listeners.ws]\nenabled = true\nbind = \"127.0.0.1\"\nport = 0\n"
                      + "[listeners.wss]\n" + _tls(pki, "optional"))
    s.env["PYTHONPATH"] = str(REPO)
    s.start()
    try:
        yield s, pki
    finally:
        s.kill_all()
        s.cleanup_shm()


def _connect(kind: str, port: int, pki: PKI) -> raw.RawClient:
    if kind == "tls":
        return TLSRaw(port, client_ctx(pki))
    if kind == "ws":
        return WSRaw(port)
    plain = socket.create_connection(("127.0.0.1", port), timeout=5)
    return WSRaw(port, sock=client_ctx(pki).wrap_socket(plain, server_hostname="localhost"))


def _served_by(s: Supervised, cid: str) -> set[int]:
    return {k for k in range(SHARDS) if f"({cid!r})" in s.log(f"shard-{k}.log")}


@pytest.mark.timeout(180)
def test_tls_ws_wss_serve_on_every_shard(sv: tuple[Supervised, PKI]) -> None:
    s, pki = sv
    info = s.wait_ready(60)
    assert info["workers"] == SHARDS
    ports = {name: int(v["port"]) for name, v in info["listeners"].items()}
    assert set(ports) == {"tcp", "tls", "ws", "wss", "quic"}, info
    for kind in ("tls", "ws", "wss"):
        seen: set[int] = set()
        for i in range(MAX_ATTEMPTS):
            cid = f"sys-{kind}-{i}"
            with _connect(kind, ports[kind], pki) as c:
                c.send(raw.connect(cid))
                assert c.expect(raw.CONNACK).body[1] == 0
                c.send(raw.subscribe(1, [(f"sys/{cid}", 1)]))
                c.expect(raw.SUBACK)
                c.send(raw.publish(f"sys/{cid}", b"round trip", qos=1, packet_id=2))
                got = c.expect(raw.PUBLISH, skip=(raw.PUBACK,))
                assert raw.parse_publish(got, 4).payload == b"round trip"
                c.send(bytes.fromhex("f000"))  # reserved type: logged with the client id
                c.packets_until_eof()
            poll(lambda: bool(_served_by(s, cid)), 10, f"the log line of {cid}", s.logs)
            seen |= _served_by(s, cid)
            if seen == set(range(SHARDS)):
                break
        assert seen == set(range(SHARDS)), f"{kind}: only shards {seen} served"
    assert s.shutdown() == 0, s.logs()
    for k in range(SHARDS):
        text = s.log(f"shard-{k}.log")
        assert re.search(r"accepting MQTT on wss", text), text[-2000:]
        assert not [m for m in UNHANDLED_MARKERS if m in text], text[-4000:]
