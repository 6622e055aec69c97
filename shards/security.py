"""Authentication, authorization, banned clients and flapping detection for a shard.

Pure logic with ports, like the rest of the shard: time is passed in as ``now``,
files are read only by :meth:`Security.load`/:meth:`Security.refresh` (which the
worker calls from its tick, at most every ``auth.reload_interval``), and slow work
never runs on the loop:

- authentication is a continuation, ``Authenticator.check(request, then, now)``:
  the answer may come at once (the built-in store with a cached credential) or
  later (a password hash verified on a thread, a database or HTTP backend);
- password hashing goes through an ``offload(fn, then, now)`` port: inline in unit
  tests, a small thread pool in the worker (hashlib releases the GIL).

Banned state is per shard: the banned file is read by every shard, so a ban
written with ``shoal ban add`` reaches all of them. Flapping is counted host-wide
under a router (every shard reports its disconnects; the router bans and tells every
shard, see ``Flapping.ban``, and a restarted shard gets the bans in force with its
welcome) and by the shard itself in a one-process broker.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from shards.acl import (
    PUBLISH, SUBSCRIBE, Acl, AclError, IPAddress, Principal, first_match, parse_ip, rules_from_rows,
)
from shards.config import AuthConfig
from shards.protocol.errors import Reason
from shards.scram import Verifier, decoy
from shards.users import UserFileError, WatchedFile, parse_store, verify_password

__all__ = ["AuthRequest", "Authenticator", "BuiltinAuthenticator", "Chain", "Banned", "Flapping",
           "Security", "PUBLISH", "SUBSCRIBE", "Principal", "run_inline", "peer_ip"]

log = logging.getLogger("shoal.auth")

# A backend's answer: None when it does not know the username (the chain asks the
# next one), else a reason code, 0 meaning accepted.
Verdict = int | None
Done = Callable[[Verdict, float], None]
Offload = Callable[[Callable[[], Any], Callable[[Any, float], None], float], None]


def run_inline(fn: Callable[[], Any], then: Callable[[Any, float], None], now: float) -> None:
    """The offload port for tests and tools: do the work now."""
    then(fn(), now)


def peer_ip(peer: str) -> IPAddress | None:
    """The address part of a link's ``host:port`` peer string (IPv6 hosts contain ':')."""
    host = peer.rpartition(":")[0] if ":" in peer else peer
    return parse_ip(host.strip("[]"))


class AuthRequest:
    __slots__ = ("client_id", "username", "password", "ip", "listener", "acl_rows")

    def __init__(self, client_id: str, username: str | None, password: bytes | None,
                 ip: IPAddress | None, listener: str | None = None) -> None:
        self.client_id = client_id
        self.username = username
        self.password = password
        self.ip = ip
        self.listener = listener  # which listener's policy applies (None: the global one)
        # out: ACL rows (permission, action, topic) the accepting backend returned
        self.acl_rows: list[tuple[str, str, str]] | None = None


class _Policy:
    """What one listener asks of a client: its chain and whether anonymous is allowed."""

    __slots__ = ("chain", "allow_anonymous", "jwt", "scram")

    def __init__(self, chain: Chain | None, allow_anonymous: bool, jwt: bool, scram: bool) -> None:
        self.chain = chain
        self.allow_anonymous = allow_anonymous
        self.jwt = jwt  # a password alone (a token) reaches the chain
        self.scram = scram  # SCRAM-SHA-256 is offered (the built-in store is in the chain)


class Authenticator(Protocol):
    def check(self, request: AuthRequest, then: Done, now: float) -> None:
        """Answer with ``then(verdict, now)``, now or later, exactly once."""


