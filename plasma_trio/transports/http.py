"""The main-port HTTP app (Quart-trio on Hypercorn's trio worker).

Routes:

* ``GET /`` with ``Accept: text/event-stream``: the SSE stream (SPEC 2).
* ``GET /hc``: 200 while the source is healthy, 500 when not, 503 while
  shutting down (so a load balancer drains this instance).
* ``GET|POST /debug`` when ``PLASMA_DEBUG`` is true (else 404).
* ``POST /publish`` when ``PLASMA_PUBLISH_TOKEN`` is set (else 404).

The SSE route admits the subscriber's session (:mod:`plasma_trio.session`)
and answers a refusal here; the stream itself is written by
:class:`~plasma_trio.transports.sse_hypercorn.ResponseWriter`.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
from typing import TYPE_CHECKING, Any, Final, cast

from hypercorn.config import Config as HypercornConfig
from quart import Response, request
from quart_trio import QuartTrio

from plasma_trio.auth import AuthError, allows, bearer, token_of_request
from plasma_trio.core.events import InvalidEvent, parse
from plasma_trio.core.sse import accepts_event_stream
from plasma_trio.logs import ERROR
from plasma_trio.session import Ask, Refused, admit, log_refusal, verifier_for
from plasma_trio.transports.sse_hypercorn import CONTROL, ConnectionControl, ResponseWriter
from plasma_trio.transports.wire import HTTP_REFUSAL, REASONS, sse_status

if TYPE_CHECKING:
    from plasma_trio.auth import Grant
    from plasma_trio.config import Config
    from plasma_trio.hub import Hub
    from plasma_trio.metrics import Figures
    from plasma_trio.sources import Source

__all__ = ["CONTROL", "create_app", "hypercorn_config"]

_log = ERROR.getChild("http")


MAX_HEAD_BYTES: Final = 16 * 1024


def _unauthorized(reason: str) -> Response:
    return _plain(f"Unauthorized: {reason}", 401, **{"WWW-Authenticate": 'Bearer realm="plasma"'})


def _refusal(exc: Refused) -> Response:
    """A refused subscriber's answer (SPEC 2, 10): the same status, body and
    access-log line as the fast path's (``sse_fast.refusal``)."""
    if exc.kind == "unauthenticated":
        return _unauthorized(exc.message)
    status = HTTP_REFUSAL[exc.kind]
    return _plain(f"{REASONS[status]}: {exc.message}", status)


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
        lowered = {k.lower(): v for k, v in request.headers.items()}
        ask = Ask(
            transport="sse",
            status=sse_status,
            topics=tuple(request.args.getlist(config.sse_eventquery)),
            token=token_of_request(
                lowered, request.query_string.decode("latin-1"), config.auth_cookie
            ),
            last_id=request.headers.get("Last-Event-ID") or request.args.get("lastEventId"),
            remote_addr=_client_address(),
            user_agent=request.headers.get("User-Agent", ""),
        )
        try:
            session = admit(hub, config, ask)
        except Refused as exc:
            log_refusal(hub, ask, exc)
            return _refusal(exc)
        try:
            # redis-streams: before the head, so that a refusal after the
            # wait is still a refusal (503), as on every path.
            await session.locate()
        except Refused as exc:
            session.refuse(exc)
            return _refusal(exc)
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
        if config.origin:
            headers["Access-Control-Allow-Origin"] = config.origin
        state: dict[str, Any] = request.scope.get("state") or {}
        control: ConnectionControl | None = state.get(CONTROL)
        writer = ResponseWriter(session, control, cast("dict[str, Any]", request.scope))
        response = Response(writer.body(config), status=200, headers=headers)
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
