"""supervisor.conf runs the broker: start, serve MQTT, report status, stop cleanly.

The broker is a router and ``numprocs`` shards ([program:router], [program:workers]).
The committed supervisor.conf is copied into a temporary directory (see
tests/system/supervision.py), so ``%(here)s`` (and with it var/: logs, pidfile, control
socket) is private to the test and a broker running from the checkout is not disturbed.
The broker is told where to listen through ``SHOAL_CONFIG``, the way an operator
configures it, and the router reports the port it got in its ready file once every
shard is ready: no fixed ports, no sleeps.
"""

from __future__ import annotations

import configparser
import os
import queue
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.harness import UNHANDLED_MARKERS, broker_kind
from tests.system.supervision import (
    CONF, REPO, Supervised, alive, make_supervised, poll, session_members,
)

# the names the old helpers had here; tests/system/test_shards.py uses the module directly
_poll = poll
_session_members = session_members
_alive = alive


@pytest.fixture
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    """supervisord running the committed supervisor.conf as it is (numprocs=2)."""
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    sv = make_supervised(tmp_path_factory.mktemp("sv"))
    try:
        yield sv
    finally:
        sv.kill_all()
        sv.cleanup_shm()


def _wait_ready(sv: Supervised, timeout: float = 30.0) -> dict[str, Any]:
    return sv.wait_ready(timeout)


