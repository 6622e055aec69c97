"""Authentication, ACL, banned clients and flapping, sans-IO: no loop, no sockets."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from shards.acl import PUBLISH, SUBSCRIBE, Acl, AclError, Principal
from shards.config import AuthConfig, ConfigError
from shards.protocol.errors import Reason
from shards.security import AuthRequest, Banned, Flapping, Security, peer_ip
from shards.users import (
    UserFileError, WatchedFile, add_user, delete_user, hash_password, parse_users, read_users,
    verify_password,
)

# cheap hashes for tests: the parameters travel in the hash, so verification uses them
FAST = {"n": 2 ** 4, "r": 1, "p": 1}


class Deferred:
    """An offload port that holds the work until the test runs it (a hash thread)."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def __call__(self, fn: Any, then: Any, now: float) -> None:
        self.pending.append((fn, then))

    def run(self, now: float = 0.0) -> None:
        pending, self.pending = self.pending, []
        for fn, then in pending:
            then(fn(), now)


def answers(sec: Security, username: str | None, password: bytes | None,
            client_id: str = "c") -> list[int | None]:
    got: list[int | None] = []
    sec.authenticate(AuthRequest(client_id, username, password, None),
                     lambda verdict, now: got.append(verdict), 0.0)
    return got


# -- password hashes and the user file -----------------------------------------------------

def test_hash_is_salted_and_verifies_in_constant_time_compare() -> None:
    a = hash_password("pw", **FAST)
    b = hash_password("pw", **FAST)
    assert a != b  # per-user salt
    assert a.startswith("scrypt$16$1$1$")
    assert verify_password(b"pw", a) and not verify_password(b"pW", a)


def test_default_cost_is_django_scrypt() -> None:
    assert hash_password("x").split("$")[1:4] == ["16384", "8", "1"]


