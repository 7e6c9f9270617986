"""The ``redis-streams`` source: blocking ``XREAD`` per stream key, nothing lost across outages.

Theory of operation
-------------------
Each key of ``PLASMA_SUBSCRIBER_REDIS_STREAMS`` has its own reader: a
connection that loops on ``XREAD COUNT`` :data:`COUNT` ``BLOCK`` (the Redis
timeout) ``STREAMS <key> <cursor>``, where the cursor is the last entry id
read on that key (one reader per key: a Redis Cluster refuses ``XREAD``
across slots). An empty answer after the block is the liveness check: a hung
Redis or a half-open connection runs into the client's read timeout and is
reconnected (plasma's retry policy, :class:`~.redis_base.RedisSource`). The
entry field ``event`` holds the JSON event (SPEC 4); each is validated like a
pub/sub message, and published to the hub with its position, which gives
its id (:mod:`plasma_trio.core.stream_window`).

Cursors live in this object, not in the connection: after an outage the
readers continue from them, so an outage of Redis or of the connection loses
nothing. Before continuing, each cursor is checked (``XRANGE cursor cursor``):

* still in the stream: nothing was lost;
* gone, and the stream now ends before it (or is gone): Redis came back
  without its data. The cursor moves back to the stream's last entry (a
  snapshot restored: what it holds was read) or to ``0-0`` when it is empty
  (new entries may have lower ids: reading on from the old cursor would skip
  every one of them);
* gone, and the stream goes on after it: it was trimmed away, maybe with
  entries not read yet.

Either loss is announced (the live gap notice, :meth:`Hub.announce_loss`).
While connected, a reader that gets a full batch (it is behind) checks the
same way that the cursor it read from still exists: trimming (``MAXLEN``,
``MINID``) removes the oldest entries first, so if the cursor survived the
read, nothing after it was trimmed before it (assuming ``COUNT`` is below
the streams' ``MAXLEN``).

At the first connection the newest ``PLASMA_HISTORY_SIZE`` entries of every
key are read (``XREVRANGE``) into the hub's replay window without being
offered to anyone, and the cursors start at each key's last entry: a client
that resumes on a fresh instance, or after a restart, is replayed from
memory; a reconnecting client within the window costs no Redis read beyond
the check of its own entries (:meth:`exists`), which decides the gap rules
that depend on what Redis holds (trimmed, deleted, beyond the end). A client
older than the window whose entries Redis still holds is replayed from Redis
(:meth:`entries_after`, a page per key as it drains the previous one).

Publishing (``/publish``, ``/debug``) appends to the first key with ``XADD
MAXLEN ~ PLASMA_SUBSCRIBER_REDIS_STREAM_MAXLEN`` and answers the new id; the
event reaches this instance's subscribers through its reader, like every
other instance's.
"""

from __future__ import annotations

import heapq
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Final

import trio

from plasma_trio.core.events import Event, InvalidEvent, parse
from plasma_trio.core.stream_ids import ZERO, EntryId, format_entry, format_position, parse_entry
from plasma_trio.redis_connect import append_event
from plasma_trio.replay_store import ReplayStore
from plasma_trio.sources.intake import BATCH_EVENTS
from plasma_trio.sources.redis_base import REDIS_ERRORS, RedisSource

if TYPE_CHECKING:
    from coredis.response.types import StreamEntry

    from plasma_trio.config import Config
    from plasma_trio.core.retry import RetryState
    from plasma_trio.core.stream_ids import Position
    from plasma_trio.hub import Hub
    from plasma_trio.redis_connect import RedisClient

__all__ = ["COUNT", "RedisStreamsSource"]

_log = RedisSource.log

# Entries per XREAD (published in batches of at most intake.BATCH_EVENTS).
COUNT: Final = 512
# Concurrent Redis reads for replays older than the window (of the command
# client's 64 pooled connections; publishing and entry checks use the rest).
DEEP_READS: Final = 16
# Entries whose parsed event is kept for other replays of the same range.
DEEP_PARSED: Final = 8192
EVENT_FIELD: Final = b"event"


