"""The embedded durable store: persistent sessions, their QoS 1/2 messages, retained messages.

SQLite in WAL mode, from the standard library: no server to run, and a commit
that returned survives the process being killed (synchronous=NORMAL syncs the
WAL at checkpoints; only a power loss can take the last commits, and
``synchronous = "FULL"`` closes that too at a cost per commit).

Files, under ``runtime.data_dir``:

- ``shard-<k>.db``: the sessions shard k owns that have a session expiry
  (MQTT 5 expiry > 0, MQTT 3 clean_session=0): their state (subscriptions,
  inbound QoS 2 ids, expiry deadline) and one row per queued or in-flight QoS 1/2
  message. Only shard k writes it.
- ``retained.db``: the host's retained messages. Every shard keeps them all in
  memory; the shard whose client published one writes it here, so a shard that
  restarts loads the current set. SQLite serialises the few concurrent writers.

Writes are journaled in memory as the shard works (a dict per table: the last
write to a row wins, so a message queued and acknowledged within one batch
never reaches the disk) and committed together by :meth:`Store.commit`, which
the worker calls once per loop turn *before* writing that turn's packets: a
PUBACK for a message a persistent session holds leaves only after the message
is on disk.

Deadlines are stored as wall-clock time (the loop's monotonic clock restarts
with the host) and converted back on load.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import orjson

from shards.config import MQTTConfig
from shards.message import Message
from shards.session import Counters, Inflight, Session
from shards.subs import Subscription
from shards.transfer import message_from_frame, message_to_bytes

log = logging.getLogger("shoal.store")

QUEUED = 0
INFLIGHT = 1
RELEASED = 2  # QoS 2: PUBREC received, PUBREL sent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (cid TEXT PRIMARY KEY, meta BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    cid TEXT NOT NULL, mid INTEGER NOT NULL, ord INTEGER NOT NULL, state INTEGER NOT NULL,
    pid INTEGER NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, sub_ids BLOB NOT NULL,
    expires REAL, frame BLOB NOT NULL, PRIMARY KEY (cid, mid));
"""
_RETAINED_SCHEMA = """
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, expires REAL, frame BLOB NOT NULL);
"""

MessageRow = tuple[Any, ...]


