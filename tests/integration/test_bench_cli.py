"""``shoal bench conn|pub|sub`` as a user runs it: subprocesses against a real broker.

The subscriber prints ``ready: N subscribed`` once every SUBACK is in: we wait for that
line (no sleeps) before publishing; ``-L`` makes both sides end by themselves and
``--json`` puts the summary on the last line.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid

import pytest

from tests.harness import REPO, Broker

pytestmark = pytest.mark.integration
WAIT = 30.0


def bench(*args: str) -> list[str]:
    # the worktree's code (cwd first on sys.path), not whatever `shoal` is installed
    return [sys.executable, "-m", "shards.cli", "bench", *args]


def run_bench(*args: str) -> tuple[int, dict, str]:
    p = subprocess.run(bench(*args, "--json", "--quiet"), cwd=REPO, capture_output=True,
                       text=True, timeout=WAIT)
    summary = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
    return p.returncode, summary, p.stdout + p.stderr


def target(broker: Broker) -> list[str]:
    return ["-h", broker.host, "-p", str(broker.port)]


@pytest.mark.parametrize("qos,version,rate", [
    (0, "4", "5"),     # QoS 0 at 200 msg/s per client: nothing dropped
    (1, "5", "0"),     # flat out, windowed
    (2, "4", "0"),
])
def test_sub_receives_what_pub_sends(broker: Broker, qos: int, version: str, rate: str) -> None:
    tag = uuid.uuid4().hex[:8]
    n_subs, n_pubs, limit = 3, 4, 400
    sub = subprocess.Popen(
        bench("sub", *target(broker), "-V", version, "-c", str(n_subs), "-i", "0",
              "-t", f"bt/{tag}/#", "-q", str(qos), "-L", str(limit * n_subs),
              "--prefix", f"s{tag}", "--json", "--quiet"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = sub.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith(f"ready: {n_subs} subscribed"), first + sub.stderr.read()  # type: ignore[union-attr]
        code, pub, out = run_bench(
            "pub", *target(broker), "-V", version, "-c", str(n_pubs), "-i", "0", "-I", rate,
            "-t", f"bt/{tag}/%i/%c", "-q", str(qos), "-s", "64", "-L", str(limit),
            "--prefix", f"p{tag}")
        assert code == 0, out
        assert pub["connected"] == n_pubs and pub["sent"] == limit
        if qos:
            assert pub["acked"] == limit
        out_s, err_s = sub.communicate(timeout=WAIT)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert sub.returncode == 0, out_s + err_s
    summary = json.loads(out_s.strip().splitlines()[-1])
    assert summary["subscribed"] == n_subs
    assert summary["received"] == limit * n_subs
    assert summary["latency_samples"] == limit * n_subs  # every payload carried pub's stamp
    assert summary["p99_ms"] >= summary["p50_ms"] > 0


def test_conn_holds_50(broker: Broker) -> None:
    code, s, out = run_bench("conn", *target(broker), "-c", "50", "-i", "0", "--duration", "0",
                             "--prefix", f"c{uuid.uuid4().hex[:8]}")
    assert code == 0, out
    assert (s["connected"], s["conn_failed"], s["disconnected"]) == (50, 0, 0)


def test_conn_over_two_processes_and_source_addresses(broker: Broker) -> None:
    # 127.0.0.0/8 is all loopback on Linux: two source addresses without any setup
    code, s, out = run_bench("conn", *target(broker), "-c", "20", "-i", "1", "--duration", "0",
                             "--procs", "2", "-V", "4", "--shortids",
                             "--ifaddr", "127.0.0.1,127.0.0.2",
                             "--prefix", f"m{uuid.uuid4().hex[:8]}-")
    assert code == 0, out
    assert s["connected"] == 20 and s["conn_failed"] == 0


def test_failed_connections_are_counted() -> None:
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        code, summary, out = run_bench("conn", "-h", "127.0.0.1", "-p", str(port), "-c", "3",
                                       "-i", "0", "--duration", "0")
    assert code == 1, out
    assert (summary["connected"], summary["conn_failed"]) == (0, 3), out


def quic_target(broker: Broker) -> list[str]:
    return ["--quic", "-h", broker.host, "-p", str(broker.ports["quic"])]


def test_conn_over_quic(broker: Broker) -> None:
    b = broker  # the harness gives every broker a QUIC listener on port 0
    code, s, out = run_bench("conn", *quic_target(b), "-c", "20", "-i", "0", "--duration", "0",
                             "--prefix", f"q{uuid.uuid4().hex[:8]}")
    assert code == 0, out
    assert (s["connected"], s["conn_failed"], s["disconnected"]) == (20, 0, 0)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_pub_and_sub_over_quic(broker: Broker, qos: int) -> None:
    b = broker
    tag = uuid.uuid4().hex[:8]
    n_subs, n_pubs, limit = 2, 3, 300
    sub = subprocess.Popen(
        bench("sub", *quic_target(b), "-c", str(n_subs), "-i", "0", "-t", f"bq/{tag}/#",
              "-q", str(qos), "-L", str(limit * n_subs), "--prefix", f"s{tag}", "--json", "--quiet"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = sub.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith(f"ready: {n_subs} subscribed"), first + sub.stderr.read()  # type: ignore[union-attr]
        # publishers over QUIC too, rate-limited for QoS 0 so nothing is dropped on purpose
        code, pub, out = run_bench(
            "pub", *quic_target(b), "-c", str(n_pubs), "-i", "0", "-I", "5" if qos == 0 else "0",
            "-t", f"bq/{tag}/%i", "-q", str(qos), "-s", "64", "-L", str(limit),
            "--prefix", f"p{tag}")
        assert code == 0, out
        assert pub["connected"] == n_pubs and pub["sent"] == limit
        if qos:
            assert pub["acked"] == limit
        out_s, err_s = sub.communicate(timeout=WAIT)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert sub.returncode == 0, out_s + err_s
    summary = json.loads(out_s.strip().splitlines()[-1])
    assert summary["subscribed"] == n_subs
    assert summary["received"] == limit * n_subs


def test_quic_connect_failure_is_counted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a UDP port nobody answers on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        p = subprocess.run(bench("conn", "--quic", "-h", "127.0.0.1", "-p", str(port), "-c", "2",
                                 "-i", "0", "--duration", "0", "--json", "--quiet"),
                           cwd=REPO, capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 1, p.stdout + p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert (summary["connected"], summary["conn_failed"]) == (0, 2)