class BuiltinAuthenticator:
    """The user store in runtime.data_dir (see :mod:`shards.users`)."""

    def __init__(self, cache_size: int, offload: Offload = run_inline) -> None:
        self.users: dict[str, str] = {}
        self.scram: dict[str, str] = {}  # SCRAM-SHA-256 verifiers, text form
        self.cache_size = cache_size
        self.offload = offload
        # (username, keyed digest of the password) -> the stored hash it verified against
        self._cache: dict[tuple[str, bytes], str] = {}
        self._key = os.urandom(32)  # the cache never holds a password or a reusable digest
        self.verified = 0  # hashes computed (for tests and stats)

    def set_users(self, users: dict[str, str]) -> None:
        self.users = users  # cached entries whose hash changed no longer match

    def check(self, request: AuthRequest, then: Done, now: float) -> None:
        name = request.username
        stored = self.users.get(name) if name is not None else None
        if stored is None or name is None:
            then(None, now)
            return
        password = request.password
        if password is None:
            then(Reason.BAD_USER_NAME_OR_PASSWORD, now)
            return
        key = (name, hmac.new(self._key, password, hashlib.sha256).digest())  # type: ignore[arg-type]
        if self._cache.get(key) == stored:
            then(Reason.SUCCESS, now)
            return

        def verify() -> bool:
            try:
                return verify_password(password, stored)
            except (UserFileError, ValueError, MemoryError) as err:
                log.warning("cannot verify the password of %r: %s", name, err)
                return False

        def verified(ok: bool, later: float) -> None:
            self.verified += 1
            if ok:
                cache = self._cache
                if self.cache_size:
                    if len(cache) >= self.cache_size:
                        del cache[next(iter(cache))]
                    cache[key] = stored
                then(Reason.SUCCESS, later)
            else:
                then(Reason.BAD_USER_NAME_OR_PASSWORD, later)

        self.offload(verify, verified, now)


class HttpAuthenticator:
    """Asks an HTTP service, EMQX-style: POST JSON, answer {"result": allow|deny|ignore}.

    The request runs on the ``offload`` port (I/O threads in the worker); accepted
    answers are cached for ``cache_ttl`` seconds, at most ``cache_size`` of them.
    """

    def __init__(self, url: str, timeout: float, cache_size: int, cache_ttl: float,
                 offload: Offload = run_inline) -> None:
        self.url = url
        self.timeout = timeout
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.offload = offload
        self._cache: dict[tuple[str, str, bytes], float] = {}
        self._key = os.urandom(32)
        self.requests = 0

    def request(self, body: bytes) -> str:
        """One HTTP exchange (on a thread): 'allow', 'deny' or 'ignore'."""
        import urllib.error
        import urllib.request
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status = resp.status
                data = resp.read(65536)
        except urllib.error.HTTPError as err:
            log.info("http auth backend answered %d: ignored", err.code)
            return "ignore"
        except (OSError, ValueError) as err:
            log.warning("http auth backend %s failed: %s", self.url, err)
            return "ignore"
        if status == 204:
            return "allow"
        if status != 200:
            return "ignore"
        try:
            result = json.loads(data).get("result")
        except (ValueError, AttributeError):
            log.warning("http auth backend %s: answer is not a JSON object", self.url)
            return "ignore"
        return result if result in ("allow", "deny", "ignore") else "ignore"

    def check(self, request: AuthRequest, then: Done, now: float) -> None:
        name = request.username
        if name is None:
            then(None, now)
            return
        password = request.password or b""
        key = (name, request.client_id, hmac.new(self._key, password, hashlib.sha256).digest())
        until = self._cache.get(key)
        if until is not None:
            if now < until:
                then(Reason.SUCCESS, now)
                return
            del self._cache[key]
        body = json.dumps({"clientid": request.client_id, "username": name,
                           "password": password.decode("utf-8", "replace"),
                           "peerhost": str(request.ip) if request.ip is not None else ""}).encode()

        def answered(result: str | None, later: float) -> None:
            self.requests += 1
            if result == "allow":
                if self.cache_size and self.cache_ttl > 0:
                    _bounded_set(self._cache, key, later + self.cache_ttl, self.cache_size)
                then(Reason.SUCCESS, later)
            elif result == "deny":
                then(Reason.BAD_USER_NAME_OR_PASSWORD, later)
            else:
                then(None, later)

        self.offload(lambda: self.request(body), answered, now)


