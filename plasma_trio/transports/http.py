"""The main-port HTTP app (Quart-trio on Hypercorn's trio worker).

Routes:

* ``GET /`` with ``Accept: text/event-stream``: the SSE stream (SPEC 2).
* ``GET /hc``: 200 while the source is healthy, 500 when not, 503 while
  shutting down (so a load balancer drains this instance).
* ``GET|POST /debug`` when ``PLASMA_DEBUG`` is true (else 404).
* ``POST /publish`` when ``PLASMA_PUBLISH_TOKEN`` is set (else 404).

The SSE response body is an async generator that registers the subscriber
with the hub on its first step and unregisters in ``finally``. Quart-trio
cancels the request's nursery when the client disconnects, which closes the
generator, so the subscription never outlives the connection.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import trio
from hypercorn.config import Config as HypercornConfig
from quart import Response, request
from quart_trio import QuartTrio

from plasma_trio.auth import AuthError, allows, bearer, token_of_request
from plasma_trio.core.events import InvalidEvent, parse
from plasma_trio.core.sse import HEARTBEAT, accepts_event_stream, encode_retry, gap_frame
from plasma_trio.errors import ServiceUnavailable
from plasma_trio.logs import ERROR, log_sse_stream
from plasma_trio.session import (
    Refused,
    Resume,
    admit,
    authorize,
    expire_at,
    locate,
    verifier_for,
)
from plasma_trio.sinks import TrioSink
from plasma_trio.transports.wire import sse_frame

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from plasma_trio.auth import Grant
    from plasma_trio.config import Config
    from plasma_trio.hub import Hub, StampedEvent
    from plasma_trio.metrics import Figures
    from plasma_trio.sources import Source

__all__ = ["CONTROL", "ConnectionControl", "create_app", "hypercorn_config"]

# The key, in each request's ASGI state, of its connection's ConnectionControl
# (set by the front door, which owns the connections).
CONTROL = "plasma_trio.control"

# While Hypercorn holds this many unsent bytes of an HTTP/2 SSE response, the
# response waits (and counts as stalled) instead of writing more.
_H2_UNSENT_LIMIT = 64 * 1024


class ConnectionControl(Protocol):
    """How an SSE response sees and ends a stall of its client."""

    async def wait_sent(self, scope: dict[str, Any], limit: int) -> None:
        """Return once at most ``limit`` bytes of the response are unsent."""
        ...

    def release(self, scope: dict[str, Any]) -> None:
        """End the response now (close the connection, or reset the HTTP/2 stream)."""
        ...


# Queued frames written to the socket in one write, at most.
_BATCH = 64

_log = ERROR.getChild("http")


@dataclass
class _Stream:
    """Book-keeping of one SSE stream, for the access log."""

    topics: frozenset[str]
    started: float
    remote_addr: str
    user_agent: str
    grant: Grant | None = None
    events: int = 0
    ending: str = "client closed"

    def log(self) -> None:
        log_sse_stream(
            remote_addr=self.remote_addr,
            user_agent=self.user_agent,
            topics=self.topics,
            started=self.started,
            events=self.events,
            ending=self.ending,
            subject=self.grant.subject if self.grant is not None else None,
        )


MAX_HEAD_BYTES: Final = 16 * 1024


def _unauthorized(reason: str) -> Response:
    return _plain(f"Unauthorized: {reason}", 401, **{"WWW-Authenticate": 'Bearer realm="plasma"'})


def _refusal(exc: Refused) -> Response:
    """A refused subscriber's answer (SPEC 2, 10)."""
    if exc.kind == "invalid":
        return _plain(f"Bad Request: {exc.message}", 400)
    if exc.kind == "unauthenticated":
        return _unauthorized(exc.message)
    if exc.kind == "forbidden":
        return _plain(f"Forbidden: {exc.message}", 403)
    return _plain(f"Service Unavailable: {exc.message}", 503)


def _plain(text: str, status: int, **headers: str) -> Response:
    return Response(
        text + "\n", status=status, headers={"Content-Type": "text/plain; charset=utf-8", **headers}
    )


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, headers={"Content-Type": "application/json"})


def _client_address() -> str:
    forwarded = request.headers.get("X-Forwarded-For", "")
    first = forwarded.split(",")[0].strip()
    if first:
        return first
    addr = request.remote_addr or ""
    # The listener is dual-stack: show IPv4 clients as IPv4.
    return addr.removeprefix("::ffff:") if addr.startswith("::ffff:") and "." in addr else addr


