"""The jwt backend, sans-IO: tokens signed here with keys made here, no loop, no sockets."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shards.config import AuthConfig, ConfigError
from shards.jwtauth import JwtKeyError
from shards.protocol.errors import Reason
from shards.security import Security
from tests.unit.test_security import answers

SECRET = "a-shared-secret-of-at-least-32-bytes!!"
BAD = Reason.BAD_USER_NAME_OR_PASSWORD


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "dev1", "exp": int(time.time()) + 600, **extra}


def hs(payload: dict[str, Any], secret: str = SECRET, **kw: Any) -> bytes:
    return jwt.encode(payload, secret, algorithm="HS256", **kw).encode()


def rs(payload: dict[str, Any], key: rsa.RSAPrivateKey, **kw: Any) -> bytes:
    return jwt.encode(payload, key, algorithm="RS256", **kw).encode()


def loaded(tmp_path: Path, anon: bool = True, **auth: Any) -> Security:
    sec = Security(AuthConfig(backends=auth.pop("backends", "jwt"), **auth), anon, str(tmp_path))
    sec.load(0.0, time.time())
    return sec


def test_hs256_good_expired_not_yet_and_bad_signature(tmp_path: Path) -> None:
    sec = loaded(tmp_path, jwt_secret=SECRET)
    assert answers(sec, "dev1", hs(claims())) == [0]
    assert answers(sec, "dev1", hs(claims(exp=int(time.time()) - 60))) == [BAD]
    assert answers(sec, "dev1", hs(claims(nbf=int(time.time()) + 60))) == [BAD]
    assert answers(sec, "dev1", hs(claims(), secret=SECRET + "x")) == [BAD]
    # a token whose signature was cut off or altered
    tok = hs(claims())
    assert answers(sec, "dev1", tok[:-4] + (b"AAAA" if not tok.endswith(b"AAAA") else b"BBBB")) == [BAD]


def test_leeway_allows_a_little_skew(tmp_path: Path) -> None:
    sec = loaded(tmp_path, jwt_secret=SECRET, jwt_leeway=30.0)
    assert answers(sec, "u", hs(claims(exp=int(time.time()) - 10))) == [0]
    assert answers(sec, "u", hs(claims(exp=int(time.time()) - 60))) == [BAD]
    assert answers(sec, "u", hs(claims(nbf=int(time.time()) + 10))) == [0]


def test_exp_required_unless_configured(tmp_path: Path) -> None:
    no_exp = hs({"sub": "x"})
    assert answers(loaded(tmp_path, jwt_secret=SECRET), "u", no_exp) == [BAD]
    assert answers(loaded(tmp_path, jwt_secret=SECRET, jwt_require_exp=False), "u", no_exp) == [0]


def test_issuer_and_audience(tmp_path: Path) -> None:
    sec = loaded(tmp_path, jwt_secret=SECRET, jwt_issuer="idp", jwt_audience="shoal")
    assert answers(sec, "u", hs(claims(iss="idp", aud="shoal"))) == [0]
    assert answers(sec, "u", hs(claims(iss="idp", aud=["x", "shoal"]))) == [0]
    assert answers(sec, "u", hs(claims(iss="other", aud="shoal"))) == [BAD]
    assert answers(sec, "u", hs(claims(iss="idp", aud="else"))) == [BAD]
    assert answers(sec, "u", hs(claims(aud="shoal"))) == [BAD]  # iss missing


def test_alg_none_is_refused(tmp_path: Path) -> None:
    sec = loaded(tmp_path, jwt_secret=SECRET)
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    assert answers(sec, "u", header + b"." + body + b".") == [BAD]


def test_rs256_public_key_file_and_hs256_confusion(tmp_path: Path) -> None:
    key = rsa_key()
    pem = tmp_path / "pub.pem"
    pem.write_bytes(public_pem(key))
    sec = loaded(tmp_path, jwt_public_key_file="pub.pem")  # relative to data_dir
    assert answers(sec, "u", rs(claims(), key)) == [0]
    assert answers(sec, "u", rs(claims(), rsa_key())) == [BAD]  # another key
    # HS256 keyed with the public key's PEM text: the classic confusion attack
    forged = jwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda k: k  # type: ignore[attr-defined]
    tok = forged.encode(json.dumps(claims()).encode(), public_pem(key), algorithm="HS256")
    assert answers(sec, "u", tok.encode()) == [BAD]
    # and an HS256 token with the shared secret a broker configured elsewhere
    assert answers(sec, "u", hs(claims())) == [BAD]


def test_jwks_picks_the_key_by_kid(tmp_path: Path) -> None:
    k1, k2 = rsa_key(), rsa_key()
    jwks = {"keys": [dict(json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())),
                          kid=kid, use="sig", alg="RS256") for k, kid in ((k1, "one"), (k2, "two"))]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    sec = loaded(tmp_path, jwt_jwks_file=str(tmp_path / "jwks.json"))
    assert answers(sec, "u", rs(claims(), k1, headers={"kid": "one"})) == [0]
    assert answers(sec, "u", rs(claims(), k2, headers={"kid": "two"})) == [0]
    assert answers(sec, "u", rs(claims(), k1, headers={"kid": "two"})) == [BAD]
    assert answers(sec, "u", rs(claims(), k1, headers={"kid": "three"})) == [BAD]
    assert answers(sec, "u", rs(claims(), k1)) == [BAD]  # no kid, two keys: ambiguous


def test_jwks_rotation_is_picked_up_and_a_bad_edit_keeps_the_old_keys(tmp_path: Path) -> None:
    k1, k2 = rsa_key(), rsa_key()

    def write(k: rsa.RSAPrivateKey) -> None:
        path = tmp_path / "jwks.json"
        tmp = tmp_path / "jwks.tmp"
        tmp.write_text(json.dumps({"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(
            k.public_key()))]}))
        tmp.replace(path)  # a new inode: the change is seen whatever the mtime granularity

    write(k1)
    sec = loaded(tmp_path, jwt_jwks_file="jwks.json", reload_interval=0.5)
    assert answers(sec, "u", rs(claims(), k1)) == [0]  # one key: no kid needed
    write(k2)
    sec.refresh(1.0, time.time())
    assert answers(sec, "u", rs(claims(), k2)) == [0]
    assert answers(sec, "u", rs(claims(), k1)) == [BAD]
    (tmp_path / "jwks.json").write_text("not json")
    sec.refresh(2.0, time.time())
    assert answers(sec, "u", rs(claims(), k2)) == [0]


def test_missing_or_bad_key_file_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(JwtKeyError):
        loaded(tmp_path, jwt_public_key_file="nope.pem")
    (tmp_path / "bad.pem").write_text("-----BEGIN PUBLIC KEY-----\nxx\n")
    with pytest.raises(JwtKeyError):
        loaded(tmp_path, jwt_public_key_file="bad.pem")
    (tmp_path / "empty.json").write_text('{"keys": []}')
    with pytest.raises(JwtKeyError):
        loaded(tmp_path, jwt_jwks_file="empty.json")


def test_config_wants_exactly_one_key_source() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        AuthConfig(backends="jwt")
    with pytest.raises(ConfigError, match="exactly one"):
        AuthConfig(backends="jwt", jwt_secret="s", jwt_jwks_file="k.json")
    AuthConfig(backends="jwt", jwt_secret="s")


def test_not_a_jwt_goes_to_the_next_backend(tmp_path: Path) -> None:
    from shards.users import hash_password
    from tests.unit.test_security import FAST
    sec = loaded(tmp_path, backends="jwt,builtin", jwt_secret=SECRET)
    assert sec.builtin is not None
    sec.builtin.set_users({"alice": hash_password("wonderland", **FAST)})
    assert answers(sec, "alice", b"wonderland") == [0]
    assert answers(sec, "alice", b"nope") == [BAD]
    assert answers(sec, "dev", hs(claims())) == [0]
    assert answers(sec, "dev", b"\xff\xfe") == [BAD]  # not ASCII, nobody knows dev
    # alone in the chain, a password that is not a JWT is refused
    assert answers(loaded(tmp_path, jwt_secret=SECRET), "alice", b"wonderland") == [BAD]


def test_token_in_the_username_or_a_password_without_username(tmp_path: Path) -> None:
    sec = loaded(tmp_path, jwt_secret=SECRET, jwt_from="username")
    assert answers(sec, hs(claims()).decode(), None) == [0]
    assert answers(sec, "plain", b"x") == [BAD]
    # MQTT 5 allows a password without a username: the token alone authenticates
    sec = loaded(tmp_path, anon=False, jwt_secret=SECRET)
    assert answers(sec, None, hs(claims())) == [0]
    assert answers(sec, None, hs(claims(exp=1))) == [BAD]
    assert answers(sec, None, None) == [Reason.NOT_AUTHORIZED]


def test_acl_claim_in_both_emqx_forms() -> None:
    from shards.jwtauth import acl_rows
    assert acl_rows({"pub": ["a/%c"], "sub": ["b/#"], "all": "c"}) == [
        ("allow", "publish", "a/%c"), ("allow", "subscribe", "b/#"), ("allow", "all", "c")]
    assert acl_rows([{"permission": "deny", "action": "publish", "topic": "x"}]) == [
        ("deny", "publish", "x")]
    from shards.acl import rules_from_rows
    for bad in ("nonsense", [1], {"pub": [2]}, {"read": ["t"]}):
        rules, skipped = rules_from_rows(acl_rows(bad))
        assert not rules and skipped  # a bad entry never widens what is allowed


def test_acl_claim_governs_the_connection_through_a_shard(tmp_path: Path) -> None:
    from shards.config import MQTTConfig
    from shards.protocol.packets import MQTT_5, Connect, Puback, Publish, Suback, SubOptions, Subscribe
    from shards.shard import Shard
    from tests.unit.shardkit import FakeLink
    sec = loaded(tmp_path, jwt_secret=SECRET, acl_no_match="deny")
    shard = Shard(MQTTConfig(), 0, 0.0, security=sec)
    acl = [{"permission": "deny", "action": "all", "topic": "dev/%c/secret"},
           {"permission": "allow", "action": "all", "topic": "dev/%c/#"}]
    link = FakeLink(shard)
    link.send(Connect("d1", protocol_level=MQTT_5, username="u", password=hs(claims(acl=acl))))
    assert link.received()[0].reason_code == 0  # type: ignore[attr-defined]
    link.send(Subscribe(1, [("dev/d1/#", SubOptions(1)), ("dev/d2/#", SubOptions(1))]))
    (suback,) = link.received()
    assert isinstance(suback, Suback) and suback.reason_codes == [1, Reason.NOT_AUTHORIZED]
    link.send(Publish("dev/d1/secret", b"x", qos=1, packet_id=5))
    assert link.received() == [Puback(5, Reason.NOT_AUTHORIZED)]
    # a token without the claim: only acl_no_match (deny here)
    other = FakeLink(shard)
    other.send(Connect("d2", protocol_level=MQTT_5, username="u", password=hs(claims())))
    other.received()
    other.send(Publish("dev/d2/x", b"x", qos=1, packet_id=1))
    assert other.received() == [Puback(1, Reason.NOT_AUTHORIZED)]
