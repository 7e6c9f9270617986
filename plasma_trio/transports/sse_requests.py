"""Which plain and TLS HTTP/1.1 requests the SSE fast path takes, and their admission.

The front door reads a connection's first request head itself; if it is an
SSE request (``GET /``, HTTP/1.1, ``Accept`` allowing ``text/event-stream``),
:func:`sse_session` makes its :class:`~plasma_trio.session.Ask` from the
head (topics, token, last id, peer) and admits it. No I/O here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from plasma_trio.auth import token_of_request
from plasma_trio.core.sse import accepts_event_stream
from plasma_trio.session import Ask, Refused, admit, log_refusal
from plasma_trio.transports.wire import sse_status

if TYPE_CHECKING:
    from plasma_trio.config import Config
    from plasma_trio.hub import Hub
    from plasma_trio.session import Session
    from plasma_trio.transports.heads import Head

__all__ = ["sse_session"]


def sse_session(request: Head, peer: str, config: Config, hub: Hub) -> Session | Refused | None:
    """The admitted session of an SSE request, if the fast path serves it.

    A request refused as ``unavailable`` (shutdown, the connection limit,
    the descriptor reserve) gets its refusal back, logged and counted, for
    the fast path to answer (``503`` at once: in a storm at the limit,
    thousands of them). Other requests (not SSE, or refused with a reason:
    400, 401, 403) are the Quart app's (``None``)."""
    if request.method != b"GET" or request.http_version != b"1.1":
        return None
    path, _, query = request.target.decode("latin-1").partition("?")
    if path != "/":
        return None
    headers: dict[str, str] = {}
    for name, value in request.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if not accepts_event_stream(headers.get("accept")):
        return None
    params = parse_qs(query, keep_blank_values=True)
    forwarded = headers.get("x-forwarded-for", "").split(",")[0].strip()
    ask = Ask(
        transport="sse",
        status=sse_status,
        topics=tuple(params.get(config.sse_eventquery, [])),
        token=token_of_request(headers, query, config.auth_cookie),
        last_id=headers.get("last-event-id") or next(iter(params.get("lastEventId", [])), None),
        remote_addr=forwarded or peer,
        user_agent=headers.get("user-agent", ""),
    )
    try:
        return admit(hub, config, ask)
    except Refused as exc:
        if exc.kind != "unavailable":
            return None  # Quart answers 400, 401 or 403 with the reason
        log_refusal(hub, ask, exc)
        return exc
