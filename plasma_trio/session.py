"""One subscriber, whatever the transport: the :class:`Session` and its rules.

A transport only renders and writes (its :class:`~plasma_trio.writer.Writer`:
the plain SSE socket, Hypercorn's response for TLS and HTTP/2, a gRPC
stream). Everything a subscriber may do and gets is decided here, once, for
all of them, and its one queue is the session's
:class:`~plasma_trio.outbox.Outbox`:

1. **Admission** (:func:`admit`, before anything is written): the topics
   under ``PLASMA_MAX_TOPICS`` / ``PLASMA_MAX_TOPIC_LENGTH``, the connection
   limit and shutdown, access control (SPEC 10; the rules are in
   :mod:`plasma_trio.admission`). A refusal is a :class:`Refused` whose
   ``kind`` each writer maps to its status.
2. **Locate** (:meth:`Session.locate`, ``redis-streams``): where the client's
   ``Last-Event-ID`` is, waited for before subscribing; the connection limit
   and shutdown are checked again after that wait.
3. **Subscribe and resume** (:meth:`Session.subscribed`): the session is the
   hub's sink; the replay (:mod:`plasma_trio.replay`) starts in the same step,
   so it ends exactly where live events begin; the gap notice comes first.
4. **Replay, then live** (:meth:`Session.replay_step`): live events (and live
   gap notices) that arrive while a replay is written are held here, bounded
   like any queue, and written in order when the replay is done. Then the
   hub's fan-out goes straight to the outbox (:meth:`Outbox.offer`), which
   writes through the writer at once when nothing waits.
5. **Bounds and the write deadline**: one rule (:meth:`Session.fits`) for
   the outbox and the held events (``PLASMA_SUBSCRIBER_BUFFER`` frames,
   ``..._BUFFER_BYTES`` bytes); the outbox records since when bytes wait for
   the client (:meth:`Session.stall`), and :mod:`plasma_trio.watch` cuts off a
   session stalled for ``PLASMA_SUBSCRIBER_WRITE_TIMEOUT``, ends one whose
   token expired, and sends heartbeats. A cut-off releases the connection
   (or HTTP/2 stream) at once, whatever the writer's write is waiting for
   (:meth:`Writer.close`).
6. **The end**: why the stream ended (:class:`Ending`, first reason wins but a
   cut-off), what was delivered (:meth:`Session.delivered`), and the one
   access-log line, in one format for every transport. A writer never
   decides any of it: it renders items and writes bytes (:class:`Writer`).

States (:class:`State`): ``OPENING`` (admitted, not subscribed) ->
``REPLAYING`` <-> ``LIVE`` (a gRPC ``Request`` with a ``lastEventId`` replays
again) -> ``ENDING`` (closed by the hub: nothing more is offered) ->
``ENDED`` (unsubscribed, logged).
"""

from __future__ import annotations

import enum
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

from plasma_trio.admission import (
    Ask,
    Ending,
    Refused,
    access_line,
    check_capacity,
    log_refusal,
    topics_of,
    verifier_for,
)
from plasma_trio.auth import AuthError, Grant, allows
from plasma_trio.errors import ServiceUnavailable
from plasma_trio.outbox import Outbox
from plasma_trio.replay import Gap, Resume, event_size, locate
from plasma_trio.writer import HEARTBEAT, End, Phase, Writer, WriterGone

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from plasma_trio.config import Config
    from plasma_trio.hub import Batch, Hub, StampedEvent, Subscription

__all__ = [
    "HEARTBEAT",
    "Ask",
    "End",
    "Ending",
    "Gap",
    "Outbox",
    "Phase",
    "Refused",
    "Session",
    "State",
    "Writer",
    "WriterGone",
    "admit",
    "log_refusal",
    "topics_of",
    "verifier_for",
]


class State(enum.Enum):
    OPENING = "opening"
    REPLAYING = "replaying"
    LIVE = "live"
    ENDING = "ending"
    ENDED = "ended"


def admit(hub: Hub, config: Config, ask: Ask) -> Session:
    """Admission: the session of a subscriber that may subscribe now.

    Checked in this order: the topics (``invalid``), shutdown and the
    connection limit (``unavailable``), then the token (``unauthenticated``,
    ``forbidden``). Access control is checked once, at admission, never per
    event; for gRPC each later ``Request``'s topics are checked against the
    same grant (:meth:`Session.set_topics`).

    Raises:
        Refused: the subscriber is not admitted.
    """
    topics = topics_of(config, ask.topics)
    if ask.require_topics and not topics:
        raise Refused("invalid", f"query parameter {config.sse_eventquery!r} is missing or empty")
    check_capacity(hub)
    grant: Grant | None = None
    verifier = verifier_for(config)
    if verifier is not None:
        try:
            grant = verifier.admit_subscriber(ask.token, topics)
        except AuthError as exc:
            raise Refused(exc.kind, exc.message) from None
    return Session(hub, config, ask, topics, grant)