def create_app(
    config: Config, hub: Hub, source: Source, figures: Figures | None = None
) -> QuartTrio:
    """The Quart-trio app of the main port (``figures``: what the ``/debug``
    console shows, the metrics port's ``/metrics/plasma``)."""
    app = QuartTrio("plasma_trio")
    # Bodies larger than an event can be are refused by Quart with 413 before
    # we read them; parse() applies the exact limit.
    app.config["MAX_CONTENT_LENGTH"] = config.max_event_bytes + 4096
    # Quart ends responses after RESPONSE_TIMEOUT (60 s) by default; SSE
    # responses set their own timeout to None below.
    debug_page = (
        importlib.resources.files("plasma_trio.transports")
        .joinpath("debug_page.html")
        .read_text("utf-8")
        .replace("__QUERY__", json.dumps(config.sse_eventquery))
    )

    @app.before_request
    async def bounded_head() -> Response | None:
        """Heads over 16 KiB are refused on every path (SPEC 10; the plain
        front door checks before handing off, this covers TLS and HTTP/2)."""
        size = len(request.scope.get("raw_path", b"")) + len(request.scope.get("query_string", b""))
        size += sum(len(k) + len(v) + 4 for k, v in request.scope.get("headers", ()))
        if size > MAX_HEAD_BYTES:
            return _plain(f"Request Header Fields Too Large: over {MAX_HEAD_BYTES} bytes", 431)
        return None

    @app.route("/", methods=["GET"])
    async def subscribe() -> Response:
        if not accepts_event_stream(request.headers.get("Accept")):
            return _plain(
                "Not Found: GET / serves Server-Sent Events; send Accept: text/event-stream",
                404,
            )
        try:
            topics = admit(hub, config, request.args.getlist(config.sse_eventquery))
            lowered = {k.lower(): v for k, v in request.headers.items()}
            query = request.query_string.decode("latin-1")
            grant = authorize(config, token_of_request(lowered, query, config.auth_cookie), topics)
        except Refused as exc:
            return _refusal(exc)
        last_id = request.headers.get("Last-Event-ID") or request.args.get("lastEventId")
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
        if config.origin:
            headers["Access-Control-Allow-Origin"] = config.origin
        info = _Stream(
            topics=topics,
            started=time.monotonic(),
            remote_addr=_client_address(),
            user_agent=request.headers.get("User-Agent", ""),
            grant=grant,
        )
        state: dict[str, Any] = request.scope.get("state") or {}
        control: ConnectionControl | None = state.get(CONTROL)
        response = Response(
            _sse_body(config, hub, last_id, info, control, cast("dict[str, Any]", request.scope)),
            status=200,
            headers=headers,
        )
        response.timeout = None
        return response

    @app.route("/hc", methods=["GET"])
    async def health() -> Response:
        if hub.closed:
            return _plain("shutting down", 503)
        if await source.healthy():
            return _plain("ok", 200)
        return _plain("source unhealthy", 500)

    @app.route("/livez", methods=["GET"])
    async def livez() -> Response:
        # The process serves (this answer is the proof), Redis or not: a
        # liveness probe must not restart a server whose subscribers wait
        # for Redis (the `alive` behaviour).
        return _plain("ok", 200)

    @app.route("/readyz", methods=["GET"])
    async def readyz() -> Response:
        if hub.closed:
            return _plain("shutting down", 503)
        if await source.healthy():
            return _plain("ok", 200)
        return _plain("source not delivering", 503)

    @app.route("/debug/figures", methods=["GET"])
    async def debug_figures() -> Response:
        """The operator console's figures (``/metrics/plasma`` on the main port,
        with ``/debug`` only)."""
        if not config.debug or figures is None:
            return _plain("Not Found", 404)
        return _json(figures.plasma())

    @app.route("/debug", methods=["GET", "POST"])
    async def debug() -> Response:
        if not config.debug:
            return _plain("Not Found", 404)
        if request.method == "GET":
            return Response(
                debug_page, status=200, headers={"Content-Type": "text/html; charset=utf-8"}
            )
        if verifier_for(config) is not None:
            # With access control on, /debug publishes only as /publish does.
            return await publish()
        return await _publish(config, hub, source)

    @app.route("/publish", methods=["POST"])
    async def publish() -> Response:
        verifier = verifier_for(config)
        if not config.publish_token and verifier is None:
            return _plain("Not Found", 404)
        # The token is checked before the body is read: the static token
        # (constant-time), else a JWT whose plasma.publish claim is checked
        # against the event's type once the body is parsed.
        token = bearer(request.headers.get("Authorization"))
        static_ok = bool(
            token
            and config.publish_token
            and hmac.compare_digest(token.encode(), config.publish_token.encode())
        )
        grant = None
        if not static_ok and token and verifier is not None:
            try:
                grant = verifier.verify(token)
            except AuthError as exc:
                return _unauthorized(exc.message)
        if not static_ok and grant is None:
            return _unauthorized("a valid 'Authorization: Bearer <token>' is required")
        return await _publish(config, hub, source, grant)

    return app


