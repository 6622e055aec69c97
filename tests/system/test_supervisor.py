"""supervisor.conf runs the broker: start, serve MQTT, report status, stop cleanly.

The committed supervisor.conf is copied into a temporary directory, so ``%(here)s``
(and with it var/: logs, pidfile, control socket) is private to the test and a
broker running from the checkout is not disturbed. shoal is installed editable, so
``python3 -m shards`` works from any directory. The broker is told where to listen
through ``SHOAL_CONFIG``, the way an operator configures it, and reports the port it
got in its ready file: no fixed ports, no sleeps.
"""

from __future__ import annotations

import configparser
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.harness import UNHANDLED_MARKERS, broker_kind

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "supervisor.conf"


def _poll(cond: Callable[[], bool], timeout: float, what: str,
          on_timeout: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")
        time.sleep(0.02)  # polling a condition with a deadline, not synchronising by sleep


def _session_members(sid: int) -> list[int]:
    """Pids of live processes in session ``sid`` (everything supervisord started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Supervised:
    here: Path
    conf: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                               str(self.conf), *args],
                              capture_output=True, text=True, env=self.env, timeout=60)

    def logs(self) -> str:
        out = []
        for path in [self.here / "supervisord.out", *sorted((self.here / "var/log").glob("*.log"))]:
            if path.exists():
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    if broker_kind() != "shoal":
        pytest.skip("supervisor.conf runs shoal only")
    here = tmp_path
    conf = here / "supervisor.conf"
    shutil.copy(CONF, conf)
    (here / "var" / "log").mkdir(parents=True)  # as var/log/.gitkeep provides in a checkout
    sock = here / "var" / "supervisor.sock"
    assert len(str(sock)) < 100, f"unix socket path too long for AF_UNIX: {sock}"

    ready = here / "ready.json"
    config = here / "shoal.toml"
    config.write_text(
        "[listeners.tcp]\nbind = \"127.0.0.1\"\nport = 0\n"
        f"[runtime]\nready_file = {json.dumps(str(ready))}\n"
        f"data_dir = {json.dumps(str(here / 'data'))}\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CONFIG"] = str(config)
    env["PYTHONUNBUFFERED"] = "1"
    # supervisor.conf runs `python3`; make that the interpreter running the tests.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")

    with open(here / "supervisord.out", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
            cwd=str(here), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own session: every descendant is findable by sid
    sv = Supervised(here, conf, env, proc)
    try:
        yield sv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)


def _wait_ready(sv: Supervised, path: Path, timeout: float = 30.0) -> dict[str, Any]:
    def ready() -> bool:
        if sv.proc.poll() is not None:
            raise AssertionError(f"supervisord exited with {sv.proc.returncode}\n{sv.logs()}")
        sv_log = sv.here / "var/log/supervisord.log"
        if sv_log.exists() and "entered FATAL state" in sv_log.read_text(errors="replace"):
            raise AssertionError(f"the shard could not start\n{sv.logs()}")
        return path.exists()

    _poll(ready, timeout, "the broker's ready file", sv.logs)
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def _round_trip(host: str, port: int, topic: str) -> tuple[str, bytes]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    connected, subscribed = threading.Event(), threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sv-{os.getpid()}",
                    protocol=mqtt.MQTTv311)
    c.on_connect = lambda client, userdata, flags, rc, props: connected.set()
    c.on_subscribe = lambda client, userdata, mid, rcs, props: subscribed.set()
    c.on_message = lambda client, userdata, msg: got.put((msg.topic, msg.payload))
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


@pytest.mark.system
@pytest.mark.timeout(120)
def test_supervisord_runs_serves_and_stops_the_broker(supervised: Supervised) -> None:
    sv = supervised
    info = _wait_ready(sv, sv.here / "ready.json")
    shard_pid = int(info["pid"])
    tcp = info["listeners"]["tcp"]
    assert tcp["port"] > 0

    assert _round_trip("127.0.0.1", int(tcp["port"]), "sv/check") == ("sv/check",
                                                                       b"through supervisord")

    # A broker can be listening before supervisord counts it as started (startsecs), so
    # STARTING is expected for a moment.
    running = re.compile(rf"^shard\s+RUNNING\s+pid {shard_pid},", re.M)
    statuses: list[str] = []

    def is_running() -> bool:
        status = sv.ctl("status")
        statuses.append(status.stdout + status.stderr)
        return status.returncode == 0 and bool(running.search(status.stdout))

    _poll(is_running, 20, "supervisorctl status to show the shard RUNNING",
          lambda: statuses[-1] if statuses else "")

    stop = sv.ctl("stop", "all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "shard: stopped" in stop.stdout
    _poll(lambda: not _alive(shard_pid), 20, f"shard pid {shard_pid} to exit", sv.logs)
    status = sv.ctl("status")
    assert re.search(r"^shard\s+STOPPED", status.stdout, re.M), status.stdout

    sv.proc.send_signal(signal.SIGTERM)
    assert sv.proc.wait(timeout=30) == 0, sv.logs()
    _poll(lambda: not _session_members(sv.proc.pid), 10, "supervisord's children to be gone",
          lambda: f"left over: {_session_members(sv.proc.pid)}")

    shard_log = (sv.here / "var/log/shard.log").read_text(errors="replace")
    assert not [m for m in UNHANDLED_MARKERS if m in shard_log], shard_log[-4000:]


@pytest.mark.system
@pytest.mark.timeout(120)
def test_supervisord_sigterm_stops_a_running_broker(supervised: Supervised) -> None:
    """Shutting supervisord down while the shard runs leaves no process and no bound port."""
    sv = supervised
    info = _wait_ready(sv, sv.here / "ready.json")
    shard_pid = int(info["pid"])
    sv.proc.send_signal(signal.SIGTERM)
    assert sv.proc.wait(timeout=30) == 0, sv.logs()
    assert not _alive(shard_pid)
    assert not _session_members(sv.proc.pid)
    assert "stopped: shard (exit status 0)" in (sv.here / "var/log/supervisord.log").read_text()


def test_supervisor_conf_needs_no_environment_and_stops_process_groups() -> None:
    text = CONF.read_text()
    settings = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(";"))
    assert "%(ENV_" not in settings, "supervisord refuses to start when such a variable is unset"
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(text)
    assert {"unix_http_server", "supervisord", "supervisorctl",
            "rpcinterface:supervisor", "program:shard"} <= set(parser.sections())
    shard = parser["program:shard"]
    assert shard["command"] == "python3 -m shards"
    assert shard["directory"] == "%(here)s"
    for key, value in {"stopasgroup": "true", "killasgroup": "true", "stopsignal": "TERM",
                       "autorestart": "true", "redirect_stderr": "true"}.items():
        assert shard[key] == value, key
    for section, key in [("supervisord", "logfile"), ("supervisord", "pidfile"),
                         ("unix_http_server", "file"), ("program:shard", "stdout_logfile")]:
        assert parser[section][key].startswith("%(here)s/var/"), (section, key)
    log_dirs = {os.path.dirname(parser[s][k].replace("%(here)s/", ""))
                for s, k in [("supervisord", "logfile"), ("program:shard", "stdout_logfile")]}
    for d in log_dirs:  # supervisord will not create them, so the checkout must carry them
        assert (REPO / d).is_dir(), f"{d} is missing from the checkout"
