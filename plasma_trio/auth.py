"""Access control (SPEC 10): JWTs for subscribers and publishers, checked at admission.

Off by default (plasma had none). With ``PLASMA_AUTH_JWT_KEY`` every
subscriber presents a JWT, verified with PyJWT against:

* an HMAC secret (HS256/384/512; at least 32 bytes, RFC 7518's minimum for
  HS256), given as the value itself or in a file (a value starting with
  ``/``, ``./``, ``../`` or ``~`` is a path);
* a PEM public key (RS*/PS*, ES256/384/512 by its curve, EdDSA), inline or
  as the path of a file;
* a JWKS file (``{"keys": [...]}``): the token's ``kid`` picks the key (a
  set of one key needs none), each key with its own algorithm.

Only the key's algorithms are accepted: ``alg: none``, and an HMAC token
presented to a public key (the classic confusion), are refused.
``PLASMA_AUTH_JWT_AUDIENCE`` / ``..._ISSUER`` are checked when set; ``exp``
and ``nbf`` always when present (no leeway beyond 5 s of clock skew).

Claims: ``plasma.subscribe`` and ``plasma.publish`` list topic prefixes
(either as those top-level names or as ``{"plasma": {"subscribe": [...]}}``).
A prefix ``p`` allows topic ``t`` when ``t == p`` or ``t`` starts with
``p + ":"`` (the same rule as event matching), ``"*"`` allows every topic.

Tokens are never logged; what the access log shows is the ``sub`` claim.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from plasma_trio.errors import ConfigError, PlasmaError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from plasma_trio.config import Config

__all__ = ["AuthError", "Grant", "Verifier", "allows", "bearer", "token_of_request"]

HMAC_ALGORITHMS: Final = ["HS256", "HS384", "HS512"]
RSA_ALGORITHMS: Final = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
MIN_HMAC_BYTES: Final = 32
LEEWAY: Final = 5.0  # seconds of clock skew tolerated on exp / nbf


class AuthError(PlasmaError):
    """A token is missing or wrong (``unauthenticated``: 401 / UNAUTHENTICATED)
    or does not allow what is asked (``forbidden``: 403 / PERMISSION_DENIED)."""

    def __init__(self, kind: Literal["unauthenticated", "forbidden"], message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows."""

    subject: str | None
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    expires: float | None  # Unix time of ``exp``

    def seconds_left(self) -> float | None:
        return None if self.expires is None else self.expires - time.time()


def allows(prefixes: Iterable[str], topic: str) -> bool:
    """Whether a claim's topic prefixes cover ``topic``."""
    return any(p == "*" or topic == p or topic.startswith(p + ":") for p in prefixes)


def _claim(payload: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = payload.get(f"plasma.{name}")
    if value is None and isinstance(payload.get("plasma"), dict):
        value = payload["plasma"].get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError("unauthenticated", f"claim plasma.{name} is not a list of topics")
    return tuple(value)


class Verifier:
    """Verifies tokens against the configured key (see the module doc)."""

    def __init__(self, key: str, *, audience: str = "", issuer: str = "") -> None:
        self.audience = audience or None
        self.issuer = issuer or None
        self._keys: dict[str | None, tuple[Any, list[str]]] = {}
        self._load(key)

    @classmethod
    def from_config(cls, config: Config) -> Verifier | None:
        """``None`` when access control is off.

        Raises:
            ConfigError: the key cannot be used (naming ``PLASMA_AUTH_JWT_KEY``).
        """
        if not config.auth_jwt_key:
            return None
        try:
            return cls(
                config.auth_jwt_key,
                audience=config.auth_jwt_audience,
                issuer=config.auth_jwt_issuer,
            )
        except (ValueError, OSError, jwt.PyJWTError) as exc:
            raise ConfigError("PLASMA_AUTH_JWT_KEY", str(exc)) from None

    def _load(self, key: str) -> None:
        text = key.strip()
        if key.startswith(("/", "./", "../", "~")):
            # A path: a PEM key, a JWKS, or a file holding the HMAC secret.
            text = Path(key).expanduser().read_text().strip()
        if text.startswith("{"):
            document = json.loads(text)
            jwks = jwt.PyJWKSet.from_dict(document)
            for jwk in jwks.keys:
                if jwk.algorithm_name in HMAC_ALGORITHMS or jwk.algorithm_name == "none":
                    raise ValueError(f"JWKS key {jwk.key_id!r}: only public keys are accepted")
                self._keys[jwk.key_id] = (jwk.key, [jwk.algorithm_name])
            if not self._keys:
                raise ValueError("the JWKS has no key")
            return
        if text.startswith("-----BEGIN"):
            public = load_pem_public_key(text.encode())
            self._keys[None] = (public, _algorithms_of(public))
            return
        if len(text.encode()) < MIN_HMAC_BYTES:
            raise ValueError(
                f"an HMAC secret needs at least {MIN_HMAC_BYTES} bytes "
                "(or give a PEM public key or a JWKS file)"
            )
        self._keys[None] = (text.encode(), list(HMAC_ALGORITHMS))

    def verify(self, token: str) -> Grant:
        """The grant of a valid token.

        Raises:
            AuthError: ``unauthenticated``, with the reason (never the token).
        """
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if kid in self._keys:
                key, algorithms = self._keys[kid]
            elif len(self._keys) == 1:
                key, algorithms = next(iter(self._keys.values()))
            else:
                raise AuthError("unauthenticated", "unknown key id")
            payload = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["aud"] if self.audience else []},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("unauthenticated", "token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError("unauthenticated", f"invalid token: {exc}") from None
        exp = payload.get("exp")
        subject = payload.get("sub")
        return Grant(
            subject=str(subject) if subject is not None else None,
            subscribe=_claim(payload, "subscribe"),
            publish=_claim(payload, "publish"),
            expires=float(exp) if isinstance(exp, (int, float)) else None,
        )

    def admit_subscriber(self, token: str | None, topics: Iterable[str]) -> Grant:
        """Verify ``token`` and check that it allows every topic.

        Raises:
            AuthError: no or bad token (``unauthenticated``), a topic outside
                the ``plasma.subscribe`` claim (``forbidden``).
        """
        if not token:
            raise AuthError("unauthenticated", "a token is required")
        grant = self.verify(token)
        for topic in sorted(topics):
            if not allows(grant.subscribe, topic):
                raise AuthError("forbidden", f"the token does not allow subscribing to {topic!r}")
        return grant


def _algorithms_of(public: Any) -> list[str]:
    if isinstance(public, rsa.RSAPublicKey):
        return list(RSA_ALGORITHMS)
    if isinstance(public, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if public.curve.name not in by_curve:
            raise ValueError(f"unsupported EC curve {public.curve.name}")
        return [by_curve[public.curve.name]]
    if isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ["EdDSA"]
    raise ValueError(f"unsupported public key type {type(public).__name__}")


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def token_of_request(headers: Mapping[str, str], query: str, cookie_name: str) -> str | None:
    """A subscriber's token over HTTP: ``Authorization: Bearer``, then the
    cookie, then the ``token`` query parameter (EventSource cannot set headers).
    ``headers`` keys are lower-case."""
    token = bearer(headers.get("authorization"))
    if token:
        return token
    cookies = headers.get("cookie")
    if cookies:
        for part in cookies.split(";"):
            name, _, value = part.strip().partition("=")
            if name == cookie_name and value:
                return value
    values = parse_qs(query).get("token")
    return values[0] if values else None