async def _publish(
    config: Config, hub: Hub, source: Source, grant: Grant | None = None
) -> Response:
    body = await request.get_data(cache=False)
    assert isinstance(body, bytes)
    event = parse(body, config.max_event_bytes)
    if isinstance(event, InvalidEvent):
        hub.count_invalid()
        _log.warning(
            "invalid event rejected", extra={"channel": request.path, "reason": event.reason}
        )
        return _plain(f"Bad Request: {event.reason}", 400)
    if grant is not None and not allows(grant.publish, event.type):
        return _plain(f"Forbidden: the token does not allow publishing {event.type!r}", 403)
    try:
        event_id = await source.publish(hub, event)
    except Exception as exc:
        _log.error("publish failed", extra={"type": event.type, "error": str(exc)})
        return _plain(f"Internal Server Error: publish failed: {exc}", 500)
    answer = {"status": "ok", "type": event.type}
    if event_id is not None:
        answer["id"] = event_id  # mock: the hub's; redis-streams: the entry id
    return _json(answer)


async def _sse_body(
    config: Config,
    hub: Hub,
    last_id: str | None,
    info: _Stream,
    control: ConnectionControl | None,
    scope: dict[str, Any],
) -> AsyncIterator[bytes]:
    """The SSE body on Hypercorn (TLS, HTTP/2, or the fast path off).

    Each ``yield`` returns once Hypercorn has taken the bytes (HTTP/1.1: sent
    them); over HTTP/2 the body also waits while Hypercorn holds more than
    ``_H2_UNSENT_LIMIT`` unsent bytes. Meanwhile ``sink.stalled_since`` is
    set, so that the write deadline and a cut-off release the connection
    (HTTP/1.1) or stream (HTTP/2) at once.
    """
    release = partial(control.release, scope) if control is not None else None
    sink = TrioSink(config.subscriber_buffer, release, max_bytes=config.subscriber_buffer_bytes)

    async def drained() -> None:
        if control is not None:
            await control.wait_sent(scope, _H2_UNSENT_LIMIT)

    topics = info.topics
    missing = await locate(hub, last_id) if last_id else False  # redis-streams
    with ExitStack() as stack:
        try:
            subscription = stack.enter_context(hub.subscribe("sse", sink, topics))
        except ServiceUnavailable as exc:
            info.ending = str(exc)
            return
        stack.callback(info.log)
        expire_at(subscription, info.grant)
        first = [encode_retry(config.sse_retry)]
        resume = Resume(hub)
        if last_id:
            # Nothing awaits between subscribing and starting the replay, so
            # it ends exactly where the live queue begins.
            gap = resume.start(last_id, topics, missing=missing)
            if gap is not None:
                first.append(gap_frame(gap.requested, gap.oldest))
        sink.stalled_since = time.monotonic()
        yield b"".join(first)
        sink.stalled_since = None
        sink.wrote = True

        # The replay, read from the history as the client drains it.
        deliveries = hub.deliveries
        while True:
            if resume.needs_refill:
                await resume.refill()  # redis-streams: older than the window
            if not (batch := resume.take()):
                break
            info.events += len(batch)
            sink.stalled_since = time.monotonic()
            yield b"".join([sse_frame(event) for event in batch])
            await drained()
            deliveries.written["sse"] += len(batch)
            sink.stalled_since = None
            sink.wrote = True
        if batch is None:
            subscription.cut_off()  # replaying slower than the history turns over

        while True:
            try:
                event = await sink.next()
            except trio.EndOfChannel:
                info.ending = "cut off (slow consumer)" if sink.cut_off else "server shutdown"
                if subscription.expired:
                    info.ending = "token expired"
                return
            events: list[StampedEvent] = []
            if event is None:
                frames = [HEARTBEAT]  # the session's watcher found the stream idle
            else:
                frames = [event if isinstance(event, bytes) else sse_frame(event)]
                if not isinstance(event, bytes):
                    events.append(event)
                # Batch whatever else is already queued into the same write.
                while len(frames) < _BATCH:
                    try:
                        queued = sink.next_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if isinstance(queued, bytes):
                        frames.append(queued)  # the live gap notice
                    elif queued is not None:
                        frames.append(sse_frame(queued))
                        events.append(queued)
                        info.events += 1
                if not isinstance(event, bytes):
                    info.events += 1
            sink.stalled_since = time.monotonic()
            yield b"".join(frames)
            await drained()
            for written in events:
                deliveries.wrote("sse", written)
            sink.stalled_since = None
            sink.wrote = True


def hypercorn_config(config: Config) -> HypercornConfig:
    """Hypercorn's settings for our connections (TLS is the front door's:
    Hypercorn is handed streams already wrapped)."""
    hc = HypercornConfig()
    hc.accesslog = None  # one access entry per stream is written by us
    hc.errorlog = logging.getLogger("plasma_trio.http")
    hc.graceful_timeout = config.shutdown_timeout
    # After a TLS handshake (or between requests), the time to send a request head.
    hc.keep_alive_timeout = config.header_timeout
    hc.include_server_header = False
    return hc
