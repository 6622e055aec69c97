"""The postgresql authentication backend against a real PostgreSQL server.

The server is started for this module with initdb/pg_ctl from the machine's
PostgreSQL, listening on a Unix socket in a private directory only (no TCP port,
so nothing to collide with); the test is skipped where PostgreSQL or the pg8000
driver is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.clients import V311, Client
from tests.integration.test_auth import BAD_CREDENTIALS

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

def _pg_tool(name: str) -> str | None:
    """From PATH, else from Debian's versioned directory (not on PATH)."""
    found = shutil.which(name)
    if found is None:
        for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
            return str(candidate)
    return found


INITDB = _pg_tool("initdb")
PG_CTL = _pg_tool("pg_ctl")
try:
    import pg8000.native
except ImportError:  # pragma: no cover - depends on the machine
    pg8000 = None  # type: ignore[assignment]

PORT = 5432  # only names the socket file: the server listens on no TCP port


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    if INITDB is None or PG_CTL is None or pg8000 is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) or pg8000 is not installed")
    root = Path(tempfile.mkdtemp(prefix="shoal-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    log = root / "server.log"
    try:
        subprocess.run(_as_postgres([INITDB, "-D", str(data), "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True, timeout=120)
        opts = f"-c listen_addresses='' -c unix_socket_directories={sock} -p {PORT}"
        subprocess.run(_as_postgres([PG_CTL, "-D", str(data), "-l", str(log), "-o", opts,
                                     "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=120)
        unix_sock = str(sock / f".s.PGSQL.{PORT}")
        con = pg8000.native.Connection("postgres", unix_sock=unix_sock)
        con.run("CREATE ROLE mqtt LOGIN")
        con.run("CREATE DATABASE mqtt OWNER mqtt")
        con.close()
        con = pg8000.native.Connection("mqtt", unix_sock=unix_sock, database="mqtt")
        con.run("CREATE TABLE mqtt_user (username text PRIMARY KEY, password_hash text NOT NULL,"
                " clientid text)")
        con.run("CREATE TABLE mqtt_acl (id serial PRIMARY KEY, username text NOT NULL,"
                " permission text NOT NULL, action text NOT NULL, topic text NOT NULL)")
        con.close()
        yield str(sock)
    finally:
        subprocess.run(_as_postgres([PG_CTL, "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _hash(password: str) -> str:
    from shards.users import hash_password
    return hash_password(password)


def _add(sock: str, username: str, password: str, clientid: str | None = None) -> None:
    con = pg8000.native.Connection("mqtt", unix_sock=f"{sock}/.s.PGSQL.{PORT}", database="mqtt")
    con.run("INSERT INTO mqtt_user VALUES (:u, :h, :c) ON CONFLICT (username) DO UPDATE "
            "SET password_hash = :h, clientid = :c", u=username, h=_hash(password), c=clientid)
    con.close()


def _connect(b: Any, cid: str, user: str, password: str, version: int = 5) -> int:
    c = Client(b, client_id=cid, version=version)
    c.c.username_pw_set(user, password)
    try:
        return c.connect().reason_code
    finally:
        c.close()


def test_postgresql_backend(make_broker: Any, postgres: str, uid: str) -> None:
    _add(postgres, "pguser", "pgpass")
    b = make_broker({"mqtt": {"allow_anonymous": False},
                     "auth": {"backends": "postgresql", "pgsql_host": postgres,
                              "pgsql_port": PORT}})
    assert _connect(b, f"{uid}a", "pguser", "pgpass") == 0
    assert _connect(b, f"{uid}b", "pguser", "wrong") == BAD_CREDENTIALS
    assert _connect(b, f"{uid}c", "stranger", "x", version=V311) == BAD_CREDENTIALS
    # a user added to the table works at once: every CONNECT asks the database
    _add(postgres, "later", "pw2")
    assert _connect(b, f"{uid}d", "later", "pw2") == 0


def test_postgresql_custom_query_binds_the_client_id(make_broker: Any, postgres: str,
                                                     uid: str) -> None:
    _add(postgres, "pinned", "pw", clientid=f"{uid}dev")
    query = ("SELECT password_hash FROM mqtt_user WHERE username = :username "
             "AND clientid = :clientid")
    b = make_broker({"auth": {"backends": "postgresql,builtin", "pgsql_host": postgres,
                              "pgsql_port": PORT, "pgsql_query": query}})
    assert _connect(b, f"{uid}dev", "pinned", "pw") == 0
    assert _connect(b, f"{uid}other", "pinned", "pw") == BAD_CREDENTIALS


def test_postgresql_down_falls_through(make_broker: Any, tmp_path: Path, uid: str) -> None:
    b = make_broker({"auth": {"backends": "postgresql", "pgsql_host": str(tmp_path),
                              "pgsql_port": PORT}})
    assert _connect(b, f"{uid}a", "pguser", "pgpass") == BAD_CREDENTIALS
    assert "postgresql auth backend failed" in b.log()


def _acl(sock: str, username: str, rows: list[tuple[str, str, str]]) -> None:
    con = pg8000.native.Connection("mqtt", unix_sock=f"{sock}/.s.PGSQL.{PORT}", database="mqtt")
    for permission, action, topic in rows:
        con.run("INSERT INTO mqtt_acl (username, permission, action, topic) VALUES (:u, :p, :a, :t)",
                u=username, p=permission, a=action, t=topic)
    con.close()


def test_postgresql_acl_rows(make_broker: Any, postgres: str, uid: str) -> None:
    from tests.integration.db_acl import check_acl_rows
    _add(postgres, "acluser", "pw")
    _acl(postgres, "acluser", [("deny", "all", "devices/%c/secret"),
                               ("allow", "all", "devices/%c/#"),
                               ("allow", "subscribe", "eq broadcast/#")])
    b = make_broker({"mqtt": {"allow_anonymous": False},
                     "auth": {"backends": "postgresql", "pgsql_host": postgres, "pgsql_port": PORT,
                              "acl_no_match": "deny",
                              # EMQX's column order: picked by name, not position
                              "pgsql_acl_query": "SELECT action, permission, topic FROM mqtt_acl"
                                                 " WHERE username = :username ORDER BY id"}})
    check_acl_rows(b, uid, "acluser", "pw")
