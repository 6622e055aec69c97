"""Start and stop the brokers that bench/e2e.py compares, on free loopback ports.

- ``Mosquitto``: ``mosquitto -c conf`` (Debian's package), no persistence, large queues, no
  inflight limit, so its limits are not what a benchmark measures.
- ``Shoal(shards=1)``: one ``python -m shards`` process, the whole broker.
- ``Shoal(shards=N)``: ``python -m router`` plus N ``python -m shards --index k --workers N``
  with one config file; the router writes the ready file once every shard is ready.
- ``Amqtt``: amqtt (PyPI) from a generated YAML config, anonymous, no logging plugins.
- ``Sink``: bench/loadgen.py's trivial forwarder, to measure the generator itself.

Each broker knows its pids (for CPU accounting from /proc/<pid>/stat), pins them to CPUs,
keeps its stderr in a log file, and on ``stop()`` sends SIGTERM, waits, and checks that no
process and (shoal) no /dev/shm/shoal-* segment of its own is left behind.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the comm field: state is fields[0], utime is field 14 overall = fields[11]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for_file(path: str, timeout: float, procs: list[subprocess.Popen]) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode} before it was ready")
        time.sleep(0.02)
    raise TimeoutError(f"no ready file {path} after {timeout} s")


_LIVE: set["Broker"] = set()


@atexit.register
def _kill_live() -> None:
    """A benchmark that dies half-way must not leave brokers running (Mosquitto would)."""
    for broker in list(_LIVE):
        broker.stop(timeout=5.0)


class Broker:
    name = "broker"
    shares_cores = False

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"bench-{self.name}-")
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self.host = "127.0.0.1"
        self.port = 0
        self.log_marks: dict[str, int] = {}

    # --- lifecycle

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        path = os.path.join(self.dir, log_name)
        self.logs.append(path)
        with open(path, "ab") as log:
            proc = subprocess.Popen(args, cwd=REPO, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        _LIVE.add(self)
        return proc

    def start(self, cpus: set[int] | None = None) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def pin(self, cpus: set[int] | None) -> None:
        if cpus:
            for pid in self.pids():
                try:
                    os.sched_setaffinity(pid, cpus)
                except OSError:
                    pass

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self, timeout: float = 10.0) -> list[str]:
        """SIGTERM, wait, SIGKILL what is left; returns problems found (leftovers)."""
        problems: list[str] = []
        for p in self._stop_order():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    problems.append(f"pid {p.pid} ignored SIGTERM for {timeout} s: killed")
                    p.kill()
                    p.wait()
        problems += self._leftovers()
        _LIVE.discard(self)
        return problems

    def _stop_order(self) -> list[subprocess.Popen]:
        return list(self.procs)

    def _leftovers(self) -> list[str]:
        return []

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- logs

    def mark_logs(self) -> None:
        """Remember where the logs end: lines after a mark and before stop are 'during run'."""
        for path in self.logs:
            self.log_marks[path] = os.path.getsize(path) if os.path.exists(path) else 0

    def log_lines(self, since: dict[str, int] | None = None) -> list[str]:
        """Log lines, each prefixed with its file's name; ``since`` maps a path to the offset
        to start from (``self.log_marks`` for "since mark_logs()")."""
        out = []
        for path in self.logs:
            try:
                with open(path, "rb") as f:
                    f.seek((since or {}).get(path, 0))
                    data = f.read()
            except OSError:
                continue
            for line in data.decode(errors="replace").splitlines():
                if line.strip():
                    out.append(f"{os.path.basename(path)}: {line}")
        return out

    def log_sizes(self) -> dict[str, int]:
        return {p: os.path.getsize(p) for p in self.logs if os.path.exists(p)}


class Mosquitto(Broker):
    name = "mosquitto"

    def start(self, cpus: set[int] | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.port = free_port()
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\n"
                    "allow_anonymous true\n"
                    "persistence false\n"
                    "max_queued_messages 100000\n"
                    "max_inflight_messages 0\n"
                    "log_dest stderr\n"
                    "log_type error\n"
                    "log_type warning\n")
        self._spawn(["mosquitto", "-c", conf], "mosquitto.log")
        self.pin(cpus)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_lines()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("mosquitto did not listen")

    @staticmethod
    def version() -> str:
        try:
            out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
            return out.splitlines()[0].strip()
        except (OSError, IndexError):
            return "mosquitto ?"


AMQTT_CONFIG = """\
---
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
    max_connections: 0
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""