def _round_trip(host: str, port: int, topic: str) -> tuple[str, bytes]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    connected, subscribed = threading.Event(), threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sv-{os.getpid()}",
                    protocol=mqtt.MQTTv311)
    c.on_connect = lambda client, userdata, flags, rc, props: connected.set()
    c.on_subscribe = lambda client, userdata, mid, rcs, props: subscribed.set()
    c.on_message = lambda client, userdata, msg: got.put((msg.topic, bytes(msg.payload)))
    c.connect(host, port, keepalive=30)
    c.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        c.subscribe(topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"
        c.publish(topic, b"through supervisord", qos=1).wait_for_publish(10)
        return got.get(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()


def _workers_section() -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(CONF.read_text())
    return parser["program:workers"]


def _numprocs() -> int:
    return int(_workers_section()["numprocs"])


def _program_names(n: int) -> list[str]:
    """How supervisorctl names the programs: the router, then workers:shard-0..n-1."""
    return ["router", *(f"workers:shard-{k}" for k in range(n))]


@pytest.mark.system
@pytest.mark.timeout(120)
def test_supervisord_runs_serves_and_stops_the_broker(supervised: Supervised) -> None:
    sv = supervised
    n = _numprocs()
    info = _wait_ready(sv)
    router_pid = int(info["pid"])
    shards = {int(k): int(v) for k, v in info["shards"].items()}
    assert info["workers"] == n and sorted(shards) == list(range(n)), info
    tcp = info["listeners"]["tcp"]
    assert tcp["port"] > 0

    assert _round_trip("127.0.0.1", int(tcp["port"]), "sv/check") == ("sv/check",
                                                                       b"through supervisord")

    # A process can be serving before supervisord counts it as started (startsecs), so
    # STARTING is expected for a moment.
    pids = {"router": router_pid, **{f"workers:shard-{k}": pid for k, pid in shards.items()}}
    statuses: list[str] = []

    def all_running() -> bool:
        status = sv.ctl("status")
        statuses.append(status.stdout + status.stderr)
        return status.returncode == 0 and all(
            re.search(rf"^{re.escape(name)}\s+RUNNING\s+pid {pid},", status.stdout, re.M)
            for name, pid in pids.items())

    _poll(all_running, 20, f"supervisorctl status to show {sorted(pids)} RUNNING",
          lambda: statuses[-1] if statuses else "")

    stop = sv.ctl("stop", "all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    for name in _program_names(n):
        assert f"{name}: stopped" in stop.stdout, stop.stdout
    for name, pid in pids.items():
        _poll(lambda: not _alive(pid), 20, f"{name} (pid {pid}) to exit", sv.logs)
    status = sv.ctl("status")
    for name in _program_names(n):
        assert re.search(rf"^{re.escape(name)}\s+STOPPED", status.stdout, re.M), status.stdout

    sv.proc.send_signal(signal.SIGTERM)
    assert sv.proc.wait(timeout=30) == 0, sv.logs()
    _poll(lambda: not _session_members(sv.proc.pid), 10, "supervisord's children to be gone",
          lambda: f"left over: {_session_members(sv.proc.pid)}")

    for name in ["router.log", *(f"shard-{k}.log" for k in range(n))]:
        text = sv.log(name)
        assert text, f"var/log/{name} is missing or empty"
        assert not [m for m in UNHANDLED_MARKERS if m in text], f"{name}:\n{text[-4000:]}"


@pytest.mark.system
@pytest.mark.timeout(120)
def test_supervisord_sigterm_stops_a_running_broker(supervised: Supervised) -> None:
    """Shutting supervisord down while the broker runs leaves no process, and every
    program exits 0: supervisord stops the workers group before the router."""
    sv = supervised
    n = _numprocs()
    info = _wait_ready(sv)
    pids = [int(info["pid"]), *(int(p) for p in info["shards"].values())]
    sv.proc.send_signal(signal.SIGTERM)
    assert sv.proc.wait(timeout=30) == 0, sv.logs()
    assert not [pid for pid in pids if _alive(pid)]
    assert not _session_members(sv.proc.pid)
    sv_log = (sv.here / "var/log/supervisord.log").read_text()
    for name in ["router", *(f"shard-{k}" for k in range(n))]:
        assert f"stopped: {name} (exit status 0)" in sv_log, sv.logs()


def test_supervisor_conf_needs_no_environment_and_stops_process_groups() -> None:
    text = CONF.read_text()
    settings = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(";"))
    assert "%(ENV_" not in settings, "supervisord refuses to start when such a variable is unset"
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(text)
    assert {"unix_http_server", "supervisord", "supervisorctl", "rpcinterface:supervisor",
            "program:router", "program:workers"} <= set(parser.sections())
    assert "program:shard" not in parser.sections(), "the single-shard program is gone"

    router = parser["program:router"]
    assert router["command"] == "python3 -m router"
    workers = parser["program:workers"]
    # the shard count is numprocs, written literally (see the ENV check above)
    assert int(workers["numprocs"]) >= 1
    assert "%(process_num)d" in workers["process_name"]
    command = workers["command"].split()
    assert command[:3] == ["python3", "-m", "shards"], workers["command"]
    assert "--index %(process_num)d" in workers["command"]
    assert "--workers %(numprocs)d" in workers["command"]
    # one log per shard, not one file shared by all
    assert "%(process_num)d" in workers["stdout_logfile"]
    # the router starts first and stops last
    assert int(router["priority"]) < int(workers["priority"])

    for program in (router, workers):
        assert program["directory"] == "%(here)s"
        for key, value in {"stopasgroup": "true", "killasgroup": "true", "stopsignal": "TERM",
                           "autorestart": "true", "redirect_stderr": "true"}.items():
            assert program[key] == value, (program.name, key)
    paths = [("supervisord", "logfile"), ("supervisord", "pidfile"), ("supervisord", "childlogdir"),
             ("unix_http_server", "file"), ("program:router", "stdout_logfile"),
             ("program:workers", "stdout_logfile")]
    for section, key in paths:
        assert parser[section][key].startswith("%(here)s/var/"), (section, key)
    log_dirs = {os.path.dirname(parser[s][k].replace("%(here)s/", ""))
                for s, k in [("supervisord", "logfile"), ("program:router", "stdout_logfile"),
                             ("program:workers", "stdout_logfile")]}
    for d in log_dirs:  # supervisord will not create them, so the checkout must carry them
        assert (REPO / d).is_dir(), f"{d} is missing from the checkout"