# How long a page read for one replay serves others asking the same, in seconds.
PAGE_REUSE: Final = 1.0


class _Page:
    """One page read for replays from Redis, shared (see ``entries_after``)."""

    __slots__ = ("abandoned", "at", "entries", "ready")

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.entries: list[tuple[int, EntryId, Event | None]] | None = None
        self.at = 0.0
        self.abandoned = False


class RedisStreamsSource(RedisSource):
    """Read the configured stream keys and feed the hub (see the module doc)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.keys = config.subscriber_redis_streams
        self.cursors: list[EntryId] = [ZERO] * len(self.keys)
        self._loaded = False
        # Replays older than the window read Redis this many at a time.
        self._deep_reads = trio.Semaphore(DEEP_READS)
        self._deep_parsed: dict[tuple[int, EntryId], Event | None] = {}
        self._pages: dict[tuple[Position, Position, int], _Page] = {}

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        hub.use_stream_ids(len(self.keys), ReplayStore(self.exists, self.entries_after))
        await super().run(hub, task_status=task_status)

    async def _connect_and_deliver(self, hub: Hub, retry: RetryState) -> None:
        config = self.config
        timeout = config.subscriber_redis_timeout
        block = max(timeout, 0.05)
        async with AsyncExitStack() as stack:
            # A blocking XREAD holds its connection: one client per key, each
            # allowed the block plus the usual timeout to answer.
            readers = [
                await stack.enter_async_context(
                    self.target.connect(command_timeout=block + max(timeout, 1.0), retry=False)
                )
                for _ in self.keys
            ]
            with trio.fail_after(max(timeout, 0.05) * (2 + len(self.keys))):
                await readers[0].ping()
                if not self._loaded:
                    await self._preload(hub, readers[0])
                else:
                    for index, reader in enumerate(readers):
                        await self._check_cursor(hub, reader, index, None)
            self.connected = True
            retry.succeeded()
            _log.info(
                "redis streams reading",
                extra={
                    "addr": self.target.describe(),
                    "streams": list(self.keys),
                    "from": [format_entry(c) for c in self.cursors],
                },
            )
            self._report_started()
            async with trio.open_nursery() as nursery:
                for index, reader in enumerate(readers):
                    nursery.start_soon(self._read, hub, reader, index, int(block * 1000))

    async def _preload(self, hub: Hub, client: RedisClient) -> None:
        """The newest entries of every key into the replay window; cursors at the ends."""
        size = self.config.history_size
        per_key: list[list[tuple[EntryId, int, Event]]] = []
        covered_from: list[EntryId] = []
        for index, key in enumerate(self.keys):
            entries = await client.xrevrange(key, "+", "-", count=size + 1)
            # A full read may have older entries before it: the window covers
            # the key only from its oldest entry read (invalid or not).
            oldest = parse_entry(entries[-1].identifier) if len(entries) > size else None
            covered_from.append(oldest or ZERO)
            valid: list[tuple[EntryId, int, Event]] = []
            for entry in reversed(entries):
                entry_id = parse_entry(entry.identifier)
                if entry_id is None:
                    continue
                self.cursors[index] = max(self.cursors[index], entry_id)
                event = self._event_of(entry)
                if isinstance(event, Event):  # an invalid one was counted when it came
                    valid.append((entry_id, index, event))
            per_key.append(valid)
        # Interleave keys by entry id (time), each key in its own order.
        merged = heapq.merge(*per_key, key=lambda item: (item[0], item[1]))
        hub.preload([(event, (index, entry_id)) for entry_id, index, event in merged], covered_from)
        self._loaded = True

    async def _check_cursor(
        self,
        hub: Hub,
        client: RedisClient,
        index: int,
        first_read: EntryId | None,
    ) -> bool:
        """Whether key ``index``'s cursor is still in its stream; if not,
        announce the loss (and reset the cursor when Redis came back without
        its data). ``first_read``: the first entry a reader just got after it."""
        key = self.keys[index]
        cursor = self.cursors[index]
        if cursor == ZERO or await client.xrange(key, format_entry(cursor), format_entry(cursor)):
            return True
        last = await client.xrevrange(key, "+", "-", count=1)
        last_id = parse_entry(last[0].identifier) if last else None
        if last_id is None or last_id < cursor:
            # Redis came back without (some of) its data. Empty: read every
            # new entry from 0-0 (ids may start below the old cursor). Restored
            # from an older snapshot: what it holds was read already; go on
            # after its last entry instead of publishing it all again.
            reason, new_cursor = "stream went back (redis lost its data)", last_id or ZERO
            after = "(" + format_entry(last_id) if last_id is not None else "-"
        else:
            reason, new_cursor, after = "entries trimmed before they were read", cursor, "("
            after += format_entry(cursor)
        first: EntryId | None = first_read
        if first is None:
            following = await client.xrange(key, after, "+", count=1)
            first = parse_entry(following[0].identifier) if following else None
        oldest = None
        position = hub.stream_position
        if first is not None and position is not None:
            moved = list(position)
            moved[index] = first
            oldest = format_entry(first) if len(moved) == 1 else format_position(tuple(moved))
        self.cursors[index] = new_cursor
        await hub.announce_loss(key=index, cursor=new_cursor, oldest=oldest)
        _log.warning(
            "events may be lost: subscribers notified",
            extra={
                "stream": key,
                "reason": reason,
                "cursor": format_entry(cursor),
                "subscribers": hub.statistics().connections_total,
            },
        )
        return False

    async def _read(self, hub: Hub, client: RedisClient, index: int, block_ms: int) -> None:
        key = self.keys[index]
        while True:
            cursor = self.cursors[index]
            answer = await client.xread({key: format_entry(cursor)}, count=COUNT, block=block_ms)
            if not answer:
                continue  # nothing new within the block: the connection is alive
            entries = next(iter(answer.values()))
            if len(entries) >= COUNT:
                # Behind: make sure nothing between the cursor and this batch
                # was trimmed away before it was read.
                first = parse_entry(entries[0].identifier)
                await self._check_cursor(hub, client, index, first)
            # What one XREAD brought is published as one batch (one write
            # per subscriber), in stream order.
            events: list[Event] = []
            positions: list[tuple[int, EntryId]] = []
            for entry in entries:
                entry_id = parse_entry(entry.identifier)
                if entry_id is None or entry_id <= self.cursors[index]:
                    continue
                self.cursors[index] = entry_id
                event = self._event_of(entry)
                if isinstance(event, Event):
                    events.append(event)
                    positions.append((index, entry_id))
                    continue
                hub.count_invalid()
                _log.warning(
                    "invalid event dropped",
                    extra={"channel": key, "id": format_entry(entry_id), "reason": event},
                )
            for start in range(0, len(events), BATCH_EVENTS):
                end = start + BATCH_EVENTS
                await hub.publish_many(events[start:end], positions[start:end])

    def _event_of(self, entry: StreamEntry) -> Event | str:
        """The entry's event, or why it is invalid."""
        body = entry.field_values.get(EVENT_FIELD)
        if body is None:
            return "entry has no 'event' field"
        event = parse(body, self.config.max_event_bytes)
        return event.reason if isinstance(event, InvalidEvent) else event

    async def exists(self, position: Position) -> bool | None:
        """Whether every entry of ``position`` is still in its stream (``0-0``
        counts as present); ``None`` when Redis cannot be asked now."""
        commands = self._commands
        if commands is None or not self.connected:
            return None
        try:
            with trio.fail_after(self.config.subscriber_redis_timeout):
                for key, entry in zip(self.keys, position, strict=True):
                    if entry == ZERO:
                        continue
                    text_id = format_entry(entry)
                    if not await commands.xrange(key, text_id, text_id):
                        return False
        except REDIS_ERRORS:
            return None
        return True

    async def entries_after(
        self, position: Position, until: Position, count: int
    ) -> list[tuple[int, EntryId, Event | None]] | None:
        """One page of a replay older than the window (see :meth:`_read_page`),
        read once for every client asking the same page at about the same
        time: a reconnect storm's clients resume from the same place and
        move in step, so a page answered less than a second ago is shared."""
        key = (position, until, count)
        while True:
            now = trio.current_time()
            page = self._pages.get(key)
            if page is not None and (not page.ready.is_set() or now - page.at < PAGE_REUSE):
                await page.ready.wait()
                if page.abandoned:
                    continue  # its reader was cancelled (client gone): read it here
                return page.entries
            if len(self._pages) >= 256:
                for old in [k for k, p in self._pages.items() if p.ready.is_set()]:
                    if now - self._pages[old].at >= PAGE_REUSE:
                        del self._pages[old]
            page = self._pages[key] = _Page()
            try:
                page.entries = await self._read_page(position, until, count)
            except BaseException:
                page.abandoned = True
                if self._pages.get(key) is page:
                    del self._pages[key]
                raise
            finally:
                page.at = trio.current_time()
                page.ready.set()
            return page.entries

    async def _read_page(
        self, position: Position, until: Position, count: int
    ) -> list[tuple[int, EntryId, Event | None]] | None:
        """The entries after ``position`` up to ``until`` (inclusive) on every
        key, merged by entry id: one page, at most ``count`` per key; see
        :meth:`ReplayStore.entries_after`. A replay older than the replay window reads
        these as its client drains them.

        Each key's position is checked first (``XRANGE p p``): trimming removes
        the oldest entries first, so while it exists nothing after it was
        trimmed. When one key's page is full, entries of other keys beyond its
        last one wait for the next page, so the merge never skips one.
        """
        commands = self._commands
        if commands is None or not self.connected:
            return None
        pages: list[list[tuple[EntryId, int, Event | None]]] = []
        cut: tuple[EntryId, int] | None = None
        try:
            # A reconnect storm of such clients waits its turn here, not in
            # Redis's or the pool's queue (where it would run into the timeout).
            async with self._deep_reads:
                with trio.fail_after(self.config.subscriber_redis_timeout * 2 * len(self.keys)):
                    for index, (key, entry, last) in enumerate(
                        zip(self.keys, position, until, strict=True)
                    ):
                        if entry >= last:
                            continue
                        text_id = format_entry(entry)
                        if entry != ZERO and not await commands.xrange(key, text_id, text_id):
                            return None  # trimmed (or deleted) meanwhile
                        entries = await commands.xrange(
                            key, "(" + text_id, format_entry(last), count=count
                        )
                        page: list[tuple[EntryId, int, Event | None]] = []
                        for raw in entries:
                            entry_id = parse_entry(raw.identifier)
                            if entry_id is None:
                                continue
                            page.append((entry_id, index, self._deep_event(index, entry_id, raw)))
                        if len(entries) >= count and page:
                            last_read = (page[-1][0], index)
                            cut = last_read if cut is None else min(cut, last_read)
                        pages.append(page)
        except REDIS_ERRORS:
            return None
        merged = heapq.merge(*pages, key=lambda item: (item[0], item[1]))
        return [
            (index, entry_id, event)
            for entry_id, index, event in merged
            if cut is None or (entry_id, index) <= cut
        ]

    def _deep_event(self, index: int, entry_id: EntryId, raw: StreamEntry) -> Event | None:
        """The entry's event (``None``: invalid), parsed once for all the
        clients of a reconnect storm replaying the same entries."""
        cache = self._deep_parsed
        key = (index, entry_id)
        if key in cache:
            return cache[key]
        event = self._event_of(raw)
        parsed = event if isinstance(event, Event) else None
        if len(cache) >= DEEP_PARSED:
            del cache[next(iter(cache))]  # the oldest parsed
        cache[key] = parsed
        return parsed

    async def publish(self, hub: Hub, event: Event) -> str:
        """``XADD`` to the first key (trimmed to about ``..._STREAM_MAXLEN``);
        returns the new entry id. Every instance's reader delivers it.

        Raises:
            SourceFailed: Redis refused or is unreachable (the caller answers 500).
        """
        wire, maxlen = event.to_wire(), self.config.subscriber_redis_stream_maxlen
        return await self.command(lambda client: append_event(client, self.keys[0], wire, maxlen))