class StoredHashAuthenticator:
    """A backend that looks a user's stored hash up remotely (a database), on the I/O
    offload port, then verifies it on the hash offload port like the built-in store.

    ``lookup(username, client_id)`` returns the stored hash, None if there is no such
    user, or raises on failure (the chain then asks the next backend). Verified
    credentials are cached with a bound; a lookup is made on every CONNECT so a
    deleted or changed user takes effect at once.
    """

    def __init__(self, name: str, lookup: Callable[[str, str], str | None], cache_size: int,
                 offload: Offload = run_inline, io_offload: Offload = run_inline) -> None:
        self.name = name
        self.lookup = lookup
        self.verifier = BuiltinAuthenticator(cache_size, offload)
        self.io_offload = io_offload

    def check(self, request: AuthRequest, then: Done, now: float) -> None:
        name = request.username
        if name is None:
            then(None, now)
            return

        def find() -> str | None | Exception:
            try:
                return self.lookup(name, request.client_id)
            except Exception as err:  # a driver's errors have no common base worth naming
                return err

        def found(stored: str | None | Exception, later: float) -> None:
            if isinstance(stored, Exception) or (stored is not None and not isinstance(stored, str)):
                log.warning("%s auth backend failed for %r: %s", self.name, name, stored)
                then(None, later)
                return
            if stored is None:
                then(None, later)
                return
            self.verifier.users = {name: stored}  # only this check reads it, synchronously
            self.verifier.check(request, then, later)

        self.io_offload(find, found, now)


class PostgresLookup:
    """Runs auth.pgsql_query with pg8000 (pure Python), one connection per I/O thread,
    reconnecting after a failure."""

    def __init__(self, cfg: AuthConfig) -> None:
        import threading
        self.cfg = cfg
        self._local = threading.local()

    def _connect(self) -> Any:
        import pg8000.native  # type: ignore[import-untyped]
        cfg = self.cfg
        kwargs: dict[str, Any] = {"user": cfg.pgsql_user, "database": cfg.pgsql_database,
                                  "timeout": 10}
        if cfg.pgsql_password:
            kwargs["password"] = cfg.pgsql_password
        if cfg.pgsql_host.startswith("/"):
            kwargs["unix_sock"] = os.path.join(cfg.pgsql_host, f".s.PGSQL.{cfg.pgsql_port}")
        else:
            kwargs["host"], kwargs["port"] = cfg.pgsql_host, cfg.pgsql_port
        return pg8000.native.Connection(**kwargs)

    def _run(self, query: str, username: str | None, client_id: str) -> tuple[list[Any], list[str]]:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._connect()
        params = {k: v for k, v in (("username", username), ("clientid", client_id))
                  if f":{k}" in query}
        try:
            rows = con.run(query, **params)
            names = [c["name"] for c in (con.columns or [])]
        except Exception:
            self._local.con = None
            try:
                con.close()
            except Exception:
                pass
            raise
        return rows or [], names

    def __call__(self, username: str, client_id: str) -> str | None:
        rows, _ = self._run(self.cfg.pgsql_query, username, client_id)
        return str(rows[0][0]) if rows else None

    def rules(self, username: str | None, client_id: str) -> list[tuple[str, str, str]]:
        rows, names = self._run(self.cfg.pgsql_acl_query, username, client_id)
        return _acl_rows(rows, names)


