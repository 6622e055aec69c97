"""Run the committed supervisor.conf from a private copy: helpers for the system tests.

The committed supervisor.conf is copied into a temporary directory, so ``%(here)s``
(and with it var/: logs, pidfile, control socket) is private to the test and a broker
running from the checkout is not disturbed. The copy is the committed file except,
when a test asks for it, ``numprocs`` in ``[program:workers]`` (the number of shards).
shoal is installed editable, so ``python3 -m router`` and ``python3 -m shards`` work
from any directory. The broker is told where to listen through ``SHOAL_CONFIG``, the
way an operator configures it, and the router reports the port it got in its ready
file: no fixed ports, no sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "supervisor.conf"
SHM_DIR = Path("/dev/shm")


def poll(cond: Callable[[], bool], timeout: float, what: str,
         on_timeout: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")
        time.sleep(0.02)  # polling a condition with a deadline, not synchronising by sleep


def session_members(sid: int) -> list[int]:
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


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def shard_index_of_pid(pid: int) -> int | None:
    """The ``--index`` of a ``python3 -m shards`` process, None for any other process."""
    args = cmdline(pid)
    for i in range(len(args) - 1):
        if args[i] == "-m" and args[i + 1] == "shards":
            break
    else:
        return None
    for i, arg in enumerate(args[:-1]):
        if arg == "--index":
            return int(args[i + 1])
    return None


def conf_text(numprocs: int | None = None) -> str:
    """The committed supervisor.conf, with ``numprocs`` of [program:workers] rewritten."""
    text = CONF.read_text()
    if numprocs is None:
        return text
    section = re.search(r"^\[program:workers\]\n(?:(?!^\[).*\n?)*", text, re.M)
    assert section, "supervisor.conf has no [program:workers]"
    body, n = re.subn(r"^numprocs=\d+$", f"numprocs={numprocs}", section.group(0), flags=re.M)
    assert n == 1, "[program:workers] has no literal numprocs= line to rewrite"
    return text[:section.start()] + body + text[section.end():]


@dataclass
class Supervised:
    """One supervisord -n running a copy of supervisor.conf in ``here``."""

    here: Path
    conf: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    @property
    def ready_path(self) -> Path:
        return self.here / "ready.json"

    @property
    def run_dir(self) -> Path:
        # router.main.run_dir_for: beside the data directory (here/data -> here/run)
        return self.here / "run"

    @property
    def tag(self) -> str:
        from router.daemon import host_tag
        return host_tag(str(self.run_dir))

    def shm_segments(self) -> set[str]:
        """This broker's shared-memory segments (their names contain ``shoal-<tag>``)."""
        mark = f"shoal-{self.tag}"
        try:
            return {name for name in os.listdir(SHM_DIR) if mark in name}
        except FileNotFoundError:
            return set()

    def start(self) -> None:
        """Start (or, after :meth:`shutdown`, start again) supervisord in the foreground."""
        with open(self.here / "supervisord.out", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)],
                cwd=str(self.here), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own session: every descendant is findable by sid
        self.procs.append(proc)

    def shutdown(self, timeout: float = 60.0) -> int:
        """SIGTERM supervisord (it stops every program first) and wait for it."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        poll(lambda: not session_members(self.proc.pid), 10, "supervisord's children to be gone",
             lambda: f"left over: {session_members(self.proc.pid)}")
        return code

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            for pid in session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup_shm(self) -> None:
        """Unlink this test broker's segments, whatever the test left behind."""
        for name in self.shm_segments():
            try:
                (SHM_DIR / name).unlink()
            except FileNotFoundError:
                pass

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                               str(self.conf), *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def status(self) -> dict[str, tuple[str, int | None]]:
        """``supervisorctl status`` as {name: (state, pid)}."""
        out: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status").stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                m = re.search(r"\bpid (\d+),", line)
                out[parts[0]] = (parts[1], int(m.group(1)) if m else None)
        return out

    def shard_pids(self) -> dict[int, int]:
        """{pid: shard index} of the shard processes this supervisord runs now."""
        pids: dict[int, int] = {}
        for proc in self.procs:
            for pid in session_members(proc.pid):
                k = shard_index_of_pid(pid)
                if k is not None:
                    pids[pid] = k
        return pids

    def log(self, name: str) -> str:
        path = self.here / "var" / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        out = []
        for path in [self.here / "supervisord.out", *sorted((self.here / "var/log").glob("*.log"))]:
            if path.exists():
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """The router's ready file, once every shard is ready."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisord exited with {self.proc.returncode}\n"
                                     f"{self.logs()}")
            sv_log = self.here / "var/log/supervisord.log"
            if sv_log.exists() and "entered FATAL state" in sv_log.read_text(errors="replace"):
                raise AssertionError(f"a program could not start\n{self.logs()}")
            return self.ready_path.exists()

        poll(ready, timeout, "the router's ready file", self.logs)
        info: dict[str, Any] = json.loads(self.ready_path.read_text())
        return info


def make_supervised(here: Path, numprocs: int | None = None, start: bool = True,
                    runtime: str = "", quic: str = "") -> Supervised:
    """A private copy of supervisor.conf in ``here`` with a broker on 127.0.0.1, port 0."""
    conf = here / "supervisor.conf"
    conf.write_text(conf_text(numprocs))
    (here / "var" / "log").mkdir(parents=True)  # as var/log/.gitkeep provides in a checkout
    sock = here / "var" / "supervisor.sock"
    assert len(str(sock)) < 100, f"unix socket path too long for AF_UNIX: {sock}"

    ready = here / "ready.json"
    config = here / "shoal.toml"
    config.write_text(
        "[listeners.tcp]\nbind = \"127.0.0.1\"\nport = 0\n"
        f"[listeners.quic]\nbind = \"127.0.0.1\"\nport = 0\n{quic}"
        f"[runtime]\nready_file = {json.dumps(str(ready))}\n"
        f"data_dir = {json.dumps(str(here / 'data'))}\n{runtime}")

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CONFIG"] = str(config)
    env["PYTHONUNBUFFERED"] = "1"
    # supervisor.conf runs `python3`; make that the interpreter running the tests.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # and this checkout's code, whichever checkout `pip install -e` last pointed at
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    sv = Supervised(here, conf, env)
    if start:
        sv.start()
    return sv

