"""MQTT over QUIC with an independent QUIC stack: Cloudflare quiche (npm @matrixai/quic).

tests/interop/node/quic_mqtt.mjs is a minimal MQTT 3.1.1 client written against quiche's
bindings only (no aioquic, no shoal code): ALPN ``mqtt``, certificate not verified, MQTT
on the first bidirectional stream, as EMQX clients do. It reaches the broker through
tests/relay.py's UDP relay; between its two rounds of publish/subscribe the test rebinds
the relay (new source port and address), so the broker sees the quiche client's address
change mid-connection. A TCP subscriber checks what reached the broker.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from shards.mqttclient import MQTTClient
from tests.harness import Broker
from tests.relay import UDPRelay

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

NODE_DIR = Path(__file__).resolve().parent.parent / "interop" / "node"
SCRIPT = NODE_DIR / "quic_mqtt.mjs"
NODE = shutil.which("node")
HAVE_QUICHE = (NODE_DIR / "node_modules" / "@matrixai" / "quic" / "package.json").exists()
pytestmark.append(pytest.mark.skipif(
    not (NODE and HAVE_QUICHE),
    reason="node is not installed" if not NODE else
    "@matrixai/quic is not installed: run scripts/install"))

COUNT = 20
TIMEOUT = 30.0


async def events_until(proc: asyncio.subprocess.Process, want: str) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        assert line, f"the node client exited before {want!r}"
        ev: dict[str, Any] = json.loads(line)
        assert ev["event"] != "failed", ev["message"]
        if ev["event"] == want:
            return ev


def test_quiche_client_publishes_subscribes_and_survives_a_rebind(broker: Broker, uid: str) -> None:
    async def main() -> None:
        watcher = await MQTTClient.connect_tcp(broker.host, broker.port, client_id=uid + "w")
        await watcher.subscribe([(f"{uid}/q", 1)])
        async with UDPRelay((broker.host, broker.ports["quic"])) as relay:
            opts = {"host": relay.listen_host, "port": relay.port, "clientId": uid + "n",
                    "topic": f"{uid}/q", "count": COUNT, "timeout": int(TIMEOUT * 1000)}
            proc = await asyncio.create_subprocess_exec(
                str(NODE), str(SCRIPT), json.dumps(opts), cwd=str(NODE_DIR),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            try:
                assert (await events_until(proc, "connack"))["connacks"] == 1
                assert (await events_until(proc, "suback"))["granted"] == 1
                assert (await events_until(proc, "phase"))["n"] == 1
                before = set(relay.upstream_addresses())
                after = set(await relay.rebind("127.0.0.7"))
                assert before.isdisjoint(after) and all(a[0] == "127.0.0.7" for a in after)
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
                assert (await events_until(proc, "phase"))["n"] == 2
                done = await events_until(proc, "done")
                assert done == {"event": "done", "connacks": 1, "received": 2 * COUNT}
                assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                err = await proc.stderr.read() if proc.stderr else b""  # type: ignore[union-attr]
            assert relay.to_server > 0 and relay.to_client > 0, err
        got = []
        for _ in range(2 * COUNT):
            msg = await asyncio.wait_for(watcher.messages.get(), TIMEOUT)
            assert msg is not None
            got.append(msg.payload.decode())
        assert got == [f"p{phase}-{i}" for phase in (1, 2) for i in range(COUNT)]
        await watcher.disconnect()
    asyncio.run(main())
