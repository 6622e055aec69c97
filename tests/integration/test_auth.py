"""Authentication, ACL, banned clients and flapping against a real broker.

The user store is made with the `shoal user` CLI and the banned list with `shoal
ban`, the ACL file is written by a fixture; reason codes are read from paho (MQTT 5
and 3.1.1) and mosquitto_pub. No fixed ports; where the broker must notice a
change (a file reloaded, a ban running out) the test polls with a deadline.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, Broker, to_toml
from tests.integration.clients import V5, V311, Client
from tests.integration.v5client import PUBREC, RawClient

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

BAD_CREDENTIALS = 0x86  # paho reports a v3 return code 4 as 0x86 too
NOT_AUTHORIZED = 0x87
BANNED = 0x8A
MOSQUITTO_PUB = shutil.which("mosquitto_pub")

ACL = """\
# devices talk in their own tree; users in theirs
allow all               all        devices/%c/#
allow all               all        users/%u/#
allow ip:127.0.0.0/8    publish    local/#
allow ip:10.0.0.0/8     subscribe  local/#
allow user:admin        all        #
deny  all               all        #
"""


class Auth:
    """An auth setup outside the broker's workdir: files the CLI writes, config to use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.users = root / "users.json"
        self.banned = root / "banned.json"
        self.acl = root / "acl.conf"
        self.cli_config = root / "cli.toml"
        self.cli_config.write_text(to_toml({"auth": self.auth_table()}))

    def auth_table(self) -> dict[str, Any]:
        return {"backends": "builtin", "users_file": str(self.users),
                "banned_file": str(self.banned), "reload_interval": 0.05}

    def shoal(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shards.cli", *args, "-c", str(self.cli_config)],
                              cwd=str(REPO), input=stdin, capture_output=True, text=True,
                              timeout=30, check=True)

    def add_user(self, name: str, password: str) -> None:
        self.shoal("user", "add", name, "--password-stdin", stdin=password + "\n")

    def config(self, acl: str | None = None, anonymous: bool = True, **auth: Any) -> dict[str, Any]:
        table = dict(self.auth_table(), **auth)
        if acl is not None:
            self.acl.write_text(acl)
            table["acl_file"] = str(self.acl)
        return {"auth": table, "mqtt": {"allow_anonymous": anonymous}}


@pytest.fixture
def auth(tmp_path: Path) -> Auth:
    a = Auth(tmp_path)
    a.add_user("alice", "wonderland")
    a.add_user("admin", "s3cret")
    return a


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: Broker, client_id: str, *, user: str | None = None,
             password: str | None = None, version: int = V5) -> Client:
        c = Client(broker, client_id=client_id, version=version)
        if user is not None:
            c.c.username_pw_set(user, password)
        made.append(c)
        c.connect()
        return c

    yield make
    for c in made:
        c.close()


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)  # polling with a deadline, not synchronising by sleep


def test_users_from_the_cli_good_and_bad_password(make_broker: Any, auth: Auth, connect: Any,
                                                  uid: str) -> None:
    b = make_broker(auth.config())
    for version in (V5, V311):
        assert connect(b, f"{uid}a{version}", user="alice", password="wonderland",
                       version=version).connack.reason_code == 0
        assert connect(b, f"{uid}b{version}", user="alice", password="nope",
                       version=version).connack.reason_code == BAD_CREDENTIALS
        assert connect(b, f"{uid}c{version}", user="eve", password="x",
                       version=version).connack.reason_code == BAD_CREDENTIALS
    # anonymous is still on
    assert connect(b, f"{uid}d").connack.reason_code == 0
    assert "user store" in b.log()


def test_anonymous_off(make_broker: Any, auth: Auth, connect: Any, uid: str) -> None:
    b = make_broker(auth.config(anonymous=False))
    assert connect(b, f"{uid}a").connack.reason_code == NOT_AUTHORIZED
    assert connect(b, f"{uid}b", version=V311).connack.reason_code == NOT_AUTHORIZED
    assert connect(b, f"{uid}c", user="admin", password="s3cret").connack.reason_code == 0