class Amqtt(Broker):
    """amqtt (PyPI, pure-Python asyncio broker; MQTT 3.1.1 only) with anonymous access and
    none of its packet/event logging plugins, so logging is not what is measured."""

    name = "amqtt"

    def start(self, cpus: set[int] | None = None) -> None:
        try:
            import amqtt  # noqa: F401  (only to say clearly what is missing)
        except ImportError:
            raise RuntimeError("amqtt is not installed (pip install amqtt)") from None
        self.port = free_port()
        conf = os.path.join(self.dir, "amqtt.yaml")
        with open(conf, "w") as f:
            f.write(AMQTT_CONFIG.format(port=self.port))
        self._spawn([sys.executable, "-c",
                     "import sys; from amqtt.scripts.broker_script import main; sys.exit(main())",
                     "-c", conf], "amqtt.log")
        self.pin(cpus)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"amqtt exited: {self.log_lines()[-20:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("amqtt did not listen")

    def log_lines(self, since: dict[str, int] | None = None) -> list[str]:
        # amqtt logs every connection at INFO: keep warnings and errors only
        return [line for line in super().log_lines(since) if " :: INFO - " not in line]

    @staticmethod
    def version() -> str:
        try:
            from importlib.metadata import version
            return f"amqtt {version('amqtt')}"
        except Exception:  # not installed
            return "amqtt ?"


SHOAL_CONFIG = """\
[listeners.tcp]
bind = "127.0.0.1"
port = 0

[listeners.quic]
bind = "127.0.0.1"
port = 0

[runtime]
ready_file = "{ready}"
data_dir = "{data}"
loop = "uvloop"

[log]
level = "WARNING"

[mqtt]
max_inflight = 65535
receive_maximum = 65535
max_queued_messages = 100000
# $SYS every second (default 10 s) so bench/e2e.py can read the broker's own drop counters
# after each scenario; one publish per key per second costs nothing measurable
sys_interval = 1.0
"""


class Shoal(Broker):
    def __init__(self, shards: int = 1) -> None:
        self.shards = shards
        self.name = f"shoal-{shards}"
        self.shares_cores = shards > 1
        super().__init__()
        self.ready: dict = {}
        self.shard_pids: dict[int, int] = {}

    def start(self, cpus: set[int] | None = None) -> None:
        ready = os.path.join(self.dir, "ready.json")
        conf = os.path.join(self.dir, "shoal.toml")
        with open(conf, "w") as f:
            f.write(SHOAL_CONFIG.format(ready=ready, data=os.path.join(self.dir, "data")))
        py = sys.executable
        if self.shards == 1:
            self._spawn([py, "-m", "shards", "--config", conf], "shard.log")
        else:
            self._spawn([py, "-m", "router", "--config", conf], "router.log")
            for k in range(self.shards):
                self._spawn([py, "-m", "shards", "--config", conf, "--index", str(k),
                             "--workers", str(self.shards)], f"shard{k}.log")
        self.pin(cpus)
        self.ready = wait_for_file(ready, 30, self.procs)
        tcp = self.ready["listeners"]["tcp"]
        self.host, self.port = tcp["host"], int(tcp["port"])
        if self.shards == 1:
            self.shard_pids = {0: int(self.ready["pid"])}
        else:
            self.shard_pids = {int(k): int(v) for k, v in self.ready["shards"].items()}
        # router/daemon.py names the segments /shoal-<blake2b-48(realpath(run_dir))>-index*,
        # run_dir being data_dir's sibling "run"; recomputed here rather than imported
        run_dir = os.path.realpath(os.path.join(self.dir, "run"))
        self.shm_tag = hashlib.blake2b(run_dir.encode(), digest_size=6).hexdigest()

    def _stop_order(self) -> list[subprocess.Popen]:
        # shards first, so the router sees them leave rather than them losing the router
        return list(self.procs[1:]) + list(self.procs[:1]) if self.shards > 1 else list(self.procs)

    def _leftovers(self) -> list[str]:
        tag = getattr(self, "shm_tag", None)
        left = sorted(n for n in shm_segments() if tag and n.startswith(f"shoal-{tag}-"))
        return [f"shared memory left behind: /dev/shm/{n}" for n in left]


class Sink(Broker):
    name = "sink"

    def start(self, cpus: set[int] | None = None) -> None:
        ready = os.path.join(self.dir, "ready.json")
        self._spawn([sys.executable, "-m", "bench.loadgen", "sink", "--ready-file", ready], "sink.log")
        self.pin(cpus)
        info = wait_for_file(ready, 10, self.procs)
        self.port = int(info["listeners"]["tcp"]["port"])


def shm_segments() -> list[str]:
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith("shoal-")]
    except OSError:
        return []


def make(name: str) -> Broker:
    if name == "mosquitto":
        return Mosquitto()
    if name == "sink":
        return Sink()
    if name == "amqtt":
        return Amqtt()
    if name.startswith("shoal-"):
        return Shoal(int(name.split("-", 1)[1]))
    raise ValueError(f"unknown broker {name!r}: mosquitto, amqtt, shoal-N, sink")
