"""PROXY protocol on the TLS and WSS listeners works on every shard under supervisord: the
router binds the groups, each shard layers TLS under the PROXY reader. Connections are
opened until both shards have served one; the protocol error each ends with is logged
with the address from the PROXY header, in the log of the shard that served it."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from tests.harness import UNHANDLED_MARKERS, broker_kind
from tests.integration import rawclient as raw
from tests.integration.pki import PKI, make_pki
from tests.integration.test_proxy_tls import ProxiedTLS
from tests.integration.transports import WSRaw, client_ctx
from tests.system.supervision import REPO, Supervised, make_supervised, poll
from tests.system.test_tls_ws_shards import MAX_ATTEMPTS, SHARDS, _tls

pytestmark = pytest.mark.system


@pytest.fixture
def sv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Supervised, PKI]]:
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    here = tmp_path_factory.mktemp("svproxytls")
    pki = make_pki(here / "pki")
    s = make_supervised(here, numprocs=SHARDS, start=False)
    config = here / "shoal.toml"
    config.write_text(config.read_text()
                      + "[listeners.tls]\n" + _tls(pki, "optional") + "proxy_protocol = true\n"
                      + "[listeners.wss]\n" + _tls(pki, "optional") + "proxy_protocol = true\n")
    s.env["PYTHONPATH"] = str(REPO)
    s.start()
    try:
        yield s, pki
    finally:
        s.kill_all()
        s.cleanup_shm()


def _connect(kind: str, port: int, pki: PKI, i: int) -> raw.RawClient:
    header = f"PROXY TCP4 203.0.113.{i + 1} 10.0.0.1 {4000 + i} {port}\r\n".encode()
    if kind == "tls":
        return ProxiedTLS(port, client_ctx(pki), header)
    plain = socket.create_connection(("127.0.0.1", port), timeout=5)
    plain.sendall(header)
    return WSRaw(port, sock=client_ctx(pki).wrap_socket(plain, server_hostname="localhost"))


@pytest.mark.timeout(180)
def test_proxy_tls_and_wss_on_every_shard(sv: tuple[Supervised, PKI]) -> None:
    s, pki = sv
    info = s.wait_ready(60)
    ports = {name: int(v["port"]) for name, v in info["listeners"].items()}
    for kind in ("tls", "wss"):
        seen: set[int] = set()
        for i in range(MAX_ATTEMPTS):
            cid = f"sysproxy-{kind}-{i}"
            with _connect(kind, ports[kind], pki, i) as c:
                c.send(raw.connect(cid))
                assert c.expect(raw.CONNACK).body[1] == 0
                c.send(bytes.fromhex("f000"))
                c.packets_until_eof()
            line = f"protocol error from 203.0.113.{i + 1}:{4000 + i} ({cid!r})"

            def served() -> set[int]:
                return {k for k in range(SHARDS) if line in s.log(f"shard-{k}.log")}

            poll(lambda: bool(served()), 10, f"the log line of {cid}", s.logs)
            seen |= served()
            if seen == set(range(SHARDS)):
                break
        assert seen == set(range(SHARDS)), f"{kind}: only shards {seen} served"
    assert s.shutdown() == 0, s.logs()
    for k in range(SHARDS):
        text = s.log(f"shard-{k}.log")
        assert re.search(r"accepting MQTT on wss", text), text[-2000:]
        assert not [m for m in UNHANDLED_MARKERS if m in text], text[-4000:]
