"""Token verification and claims (SPEC 10), without a server: every key kind,
every refusal the spec names, and the prefix rule under hypothesis."""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from plasma_trio.auth import AuthError, Verifier, allows, bearer, token_of_request
from plasma_trio.core.topics import prefixes

if TYPE_CHECKING:
    from pathlib import Path

SECRET = "a-test-secret-that-is-long-enough-0123456789"


def hs(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


def pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_hmac_token_and_claims() -> None:
    v = Verifier(SECRET)
    exp = int(time.time()) + 60
    grant = v.verify(hs({"sub": "alice", "exp": exp, "plasma.subscribe": ["a", "b:c"]}))
    assert grant.subject == "alice"
    assert grant.subscribe == ("a", "b:c")
    assert grant.publish == ()
    assert grant.expires == exp
    nested = v.verify(hs({"plasma": {"subscribe": "x", "publish": ["y"]}}))
    assert (nested.subscribe, nested.publish) == (("x",), ("y",))


@pytest.mark.parametrize(
    ("token_of", "reason"),
    [
        (lambda: hs({"exp": int(time.time()) - 60}), "expired"),
        (lambda: hs({}, secret="another-secret-that-is-long-enough-012345"), "Signature"),
        (lambda: "not.a.token", "invalid"),
        (lambda: jwt.encode({"sub": "x"}, None, algorithm="none"), "invalid"),
        (lambda: hs({"nbf": int(time.time()) + 3600}), "not yet valid"),
        (lambda: hs({"plasma.subscribe": [1, 2]}), "not a list"),
    ],
)
def test_refused_tokens(token_of: Any, reason: str) -> None:
    with pytest.raises(AuthError, match=reason) as info:
        Verifier(SECRET).verify(token_of())
    assert info.value.kind == "unauthenticated"


def test_audience_and_issuer_when_set() -> None:
    v = Verifier(SECRET, audience="plasma", issuer="https://auth.example")
    good = {"aud": "plasma", "iss": "https://auth.example"}
    assert v.verify(hs(good)).subject is None
    for bad in ({"iss": "https://auth.example"}, {**good, "aud": "other"}, {**good, "iss": "x"}):
        with pytest.raises(AuthError):
            v.verify(hs(bad))


def test_short_hmac_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Verifier("short")


def test_public_keys_pem_inline_and_file_and_their_algorithms_only(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for private, algorithm in ((rsa_key, "RS256"), (ec_key, "ES256"), (ed_key, "EdDSA")):
        path = tmp_path / f"{algorithm}.pem"
        path.write_text(pem(private))
        for v in (Verifier(pem(private)), Verifier(str(path))):
            token = jwt.encode({"sub": algorithm}, private, algorithm=algorithm)
            assert v.verify(token).subject == algorithm
            # The public key used as an HMAC secret (algorithm confusion): refused.
            forged = base64.urlsafe_b64encode(json.dumps({"alg": "HS256"}).encode()).rstrip(b"=")
            with pytest.raises(AuthError):
                v.verify(forged.decode() + "." + token.split(".", 1)[1])
            with pytest.raises(AuthError):
                v.verify(hs({"sub": "x"}))


def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    keys = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("one", "two")}
    jwks = {
        "keys": [
            {
                **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())),
                "kid": kid,
                "alg": "ES256",
            }
            for kid, k in keys.items()
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    v = Verifier(str(path))
    for kid, key in keys.items():
        token = jwt.encode({"sub": kid}, key, algorithm="ES256", headers={"kid": kid})
        assert v.verify(token).subject == kid
    wrong = jwt.encode({"sub": "x"}, keys["one"], algorithm="ES256", headers={"kid": "two"})
    with pytest.raises(AuthError):
        v.verify(wrong)
    unknown = jwt.encode({"sub": "x"}, keys["one"], algorithm="ES256", headers={"kid": "nine"})
    with pytest.raises(AuthError, match="unknown key id"):
        v.verify(unknown)


def test_admit_subscriber_checks_every_topic() -> None:
    v = Verifier(SECRET)
    token = hs({"plasma.subscribe": ["program:1", "poll"]})
    assert v.admit_subscriber(token, {"program:1", "program:1:views", "poll"}).subscribe
    with pytest.raises(AuthError) as info:
        v.admit_subscriber(token, {"program:12"})
    assert info.value.kind == "forbidden"
    with pytest.raises(AuthError) as info:
        v.admit_subscriber(None, {"poll"})
    assert info.value.kind == "unauthenticated"


TOPIC = st.lists(st.sampled_from(["a", "b", "ab", "c1"]), min_size=1, max_size=4).map(":".join)


@given(st.lists(TOPIC, max_size=4), TOPIC)
def test_prefix_rule_is_the_matching_rule(claim: list[str], topic: str) -> None:
    """A claim prefix allows a topic exactly when an event of that topic's type
    would reach a subscriber of the prefix (SPEC 1's matching)."""
    assert allows(claim, topic) == any(p in claim for p in prefixes(topic))
    assert allows(["*"], topic)


def test_where_tokens_come_from() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer(None) is None
    headers = {"cookie": "x=1; plasma_token=fromcookie", "authorization": "Bearer fromheader"}
    assert token_of_request(headers, "token=fromquery", "plasma_token") == "fromheader"
    del headers["authorization"]
    assert token_of_request(headers, "token=fromquery", "plasma_token") == "fromcookie"
    assert token_of_request({}, "eventType=a&token=fromquery", "plasma_token") == "fromquery"
    assert token_of_request({}, "eventType=a", "plasma_token") is None


def test_an_hmac_secret_in_a_file_is_the_file_s_content(tmp_path: Path) -> None:
    """A path names a file whose content is the secret (never the path itself)."""
    path = tmp_path / "hmac_secret"
    path.write_text(SECRET + "\n")
    v = Verifier(str(path))
    assert v.verify(hs({"sub": "file"})).subject == "file"
    with pytest.raises(AuthError):
        v.verify(hs({"sub": "x"}, secret=str(path)))
    # A long secret that contains slashes is a secret, not a path.
    slashed = "a/b+c/" * 8
    assert Verifier(slashed).verify(hs({"sub": "s"}, secret=slashed)).subject == "s"
