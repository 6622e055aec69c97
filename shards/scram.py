"""SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, as a pure state machine.

No I/O, no clock, no randomness of its own: the server nonce is passed in, and the
caller looks the user's verifier up between the two steps. Standard library only
(hashlib, hmac, base64), like the protocol package.

MQTT 5 enhanced authentication carries it (Authentication Method "SCRAM-SHA-256"):

    CONNECT  data = client-first   ->  :meth:`ScramServer.client_first` -> username
                                       :meth:`ScramServer.server_first` -> AUTH 0x18 data
    AUTH 0x18 data = client-final  ->  :meth:`ScramServer.client_final` -> CONNACK data
                                       (server-final, "v=<server signature>")

The stored verifier is what RFC 5802 section 3 calls StoredKey and ServerKey, with
the salt and iteration count, in PostgreSQL's text form
``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64): it lets the
server check a client's proof and prove itself, but is not a password equivalent.

Channel binding is not offered (the gs2 flag must be ``n`` or ``y``; ``p=`` is refused),
and an authorization identity other than the user itself is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

METHOD = "SCRAM-SHA-256"
PREFIX = "SCRAM-SHA-256"
# RFC 7677 section 4: at least 4096 iterations; the cost is the client's (and
# `shoal user add`'s), the server only computes HMACs
DEFAULT_ITERATIONS = 4096
MAX_ITERATIONS = 10_000_000  # a verifier asking more is damaged, not stronger
SALT_BYTES = 16
_MAX_MESSAGE = 4096  # a client-first/final is some hundred bytes; more is an attack


class ScramError(Exception):
    """The exchange failed; ``message`` says why (for the log, not the client)."""


@dataclass(frozen=True, slots=True)
class Verifier:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        b = _b64
        return (f"{PREFIX}${self.iterations}:{b(self.salt)}$"
                f"{b(self.stored_key)}:{b(self.server_key)}")

    @classmethod
    def decode(cls, text: str) -> Verifier:
        try:
            prefix, params, keys = text.split("$")
            if prefix != PREFIX:
                raise ValueError(f"unknown scheme {prefix!r}")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            v = cls(_unb64(salt), int(iterations), _unb64(stored), _unb64(server))
        except ValueError as err:
            raise ValueError(f"malformed SCRAM verifier: {err}") from None
        if not 1 <= v.iterations <= MAX_ITERATIONS or len(v.stored_key) != 32 \
                or len(v.server_key) != 32:
            raise ValueError("malformed SCRAM verifier: bad iterations or key length")
        return v


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def make_verifier(password: str | bytes, salt: bytes | None = None,
                  iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """What the user store keeps for ``password`` (RFC 5802 section 3).

    The password should be SASLprep-normalised; shoal takes it as UTF-8 bytes, which is
    the same thing for the ASCII passwords clients send in practice.
    """
    pw = password.encode("utf-8") if isinstance(password, str) else password
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", pw, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return Verifier(salt, iterations, hashlib.sha256(client_key).digest(),
                    _hmac(salted, b"Server Key"))


def _attrs(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError(f"malformed attribute {part[:20]!r}")
        out.append((part[0], part[2:]))
    return out


def _saslname(text: str) -> str:
    # RFC 5802: ',' and '=' travel as '=2C' and '=3D'; any other '=' is malformed
    out = text.replace("=2C", ",").replace("=3D", "=")
    if "=" in text.replace("=2C", "").replace("=3D", ""):
        raise ScramError("malformed user name")
    return out


class ScramServer:
    """One exchange: :meth:`client_first`, :meth:`server_first`, :meth:`client_final`,
    each once and in that order."""

    def __init__(self, nonce: str) -> None:
        if not nonce or "," in nonce:
            raise ValueError("the server nonce is printable characters without ','")
        self.server_nonce = nonce
        self.username = ""
        self._gs2 = ""
        self._first_bare = ""
        self._nonce = ""
        self._server_first = ""
        self._verifier: Verifier | None = None
        self.done = False

    def client_first(self, data: bytes) -> str:
        """Parse the client-first message; returns the user name to look up."""
        if self._gs2:
            raise ScramError("client-first sent twice")
        if len(data) > _MAX_MESSAGE:
            raise ScramError("client-first too long")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-first is not UTF-8") from None
        flag, sep, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not sep or not sep2:
            raise ScramError("client-first has no gs2 header")
        if flag.startswith("p="):
            raise ScramError("channel binding is not supported")
        if flag not in ("n", "y"):
            raise ScramError(f"bad gs2 channel binding flag {flag[:10]!r}")
        attrs = _attrs(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            # (an m= mandatory extension first lands here too: none is supported)
            raise ScramError("client-first-bare must start n=...,r=...")
        username = _saslname(attrs[0][1])
        nonce = attrs[1][1]
        if not username or not nonce:
            raise ScramError("empty user name or nonce")
        if authzid:
            if not authzid.startswith("a=") or _saslname(authzid[2:]) != username:
                raise ScramError("an authorization identity other than the user is refused")
        self._gs2 = text[:len(flag) + len(authzid) + 2]
        self._first_bare = bare
        self._nonce = nonce + self.server_nonce
        self.username = username
        return username

    def server_first(self, verifier: Verifier) -> bytes:
        """The server-first message. For an unknown user pass a made-up verifier (see
        :func:`decoy`) so the answer does not tell who exists; its proof never checks."""
        if not self._gs2 or self._server_first:
            raise ScramError("server-first out of order")
        self._verifier = verifier
        self._server_first = f"r={self._nonce},s={_b64(verifier.salt)},i={verifier.iterations}"
        return self._server_first.encode()

    def client_final(self, data: bytes) -> bytes:
        """Check the client's proof; returns the server-final message (``v=...``)."""
        verifier = self._verifier
        if verifier is None or self.done:
            raise ScramError("client-final out of order")
        self.done = True
        if len(data) > _MAX_MESSAGE:
            raise ScramError("client-final too long")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-final is not UTF-8") from None
        attrs = _attrs(text)
        if len(attrs) < 3 or attrs[0][0] != "c" or attrs[1][0] != "r" or attrs[-1][0] != "p":
            raise ScramError("client-final must be c=...,r=...,...,p=...")
        try:
            binding = _unb64(attrs[0][1])
            proof = _unb64(attrs[-1][1])
        except ValueError:
            raise ScramError("client-final: bad base64") from None
        if binding != self._gs2.encode():
            raise ScramError("channel binding data does not match the gs2 header")
        if not hmac.compare_digest(attrs[1][1].encode(), self._nonce.encode()):
            raise ScramError("nonce does not match")
        if len(proof) != 32:
            raise ScramError("bad proof length")
        without_proof = text[:text.rindex(",p=")]
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(verifier.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
            raise ScramError("invalid proof")
        return b"v=" + base64.b64encode(_hmac(verifier.server_key, auth_message))


def decoy(username: str, key: bytes, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """A verifier for a user that does not exist: a salt stable per name (keyed by the
    server's secret ``key``) so that asking twice looks like a real user, and keys no
    proof can match (RFC 5802 section 9 on user enumeration)."""
    salt = _hmac(key, b"salt:" + username.encode("utf-8"))[:SALT_BYTES]
    return Verifier(salt, iterations, _hmac(key, b"stored:" + username.encode("utf-8")),
                    _hmac(key, b"server:" + username.encode("utf-8")))


class ScramClient:
    """The client side, for tests and tools (``shoal`` does not ship a client)."""

    def __init__(self, username: str, password: str, nonce: str) -> None:
        self.username = username
        self.password = password.encode("utf-8")
        self.nonce = nonce
        name = username.replace("=", "=3D").replace(",", "=2C")
        self.first_bare = f"n={name},r={nonce}"
        self._server_key = b""
        self._auth_message = b""

    def first(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(_attrs(server_first.decode()))
        nonce, salt, iterations = attrs["r"], _unb64(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise ScramError("server nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored = hashlib.sha256(client_key).digest()
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored, auth)))
        self._server_key = _hmac(salted, b"Server Key")
        self._auth_message = auth
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify(self, server_final: bytes) -> bool:
        expected = b"v=" + base64.b64encode(_hmac(self._server_key, self._auth_message))
        return hmac.compare_digest(server_final, expected)
