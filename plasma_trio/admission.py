"""Admission's rules and the access-log line: what every session checks first.

Leaf of the session layer (:mod:`plasma_trio.session` builds on it): the
refusal (:class:`Refused`, whose ``kind`` each writer maps to its status),
what a subscriber asks for (:class:`Ask`), why a stream ended
(:class:`Ending`), the topic limits, the connection limit and shutdown, the
token verifier, and the one access-log line, in one format for every
transport.
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from plasma_trio.auth import Verifier
from plasma_trio.core.topics import TopicError, parse_topics
from plasma_trio.errors import PlasmaError
from plasma_trio.logs import ACCESS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from plasma_trio.config import Config
    from plasma_trio.hub import Hub, Transport

__all__ = [
    "TRANSPORTS",
    "Ask",
    "Ending",
    "Refused",
    "access_line",
    "check_capacity",
    "log_refusal",
    "topics_of",
    "verifier_for",
]

RefusalKind = Literal["invalid", "unavailable", "unauthenticated", "forbidden"]

# The transports a subscriber arrives by (the hub counts per name).
TRANSPORTS: Final = ("sse", "grpc")


class Refused(PlasmaError):
    """A subscriber is not admitted. ``kind`` says why: ``invalid`` (its
    request is wrong: 400 / INVALID_ARGUMENT), ``unavailable`` (connection
    limit or shutdown: 503 / UNAVAILABLE), ``unauthenticated`` (no or a bad
    token: 401 / UNAUTHENTICATED) or ``forbidden`` (a topic the token does not
    allow: 403 / PERMISSION_DENIED)."""

    def __init__(self, kind: RefusalKind, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.kind: RefusalKind = kind
        self.message = message
        # What the metrics count it as (plasma_streams_refused_total's
        # ``reason``): the kind, or for ``unavailable`` which limit.
        self.reason = reason or kind


class Ending(enum.Enum):
    """Why a stream ended (the access log's ``ending``)."""

    CLIENT_CLOSED = "client closed"
    CUT_OFF = "cut off (slow consumer)"
    SHUTDOWN = "server shutdown"
    SHUTDOWN_DEADLINE = "shutdown deadline"
    TOKEN_EXPIRED = "token expired"
    FORCE_CLOSE = "force close"  # gRPC Request.forceClose
    BAD_REQUEST = "bad request"  # gRPC: a later Request refused
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Ask:
    """What a subscriber asks for, read off its request by the transport."""

    transport: Transport
    # The access log's status: the HTTP status for SSE, the gRPC status
    # name for gRPC (each writer module has its table).
    status: Callable[[Ending, Refused | None], int | str]
    topics: tuple[str, ...] = ()  # raw values (comma-separated lists)
    token: str | None = None
    last_id: str | None = None
    remote_addr: str = ""
    user_agent: str = ""
    require_topics: bool = True  # SSE: at least one; gRPC: its Requests carry them


@functools.cache
def verifier_for(config: Config) -> Verifier | None:
    """The token verifier of ``PLASMA_AUTH_JWT_KEY`` (``None``: access control
    off), built once per configuration (the server builds it at start-up, so
    a bad key is a configuration error there).

    Raises:
        ConfigError: the key cannot be used.
    """
    return Verifier.from_config(config)


def topics_of(config: Config, values: Iterable[str]) -> frozenset[str]:
    """The topics of a request (also a later gRPC ``Request`` on an open stream).

    Raises:
        Refused: ``invalid`` over the topic-count or topic-length limit.
    """
    try:
        topics = parse_topics(
            values, max_topics=config.max_topics, max_length=config.max_topic_length
        )
    except TopicError as exc:
        raise Refused("invalid", str(exc)) from None
    # Streams of the same topics share one set (most do: ~200 bytes each).
    if len(_SHARED_TOPICS) < SHARED_TOPICS_MAX:
        return _SHARED_TOPICS.setdefault(topics, topics)
    return _SHARED_TOPICS.get(topics, topics)


# Distinct topic sets shared between streams, at most (a bound, not a cache:
# beyond it a stream keeps its own set).
SHARED_TOPICS_MAX: Final = 4096
_SHARED_TOPICS: dict[frozenset[str], frozenset[str]] = {}


def check_capacity(hub: Hub) -> None:
    """Refuse (``unavailable``) while shutting down, at ``PLASMA_MAX_CONNECTIONS``,
    or near the open-file limit (:mod:`plasma_trio.descriptors`)."""
    if hub.closed:
        raise Refused("unavailable", "server is shutting down", reason="shutdown")
    if hub.max_connections and hub.statistics().connections_total >= hub.max_connections:
        raise Refused(
            "unavailable",
            f"connection limit of {hub.max_connections} reached",
            reason="connection_limit",
        )
    descriptors = hub.descriptors
    if descriptors is not None and descriptors.streams_full:
        raise Refused(
            "unavailable",
            f"open-file limit of {descriptors.limit} nearly reached",
            reason="descriptors",
        )


def log_refusal(
    hub: Hub,
    ask: Ask,
    refused: Refused,
    started: float | None = None,
    status: int | str | None = None,
) -> None:
    """Count a subscriber refused at admission and write its access-log line
    (``status``: what the client was told, when not the refusal's own status)."""
    hub.refused(ask.transport, refused.reason)
    if status is None:
        status = ask.status(Ending.REFUSED, refused)
    access_line(ask, status, frozenset(), started, 0, f"refused: {refused.message}", None)


def access_line(
    ask: Ask,
    status: int | str,
    topics: frozenset[str],
    started: float | None,
    events: int,
    ending: str,
    subject: str | None,
) -> None:
    """The access-log line of one stream (``started``: monotonic; ``None``
    for a refusal before anything began)."""
    ACCESS.info(
        f"{ask.transport} stream ended",
        extra={
            "transport": ask.transport,
            "status": status,
            "remote_addr": ask.remote_addr,
            "user_agent": ask.user_agent,
            "topics": sorted(topics),
            "duration": round(time.monotonic() - started, 6) if started is not None else 0.0,
            "events": events,
            "ending": ending,
            **({"subject": subject} if subject is not None else {}),
        },
    )