class MysqlLookup:
    """Runs auth.mysql_query with PyMySQL (pure Python), one connection per I/O thread,
    reconnecting after a failure. ``:username``/``:clientid`` become PyMySQL's
    ``%(name)s`` parameters (a literal ``%`` in the query is escaped first)."""

    def __init__(self, cfg: AuthConfig) -> None:
        import threading
        self.cfg = cfg
        self._local = threading.local()
        self.query, self.names = self._translate(cfg.mysql_query)
        self.acl_query, self.acl_names = self._translate(cfg.mysql_acl_query)

    @staticmethod
    def _translate(query: str) -> tuple[str, list[str]]:
        query = query.replace("%", "%%")
        names = [k for k in ("username", "clientid") if f":{k}" in query]
        for k in names:
            query = query.replace(f":{k}", f"%({k})s")
        return query, names

    def _connect(self) -> Any:
        import pymysql  # type: ignore[import-untyped]
        cfg = self.cfg
        kwargs: dict[str, Any] = {"user": cfg.mysql_user, "database": cfg.mysql_database,
                                  "connect_timeout": 10, "read_timeout": 10, "autocommit": True}
        if cfg.mysql_password:
            kwargs["password"] = cfg.mysql_password
        if cfg.mysql_host.startswith("/"):
            kwargs["unix_socket"] = cfg.mysql_host
        else:
            kwargs["host"], kwargs["port"] = cfg.mysql_host, cfg.mysql_port
        return pymysql.connect(**kwargs)

    def _run(self, query: str, names: list[str], username: str | None, client_id: str,
             one: bool) -> tuple[list[Any], list[str]]:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._connect()
        values = {"username": username, "clientid": client_id}
        try:
            with con.cursor() as cur:
                cur.execute(query, {k: values[k] for k in names})
                rows = [cur.fetchone()] if one else list(cur.fetchall())
                columns = [d[0] for d in (cur.description or ())]
        except Exception:
            self._local.con = None
            try:
                con.close()
            except Exception:
                pass
            raise
        return [r for r in rows if r is not None], columns

    def __call__(self, username: str, client_id: str) -> str | None:
        rows, _ = self._run(self.query, self.names, username, client_id, True)
        return str(rows[0][0]) if rows else None

    def rules(self, username: str | None, client_id: str) -> list[tuple[str, str, str]]:
        rows, columns = self._run(self.acl_query, self.acl_names, username, client_id, False)
        return _acl_rows(rows, columns)


def _acl_rows(rows: list[Any], columns: list[str]) -> list[tuple[str, str, str]]:
    """(permission, action, topic) from an ACL query's rows: by column name when the
    query names them so (EMQX's queries select action, permission, topic), else by
    position."""
    lower = [str(c).lower() for c in columns]
    try:
        at = [lower.index("permission"), lower.index("action"), lower.index("topic")]
    except ValueError:
        at = [0, 1, 2]
    out = []
    for row in rows:
        if len(row) < 3:
            raise ValueError("an ACL query must return permission, action and topic")
        out.append((row[at[0]], row[at[1]], row[at[2]]))
    return out


class Chain:
    """Backends asked in order; the first that knows the username decides."""

    def __init__(self, backends: list[Authenticator]) -> None:
        self.backends = backends

    def check(self, request: AuthRequest, then: Done, now: float) -> None:
        backends = self.backends

        def step(i: int, now: float) -> None:
            if i == len(backends):
                then(Reason.BAD_USER_NAME_OR_PASSWORD, now)
                return

            def answered(verdict: Verdict, later: float) -> None:
                if verdict is None:
                    step(i + 1, later)
                else:
                    then(verdict, later)

            backends[i].check(request, answered, now)

        step(0, now)


class Banned:
    """Bans from the banned file: by client id, username or address/network.

    The file holds wall-clock end times; :meth:`load` turns them into times on the
    shard's clock (``now``) so checks need no clock of their own.
    """

    FILE_VERSION = 1
    KINDS = ("clientid", "username", "address")

    def __init__(self) -> None:
        self.clients: dict[str, float] = {}
        self.users: dict[str, float] = {}
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, float]] = []

    def __bool__(self) -> bool:
        return bool(self.clients or self.users or self.networks)

    def load(self, entries: list[dict[str, Any]], now: float, wall: float) -> None:
        clients: dict[str, float] = {}
        users: dict[str, float] = {}
        nets = []
        for e in entries:
            until = e.get("until")
            if until is not None and until <= wall:
                continue
            at = float("inf") if until is None else now + (until - wall)
            kind, value = e["kind"], e["value"]
            if kind == "clientid":
                clients[value] = at
            elif kind == "username":
                users[value] = at
            else:
                nets.append((ipaddress.ip_network(value, strict=False), at))
        self.clients, self.users, self.networks = clients, users, nets

    def why(self, client_id: str, username: str | None, ip: IPAddress | None,
            now: float) -> str | None:
        until = self.clients.get(client_id)
        if until is not None and now < until:
            return "client id is banned"
        if username is not None:
            until = self.users.get(username)
            if until is not None and now < until:
                return "username is banned"
        if ip is not None:
            for net, until in self.networks:
                if ip in net and now < until:
                    return "address is banned"
        return None


