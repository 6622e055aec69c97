"""SCRAM-SHA-256, sans-IO: RFC 7677's test vector and the ways an exchange fails."""

from __future__ import annotations

import base64

import pytest

from shards.scram import ScramClient, ScramError, ScramServer, Verifier, decoy, make_verifier

# RFC 7677 section 3
USER, PASSWORD = "user", "pencil"
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_server() -> ScramServer:
    s = ScramServer(SERVER_NONCE)
    assert s.client_first(CLIENT_FIRST) == USER
    assert s.server_first(make_verifier(PASSWORD, SALT, 4096)) == SERVER_FIRST
    return s


def test_rfc7677_vector_server_side() -> None:
    assert rfc_server().client_final(CLIENT_FINAL) == SERVER_FINAL


def test_rfc7677_vector_client_side() -> None:
    c = ScramClient(USER, PASSWORD, CLIENT_NONCE)
    assert c.first() == CLIENT_FIRST
    assert c.final(SERVER_FIRST) == CLIENT_FINAL
    assert c.verify(SERVER_FINAL) and not c.verify(b"v=" + base64.b64encode(b"x" * 32))


def test_verifier_round_trips_in_postgres_text_form() -> None:
    v = make_verifier(PASSWORD, SALT, 4096)
    text = v.encode()
    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert Verifier.decode(text) == v
    for bad in ("", "SCRAM-SHA-1$4096:AA==$AA==:AA==", "SCRAM-SHA-256$x:AA==$AA==:AA==",
                text.replace("4096", "0"), text[:-8]):
        with pytest.raises(ValueError):
            Verifier.decode(bad)


def test_wrong_password_is_an_invalid_proof() -> None:
    s = ScramServer("srv")
    c = ScramClient("alice", "wrong", "cli")
    s.client_first(c.first())
    server_first = s.server_first(make_verifier("right"))
    with pytest.raises(ScramError, match="invalid proof"):
        s.client_final(c.final(server_first))


def test_good_password_with_random_salt_and_special_name() -> None:
    s = ScramServer("srvnonce")
    c = ScramClient("a,b=c", "pässwörd", "clinonce")
    assert s.client_first(c.first()) == "a,b=c"
    assert c.verify(s.client_final(c.final(s.server_first(make_verifier("pässwörd")))))


def test_unknown_user_gets_a_stable_decoy_that_never_verifies() -> None:
    key = b"k" * 32
    assert decoy("nobody", key) == decoy("nobody", key) != decoy("other", key)
    s = ScramServer("srv")
    c = ScramClient("nobody", "guess", "cli")
    s.client_first(c.first())
    with pytest.raises(ScramError):
        s.client_final(c.final(s.server_first(decoy("nobody", key))))


@pytest.mark.parametrize("first", [
    b"", b"n", b"n,,", b"x,,n=u,r=a", b"p=tls-unique,,n=u,r=a", b"n,,r=a,n=u", b"n,,n=,r=a",
    b"n,,n=u,r=", b"n,,n=u=x,r=a", b"n,a=other,n=u,r=a", b"n,,m=ext,n=u,r=a", b"\xff\xfe",
    b"n,,n=u,r=a" + b"x" * 5000, b"n,,n=u,,r=a",
])
def test_malformed_client_first_is_refused(first: bytes) -> None:
    with pytest.raises(ScramError):
        ScramServer("srv").client_first(first)


def test_authzid_equal_to_the_user_is_allowed() -> None:
    assert ScramServer("srv").client_first(b"y,a=u,n=u,r=abc") == "u"


@pytest.mark.parametrize("final", [
    b"", b"c=biws", b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    CLIENT_FINAL.replace(b"c=biws", b"c=eSws"),  # gs2 header "y,," does not match "n,,"
    CLIENT_FINAL.replace(b"r=rOpr", b"r=XOpr"),  # a nonce that is not the server's
    CLIENT_FINAL.replace(b"p=dHzb", b"p=*Hzb"),  # not base64
    CLIENT_FINAL[:-8] + b"AAAAAAA=",  # a proof one bit off
    CLIENT_FINAL.replace(b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", b"p=AAAA"),
])
def test_bad_client_final_is_refused(final: bytes) -> None:
    with pytest.raises(ScramError):
        rfc_server().client_final(final)


def test_steps_out_of_order_and_replay() -> None:
    s = ScramServer("srv")
    with pytest.raises(ScramError):
        s.server_first(make_verifier("x"))
    with pytest.raises(ScramError):
        s.client_final(b"c=biws,r=x,p=AAAA")
    s = rfc_server()
    s.client_final(CLIENT_FINAL)
    with pytest.raises(ScramError):
        s.client_final(CLIENT_FINAL)  # one exchange proves once
    with pytest.raises(ScramError):
        s.client_first(CLIENT_FIRST)
