"""The hub: who is subscribed to what, and the fan-out of each event.

Theory of operation
-------------------
Every subscriber registers a *sink* (its :class:`~plasma_trio.session.Session`;
the hub knows no transport, only its name for the counts), a non-blocking,
bounded queue, through the sync context manager :meth:`Hub.subscribe`;
leaving the ``with`` block (normally, by error or by cancellation)
unregisters it, so a subscriber can never outlive its
connection's task.

:meth:`Hub.publish` never waits for a subscriber (it takes only the ordering
lock, and yields every :data:`SLICE` subscribers). It stamps the event with
the next id, expands the event type into its topic prefixes (``a:b:c`` ->
``a``, ``a:b``, ``a:b:c``), takes the union of the subscribers registered
under those prefixes (so each receives the event at most once, however many
of its topics match), and offers the one shared :class:`StampedEvent` to
each sink. Events that arrived together go out as one batch
(:meth:`Hub.publish_many`, :mod:`plasma_trio.batches`): each sink is offered
all of it that it matches in one call, for one write. A sink that is full
refuses; the hub then cuts that subscriber off alone (closes its sink, which
releases its connection, and forgets it) and counts it. Publication
therefore costs O(matching subscribers), never waits for a slow client, and
memory stays bounded by ``buffer x subscribers``.

Ids are ``<epoch>-<seq>``: ``epoch`` is the hub's start time in ms, ``seq``
counts published events from 1, so ids increase in publish order and are
distinct across restarts. With the ``redis-streams`` source
(:meth:`Hub.use_stream_ids`) an event's id is its stream position instead
(the entry id, or one per key), the same on every instance; ``seq`` still
orders events within this process. The last ``history_size`` stamped events
are kept for ``Last-Event-ID`` replay (:meth:`Hub.replay`).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import trio

from plasma_trio import batches
from plasma_trio.batches import Batch
from plasma_trio.core.history import History, Replay, format_id
from plasma_trio.core.lag import SAMPLE as LAG_SAMPLE
from plasma_trio.core.stream_window import StreamWindow
from plasma_trio.core.topics import prefixes
from plasma_trio.errors import ServiceUnavailable
from plasma_trio.stamped import Deliveries, Sink, StampedEvent

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from plasma_trio.core.events import Event
    from plasma_trio.core.stream_ids import EntryId, Position
    from plasma_trio.descriptors import Descriptors
    from plasma_trio.replay_store import ReplayStore

__all__ = [
    "Batch",
    "Hub",
    "Deliveries",
    "HubStatistics",
    "Sink",
    "StampedEvent",
    "Subscription",
    "Transport",
]

# Subscribers served between two checkpoints of a sliced fan-out.
SLICE = 1000

T = TypeVar("T")

# A transport's name ("sse", "grpc"...): the hub counts per name and knows no wire.
Transport = str


@dataclass(frozen=True, slots=True)
class HubStatistics:
    """A snapshot of the hub's counters (see the metrics endpoints)."""

    connections: dict[str, int]
    events_received: int
    events_delivered: dict[str, int]  # written to sockets
    events_queued: dict[str, int]  # offered to subscribers' queues
    events_dropped: int
    events_invalid: int
    source_losses: int
    cut_off: dict[str, int]
    last_id: str | None
    topics: int = 0  # distinct topics with subscribers

    @property
    def connections_total(self) -> int:
        return sum(self.connections.values())