def _connect(path: str, synchronous: str, schema: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
    # N shards starting together open the shared retained.db at once: switching it to WAL
    # needs a lock SQLite's busy handler does not always wait for, so retry briefly
    for attempt in range(50):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == 49:
                raise
            time.sleep(0.05 + 0.01 * attempt)
    return db


class Store:
    def __init__(self, data_dir: str, shard: int, synchronous: str = "NORMAL") -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, f"shard-{shard}.db")
        self.db = _connect(self.path, synchronous, _SCHEMA)
        self.rdb = _connect(os.path.join(data_dir, "retained.db"), synchronous, _RETAINED_SCHEMA)
        row = self.db.execute("SELECT COALESCE(MAX(ord), 0) FROM messages").fetchone()
        self._ord = int(row[0])
        self._sessions: dict[str, Session | None] = {}
        self._messages: dict[tuple[str, int], MessageRow | None] = {}
        self._retained: dict[str, Message | None] = {}
        self._mono_to_wall = time.time() - time.monotonic()
        self.dirty = False
        self.commits = 0
        self.closed = False
        # called the first time a batch gets dirty: the worker commits at the end of
        # this loop turn even when the turn writes nothing to any client
        self.on_dirty: Callable[[], None] = lambda: None

    # -- the journal (hot path: a dict write each) ------------------------------------

    def _touch(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.on_dirty()

    def session_changed(self, session: Session) -> None:
        self._sessions[session.client_id] = session
        self._touch()

    def session_gone(self, client_id: str) -> None:
        self._sessions[client_id] = None
        # rows journaled for the old session must not outlive its deletion
        for key in [k for k in self._messages if k[0] == client_id]:
            del self._messages[key]
        self._touch()

    def put(self, client_id: str, msg: Message, state: int, pid: int, qos: int, retain: bool,
            sub_ids: tuple[int, ...]) -> None:
        self._ord += 1
        self._messages[(client_id, msg.id)] = (msg, self._ord, state, pid, qos, retain, sub_ids)
        self._touch()

    def delete(self, client_id: str, msg: Message) -> None:
        self._messages[(client_id, msg.id)] = None
        self._touch()

    def retained_set(self, msg: Message) -> None:
        self._retained[msg.topic] = msg if msg.payload else None
        self._touch()

    # -- commit ----------------------------------------------------------------------------

    def _wall(self, mono: float | None) -> float | None:
        return None if mono is None else mono + self._mono_to_wall

    def commit(self) -> None:
        # after close (shutdown): late callbacks of the loop may still journal; they are
        # covered by load(), which treats sessions still marked connected as just disconnected
        if not self.dirty or self.closed:
            return
        self.dirty = False
        self.commits += 1
        sessions, self._sessions = self._sessions, {}
        messages, self._messages = self._messages, {}
        retained, self._retained = self._retained, {}
        if sessions or messages:
            db = self.db
            db.execute("BEGIN")
            try:
                for cid, session in sessions.items():
                    if session is None:
                        db.execute("DELETE FROM sessions WHERE cid = ?", (cid,))
                        db.execute("DELETE FROM messages WHERE cid = ?", (cid,))
                rows = []
                deletes = []
                for (cid, mid), row in messages.items():
                    if row is None:
                        deletes.append((cid, mid))
                        continue
                    msg, order, state, pid, qos, retain, sub_ids = row
                    rows.append((cid, mid, order, state, pid, qos, int(retain),
                                 orjson.dumps(list(sub_ids)), self._wall(msg.expires_at),
                                 message_to_bytes(msg)))
                if deletes:
                    db.executemany("DELETE FROM messages WHERE cid = ? AND mid = ?", deletes)
                if rows:
                    db.executemany("INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
                for cid, session in sessions.items():
                    if session is not None:
                        db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?)",
                                   (cid, orjson.dumps(self._meta(session))))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if retained:
            rdb = self.rdb
            rdb.execute("BEGIN")
            try:
                for topic, msg in retained.items():
                    if msg is None:
                        rdb.execute("DELETE FROM retained WHERE topic = ?", (topic,))
                    else:
                        rdb.execute("INSERT OR REPLACE INTO retained VALUES (?, ?, ?)",
                                    (topic, self._wall(msg.expires_at), message_to_bytes(msg)))
                rdb.execute("COMMIT")
            except BaseException:
                rdb.execute("ROLLBACK")
                raise

    def _meta(self, session: Session) -> dict[str, Any]:
        return {
            "version": session.version,
            "expiry": session.expiry_interval,
            "expires": self._wall(session.expires_at),
            "qos2_in": sorted(session.inbound_qos2),
            "next_pid": session.next_pid,
            "subs": [[key, sub.filter, sub.group, sub.opts.qos, sub.opts.no_local,
                      sub.opts.retain_as_published, sub.opts.retain_handling, sub.sub_id]
                     for key, sub in session.subscriptions.items()],
        }

    # -- load ------------------------------------------------------------------------------

    def _mono(self, wall: float | None, now: float) -> float | None:
        return None if wall is None else now + (wall - time.time())

    def load_sessions(self, cfg: MQTTConfig, counters: Counters,
                      now: float) -> list[tuple[Session, list[Subscription]]]:
        from shards.protocol.packets import SubOptions

        out = []
        for cid, blob in self.db.execute("SELECT cid, meta FROM sessions"):
            meta = orjson.loads(blob)
            session = Session(cid, cfg, counters, now)
            session.version = meta["version"]
            session.expiry_interval = meta["expiry"]
            # a session that was connected when its shard died counts as disconnected now
            expires = self._mono(meta["expires"], now)
            session.expires_at = expires if expires is not None else now + session.expiry_interval
            session.inbound_qos2 = set(meta["qos2_in"])
            session.next_pid = meta["next_pid"]
            subs = []
            for key, filt, group, qos, no_local, rap, rh, sub_id in meta["subs"]:
                sub = Subscription(session, filt, SubOptions(qos, no_local, rap, rh), sub_id, group)
                session.subscriptions[key] = sub
                subs.append(sub)
            out.append((session, subs))
        by_cid = {s.client_id: s for s, _ in out}
        for cid, state, pid, qos, retain, sub_ids, expires, frame in self.db.execute(
                "SELECT cid, state, pid, qos, retain, sub_ids, expires, frame FROM messages ORDER BY ord"):
            session = by_cid.get(cid)
            if session is None:
                continue
            msg = message_from_frame(frame, now)[0]
            msg.expires_at = self._mono(expires, now)
            ids = tuple(orjson.loads(sub_ids))
            if state == QUEUED:
                session.queue_for_append().append((msg, qos, bool(retain), ids))
            else:
                item = Inflight(msg, qos, bool(retain), ids)
                item.released = state == RELEASED
                session.inflight[pid] = item
        return out

    def load_retained(self, now: float) -> list[Message]:
        out = []
        for expires, frame in self.rdb.execute("SELECT expires, frame FROM retained"):
            msg = message_from_frame(frame, now)[0]
            msg.expires_at = self._mono(expires, now)
            out.append(msg)
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.commit()
        self.closed = True
        self.db.close()
        self.rdb.close()
