"""The jwt authentication backend: a signed JSON Web Token in a CONNECT field.

Verification is PyJWT's (a well-kept JWS implementation beats a hand-rolled one).
What this module decides is policy:

- the key's kind fixes the algorithm: a shared secret verifies HS256 only, an RSA
  public key or a JWKS verifies RS256 only. A token therefore cannot pick ``none``,
  nor HS256 with the public key as the HMAC secret (algorithm confusion);
- ``exp`` (required unless ``auth.jwt_require_exp`` is off) and ``nbf`` are checked
  against the wall clock with ``auth.jwt_leeway`` of skew, ``iss``/``aud`` when set;
- a field that holds no JWT at all (not three base64url parts with a JSON header) is
  not this backend's business: the chain asks the next backend, so ``jwt,builtin``
  serves token and password clients side by side. A JWT that fails is refused.

Verification runs on the loop: an HS256 check is some microseconds and an RS256 one
(public exponent 65537) some tens, less than handing the work to a thread would cost.
Key files are read by :meth:`JwtAuthenticator.load`/:meth:`refresh` from the worker's
tick, like the user and ACL files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import jwt

from shards.config import AuthConfig
from shards.protocol.errors import Reason
from shards.users import WatchedFile

log = logging.getLogger("shoal.auth")

Done = Callable[[int | None, float], None]


class JwtKeyError(Exception):
    """A configured key file cannot be used."""


class JwtAuthenticator:
    def __init__(self, cfg: AuthConfig, key_path: str | None = None) -> None:
        self.cfg = cfg
        self.from_username = cfg.jwt_from == "username"
        self.algorithms = ["HS256"] if cfg.jwt_secret else ["RS256"]
        self.secret: bytes | None = cfg.jwt_secret.encode() if cfg.jwt_secret else None
        self.public_key: Any = None
        self.jwks: dict[str, Any] = {}  # kid -> key ("" for a key without kid)
        self._file = WatchedFile(key_path, cfg.reload_interval) if key_path else None
        self._jwks = bool(cfg.jwt_jwks_file)
        self.options: Any = {"require": ["exp"] if cfg.jwt_require_exp else [],
                                        "verify_aud": bool(cfg.jwt_audience)}
        self.accepted = 0
        self.refused = 0

    # -- key files ----------------------------------------------------------------------

    def _read(self) -> None:
        assert self._file is not None
        path = self._file.path
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise JwtKeyError(f"cannot read {path}: {err}") from None
        try:
            if self._jwks:
                keyset = jwt.PyJWKSet.from_dict(json.loads(data))
                keys = {}
                for k in keyset.keys:
                    if k.key_type != "RSA":
                        continue  # only RS256 is accepted; an EC key here would never verify
                    keys[k.key_id or ""] = k.key
                if not keys:
                    raise JwtKeyError(f"{path}: no RSA key in the set")
                self.jwks = keys
            else:
                from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
                from cryptography.hazmat.primitives.serialization import load_pem_public_key
                key = load_pem_public_key(data)
                if not isinstance(key, RSAPublicKey):
                    raise JwtKeyError(f"{path}: not an RSA public key")
                self.public_key = key
        except JwtKeyError:
            raise
        except (ValueError, TypeError, jwt.PyJWTError) as err:
            raise JwtKeyError(f"{path}: {err}") from None

    def load(self, now: float) -> None:
        """Start-up: a missing or bad key file raises JwtKeyError."""
        if self._file is not None:
            self._file.changed(now, force=True)
            self._read()

    def refresh(self, now: float) -> None:
        """Re-read a changed key file; a bad edit is logged and the old keys stay."""
        if self._file is not None and self._file.changed(now):
            try:
                self._read()
            except JwtKeyError as err:
                log.error("JWT keys not reloaded, the previous ones stay: %s", err)
            else:
                log.info("JWT keys reloaded from %s", self._file.path)

    # -- checking -----------------------------------------------------------------------

    def token_of(self, username: str | None, password: bytes | None) -> str | None:
        if self.from_username:
            return username
        if password is None:
            return None
        try:
            return password.decode("ascii")
        except UnicodeDecodeError:
            return None

    def _key_for(self, header: dict[str, Any]) -> Any:
        if self.secret is not None:
            return self.secret
        if not self._jwks:
            return self.public_key
        kid = header.get("kid")
        if kid is None:
            return next(iter(self.jwks.values())) if len(self.jwks) == 1 else None
        return self.jwks.get(kid) if isinstance(kid, str) else None

    def verify(self, token: str, request: Any = None) -> int | None:
        """None: not a JWT; else 0 (valid) or a CONNACK reason code. The ACL claim of a
        valid token goes to ``request.acl_rows``."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        key = self._key_for(header)
        if key is None:
            log.info("JWT refused: no key for kid %r", header.get("kid"))
            self.refused += 1
            return Reason.BAD_USER_NAME_OR_PASSWORD
        cfg = self.cfg
        try:
            # PyJWT checks exp/nbf/iat against its own clock; leeway covers skew
            claims = jwt.decode(token, key, algorithms=self.algorithms, leeway=cfg.jwt_leeway,
                       issuer=cfg.jwt_issuer or None, audience=cfg.jwt_audience or None,
                       options=self.options)
        except jwt.PyJWTError as err:
            log.info("JWT refused: %s", err)
            self.refused += 1
            return Reason.BAD_USER_NAME_OR_PASSWORD
        self.accepted += 1
        claim = cfg.jwt_acl_claim
        if claim and request is not None and claim in claims:
            request.acl_rows = acl_rows(claims[claim])
        return Reason.SUCCESS

    def check(self, request: Any, then: Done, now: float) -> None:
        token = self.token_of(request.username, request.password)
        then(None if not token else self.verify(token, request), now)


_CLAIM_ACTIONS = {"pub": "publish", "sub": "subscribe", "all": "all"}


def acl_rows(claim: Any) -> list[tuple[str, str, str]]:
    """(permission, action, topic) rows from an ``acl`` claim in either of EMQX's forms;
    entries of the wrong shape become rows that :func:`shards.acl.rules_from_rows` logs
    and skips (so a bad entry never widens what is allowed)."""
    rows: list[tuple[str, str, str]] = []
    if isinstance(claim, dict):
        for key, topics in claim.items():
            action = _CLAIM_ACTIONS.get(key, str(key))
            for topic in topics if isinstance(topics, list) else [topics]:
                rows.append(("allow", action, topic if isinstance(topic, str) else ""))
    elif isinstance(claim, list):
        for rule in claim:
            if isinstance(rule, dict):
                rows.append((str(rule.get("permission", "")), str(rule.get("action", "")),
                             str(rule.get("topic", ""))))
            else:
                rows.append(("", "", ""))
    else:
        rows.append(("", "", ""))
    return rows
