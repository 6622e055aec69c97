"""The built-in user store: a file of salted password hashes under runtime.data_dir.

The file is JSON, ``{"version": 1, "users": {"alice": "scrypt$16384$8$1$<salt>$<hash>"},
"scram": {"alice": "SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>"}}``: the scrypt hash
checks a password sent in CONNECT, the SCRAM verifier (see :mod:`shards.scram`) serves MQTT 5
enhanced authentication; ``shoal user add`` writes both. ``scram`` is optional (files written
before it have none; their users simply cannot use SCRAM until their password is set again),
written only by ``shoal user add|del`` (atomically: a temporary file renamed into place,
under an exclusive lock so two concurrent commands do not lose each other's change) and
read by every shard, which notices a change by its stat signature (see :class:`WatchedFile`).

Hashes use scrypt from the standard library with a 16-byte random salt per user. The cost
(N=2**14, r=8, p=1: 16 MiB and some tens of milliseconds a check) is Django's default for
scrypt: expensive enough that a stolen file does not give up its passwords to a GPU
quickly, cheap enough that a reconnect storm of a few thousand clients is verified in
seconds on the hash threads. The parameters are stored in each hash, so raising them later
needs no migration: old hashes keep verifying with their own. Comparison is constant-time.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from pathlib import Path

SCHEME = "scrypt"
SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
FILE_VERSION = 1
# scrypt's memory is 128 * r * N bytes; allow what a stored hash may ask for, with headroom
_MAXMEM = 256 * 1024 * 1024


class UserFileError(Exception):
    """The user file exists but cannot be used (not JSON, wrong shape, bad hash)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str | bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P, salt: bytes | None = None) -> str:
    """The stored form of ``password``: scheme, cost parameters, salt and hash."""
    pw = password.encode("utf-8") if isinstance(password, str) else password
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=HASH_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != SCHEME:
            raise ValueError(f"unknown scheme {scheme!r}")
        return int(n), int(r), int(p), base64.b64decode(salt, validate=True), \
            base64.b64decode(digest, validate=True)
    except ValueError as err:
        raise UserFileError(f"malformed password hash: {err}") from None


def verify_password(password: bytes, encoded: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time compare)."""
    n, r, p, salt, digest = _parse(encoded)
    got = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(digest))
    return hmac.compare_digest(got, digest)


def parse_users(text: str) -> dict[str, str]:
    return parse_store(text)[0]


def parse_store(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """The password hashes and the SCRAM verifiers of a user file."""
    from shards.scram import Verifier
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserFileError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION \
            or not isinstance(doc.get("users"), dict):
        raise UserFileError(f"expected {{\"version\": {FILE_VERSION}, \"users\": {{...}}}}")
    users = doc["users"]
    for name, encoded in users.items():
        if not isinstance(encoded, str):
            raise UserFileError(f"user {name!r}: hash is not a string")
        _parse(encoded)
    scram = doc.get("scram", {})
    if not isinstance(scram, dict):
        raise UserFileError("\"scram\" is not an object")
    for name, encoded in scram.items():
        if not isinstance(encoded, str):
            raise UserFileError(f"user {name!r}: SCRAM verifier is not a string")
        try:
            Verifier.decode(encoded)
        except ValueError as err:
            raise UserFileError(f"user {name!r}: {err}") from None
    return dict(users), dict(scram)


def read_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """The users in ``path``; no file means no users."""
    return read_store(path)[0]


def read_store(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, {}
    return parse_store(text)


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)  # hashes are secrets too
    os.replace(tmp, target)


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Serialise read-modify-write of ``path`` between concurrent commands."""
    lock = Path(f"{os.fspath(path)}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_users(path: str | os.PathLike[str], users: dict[str, str],
                scram: dict[str, str] | None = None) -> None:
    doc: dict[str, object] = {"version": FILE_VERSION, "users": dict(sorted(users.items()))}
    if scram:
        doc["scram"] = dict(sorted(scram.items()))
    write_atomically(path, json.dumps(doc, indent=1) + "\n")


def add_user(path: str | os.PathLike[str], name: str, password: str,
             scram_iterations: int | None = None) -> bool:
    """Add or replace ``name`` (its scrypt hash and its SCRAM verifier); True if new."""
    from shards.scram import DEFAULT_ITERATIONS, make_verifier
    encoded = hash_password(password)
    verifier = make_verifier(password, iterations=scram_iterations or DEFAULT_ITERATIONS).encode()
    with locked(path):
        users, scram = read_store(path)
        new = name not in users
        users[name] = encoded
        scram[name] = verifier
        write_users(path, users, scram)
    return new


def delete_user(path: str | os.PathLike[str], name: str) -> bool:
    """Remove ``name``; False if there was no such user."""
    with locked(path):
        users, scram = read_store(path)
        if users.pop(name, None) is None:
            return False
        scram.pop(name, None)
        write_users(path, users, scram)
    return True


class WatchedFile:
    """A file the broker re-reads when it changes, checked at most every ``interval``.

    The change test is the stat signature (inode, size, mtime in ns): an atomic
    replace always changes the inode. ``poll`` costs one stat per interval.
    """

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._sig: tuple[int, int, int] | None = None
        self._next = float("-inf")

    def changed(self, now: float, force: bool = False) -> bool:
        if not force and now < self._next:
            return False
        self._next = now + self.interval
        try:
            st = os.stat(self.path)
            sig: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            sig = None
        if sig == self._sig and not force:
            return False
        self._sig = sig
        return True
