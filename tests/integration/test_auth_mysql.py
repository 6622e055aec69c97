"""The mysql authentication backend against a real MariaDB server.

The server is started for this module from the machine's MariaDB (Debian's
mariadb-server), with --skip-networking: it listens on a Unix socket in a private
directory only, so there is no port to collide with. Skipped where MariaDB or the
PyMySQL driver is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.clients import V311, Client
from tests.integration.test_auth import BAD_CREDENTIALS

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
MARIADBD = shutil.which("mariadbd") or shutil.which("mysqld") or (
    "/usr/sbin/mariadbd" if os.path.exists("/usr/sbin/mariadbd") else None)
try:
    import pymysql
except ImportError:  # pragma: no cover - depends on the machine
    pymysql = None  # type: ignore[assignment]


def _root(sock: str) -> Any:
    return pymysql.connect(unix_socket=sock, user="root", autocommit=True)


@pytest.fixture(scope="module")
def mariadb() -> Iterator[str]:
    if INSTALL_DB is None or MARIADBD is None or pymysql is None:
        pytest.skip("MariaDB (mariadb-install-db, mariadbd) or PyMySQL is not installed")
    root = Path(tempfile.mkdtemp(prefix="shoal-mysql-"))
    data, sock = root / "data", str(root / "mysqld.sock")
    user = ["--user=mysql"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(root, "mysql")
    proc = None
    try:
        subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={data}", *user,
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=180)
        proc = subprocess.Popen([MARIADBD, "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                                 "--skip-networking", f"--pid-file={root / 'mysqld.pid'}",
                                 f"--log-error={root / 'error.log'}", *user],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:  # polling the server with a deadline until it answers
            try:
                con = _root(sock)
                break
            except pymysql.err.OperationalError:
                assert proc.poll() is None, (root / "error.log").read_text(errors="replace")
                assert time.monotonic() < deadline, "MariaDB did not start in time"
                time.sleep(0.05)
        with con.cursor() as cur:
            cur.execute("CREATE DATABASE mqtt")
            cur.execute("CREATE USER 'mqtt'@'localhost'")
            cur.execute("GRANT ALL ON mqtt.* TO 'mqtt'@'localhost'")
            cur.execute("CREATE TABLE mqtt.mqtt_user (username varchar(100) PRIMARY KEY, "
                        "password_hash varchar(200) NOT NULL, clientid varchar(100))")
            cur.execute("CREATE TABLE mqtt.mqtt_acl (id int AUTO_INCREMENT PRIMARY KEY, "
                        "username varchar(100) NOT NULL, permission varchar(5) NOT NULL, "
                        "action varchar(9) NOT NULL, topic varchar(200) NOT NULL)")
        con.close()
        yield sock
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _add(sock: str, username: str, password: str, clientid: str | None = None) -> None:
    from shards.users import hash_password
    con = _root(sock)
    with con.cursor() as cur:
        cur.execute("REPLACE INTO mqtt.mqtt_user VALUES (%s, %s, %s)",
                    (username, hash_password(password), clientid))
    con.close()


def _connect(b: Any, cid: str, user: str, password: str, version: int = 5) -> int:
    c = Client(b, client_id=cid, version=version)
    c.c.username_pw_set(user, password)
    try:
        return c.connect().reason_code
    finally:
        c.close()


def test_mysql_backend(make_broker: Any, mariadb: str, uid: str) -> None:
    _add(mariadb, "dbuser", "dbpass")
    b = make_broker({"mqtt": {"allow_anonymous": False},
                     "auth": {"backends": "mysql", "mysql_host": mariadb}})
    assert _connect(b, f"{uid}a", "dbuser", "dbpass") == 0
    assert _connect(b, f"{uid}b", "dbuser", "wrong") == BAD_CREDENTIALS
    assert _connect(b, f"{uid}c", "stranger", "x", version=V311) == BAD_CREDENTIALS
    _add(mariadb, "later", "pw2")
    assert _connect(b, f"{uid}d", "later", "pw2") == 0


def test_mysql_custom_query_binds_the_client_id(make_broker: Any, mariadb: str, uid: str) -> None:
    _add(mariadb, "pinned", "pw", clientid=f"{uid}dev")
    query = ("SELECT password_hash FROM mqtt_user WHERE username = :username "
             "AND clientid = :clientid AND username LIKE '%'")
    b = make_broker({"auth": {"backends": "mysql,builtin", "mysql_host": mariadb,
                              "mysql_query": query}})
    assert _connect(b, f"{uid}dev", "pinned", "pw") == 0
    assert _connect(b, f"{uid}other", "pinned", "pw") == BAD_CREDENTIALS


def test_mysql_down_falls_through(make_broker: Any, tmp_path: Path, uid: str) -> None:
    b = make_broker({"auth": {"backends": "mysql", "mysql_host": str(tmp_path / "no.sock")}})
    assert _connect(b, f"{uid}a", "dbuser", "dbpass") == BAD_CREDENTIALS
    assert "mysql auth backend failed" in b.log()


def _acl(sock: str, username: str, rows: list[tuple[str, str, str]]) -> None:
    con = _root(sock)
    with con.cursor() as cur:
        for permission, action, topic in rows:
            cur.execute("INSERT INTO mqtt.mqtt_acl (username, permission, action, topic) "
                        "VALUES (%s, %s, %s, %s)", (username, permission, action, topic))
    con.close()


def test_mysql_acl_rows(make_broker: Any, mariadb: str, uid: str) -> None:
    from tests.integration.db_acl import check_acl_rows
    _add(mariadb, "acluser", "pw")
    _acl(mariadb, "acluser", [("deny", "all", "devices/%c/secret"),
                              ("allow", "all", "devices/%c/#"),
                              ("allow", "subscribe", "eq broadcast/#")])
    b = make_broker({"mqtt": {"allow_anonymous": False},
                     "auth": {"backends": "mysql", "mysql_host": mariadb, "acl_no_match": "deny",
                              "mysql_acl_query": "SELECT permission, action, topic FROM mqtt_acl"
                                                 " WHERE username = :username ORDER BY id"}})
    check_acl_rows(b, uid, "acluser", "pw")
