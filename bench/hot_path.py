"""In-process hot-path probe: the time Hub.publish takes per delivery to N
fast-path SSE subscribers (socketpairs drained between events, not timed).

Not a load test (bench/fanout.py is one: the load generator outside the
server); it isolates the fan-out's Python path, for comparing two builds in
one pass. Runs against this tree, or against a build from before the Session
(issue 21), where the fast path's sink was ``sse_fast.DirectSink``:

    python bench/hot_path.py 1000 1500     # subscribers, events

Prints ``before|after us/delivery X``.
"""

from __future__ import annotations

import resource
import socket
import sys
import time
from contextlib import ExitStack
from typing import Any

import trio

from plasma_trio.config import Config
from plasma_trio.core.events import Event
from plasma_trio.hub import Hub


def subscribe(stack: ExitStack, hub: Hub, sock: Any) -> None:
    """One fast-path subscriber of topic ``t`` on ``sock``, as the front door makes it."""
    try:
        from plasma_trio.transports.sse_fast import DirectSink  # type: ignore[attr-defined]
    except ImportError:
        from plasma_trio.session import Ask, admit
        from plasma_trio.transports.sse_fast import SocketWriter
        from plasma_trio.transports.wire import sse_status

        session = admit(hub, Config(subscriber_buffer=1000), Ask("sse", sse_status, ("t",)))
        stack.enter_context(session.subscribed(SocketWriter(sock, session)))
        return
    sink = DirectSink(sock, buffer=1000, topics=frozenset({"t"}), remote_addr="", user_agent="")
    sink.deliveries = hub.deliveries
    stack.enter_context(hub.subscribe("sse", sink, frozenset({"t"})))


async def main(subscribers: int, events: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * subscribers + 100
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise SystemExit(f"{subscribers} subscribers need {wanted} descriptors (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        from plasma_trio.session import Session  # noqa: F401

        build = "after"
    except ImportError:
        build = "before"
    hub = Hub()
    clients = []
    with ExitStack() as stack:
        for _ in range(subscribers):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.setblocking(False)
            clients.append(theirs)
            subscribe(stack, hub, trio.socket.from_stdlib_socket(ours))
        data = b'"' + b"x" * 100 + b'"'
        total = 0.0
        for _ in range(events):
            start = time.perf_counter()
            await hub.publish(Event("t", data))
            total += time.perf_counter() - start
            for client in clients:
                try:
                    while client.recv(65536):
                        pass
                except BlockingIOError:
                    pass
    print(f"{build} us/delivery {total / (subscribers * events) * 1e6:.3f}")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
    trio.run(main, n, k)