def test_user_file_add_delete_and_atomic_format(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "users.json"
    assert read_users(path) == {}
    assert add_user(path, "alice", "one") is True
    assert add_user(path, "alice", "two") is False
    assert add_user(path, "bob", "three") is True
    users = read_users(path)
    assert sorted(users) == ["alice", "bob"]
    assert verify_password(b"two", users["alice"])
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert delete_user(path, "bob") and not delete_user(path, "bob")
    assert list(read_users(path)) == ["alice"]
    assert not list(tmp_path.glob("sub/*.tmp"))


@pytest.mark.parametrize("text", ["nope", "[]", '{"version": 2, "users": {}}',
                                  '{"version": 1, "users": {"a": "md5$x"}}',
                                  '{"version": 1, "users": {"a": 3}}'])
def test_bad_user_files_are_refused(text: str) -> None:
    with pytest.raises(UserFileError):
        parse_users(text)


def test_watched_file_checks_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "f"
    w = WatchedFile(str(path), 1.0)
    assert w.changed(0.0, force=True)
    path.write_text("x")
    assert not w.changed(0.5)  # within the interval: no stat at all
    assert w.changed(1.0)
    assert not w.changed(2.0)
    path.write_text("yy")
    assert w.changed(3.0)
    path.unlink()
    assert w.changed(4.0)


# -- authentication ---------------------------------------------------------------------------

def builtin(offload: Any = None, **cfg: Any) -> Security:
    auth = AuthConfig(backends="builtin", **cfg)
    sec = Security(auth, allow_anonymous=cfg.pop("anon", True)) if offload is None else \
        Security(auth, True, ".", offload)
    assert sec.builtin is not None
    sec.builtin.set_users({"alice": hash_password("secret", **FAST)})
    return sec


def test_anonymous_on_and_off() -> None:
    assert answers(Security(AuthConfig(), allow_anonymous=True), None, None) == [0]
    assert answers(Security(AuthConfig(), allow_anonymous=False), None, None) == [Reason.NOT_AUTHORIZED]
    # no backend can check a username: accepted unchecked only while anonymous is allowed
    assert answers(Security(AuthConfig(), allow_anonymous=True), "u", b"p") == [0]
    assert answers(Security(AuthConfig(), allow_anonymous=False), "u", b"p") == [
        Reason.BAD_USER_NAME_OR_PASSWORD]


def test_builtin_good_bad_unknown_and_missing_password() -> None:
    sec = builtin()
    assert answers(sec, "alice", b"secret") == [0]
    assert answers(sec, "alice", b"wrong") == [Reason.BAD_USER_NAME_OR_PASSWORD]
    assert answers(sec, "mallory", b"secret") == [Reason.BAD_USER_NAME_OR_PASSWORD]
    assert answers(sec, "alice", None) == [Reason.BAD_USER_NAME_OR_PASSWORD]
    assert answers(sec, None, None) == [0]  # anonymous is still governed by allow_anonymous


def test_hash_runs_on_the_offload_port_and_answers_later() -> None:
    offload = Deferred()
    sec = builtin(offload)
    got = answers(sec, "alice", b"secret")
    assert got == [] and len(offload.pending) == 1  # nothing decided on the loop
    offload.run(1.0)
    assert got == [0]


def test_verified_credentials_are_cached_until_the_password_changes() -> None:
    offload = Deferred()
    sec = builtin(offload)
    answers(sec, "alice", b"secret")
    offload.run()
    assert answers(sec, "alice", b"secret") == [0] and not offload.pending  # cache hit
    assert answers(sec, "alice", b"other") == [] and offload.pending  # a miss hashes
    offload.run()
    assert sec.builtin is not None
    sec.builtin.set_users({"alice": hash_password("new", **FAST)})
    assert answers(sec, "alice", b"secret") == []  # the cached hash no longer matches
    offload.run()


def test_credential_cache_is_bounded() -> None:
    sec = builtin(credential_cache_size=2)
    assert sec.builtin is not None
    sec.builtin.set_users({n: hash_password(n, **FAST) for n in "abc"})
    for n in "abc":
        answers(sec, n, n.encode())
    assert len(sec.builtin._cache) == 2
    before = sec.builtin.verified
    answers(sec, "a", b"a")  # evicted: verified again
    assert sec.builtin.verified == before + 1


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'ldap'"):
        AuthConfig(backends="builtin, ldap")


# -- ACL ----------------------------------------------------------------------------------------

ACL = """
# a comment
allow user:dashboard subscribe $SYS/#
deny  all            subscribe $SYS/# eq:#
allow all            all       devices/%c/#  users/%u/#
allow ip:10.0.0.0/8,user:ops all  ops/#
deny  client:rogue   publish   #
allow all            publish   public/#
allow all            subscribe public/+/status "with space/+"
"""


def who(client_id: str = "c1", username: str | None = "u1", ip: str | None = None) -> Principal:
    return Principal(client_id, username, ipaddress.ip_address(ip) if ip else None)


def test_acl_first_match_placeholders_and_default() -> None:
    deny = Acl.from_text(ACL, no_match_allows=False)
    allow = Acl.from_text(ACL, no_match_allows=True)
    c = who()
    assert deny.check(c, PUBLISH, "devices/c1/temp")
    assert not deny.check(c, PUBLISH, "devices/c2/temp")
    assert deny.check(c, SUBSCRIBE, "users/u1/#")
    assert not deny.check(who(username=None), PUBLISH, "users//x")  # %u needs a username
    assert deny.check(c, PUBLISH, "public/x") and not deny.check(who("rogue"), PUBLISH, "public/x")
    assert not deny.check(c, PUBLISH, "elsewhere") and allow.check(c, PUBLISH, "elsewhere")
    assert deny.check(c, SUBSCRIBE, "with space/x")


def test_acl_subscribe_filters_must_be_covered() -> None:
    acl = Acl.from_text(ACL, no_match_allows=False)
    c = who()
    assert acl.check(c, SUBSCRIBE, "public/a/status")
    assert acl.check(c, SUBSCRIBE, "public/+/status")
    assert not acl.check(c, SUBSCRIBE, "public/#")  # reaches beyond public/+/status
    assert not acl.check(c, SUBSCRIBE, "public/a/+")
    assert acl.check(c, SUBSCRIBE, "devices/c1/+/x")


def test_acl_eq_and_sys() -> None:
    acl = Acl.from_text(ACL, no_match_allows=True)
    assert not acl.check(who(), SUBSCRIBE, "#")  # eq:# denies exactly '#'
    assert acl.check(who(), SUBSCRIBE, "a/#")
    assert not acl.check(who(), SUBSCRIBE, "$SYS/broker/uptime")
    assert acl.check(who(username="dashboard"), SUBSCRIBE, "$SYS/#")


def test_acl_cidr_and_conjunction() -> None:
    acl = Acl.from_text(ACL, no_match_allows=False)
    assert acl.check(who(username="ops", ip="10.1.2.3"), PUBLISH, "ops/x")
    assert not acl.check(who(username="ops", ip="192.168.0.1"), PUBLISH, "ops/x")
    assert not acl.check(who(username="dev", ip="10.1.2.3"), PUBLISH, "ops/x")
    assert not acl.check(who(username="ops"), PUBLISH, "ops/x")  # no address known


@pytest.mark.parametrize("line", ["maybe all all #", "allow all write #", "allow all all",
                                  "allow ip:999.1.1.1 all #", "allow group:x all #",
                                  "allow user:a,user:b all #", 'allow all all "open'])
def test_acl_syntax_errors_name_the_line(line: str) -> None:
    with pytest.raises(AclError, match="line 2"):
        Acl.from_text("# ok\n" + line, True)


def test_decisions_are_cached_with_a_bound_and_cleared_on_reload() -> None:
    sec = Security(AuthConfig(acl_cache_size=2))
    sec.set_acl(Acl.from_text("allow all publish a/#\n", no_match_allows=False))
    c = who()
    assert sec.allowed(c, PUBLISH, "a/1") and not sec.allowed(c, PUBLISH, "b")
    sec.allowed(c, PUBLISH, "a/2")
    assert len(sec._acl_cache) == 2
    sec.set_acl(Acl.from_text("deny all publish a/#\n", no_match_allows=True))
    assert not sec._acl_cache and not sec.allowed(c, PUBLISH, "a/1")


# -- bans and flapping ---------------------------------------------------------------------------

def test_banned_by_client_user_address_with_end_time() -> None:
    b = Banned()
    b.load([{"kind": "clientid", "value": "bad", "until": None},
            {"kind": "username", "value": "eve", "until": 1010.0},
            {"kind": "address", "value": "192.0.2.0/24", "until": None},
            {"kind": "clientid", "value": "old", "until": 900.0}], now=5.0, wall=1000.0)
    ip = ipaddress.ip_address
    assert b.why("bad", None, None, 5.0) == "client id is banned"
    assert b.why("x", "eve", None, 14.0) == "username is banned"
    assert b.why("x", "eve", None, 15.0) is None  # its end time, moved to the shard's clock
    assert b.why("x", None, ip("192.0.2.7"), 5.0) == "address is banned"
    assert b.why("x", None, ip("198.51.100.1"), 5.0) is None
    assert b.why("old", None, None, 5.0) is None


def test_banned_file_is_read_and_reloaded(tmp_path: Path) -> None:
    sec = Security(AuthConfig(reload_interval=1.0), data_dir=str(tmp_path))
    sec.load(0.0, 1000.0)
    assert sec.banned_why("c", None, None, 0.0) is None
    (tmp_path / "banned.json").write_text(json.dumps(
        {"version": 1, "bans": [{"kind": "clientid", "value": "c", "until": None}]}))
    sec.refresh(0.5, 1000.5)
    assert sec.banned_why("c", None, None, 0.5) is None  # not checked yet
    sec.refresh(1.0, 1001.0)
    assert sec.banned_why("c", None, None, 1.0) == "client id is banned"
    (tmp_path / "banned.json").write_text("garbage")
    sec.refresh(2.0, 1002.0)  # a bad edit keeps the previous bans
    assert sec.banned_why("c", None, None, 2.0) == "client id is banned"


def test_flapping_bans_for_a_while_then_forgets() -> None:
    f = Flapping(max_count=3, window=1.0, ban_time=5.0, max_tracked=100)
    assert not f.disconnected("c", 0.0) and not f.disconnected("c", 0.5)
    assert f.disconnected("c", 0.9)
    assert f.banned("c", 1.0) and f.banned("c", 5.8)
    assert not f.banned("c", 5.9)
    # slow reconnects never add up: the window starts again
    assert not any(f.disconnected("d", t) for t in (0.0, 0.8, 1.9, 2.5, 4.0))


def test_flapping_memory_is_bounded() -> None:
    f = Flapping(max_count=2, window=10.0, ban_time=10.0, max_tracked=3)
    for k in range(10):
        f.disconnected(f"c{k}", 0.0)
    assert len(f._counts) == 3
    f.prune(20.0)
    assert len(f) == 0


def test_peer_ip() -> None:
    assert str(peer_ip("127.0.0.1:5555")) == "127.0.0.1"
    assert str(peer_ip("::1:5555")) == "::1"
    assert peer_ip("test") is None and peer_ip("?") is None


# -- the http backend (the HTTP exchange itself is stubbed; integration tests run a server) --

def http_security(answers_by_user: dict[str, str], offload: Any = None,
                  **cfg: Any) -> tuple[Security, list[dict[str, Any]]]:
    from shards.security import HttpAuthenticator
    seen: list[dict[str, Any]] = []

    def fake_request(self: HttpAuthenticator, body: bytes) -> str:
        doc = json.loads(body)
        seen.append(doc)
        return answers_by_user.get(doc["username"], "ignore")

    auth = AuthConfig(backends="http,builtin", http_url="http://127.0.0.1:1/auth", **cfg)
    sec = Security(auth, True, ".", offload or (lambda fn, then, now: then(fn(), now)))
    backend = sec.chain.backends[0]  # type: ignore[union-attr]
    backend.request = fake_request.__get__(backend)  # type: ignore[method-assign]
    assert sec.builtin is not None
    sec.builtin.set_users({"alice": hash_password("secret", **FAST)})
    return sec, seen


def test_http_allow_deny_and_ignore_falls_through_the_chain() -> None:
    sec, seen = http_security({"svc": "allow", "evil": "deny"})
    assert answers(sec, "svc", b"pw", client_id="c9") == [0]
    assert seen[0] == {"clientid": "c9", "username": "svc", "password": "pw", "peerhost": ""}
    assert answers(sec, "evil", b"pw") == [Reason.BAD_USER_NAME_OR_PASSWORD]
    assert answers(sec, "alice", b"secret") == [0]  # http ignored it; builtin knows alice
    assert answers(sec, "nobody", b"x") == [Reason.BAD_USER_NAME_OR_PASSWORD]


def test_http_answers_arrive_later_and_allow_is_cached_for_the_ttl() -> None:
    offload = Deferred()
    sec, seen = http_security({"svc": "allow"}, offload, http_cache_ttl=10.0)
    got: list[Any] = []
    sec.authenticate(AuthRequest("c", "svc", b"pw", None), lambda v, now: got.append(v), 0.0)
    assert got == [] and len(offload.pending) == 1
    offload.run(1.0)
    assert got == [0]
    sec.authenticate(AuthRequest("c", "svc", b"pw", None), lambda v, now: got.append(v), 5.0)
    assert got == [0, 0] and not offload.pending and len(seen) == 1  # from the cache
    sec.authenticate(AuthRequest("c", "svc", b"other", None), lambda v, now: got.append(v), 5.0)
    assert offload.pending  # another password is another question
    offload.run(5.0)
    sec.authenticate(AuthRequest("c", "svc", b"pw", None), lambda v, now: got.append(v), 11.5)
    assert offload.pending  # the ttl ran out


def test_http_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="http_url: must be set"):
        AuthConfig(backends="http")
    with pytest.raises(ConfigError, match="not an http"):
        AuthConfig(backends="http", http_url="ftp://x")