class Session:
    """One subscriber's stream, from admission to its access-log line.

    Obtain it from :func:`admit`; it is the hub's sink for this subscriber
    while :meth:`subscribed` is entered.
    """

    # Slots: one Session per subscriber, thousands of them (memory per
    # connection is a benchmark figure).
    __slots__ = (
        "_held",
        "_held_bytes",
        "_written",
        "ask",
        "buffer",
        "config",
        "deliveries",
        "ending",
        "events",
        "grant",
        "heartbeats",
        "hub",
        "idle_since",
        "max_bytes",
        "missing",
        "out",
        "refusal",
        "resume",
        "stalled_since",
        "started",
        "state",
        "status",
        "subscription",
        "topics",
        "tracks_sent",
        "transport",
        "wrote",
    )

    def __init__(
        self, hub: Hub, config: Config, ask: Ask, topics: frozenset[str], grant: Grant | None
    ) -> None:
        self.hub = hub
        self.config = config
        self.ask = ask
        self.transport = ask.transport
        self.topics = topics
        self.grant = grant
        self.state = State.OPENING
        self.ending: Ending | None = None
        # The log's status when the ending does not say it (a head already sent).
        self.status: int | str | None = None
        self.refusal: Refused | None = None
        self.started = time.monotonic()
        self.events = 0  # delivered to the client's socket
        self.missing: bool | None = False  # what locate found (redis-streams)
        # gRPC: which events went out (a later Request's replay skips them).
        self.tracks_sent = ask.transport == "grpc"
        self.resume = Resume(hub, track_sent=self.tracks_sent)
        self.subscription: Subscription | None = None
        self.out: Outbox | None = None  # the queue, once subscribed
        self.deliveries = hub.deliveries
        self._written = hub.deliveries.written
        self.buffer = config.subscriber_buffer
        self.max_bytes = config.subscriber_buffer_bytes
        # Live events and notices that arrived during a replay, in order.
        # (Made at the first: most streams never replay.)
        self._held: list[StampedEvent | Gap] | None = None
        self._held_bytes = 0
        # The write deadline: since when the writer's writes wait for the client.
        self.stalled_since: float | None = None
        # The heartbeat clock (heartbeat_due): ``wrote`` is set on every write.
        self.wrote = False
        self.idle_since = self.started
        self.heartbeats = False

    # -- opening -------------------------------------------------------------

    async def locate(self, last_id: str | None = None) -> None:
        """``redis-streams``: find the client's position in Redis (and wait, up
        to two seconds, for one this instance has not read yet). Then check
        shutdown and the connection limit again (the wait may have been long).

        Raises:
            Refused: ``unavailable``, shutdown began or the limit was reached.
        """
        last_id = last_id if last_id is not None else self.ask.last_id
        if last_id:
            self.missing = await locate(self.hub, last_id)
        if self.state is State.OPENING:  # (not for a later gRPC Request)
            check_capacity(self.hub)

    @contextmanager
    def subscribed(self, writer: Writer) -> Iterator[Gap | None]:
        """Register with the hub for the duration of the ``with`` block and
        start the resume in the same step; yields the gap notice to write
        first (or ``None``). On leaving, the session is unsubscribed, its
        ending decided and its access-log line written.

        Raises:
            Refused: ``unavailable`` (shutdown or the limit, at this moment).
        """
        self.out = Outbox(self, writer)
        self.heartbeats = writer.heartbeats
        hub = self.hub
        try:
            with hub.subscribe(self.transport, self, self.topics) as subscription:
                self.subscription = subscription
                self._expire_at()
                gap = None
                if self.ask.last_id and self.topics:
                    gap = self.resume.start(self.ask.last_id, self.topics, missing=self.missing)
                self._enter(State.REPLAYING if self.resume.replaying else State.LIVE)
                try:
                    yield gap
                except (trio.Cancelled, GeneratorExit):
                    # Cancelled (GeneratorExit: a response body closed by its
                    # server): at shutdown, the deadline came before the
                    # stream had drained; otherwise the client went away.
                    if hub.closed and self.ending in (None, Ending.SHUTDOWN):
                        self.ending = Ending.SHUTDOWN_DEADLINE
                    elif self.ending is None:
                        self.ending = Ending.CLIENT_CLOSED
                    raise
        except ServiceUnavailable as exc:
            reason = "shutdown" if hub.closed else "connection_limit"
            self.refuse(Refused("unavailable", str(exc), reason=reason))
            raise self.refusal from None  # type: ignore[misc]
        finally:
            if self.refusal is None:
                self.state = State.ENDED
                self._log()

    def refuse(self, refused: Refused) -> None:
        """Record (and log) a refusal after admission (the writer answers it)."""
        self.refusal = refused
        self.ending = Ending.REFUSED
        self.state = State.ENDED
        log_refusal(self.hub, self.ask, refused, self.started, self.status)

    def _expire_at(self) -> None:
        """End the stream when its token expires (``exp``): the watcher does."""
        grant, subscription = self.grant, self.subscription
        if grant is None or subscription is None:
            return
        subscription.subject = grant.subject
        if grant.expires is not None:
            left = grant.seconds_left()
            subscription.expires_at = time.monotonic() + (left if left is not None else 0.0)

    # -- gRPC: a later Request ------------------------------------------------

    def check_topics(self, values: Iterable[str]) -> frozenset[str]:
        """A later gRPC ``Request``'s topics, checked like admission's.

        Raises:
            Refused: ``invalid`` (limits) or ``forbidden`` (the token's claim).
        """
        topics = topics_of(self.config, values)
        if self.grant is not None:
            subscribe = self.grant.subscribe
            denied = next((t for t in sorted(topics) if not allows(subscribe, t)), None)
            if denied is not None:
                raise Refused("forbidden", f"the token does not allow subscribing to {denied!r}")
        return topics

    def set_topics(self, topics: frozenset[str], last_id: str | None = None) -> Gap | None:
        """Replace the topics (gRPC); with ``last_id``, replay what followed it
        first (call :meth:`locate` with it before, in ``redis-streams`` mode).
        Returns the gap notice to write first, if any. Nothing is awaited:
        live events from now on come after the replay."""
        gap = None
        if last_id and topics:
            gap = self.resume.start(last_id, topics, missing=self.missing)
            if self.resume.replaying and self.state is State.LIVE:
                self._enter(State.REPLAYING)
            if self.out is not None:
                self.out.drop_owed()  # the replay sends them, in order
                self.out.wake()
        self.topics = topics
        if self.subscription is not None:
            self.subscription.set_topics(topics)
        return gap

    def _enter(self, state: State) -> None:
        """Change state; while ``LIVE`` the fan-out calls the outbox's
        ``offer`` directly (the hot path), otherwise :meth:`offer` here."""
        self.state = state
        out, subscription = self.out, self.subscription
        if subscription is not None:
            live = state is State.LIVE and out is not None
            if live and out is not None:
                subscription.offer, subscription.offer_batch = out.offer, out.offer_batch
            else:
                subscription.offer, subscription.offer_batch = self.offer, self.offer_batch

    # -- the hub's side (synchronous, never blocks) ---------------------------

    def offer(self, event: StampedEvent) -> bool:
        if self.state is State.LIVE:
            out = self.out
            assert out is not None
            return out.offer(event)
        if self.state is State.REPLAYING:
            return self._hold(event)
        return True  # ending: nothing more to deliver, nothing to cut off

    def offer_batch(self, batch: Batch) -> int:
        if self.state is State.LIVE:
            out = self.out
            assert out is not None
            return out.offer_batch(batch)
        if self.state is State.REPLAYING:
            for taken, event in enumerate(batch.events):
                if not self._hold(event):
                    return taken
        return len(batch.events)

    def _hold(self, item: StampedEvent | Gap) -> bool:
        size = event_size(item) if not isinstance(item, Gap) else 0
        held = self._held
        if held is None:
            held = self._held = []
        if not self.fits(len(held), self._held_bytes, size):
            return False
        held.append(item)
        self._held_bytes += size
        return True

    def loss(self, requested: str | None, oldest: str | None) -> None:
        """The live gap notice: after what is queued, before the next event
        (none for a stream with no topics: a gRPC stream before its first
        ``Request`` is sent nothing)."""
        if not self.topics:
            return
        gap = Gap(requested, oldest)
        if self.state is State.REPLAYING:
            if self._held is None:
                self._held = []
            self._held.append(gap)  # after the replay, before the held events
        elif self.state is State.LIVE and self.out is not None and self.out.phase is Phase.OPEN:
            self.out.put(gap)

    def close(self, *, cut_off: bool) -> None:
        """The hub ends the stream: cut off, token expired, or shutdown."""
        subscription = self.subscription
        if cut_off:
            self.ending = Ending.CUT_OFF  # a cut-off overrides an earlier reason
        elif self.ending is None:
            expired = subscription is not None and subscription.expired
            self.ending = Ending.TOKEN_EXPIRED if expired else Ending.SHUTDOWN
        if self.state in (State.REPLAYING, State.LIVE, State.OPENING):
            self._enter(State.ENDING)
        self._held = None  # a replay ends where it is: the reconnect resumes
        self._held_bytes = 0
        if self.out is not None:
            self.out.close(cut_off=cut_off)

    def end(self, ending: Ending, *, status: int | str | None = None) -> None:
        """The stream ends from the subscriber's side (gRPC ``forceClose``, a
        refused later ``Request``, whose ``status`` the log shows): what is
        queued still goes out."""
        if self.ending is None:
            self.ending = ending
            self.status = status
        if self.state in (State.REPLAYING, State.LIVE):
            self._enter(State.ENDING)
        if self.out is not None:
            self.out.close(cut_off=False)

    def lost(self) -> None:
        """The client went away (EOF, reset, a cancelled stream)."""
        if self.ending is None:
            self.ending = Ending.CLIENT_CLOSED

    def heartbeat(self) -> None:
        """The watcher found the stream idle (SSE)."""
        if self.state is State.LIVE and self.out is not None:
            self.out.heartbeat()

    def cut_off(self) -> None:
        """Cut this subscriber off (the hub forgets it and closes it)."""
        if self.subscription is not None:
            self.hub.cut_off(self.subscription)

    @property
    def queue_depth(self) -> int:
        out = self.out
        held = len(self._held) if self._held is not None else 0
        return held + (out.depth + out.writing if out is not None else 0)

    @property
    def ended(self) -> bool:
        """Closed (by the hub or the subscriber): write what is queued, then end."""
        return self.state in (State.ENDING, State.ENDED)

    # -- the rules writers apply ----------------------------------------------

    def fits(self, queued: int, queued_bytes: int, size: int) -> bool:
        """Whether one more item of ``size`` bytes fits a queue holding
        ``queued`` items of ``queued_bytes`` (the slow-consumer bound)."""
        return queued < self.buffer and queued_bytes + size <= self.max_bytes

    def stall(self, now: float | None = None) -> None:
        """The writer's bytes wait for the client, counted from now (called
        again on every progress: the deadline counts from the last byte taken)."""
        self.stalled_since = now if now is not None else time.monotonic()

    def unstall(self) -> None:
        """Nothing waits for the client any more."""
        self.stalled_since = None
        self.wrote = True

    def delivered(
        self, events: list[StampedEvent], sampled: list[StampedEvent] | None = None
    ) -> None:
        """Live events written to the client's socket: counted, their lag
        sampled (``sampled``: those timed, when already known), and for gRPC
        remembered as sent (a later replay skips them). The hot path
        (:meth:`Outbox.offer`) has this inlined for one event."""
        if self.tracks_sent:
            sent = self.resume.sent
            for event in events:
                sent(event)
        self.events += len(events)
        self.wrote = True
        self._written[self.transport] += len(events)
        timed = sampled if sampled is not None else [event for event in events if event.t0]
        if timed:
            now = time.monotonic()
            lag = self.deliveries.lag
            for event in timed:
                lag.observe(now - event.t0)

    def delivered_replay(self, count: int) -> None:
        """``count`` replayed (or held) events written (no lag sample: their
        age is the client's absence, not the server's delay)."""
        self.events += count
        self.wrote = True
        self.deliveries.written[self.transport] += count

    def is_new(self, event: StampedEvent) -> bool:
        """gRPC: a queued live event not sent yet nor owed by a later replay."""
        return self.resume.is_new(event)

    def sent(self, event: StampedEvent) -> None:
        """gRPC: remember ``event`` went out (a later replay skips it)."""
        self.resume.sent(event)

    # -- the replay ------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        return self.state is State.REPLAYING

    async def replay_step(self) -> list[StampedEvent | Gap]:
        """The next items a ``REPLAYING`` session's writer writes: a batch of
        the replay, or, once it is done, the live events and notices held
        meanwhile (the session is ``LIVE`` from then on: write them before
        anything else). Empty when there is nothing to write; a client that
        replays slower than the history turns over is cut off here."""
        resume = self.resume
        if resume.needs_refill:
            await resume.refill()  # redis-streams: a page older than the window
        if self.state is not State.REPLAYING:
            return []
        batch = resume.take()
        if batch is None:
            self.cut_off()  # replaying slower than the history turns over
            return []
        if batch:
            return list(batch)
        held: list[StampedEvent | Gap] = [
            item for item in self._held or () if isinstance(item, Gap) or resume.is_new(item)
        ]
        self._held = None
        self._held_bytes = 0
        self._enter(State.LIVE)
        return held

    # -- the end -------------------------------------------------------------

    def _log(self) -> None:
        ending = self.ending or Ending.CLIENT_CLOSED
        access_line(
            self.ask,
            self.status
            if self.status is not None and ending is self.ending
            else self.ask.status(ending, None),
            self.topics,
            self.started,
            self.events,
            ending.value,
            self.grant.subject if self.grant is not None else None,
        )