class Subscription:
    """One registered subscriber. Obtain it from :meth:`Hub.subscribe`."""

    __slots__ = (
        "_hub",
        "active",
        "expired",
        "expires_at",
        "last",
        "offer",
        "offer_batch",
        "sink",
        "subject",
        "topics",
        "transport",
        "was_cut_off",
    )

    def __init__(self, hub: Hub, transport: Transport, sink: Sink) -> None:
        self._hub = hub
        self.transport = transport
        self.sink = sink
        # What the fan-out calls: the sink's offer, unless the sink routes its
        # events elsewhere meanwhile (a session hands its writer's offer here
        # while live: one call per delivery, not two).
        self.offer: Callable[[StampedEvent], bool] = sink.offer
        self.offer_batch: Callable[[Batch], int] = sink.offer_batch
        self.topics: frozenset[str] = frozenset()
        self.active = True
        self.was_cut_off = False
        self.last: StampedEvent | None = None  # the newest event the hub gave this subscriber
        # Access control: when the token expires (monotonic), whose it is.
        self.expires_at: float | None = None
        self.expired = False
        self.subject: str | None = None

    def set_topics(self, topics: frozenset[str]) -> None:
        """Replace the topic set (gRPC semantics); an empty set receives nothing."""
        if self.active and not self.expired:
            self._hub._reindex(self, topics)

    def cut_off(self) -> None:
        """Cut this subscriber off (see :meth:`Hub.cut_off`)."""
        self._hub.cut_off(self)