# -- a database backend: the lookup is stubbed (integration tests run PostgreSQL) ----------

def test_stored_hash_backend_looks_up_then_verifies_on_the_ports() -> None:
    from shards.security import Chain, StoredHashAuthenticator
    table = {"dbuser": hash_password("pw", **FAST)}
    calls: list[tuple[str, str]] = []

    def lookup(username: str, client_id: str) -> str | None:
        calls.append((username, client_id))
        if username == "broken":
            raise ConnectionError("database down")
        return table.get(username)

    io, hashing = Deferred(), Deferred()
    backend = StoredHashAuthenticator("db", lookup, 10, hashing, io)
    chain = Chain([backend])
    got: list[Any] = []
    chain.check(AuthRequest("c1", "dbuser", b"pw", None), lambda v, now: got.append(v), 0.0)
    assert got == [] and io.pending and not hashing.pending
    io.run()
    assert got == [] and hashing.pending  # found: the hash is verified on the hash threads
    hashing.run()
    assert got == [0] and calls == [("dbuser", "c1")]
    for user, password in (("dbuser", b"bad"), ("nobody", b"x"), ("broken", b"x")):
        chain.check(AuthRequest("c1", user, password, None), lambda v, now: got.append(v), 0.0)
        io.run()
        hashing.run()
    # wrong password, unknown user, failing database: all refused by the end of the chain
    assert got[1:] == [Reason.BAD_USER_NAME_OR_PASSWORD] * 3


def test_mysql_query_placeholders_become_bound_parameters() -> None:
    from shards.security import MysqlLookup
    q = MysqlLookup(AuthConfig(mysql_query="SELECT h FROM u WHERE name = :username AND c = "
                                           ":clientid AND name LIKE 'a%'"))
    assert q.query == ("SELECT h FROM u WHERE name = %(username)s AND c = %(clientid)s "
                       "AND name LIKE 'a%%'")
    assert q.names == ["username", "clientid"]
