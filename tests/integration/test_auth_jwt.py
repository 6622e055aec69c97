"""The jwt backend against a real broker over real sockets, with paho (MQTT 5 and 3.1.1).

Tokens are signed in the test: HS256 with a shared secret, RS256 with RSA keys made
here (a PEM public key file and a JWKS file of two keys picked by kid).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.harness import Broker
from tests.integration.clients import V5, V311, Client
from tests.integration.v5client import CONNACK, CONNECT, RawClient, mqtt_str, packet
from tests.unit.test_jwt import SECRET, claims, hs, public_pem, rs, rsa_key

pytestmark = [pytest.mark.integration, pytest.mark.shoal_only]

BAD_CREDENTIALS = 0x86  # paho reports a v3 return code 4 as 0x86 too
NOT_AUTHORIZED = 0x87  # v3 return code 5


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: Broker, client_id: str, user: str | None, password: bytes | None,
             version: int = V5) -> Client:
        c = Client(broker, client_id=client_id, version=version)
        if user is not None or password is not None:
            c.c.username_pw_set(user, password)  # type: ignore[arg-type]
        made.append(c)
        c.connect()
        return c

    yield make
    for c in made:
        c.close()


def test_hs256_tokens(make_broker: Any, connect: Any, uid: str) -> None:
    b = make_broker({"auth": {"backends": "jwt", "jwt_secret": SECRET},
                     "mqtt": {"allow_anonymous": False}})
    for v in (V5, V311):
        ok = connect(b, f"{uid}ok{v}", "dev", hs(claims()), v)
        assert ok.connack.reason_code == 0
        ok.publish(f"{uid}/t", b"x", qos=1)  # a working session, not just a CONNACK
        for name, token in (("exp", hs(claims(exp=int(time.time()) - 120))),
                            ("nbf", hs(claims(nbf=int(time.time()) + 120))),
                            ("sig", hs(claims(), secret="another-secret-of-enough-length!!!")),
                            ("garbage", b"not-a-token")):
            c = connect(b, f"{uid}{name}{v}", "dev", token, v)
            assert c.connack.reason_code == BAD_CREDENTIALS, name
        assert connect(b, f"{uid}anon{v}", None, None, v).connack.reason_code == NOT_AUTHORIZED
    # MQTT 5 allows a password without a username (paho cannot send one): the token alone
    for token, code in ((hs(claims()), 0), (hs(claims(exp=1)), BAD_CREDENTIALS)):
        raw = RawClient(b)
        try:
            body = (mqtt_str("MQTT") + bytes([5, 0x42]) + struct.pack("!H", 60) + b"\x00"
                    + mqtt_str(f"{uid}nouser") + mqtt_str(token))
            raw.send(packet(CONNECT, 0, body))
            ack = raw.recv()
            assert ack is not None and ack.type == CONNACK and ack.reason == code
        finally:
            raw.sock.close()


def test_rs256_public_key_refuses_none_and_hs256_confusion(make_broker: Any, connect: Any,
                                                           uid: str, tmp_path: Path) -> None:
    key = rsa_key()
    (tmp_path / "pub.pem").write_bytes(public_pem(key))
    b = make_broker({"auth": {"backends": "jwt", "jwt_public_key_file": str(tmp_path / "pub.pem")}})
    assert connect(b, f"{uid}a", "u", rs(claims(), key)).connack.reason_code == 0
    assert connect(b, f"{uid}b", "u", rs(claims(), rsa_key())).connack.reason_code == BAD_CREDENTIALS
    forged = jwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda k: k  # type: ignore[attr-defined]
    confused = forged.encode(json.dumps(claims()).encode(), public_pem(key), algorithm="HS256")
    assert connect(b, f"{uid}c", "u", confused.encode()).connack.reason_code == BAD_CREDENTIALS
    unsigned = jwt.encode(claims(), None, algorithm="none").encode()
    for v in (V5, V311):
        assert connect(b, f"{uid}d{v}", "u", unsigned, v).connack.reason_code == BAD_CREDENTIALS


def test_jwks_file_with_two_keys(make_broker: Any, connect: Any, uid: str, tmp_path: Path) -> None:
    k1, k2 = rsa_key(), rsa_key()
    jwks = {"keys": [dict(json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), kid=kid)
                     for k, kid in ((k1, "k1"), (k2, "k2"))]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    b = make_broker({"auth": {"backends": "jwt", "jwt_jwks_file": str(tmp_path / "jwks.json"),
                              "jwt_issuer": "idp"}})
    assert connect(b, f"{uid}a", "u", rs(claims(iss="idp"), k1, headers={"kid": "k1"})
                   ).connack.reason_code == 0
    assert connect(b, f"{uid}b", "u", rs(claims(iss="idp"), k2, headers={"kid": "k2"}),
                   V311).connack.reason_code == 0
    assert connect(b, f"{uid}c", "u", rs(claims(iss="idp"), k2, headers={"kid": "k1"})
                   ).connack.reason_code == BAD_CREDENTIALS
    assert connect(b, f"{uid}d", "u", rs(claims(iss="other"), k1, headers={"kid": "k1"})
                   ).connack.reason_code == BAD_CREDENTIALS


def test_acl_claim(make_broker: Any, connect: Any, uid: str) -> None:
    b = make_broker({"auth": {"backends": "jwt", "jwt_secret": SECRET, "acl_no_match": "deny"}})
    token = hs(claims(acl={"pub": [f"{uid}/%c/up"], "sub": [f"{uid}/%c/#"]}))
    c = connect(b, f"{uid}dev", "dev", token)
    assert c.connack.reason_code == 0
    assert c.subscribe(f"{uid}/{uid}dev/#", qos=1) == [1]
    assert c.subscribe(f"{uid}/other/#", qos=1) == [0x87]
    assert c.publish(f"{uid}/{uid}dev/up", b"reading", qos=1) == 0
    assert c.get().payload == b"reading"
    assert c.publish(f"{uid}/{uid}dev/down", b"no", qos=1) == 0x87  # sub only
    c.expect_none(0.3)


def test_missing_key_file_stops_the_broker_with_a_clear_error(tmp_path: Path,
                                                              loop_name: str) -> None:
    from tests.harness import start_shoal
    with pytest.raises(RuntimeError) as info:
        start_shoal(tmp_path, {"auth": {"backends": "jwt",
                                        "jwt_jwks_file": str(tmp_path / "missing.json")}},
                    loop=loop_name)
    text = str(info.value)
    assert "missing.json" in text and "Traceback" not in text