def test_user_added_and_deleted_without_restart(make_broker: Any, auth: Auth, connect: Any,
                                                uid: str) -> None:
    b = make_broker(auth.config())
    auth.add_user("carol", "pw1")
    until(lambda: connect(b, f"{uid}a", user="carol", password="pw1").connack.reason_code == 0)
    auth.shoal("user", "del", "carol")
    until(lambda: connect(b, f"{uid}b", user="carol",
                          password="pw1").connack.reason_code == BAD_CREDENTIALS)
    assert "carol" not in auth.shoal("user", "list").stdout


@pytest.mark.skipif(MOSQUITTO_PUB is None, reason="mosquitto_pub not installed")
def test_mosquitto_pub_credentials(make_broker: Any, auth: Auth, uid: str) -> None:
    b = make_broker(auth.config(anonymous=False))

    def pub(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MOSQUITTO_PUB, "-h", b.host, "-p", str(b.port), "-t", f"{uid}/t",
                               "-m", "x", "-i", f"{uid}mp", *extra],
                              capture_output=True, text=True, timeout=20)

    assert pub("-u", "alice", "-P", "wonderland").returncode == 0
    bad = pub("-u", "alice", "-P", "wrong")
    assert bad.returncode != 0, bad
    assert "password" in (bad.stderr + bad.stdout).lower(), bad
    assert pub("-V", "5", "-u", "alice", "-P", "wrong").returncode != 0


def test_acl_publish_and_subscribe_v5_reason_codes(make_broker: Any, auth: Auth, connect: Any,
                                                   uid: str) -> None:
    b = make_broker(auth.config(ACL))
    admin = connect(b, f"{uid}adm", user="admin", password="s3cret")
    assert admin.subscribe("#", qos=1) == [1]
    alice = connect(b, f"{uid}dev", user="alice", password="wonderland")
    # %c and %u
    assert alice.subscribe(f"devices/{uid}dev/+", qos=1) == [1]
    assert alice.subscribe(f"devices/{uid}other/+", qos=1) == [NOT_AUTHORIZED]
    assert alice.subscribe("users/alice/#", qos=1) == [1]
    assert alice.subscribe("users/bob/#", qos=1) == [NOT_AUTHORIZED]
    assert alice.publish(f"devices/{uid}dev/temp", b"ok", qos=1) == 0
    assert alice.get().payload == b"ok"
    assert admin.get().topic == f"devices/{uid}dev/temp"
    assert alice.publish("users/bob/x", b"no", qos=1) == NOT_AUTHORIZED
    # QoS 2: read the PUBREC itself (paho sends PUBREL even after a failing PUBREC and
    # reports the PUBCOMP's 0x92 instead), from an anonymous raw client
    with RawClient(b) as raw:
        assert raw.connect(f"{uid}raw").reason == 0
        raw.publish("users/bob/x", b"no", qos=2, pid=7)
        rec = raw.expect(PUBREC)
        assert (rec.pid, rec.reason) == (7, NOT_AUTHORIZED)
    alice.publish("users/bob/x", b"no", qos=0)
    # CIDR: this client is on 127.0.0.1
    assert alice.publish("local/x", b"here", qos=1) == 0
    assert admin.get().payload == b"here"
    assert alice.subscribe("local/#") == [NOT_AUTHORIZED]
    admin.expect_none(0.3)  # none of the denied publishes reached anyone
    assert alice.connected


def test_acl_v311_suback_failure_and_acked_drop(make_broker: Any, auth: Auth, connect: Any,
                                                uid: str) -> None:
    b = make_broker(auth.config(ACL))
    admin = connect(b, f"{uid}adm", user="admin", password="s3cret")
    assert admin.subscribe("#", qos=1) == [1]
    c = connect(b, f"{uid}v3", user="alice", password="wonderland", version=V311)
    assert c.subscribe("users/bob/#", qos=1) == [0x80]
    assert c.subscribe("users/alice/#", qos=1) == [1]
    # v3.1.1 has no negative ack: the publish is acknowledged and dropped
    assert c.publish("users/bob/x", b"no", qos=1) == 0
    assert c.publish("users/bob/x", b"no", qos=2) == 0
    assert c.publish("users/alice/x", b"yes", qos=1) == 0
    assert admin.get().payload == b"yes"
    admin.expect_none(0.3)
    assert c.connected