def parse_banned(text: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") != Banned.FILE_VERSION \
            or not isinstance(doc.get("bans"), list):
        raise ValueError('expected {"version": 1, "bans": [...]}')
    for e in doc["bans"]:
        if not isinstance(e, dict) or e.get("kind") not in Banned.KINDS \
                or not isinstance(e.get("value"), str):
            raise ValueError(f"bad entry {e!r}")
        if e["kind"] == "address":
            ipaddress.ip_network(e["value"], strict=False)  # raises ValueError
        until = e.get("until")
        if until is not None and not isinstance(until, (int, float)):
            raise ValueError(f"bad end time in {e!r}")
    return list(doc["bans"])


class Flapping:
    """Client ids that disconnect ``max_count`` times within ``window`` are banned
    for ``ban_time``. Fixed windows from the first disconnect, as EMQX counts.

    Memory is bounded by ``max_tracked`` entries in each table; the oldest go first.
    """

    def __init__(self, max_count: int, window: float, ban_time: float, max_tracked: int) -> None:
        self.max_count = max_count
        self.window = window
        self.ban_time = ban_time
        self.max_tracked = max_tracked
        self._counts: dict[str, tuple[float, int]] = {}
        self._bans: dict[str, float] = {}
        self.banned_total = 0

    def banned(self, client_id: str, now: float) -> bool:
        until = self._bans.get(client_id)
        if until is None:
            return False
        if now >= until:
            del self._bans[client_id]
            return False
        return True

    def disconnected(self, client_id: str, now: float) -> bool:
        """Count one disconnect; True if it gets the client id banned."""
        counts = self._counts
        entry = counts.pop(client_id, None)
        if entry is None or now - entry[0] > self.window:
            entry = (now, 0)
        first, n = entry[0], entry[1] + 1
        if n >= self.max_count:
            _bounded_set(self._bans, client_id, now + self.ban_time, self.max_tracked)
            self.banned_total += 1
            return True
        _bounded_set(counts, client_id, (first, n), self.max_tracked)
        return False

    def active_bans(self, now: float) -> list[tuple[str, float]]:
        """(client id, seconds left) of every ban in force: what a restarted shard is told."""
        return [(cid, until - now) for cid, until in self._bans.items() if until > now]

    def ban(self, client_id: str, until: float) -> None:
        """A ban decided elsewhere (the router counts disconnects host-wide)."""
        _bounded_set(self._bans, client_id, until, self.max_tracked)

    def prune(self, now: float) -> None:
        """Forget windows and bans that are over (the worker calls this from its tick)."""
        window = self.window
        for cid in [c for c, (first, _) in self._counts.items() if now - first > window]:
            del self._counts[cid]
        for cid in [c for c, until in self._bans.items() if now >= until]:
            del self._bans[cid]

    def __len__(self) -> int:
        return len(self._counts) + len(self._bans)


def _bounded_set(table: dict[Any, Any], key: Any, value: Any, bound: int) -> None:
    table.pop(key, None)
    while len(table) >= bound:
        del table[next(iter(table))]
    table[key] = value


def _resolve(data_dir: str, name: str) -> str:
    return name if os.path.isabs(name) else os.path.join(data_dir, name)


class Security:
    """What the shard asks: may this client connect, publish, subscribe?"""

    def __init__(self, cfg: AuthConfig | None = None, allow_anonymous: bool = True,
                 data_dir: str = ".", offload: Offload = run_inline,
                 io_offload: Offload | None = None, listeners: Any = None) -> None:
        cfg = cfg if cfg is not None else AuthConfig()
        self.cfg = cfg
        self.allow_anonymous = allow_anonymous
        names = cfg.backend_list()
        self.io_offload = io_offload or offload
        # one lookup object per database, shared by authentication and the ACL query, so
        # each I/O thread keeps one connection to it
        lookups: dict[str, Any] = {}

        def pg_lookup() -> PostgresLookup:
            if "pg" not in lookups:
                lookups["pg"] = PostgresLookup(cfg)
            return lookups["pg"]  # type: ignore[no-any-return]

        def my_lookup() -> MysqlLookup:
            if "my" not in lookups:
                lookups["my"] = MysqlLookup(cfg)
            return lookups["my"]  # type: ignore[no-any-return]

        self.builtin: BuiltinAuthenticator | None = None
        self.jwt: Any = None  # a JwtAuthenticator when the chain has one
        by_name: dict[str, Authenticator] = {}
        for name in names:
            if name == "builtin":
                self.builtin = BuiltinAuthenticator(cfg.credential_cache_size, offload)
                by_name[name] = self.builtin
            elif name == "postgresql":
                by_name[name] = (StoredHashAuthenticator(
                    "postgresql", pg_lookup(), cfg.credential_cache_size, offload,
                    io_offload or offload))
            elif name == "mysql":
                by_name[name] = (StoredHashAuthenticator(
                    "mysql", my_lookup(), cfg.credential_cache_size, offload,
                    io_offload or offload))
            elif name == "jwt":
                from shards.jwtauth import JwtAuthenticator  # PyJWT only when configured
                key_file = cfg.jwt_public_key_file or cfg.jwt_jwks_file
                self.jwt = JwtAuthenticator(
                    cfg, _resolve(data_dir, key_file) if key_file else None)
                by_name[name] = self.jwt
            elif name == "http":
                by_name[name] = (HttpAuthenticator(cfg.http_url, cfg.http_timeout,
                                                  cfg.credential_cache_size, cfg.http_cache_ttl,
                                                  io_offload or offload))
        self.chain: Chain | None = Chain([by_name[n] for n in names]) if names else None
        self._default = _Policy(self.chain, allow_anonymous, "jwt" in names, "builtin" in names)
        # listeners with a chain or an anonymous rule of their own (see [listeners.*])
        self._policies: dict[str, _Policy] = {}
        if listeners is not None:
            from dataclasses import fields

            from shards.config import listener_backends
            for f in fields(listeners):
                table = getattr(listeners, f.name)
                own = listener_backends(table)
                mode = table.anonymous
                if own is None and mode == "inherit":
                    continue
                chain_names = names if own is None else own
                unknown = [n for n in chain_names if n not in by_name]
                if unknown:  # Config refuses this; a hand-built one gets told too
                    raise ValueError(f"listeners.{f.name}.auth names {unknown} outside auth.backends")
                self._policies[f.name] = _Policy(
                    Chain([by_name[n] for n in chain_names]) if chain_names else None,
                    allow_anonymous if mode == "inherit" else mode == "allow",
                    "jwt" in chain_names, "builtin" in chain_names)
        # per-connection rules from the databases, fetched once per CONNECT
        self.acl_sources: list[tuple[str, Callable[[str | None, str], list[tuple[str, str, str]]]]] = []
        if cfg.pgsql_acl_query:
            self.acl_sources.append(("postgresql", pg_lookup().rules))
        if cfg.mysql_acl_query:
            self.acl_sources.append(("mysql", my_lookup().rules))
        # False: no ACL file, no ACL query and no JWT acl claim read, and the publish path
        # skips authorization
        self._claims_rules = "jwt" in names and bool(cfg.jwt_acl_claim)
        self.authorizing = bool(cfg.acl_file or self.acl_sources or self._claims_rules)
        self.acl: Acl | None = None
        self._acl_cache: dict[tuple[Principal, int, str], bool] = {}
        self.banned = Banned()
        self.flapping = (Flapping(cfg.flapping_max_count, cfg.flapping_window, cfg.flapping_ban_time,
                                  cfg.flapping_max_tracked) if cfg.flapping_max_count else None)
        self.publish_denied = 0
        self.subscribe_denied = 0
        interval = cfg.reload_interval
        self._users_file = (WatchedFile(_resolve(data_dir, cfg.users_file), interval)
                            if self.builtin is not None else None)
        self._acl_file = (WatchedFile(_resolve(data_dir, cfg.acl_file), interval)
                          if cfg.acl_file else None)
        self._banned_file = WatchedFile(_resolve(data_dir, cfg.banned_file), interval)
        self._scram_key = os.urandom(32)  # until a user file is read

    # -- files ----------------------------------------------------------------------------

    def load(self, now: float, wall: float) -> None:
        """Start-up: read every file; an ACL that is missing or invalid raises (AclError),
        since starting without the rules the operator asked for would allow too much."""
        if self._acl_file is not None:
            path = self._acl_file.path
            self._acl_file.changed(now, force=True)
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as err:
                raise AclError(f"cannot read the ACL file {path}: {err}") from None
            self.set_acl(Acl.from_text(text, self.cfg.acl_no_match == "allow"))
        if self.jwt is not None:
            self.jwt.load(now)  # JwtKeyError: no start without the keys asked for
        self._reload_users(now, force=True)
        self._reload_banned(now, wall, force=True)

    def refresh(self, now: float, wall: float) -> None:
        """Re-read what changed (one stat per file per reload_interval); a bad edit is
        logged and the previous content stays in force."""
        if self._acl_file is not None and self._acl_file.changed(now):
            path = self._acl_file.path
            try:
                with open(path, encoding="utf-8") as fh:
                    acl = Acl.from_text(fh.read(), self.cfg.acl_no_match == "allow")
            except (OSError, AclError) as err:
                log.error("ACL file %s not reloaded, the previous rules stay: %s", path, err)
            else:
                self.set_acl(acl)
                log.info("ACL reloaded from %s: %d rules", path, len(acl.rules))
        if self.jwt is not None:
            self.jwt.refresh(now)
        self._reload_users(now)
        self._reload_banned(now, wall)
        if self.flapping is not None:
            self.flapping.prune(now)

    def _reload_users(self, now: float, force: bool = False) -> None:
        watched = self._users_file
        if watched is None or self.builtin is None or not watched.changed(now, force):
            return
        try:
            with open(watched.path, encoding="utf-8") as fh:
                users, scram = parse_store(fh.read())
        except FileNotFoundError:
            users, scram = {}, {}
        except (OSError, UserFileError) as err:
            log.error("user file %s not reloaded, the previous users stay: %s", watched.path, err)
            return
        self.builtin.set_users(users)
        self.builtin.scram = scram
        # the key of the decoys for unknown SCRAM users: the same on every shard (so a
        # client cannot compare two shards' answers) and secret as the hashes are
        self._scram_key = hashlib.sha256("\n".join(sorted(users.values())).encode()).digest()
        log.info("user store %s: %d users", watched.path, len(users))

    def _reload_banned(self, now: float, wall: float, force: bool = False) -> None:
        watched = self._banned_file
        if not watched.changed(now, force):
            return
        try:
            with open(watched.path, encoding="utf-8") as fh:
                entries = parse_banned(fh.read())
        except FileNotFoundError:
            entries = []
        except (OSError, ValueError) as err:
            log.error("banned file %s not reloaded, the previous bans stay: %s", watched.path, err)
            return
        self.banned.load(entries, now, wall)
        if entries:
            log.info("banned file %s: %d entries", watched.path, len(entries))

    def set_acl(self, acl: Acl | None) -> None:
        self.acl = acl
        self.authorizing = acl is not None or bool(self.acl_sources) or self._claims_rules
        self._acl_cache.clear()

    # -- CONNECT --------------------------------------------------------------------------

    def banned_why(self, client_id: str, username: str | None, ip: IPAddress | None,
                   now: float) -> str | None:
        if self.flapping is not None and self.flapping.banned(client_id, now):
            return "client id is banned for flapping"
        if self.banned:
            return self.banned.why(client_id, username, ip, now)
        return None

    def _policy(self, listener: str | None) -> _Policy:
        return self._policies.get(listener, self._default) if listener else self._default

    def authenticate(self, request: AuthRequest, then: Done, now: float) -> None:
        """``then(reason, now)``: 0 to accept, else the CONNACK reason code. The policy is
        the request's listener's, else the global one."""
        policy = self._policy(request.listener)
        if request.username is None and (request.password is None or not policy.jwt):
            # (an MQTT 5 client may send a password alone: a token for the jwt backend)
            then(Reason.SUCCESS if policy.allow_anonymous else Reason.NOT_AUTHORIZED, now)
        elif policy.chain is None:
            # nothing can check a username: accepted unchecked only while anonymous is
            then(Reason.SUCCESS if policy.allow_anonymous else Reason.BAD_USER_NAME_OR_PASSWORD,
                 now)
        else:
            policy.chain.check(request, then, now)  # type: ignore[arg-type]

    def scram_offered(self, listener: str | None = None) -> bool:
        """SCRAM-SHA-256 enhanced authentication is offered where the built-in store, which
        keeps the verifiers (``shoal user add`` writes them), is in the listener's chain."""
        return self.builtin is not None and self._policy(listener).scram

    def scram_verifier(self, username: str) -> Verifier:
        """The user's verifier, or a decoy that no proof matches (unknown user, or a user
        added before verifiers were kept): the exchange then fails only at its end."""
        builtin = self.builtin
        text = builtin.scram.get(username) if builtin is not None else None
        if text is not None:
            try:
                return Verifier.decode(text)
            except ValueError as err:
                log.warning("SCRAM verifier of %r unusable: %s", username, err)
        return decoy(username, self._scram_key)

    def disconnected(self, client_id: str, now: float) -> None:
        flapping = self.flapping
        if flapping is not None and flapping.disconnected(client_id, now):
            log.warning("client %r banned for %.3gs: %d disconnects within %.3gs", client_id,
                        flapping.ban_time, flapping.max_count, flapping.window)

    # -- authorization ----------------------------------------------------------------------

    def fetch_rules(self, who: Principal, then: Callable[[float], None], now: float) -> None:
        """Fetch ``who``'s rules from the ACL queries (on an I/O thread) into who.rules,
        then ``then(now)``; at once when no query is configured."""
        sources = self.acl_sources
        if not sources:
            then(now)
            return

        def fetch() -> tuple[list[tuple[str, str, str]], list[str]]:
            rows: list[tuple[str, str, str]] = []
            failures = []
            for name, query in sources:
                try:
                    rows.extend(query(who.username, who.client_id))
                except Exception as err:  # a driver's errors have no common base worth naming
                    failures.append(f"{name}: {err}")
            return rows, failures

        def fetched(result: tuple[list[tuple[str, str, str]], list[str]], later: float) -> None:
            rows, failures = result
            for failure in failures:
                log.warning("ACL query for %r failed, counted as no rows: %s", who.client_id,
                            failure)
            self.set_rules(who, rows)
            then(later)

        self.io_offload(fetch, fetched, now)

    def set_rules(self, who: Principal, rows: list[tuple[str, str, str]]) -> None:
        """Add rules from rows to ``who``'s own, after those it has (a JWT's claim first,
        then the databases')."""
        rules, bad = rules_from_rows(rows)
        if bad:
            log.warning("ACL rows for %r ignored: %s", who.client_id, "; ".join(bad[:5]))
        if rules:
            who.rules = (who.rules or []) + rules

    def allowed(self, who: Principal, action: int, topic: str) -> bool:
        """Whether ``who`` may publish to / subscribe to ``topic``; only call while
        ``authorizing``. The connection's own rules first, then the ACL file."""
        key = (who, action, topic)
        cache = self._acl_cache
        hit = cache.get(key)
        if hit is not None:
            return hit
        acl = self.acl
        verdict = first_match(who.rules, who, action, topic) if who.rules else None
        if verdict is not None:
            ok = verdict
        elif acl is not None:
            ok = acl.check(who, action, topic)
        else:
            ok = self.cfg.acl_no_match == "allow"
        size = self.cfg.acl_cache_size
        if size:
            if len(cache) >= size:
                del cache[next(iter(cache))]
            cache[key] = ok
        return ok