class Hub:
    """Subscription registry and fan-out. Not thread-safe; lives in one trio run."""

    def __init__(
        self,
        *,
        history_size: int = 1000,
        max_connections: int = 0,
        epoch: int | None = None,
        transports: Iterable[Transport] = (),
    ) -> None:
        self.epoch = epoch if epoch is not None else time.time_ns() // 1_000_000
        self.max_connections = max_connections
        # Named in statistics() from the start (others once seen).
        self.transports: tuple[Transport, ...] = tuple(transports)
        self._by_topic: dict[str, set[Subscription]] = {}
        self._subscriptions: set[Subscription] = set()
        self._history: History[StampedEvent] = History(self.epoch, history_size)
        self._seq = 0
        self._closed = False
        # Per transport name; plain dicts (a Counter's += is slower on the
        # fan-out's path), every name entered at its first subscriber.
        self._connections: dict[str, int] = dict.fromkeys(self.transports, 0)
        self._delivered: dict[str, int] = dict.fromkeys(self.transports, 0)
        self._cut_off: dict[str, int] = dict.fromkeys(self.transports, 0)
        self._received = 0
        self._dropped = 0
        self._invalid = 0
        self._losses = 0
        self._publish_lock = trio.Lock()
        self._flushers: list[Callable[[], None]] = []
        self._streams: StreamWindow[StampedEvent] | None = None
        self._moved: trio.Event | None = None  # set at the next publish, for waiters
        self._last_id: str | None = None
        # redis-streams: where replays older than the window are read
        # (plasma_trio.replay.ReplayStore, given by the source).
        self.replay_store: ReplayStore | None = None
        self.deliveries = Deliveries(self.transports)
        # The process's open-file budget (given by the server; admission
        # refuses new streams near the limit).
        self.descriptors: Descriptors | None = None
        # Subscribers refused at admission, by (transport, reason).
        self.refusals: Counter[tuple[str, str]] = Counter()
        self._sample = 1  # countdown to the next event timed for delivery lag

    # -- subscribers ---------------------------------------------------------

    def refused(self, transport: str, reason: str) -> None:
        """Count one subscriber refused at admission."""
        self.refusals[transport, reason] += 1

    @contextmanager
    def subscribe(
        self, transport: Transport, sink: Sink, topics: frozenset[str] = frozenset()
    ) -> Iterator[Subscription]:
        """Register a subscriber for the duration of the ``with`` block.

        Raises:
            ServiceUnavailable: the connection limit is reached or the hub is
                closed (shutting down).
        """
        if self._closed:
            raise ServiceUnavailable("server is shutting down")
        if self.max_connections and sum(self._connections.values()) >= self.max_connections:
            raise ServiceUnavailable(f"connection limit of {self.max_connections} reached")
        if transport not in self._connections:
            for counts in (self._connections, self._delivered, self._cut_off):
                counts[transport] = 0
            self.deliveries.written.setdefault(transport, 0)
        sub = Subscription(self, transport, sink)
        self._subscriptions.add(sub)
        self._connections[transport] += 1
        try:
            if topics:
                self._reindex(sub, topics)
            yield sub
        finally:
            self._forget(sub)
            self._connections[transport] -= 1

    def _reindex(self, sub: Subscription, topics: frozenset[str]) -> None:
        for topic in sub.topics - topics:
            self._unindex(topic, sub)
        for topic in topics - sub.topics:
            self._by_topic.setdefault(topic, set()).add(sub)
        sub.topics = topics

    def _unindex(self, topic: str, sub: Subscription) -> None:
        subs = self._by_topic.get(topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_topic[topic]

    def _forget(self, sub: Subscription) -> None:
        if not sub.active:
            return
        sub.active = False
        for topic in sub.topics:
            self._unindex(topic, sub)
        self._subscriptions.discard(sub)

    # -- events --------------------------------------------------------------

    async def publish(
        self, event: Event, *, pos: tuple[int, EntryId] | None = None
    ) -> StampedEvent:
        """Stamp ``event`` and offer it to every matching subscriber, once each.

        ``pos`` (``redis-streams`` only, required there): the event's key index
        and entry id, from which its id is made.

        Never waits for a subscriber: one whose queue is full is cut off. Every
        publish path (sources, ``/debug``, ``/publish``) comes here or to
        :meth:`publish_many`, under one lock, so events reach every subscriber
        in publish order. Other tasks run every :data:`SLICE` subscribers (one
        event to 10,000 subscribers costs tens of milliseconds), at shielded
        checkpoints: an event, once stamped, reaches everyone.
        """
        return (await self.publish_many([event], [pos] if pos is not None else None))[0]

    async def publish_many(
        self,
        events: Sequence[Event],
        positions: Sequence[tuple[int, EntryId]] | None = None,
    ) -> list[StampedEvent]:
        """Publish ``events`` (in order; ``positions``: each one's, in
        ``redis-streams`` mode) as one batch: every subscriber gets all the
        events it matches in one offer (:class:`Batch`), which its writer
        writes in one write. Each event is stamped, counted, held for replay
        and bounded exactly as if published alone (:meth:`publish`)."""
        async with self._publish_lock:
            stamped = [
                self._stamp(event, positions[n] if positions is not None else None)
                for n, event in enumerate(events)
            ]
            if len(stamped) == 1:  # (the lone event's path: one offer per subscriber)
                await self._sliced(self._targets(stamped[0]), partial(self._offer, stamped[0]))
            else:
                groups = [self._groups(event) for event in stamped]
                await self._sliced(batches.plan(stamped, groups), self._offer_batches)
            if self._moved is not None:
                self._moved.set()
                self._moved = None
            return stamped

    async def _sliced(self, work: list[T], offer: Callable[[list[T]], None]) -> None:
        """``offer`` the fan-out's ``work`` :data:`SLICE` at a time (other
        tasks run in between), each slice's writes flushed."""
        for start in range(0, len(work), SLICE):
            if start:
                await trio.lowlevel.cancel_shielded_checkpoint()
            offer(work[start : start + SLICE])
            for flush in self._flushers:
                flush()

    def _stamp(self, event: Event, pos: tuple[int, EntryId] | None) -> StampedEvent:
        self._seq += 1
        streams = self._streams
        if streams is None:
            stamped = StampedEvent(format_id(self.epoch, self._seq), self._seq, event)
        else:
            if pos is None:
                raise ValueError("redis-streams ids: an event needs its stream position")
            stamped = StampedEvent(streams.stamp(*pos), self._seq, event, pos)
        self._history.append(stamped)
        self._last_id = stamped.id
        return stamped

    def _groups(self, stamped: StampedEvent) -> list[set[Subscription]]:
        """The subscriber sets registered under the event's topic prefixes
        (counted as received, and timed for the lag one time in LAG_SAMPLE)."""
        self._received += 1
        self._sample -= 1
        if not self._sample:
            self._sample = LAG_SAMPLE
            stamped.t0 = time.monotonic()
        by_topic = self._by_topic
        return [subs for p in prefixes(stamped.event.type) if (subs := by_topic.get(p))]

    def _targets(self, stamped: StampedEvent) -> list[Subscription]:
        """Every subscriber of the event, once each."""
        groups = self._groups(stamped)
        if not groups:
            return []
        if len(groups) == 1:
            return list(groups[0])
        # One subscriber may be registered under several prefixes.
        return list(set().union(*groups))

    def _offer(self, stamped: StampedEvent, targets: list[Subscription]) -> None:
        queued = self._delivered
        for sub in targets:
            if not sub.active:
                continue  # left (or was cut off) during a sliced fan-out
            if sub.offer(stamped):
                sub.last = stamped
                queued[sub.transport] += 1
            else:
                self._dropped += 1
                self.cut_off(sub)

    def _offer_batches(self, plan: list[tuple[Subscription, Batch]]) -> None:
        queued = self._delivered
        for sub, batch in plan:
            if not sub.active:
                continue  # left (or was cut off) during a sliced fan-out
            taken = sub.offer_batch(batch)
            if taken:
                sub.last = batch.events[taken - 1]
                queued[sub.transport] += taken
            if taken < len(batch.events):
                self._dropped += 1  # the event that did not fit (as publish)
                self.cut_off(sub)

    def add_flusher(self, flush: Callable[[], None]) -> None:
        """Call ``flush`` after each slice of every fan-out (and after the
        live gap notices of :meth:`loss`): a transport that
        gathers its writes during ``offer`` (the gRPC direct path writes one
        batch per connection) writes them there. It must not raise."""
        self._flushers.append(flush)

    def cut_off(self, sub: Subscription) -> None:
        """Forget a subscriber that fell too far behind and end its stream."""
        if not sub.active:
            return
        self._forget(sub)
        sub.was_cut_off = True
        self._cut_off[sub.transport] += 1
        sub.sink.close(cut_off=True)

    def expire(self, sub: Subscription) -> None:
        """End a subscriber whose token expired: it receives nothing more,
        what is queued is still sent, then its stream ends (gRPC:
        ``UNAUTHENTICATED``). It stays registered until its connection's
        task leaves, so the write deadline still applies to that last drain
        (a client that stops reading then is cut off like any other)."""
        if not sub.active or sub.expired:
            return
        for topic in sub.topics:
            self._unindex(topic, sub)
        sub.topics = frozenset()
        sub.expired = True
        sub.expires_at = None
        sub.sink.close(cut_off=False)

    async def announce_loss(
        self,
        *,
        key: int = 0,
        cursor: EntryId | None = None,
        oldest: str | None = None,
    ) -> None:
        """The source may have lost events (a pub/sub resubscribe after an
        outage; in ``redis-streams`` mode, entries of stream ``key`` trimmed
        before they were read, or Redis back without its data): every
        connected subscriber gets the live gap notice (SPEC 4) once, before
        its next event, with the id of the last event it was given and the id
        of the first event after the loss: the next one's here, ``oldest``
        (or ``None`` when not known) in streams mode, where ``cursor`` is
        where the source now reads ``key`` from. A later resume from before
        the loss gets the gap notice too. Taken in publish order."""
        async with self._publish_lock:
            streams = self._streams
            if streams is None:
                self._history.mark_loss()
                oldest = format_id(self.epoch, self._seq + 1)
            else:
                streams.loss(key, cursor)
            for sub in list(self._subscriptions):
                requested = sub.last.id if sub.last is not None else None
                sub.sink.loss(requested, oldest)
            for flush in self._flushers:
                flush()
            self._losses += 1

    # -- redis-streams ids ---------------------------------------------------

    def use_stream_ids(self, keys: int, store: ReplayStore) -> None:
        """Give events stream positions as ids from now on (the ``redis-streams``
        source, reading ``keys`` keys); call before the first event. ``store``
        reads Redis for resumes (whether a client's entries still exist, and
        replays older than the window)."""
        self._streams = StreamWindow(keys, self._history)
        self.replay_store = store

    @property
    def stream_position(self) -> Position | None:
        """Where this instance has read the streams to (``None``: not streams mode)."""
        return self._streams.position if self._streams is not None else None

    def parse_position(self, last_id: str) -> Position | None:
        """A client's last id as a stream position (``None``: not one of this mode)."""
        return self._streams.parse(last_id) if self._streams is not None else None

    def preload(
        self,
        entries: list[tuple[Event, tuple[int, EntryId]]],
        covered_from: list[EntryId] | None = None,
    ) -> None:
        """Hold entries read from the streams at start-up for replay, without
        offering them to anyone (they were published before this instance
        started). In stream order per key; call before the first publish.
        ``covered_from``: per key, the oldest entry read when older ones may
        exist (a client from before it gets the gap notice)."""
        for event, pos in entries:
            self._stamp(event, pos)
        if self._streams is not None and covered_from is not None:
            self._streams.cover_from(covered_from)

    async def wait_position(self, position: Position) -> None:
        """Return once this instance has read the streams up to ``position``."""
        streams = self._streams
        while streams is not None and streams.ahead(position):
            if self._moved is None:
                self._moved = trio.Event()
            await self._moved.wait()

    def count_invalid(self) -> None:
        """Record an event a source or publisher rejected."""
        self._invalid += 1

    def replay(self, last_id: str, *, missing: bool | None = None) -> Replay:
        """What a client that last saw ``last_id`` missed: a range of seqs to
        read with :meth:`history_get` as the client drains them. ``missing``
        (``redis-streams``): Redis no longer holds the client's entry
        (``False``: it holds them all; ``None``: not known)."""
        if self._streams is not None:
            return self._streams.since(last_id, current_seq=self._seq, missing=missing)
        return self._history.since(last_id, current_seq=self._seq)

    def history_get(self, seq: int) -> StampedEvent | None:
        """The held event ``seq``, or ``None`` when the history has dropped it."""
        return self._history.get(seq)

    @property
    def losses(self) -> int:
        """How many times the source announced a loss (see :meth:`announce_loss`)."""
        return self._losses

    @property
    def history_first_seq(self) -> int:
        return self._history.first_seq

    def queue_depths(self) -> list[int]:
        """Every subscriber's queue depth, now (``plasma_subscriber_queue_depth``)."""
        return [sub.sink.queue_depth for sub in self._subscriptions]

    def subscribers_of(self, topic: str) -> int:
        """How many subscribers are registered under ``topic`` exactly."""
        return len(self._by_topic.get(topic, ()))

    @property
    def topic_count(self) -> int:
        """How many distinct topics have subscribers (0 when nobody listens)."""
        return len(self._by_topic)

    def subscriptions(self) -> list[Subscription]:
        """The registered subscribers, now (a copy: safe to cut off while iterating)."""
        return list(self._subscriptions)

    @property
    def last_seq(self) -> int:
        return self._seq

    # -- lifecycle -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Shut down: refuse new subscribers and end every open stream."""
        self._closed = True
        for sub in list(self._subscriptions):
            self._forget(sub)
            sub.sink.close(cut_off=False)

    def statistics(self) -> HubStatistics:
        """The counters now, per transport: every transport named at
        construction, and any other seen since."""
        names = self._connections  # every name: the constructor's, and each seen since
        written = self.deliveries.written
        return HubStatistics(
            connections=dict(self._connections),
            events_received=self._received,
            events_delivered={t: written.get(t, 0) for t in names},
            events_queued={t: self._delivered[t] for t in names},
            events_dropped=self._dropped,
            events_invalid=self._invalid,
            source_losses=self._losses,
            cut_off={t: self._cut_off[t] for t in names},
            last_id=self._last_id,
            topics=len(self._by_topic),
        )