def test_acl_disconnect_on_deny(make_broker: Any, auth: Auth, connect: Any, uid: str) -> None:
    b = make_broker(auth.config(ACL, acl_deny_action="disconnect"))
    c = connect(b, f"{uid}x", user="alice", password="wonderland")
    c.publish_nowait("users/bob/x", b"no", qos=1)
    gone = c.wait_disconnect()
    assert gone.reason_code == NOT_AUTHORIZED and gone.from_server


def test_banned_client_id_from_the_cli(make_broker: Any, auth: Auth, connect: Any,
                                       uid: str) -> None:
    auth.shoal("ban", "add", "clientid", f"{uid}bad")
    b = make_broker(auth.config())
    assert connect(b, f"{uid}bad").connack.reason_code == BANNED
    assert connect(b, f"{uid}bad", version=V311).connack.reason_code == NOT_AUTHORIZED  # rc 5
    assert connect(b, f"{uid}good").connack.reason_code == 0
    # banned while running, then lifted: every shard re-reads the file
    auth.shoal("ban", "add", "username", "alice")
    until(lambda: connect(b, f"{uid}u1", user="alice",
                          password="wonderland").connack.reason_code == BANNED)
    auth.shoal("ban", "del", "username", "alice")
    until(lambda: connect(b, f"{uid}u2", user="alice",
                          password="wonderland").connack.reason_code == 0)


def test_flapping_client_is_banned_for_a_while(make_broker: Any, auth: Auth, connect: Any,
                                               uid: str) -> None:
    b = make_broker(auth.config(flapping_max_count=3, flapping_window=30.0,
                                flapping_ban_time=1.0))
    cid = f"{uid}flap"
    for _ in range(3):
        c = connect(b, cid)
        assert c.connack.reason_code == 0
        c.disconnect()
    assert connect(b, cid).connack.reason_code == BANNED
    assert connect(b, f"{uid}steady").connack.reason_code == 0
    started = time.monotonic()
    until(lambda: connect(b, cid).connack.reason_code == 0)
    assert time.monotonic() - started < 5.0
    assert "banned for" in b.log()


class _AuthService(BaseHTTPRequestHandler):
    """EMQX-style HTTP authentication: svc/letmein allowed, svc/other denied, rest ignored."""

    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(doc)
        if doc["username"] == "svc":
            result = "allow" if doc["password"] == "letmein" else "deny"
        elif doc["username"] == "down":
            self.send_response(503)
            self.end_headers()
            return
        else:
            result = "ignore"
        body = json.dumps({"result": result}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def auth_service() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthService)
    _AuthService.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mqtt/auth"
    server.shutdown()
    server.server_close()


def test_http_backend_then_builtin(make_broker: Any, auth: Auth, connect: Any, auth_service: str,
                                   uid: str) -> None:
    b = make_broker(auth.config(anonymous=False, backends="http,builtin", http_url=auth_service))
    assert connect(b, f"{uid}a", user="svc", password="letmein").connack.reason_code == 0
    seen = _AuthService.requests[0]
    assert seen["clientid"] == f"{uid}a" and seen["peerhost"] == "127.0.0.1"
    assert connect(b, f"{uid}b", user="svc", password="nope").connack.reason_code == BAD_CREDENTIALS
    # ignored (and a 503) by the service: the builtin store answers
    assert connect(b, f"{uid}c", user="alice", password="wonderland").connack.reason_code == 0
    assert connect(b, f"{uid}d", user="down", password="x").connack.reason_code == BAD_CREDENTIALS
    # an accepted answer is reused: no new request
    n = len(_AuthService.requests)
    assert connect(b, f"{uid}a", user="svc", password="letmein").connack.reason_code == 0
    assert len(_AuthService.requests) == n


def test_http_backend_unreachable_falls_through(make_broker: Any, auth: Auth, connect: Any,
                                                uid: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/auth"  # bound, not listening: refused
        b = make_broker(auth.config(backends="http,builtin", http_url=dead))
        assert connect(b, f"{uid}a", user="alice", password="wonderland").connack.reason_code == 0
        assert connect(b, f"{uid}b", user="svc", password="x").connack.reason_code == BAD_CREDENTIALS
