"""Start a real broker process for a test and tear it down cleanly.

shoal is started as ``python -m shards --config FILE`` with every TCP listener on
port 0; once its sockets are bound it writes the chosen ports to a ready file
(JSON, written atomically), which is what we wait for: no fixed ports, no sleeps.

``SHOAL_TEST_BROKER=mosquitto`` runs the same black-box tests against Mosquitto
instead. That is how a new integration test is checked against a reference
broker before shoal is blamed; tests of shoal-only behaviour mark themselves
``shoal_only``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Lines that mean the broker's event loop swallowed an error: a test whose broker
# logged one fails, even if the client-side assertions passed.
UNHANDLED_MARKERS = ("Traceback (most recent call last)", "Exception in callback",
                     "exception was never retrieved", "Unhandled exception")


def broker_kind() -> str:
    return os.environ.get("SHOAL_TEST_BROKER", "shoal")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for nested dicts of scalars and lists of scalars."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = ""
    if prefix and scalars:
        out += f"[{prefix}]\n"
    out += "".join(line + "\n" for line in scalars)
    for key, value in tables:
        out += to_toml(value, f"{prefix}.{key}" if prefix else key)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def free_port() -> int:
    """Only for brokers that cannot bind port 0 and report it (Mosquitto)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    kind: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    loop: str = "uvloop"
    ports: dict[str, int] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.kind} did not stop within {timeout}s of SIGTERM")
        return self.proc.returncode

    def unhandled_errors(self) -> list[str]:
        text = self.log()
        return [m for m in UNHANDLED_MARKERS if m in text]


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before it was ready:\n"
                               + log_path.read_text(errors="replace"))
        time.sleep(0.01)  # polling a condition with a deadline, not synchronising by sleep
    proc.kill()
    raise RuntimeError("broker not ready in time:\n" + log_path.read_text(errors="replace"))


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("broker did not listen in time")


def start_shoal(workdir: Path, config: dict[str, Any] | None = None, loop: str = "uvloop",
                timeout: float = 20.0) -> Broker:
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    base: dict[str, Any] = {
        # every listener a test does not name stays off its fixed default port
        "listeners": {"tcp": {"bind": "127.0.0.1", "port": 0},
                      "quic": {"bind": "127.0.0.1", "port": 0}},
        "runtime": {"loop": loop, "ready_file": str(ready), "data_dir": str(workdir / "data")},
        "log": {"level": "INFO"},
    }
    cfg = merge(base, config or {})
    cfg_path = workdir / "shoal.toml"
    cfg_path.write_text(to_toml(cfg))
    log_path = workdir / "broker.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SHOAL_CONFIG", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shards", "--config", str(cfg_path)],
                                cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, env=env)
    info = _wait_for(ready, proc, log_path, timeout)
    ports = {name: int(l["port"]) for name, l in info["listeners"].items()}
    return Broker("shoal", "127.0.0.1", ports["tcp"], proc, workdir, log_path, loop, ports)


def start_mosquitto(workdir: Path, timeout: float = 10.0) -> Broker:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_keepalive 65535\n")
    log_path = workdir / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    _wait_listening("127.0.0.1", port, proc, timeout)
    return Broker("mosquitto", "127.0.0.1", port, proc, workdir, log_path, "n/a", {"tcp": port})
