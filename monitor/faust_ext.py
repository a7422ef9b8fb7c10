"""Small extensions of faust that the worker needs to lose nothing and send nothing
twice (issue #4).

- `seek_to_committed` / `install_rewinding_consumer`: a partition that has records
  but no committed offset yet is read again from its beginning whenever faust seeks
  back "to the committed offsets". faust does that seek after every rebalance, and
  whenever its fetcher got records while the flow was stopped (it drops them and
  counts on the seek to read them again). aiokafka's ``seek_to_committed`` does
  nothing for a partition without a committed offset, so the records faust dropped
  were skipped for good: alerts never e-mailed, events never stepped. Reading from
  the beginning is what ``consumer_auto_offset_reset="earliest"`` promises; what is
  read twice is dropped by the engine (same position) and by the notification log
  (same alert key).
- `commit_offset`: the offset to commit for a partition, from the offsets acked. faust
  (0.15) may commit past one offset that was never acked: its check for a hole at the
  head of the acked offsets compares with the committed offset as if that were the
  last offset processed, while it is the next one to read. A message faust dropped
  unprocessed (its stream skips messages while a rebalance suspends the flow, counting
  on a seek back to the committed offset) was then committed, and the seek never read
  it again: an event lost for good, seen as a worker one event short after a restart.
- `OffsetGuard` / `fetch_range` / `mark_acked`: faust may also drop a message in flight
  without a seek to read it again (seen here around the end of the table recovery
  after a restart: one message of a partition never reached the agent, the next ones
  did). The agent knows where each partition's reading starts after every seek
  (`seek_to_committed` records it), so it sees such a hole; it reads the missing
  offsets itself and steps them first, then counts them as acked. A hole at the end of
  a quiet partition has no later message to show it: the consumer notes the highest
  offset faust fetched, and a timer compares (`OffsetGuard.tails`).
- `ConfirmedTable`: a faust table that can wait until the broker has its writes. A
  table write only joins faust's producer buffer, and faust drops the future of its
  changelog record: a worker killed before the buffer drained loses the write (the
  worker that takes an e-mail log over then e-mails the alert again), and a write the
  broker refused is lost while the events that made it are acked. Its `write` takes a
  batch's rows at once and sends them as one produce batch per partition.
- `ArrivalMonitor`: a message's ``time_in`` is when the consumer fetched it, not when
  a stream took it from its queue (up to 4,096 messages later), so the processing
  latency includes the wait in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.sensors import Monitor
from faust.stores.base import SerializedStore
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

__all__ = ["ArrivalMonitor", "Carrier", "ConfirmedTable", "OffsetGuard", "commit_offset",
           "current_event", "drop", "fetch_range", "fill_tails", "install_rewinding_consumer",
           "mark_acked", "read_hole", "read_since", "seek_to_committed", "sync", "undelivered",
           "until_read"]

Partition = tuple[str, int]  # (topic, partition)
Servers = str | list[str]  # aiokafka's bootstrap_servers: "host:port", or several
log = logging.getLogger(__name__)


async def seek_to_committed(consumer: AIOKafkaConsumer, rewinds: Callable[[str], bool],
                            positions: dict[Partition, int] | None = None
                            ) -> Mapping[TopicPartition, int | None]:
    """Seek every assigned partition to its committed offset, as aiokafka does, and a
    partition of a topic ``rewinds`` accepts that has no committed offset (None, or 0,
    which aiokafka does not seek to either) to its beginning. Returns the committed
    offsets, as aiokafka does; fills ``positions`` with the offset each partition of
    those topics is read from next."""
    committed = await consumer.seek_to_committed()
    unset = [tp for tp, offset in committed.items() if not offset and rewinds(tp.topic)]
    if unset:
        await consumer.seek_to_beginning(*unset)
    if positions is not None:
        for tp in consumer.assignment():
            if rewinds(tp.topic):
                positions[(tp.topic, tp.partition)] = await consumer.position(tp)
    return committed


def commit_offset(acked: list[int], committed: int | None) -> tuple[int | None, int]:
    """The offset to commit for a partition, and how many of the (sorted) ``acked``
    offsets it covers. ``committed`` is the offset committed before, i.e. the next one
    to read (None: none yet, so the first run of acked offsets counts). Nothing is
    committed while that offset itself has not been acked: the
    offsets after a hole wait until the hole is filled (faust's gaps, the offsets a
    compacted or transactional topic skips, are added to ``acked`` beforehand)."""
    if not acked or (committed is not None and acked[0] > committed):
        return None, 0
    run = 1
    while run < len(acked) and acked[run] == acked[run - 1] + 1:
        run += 1
    return acked[run - 1] + 1, run


class OffsetGuard:
    """Finds the messages of the agent's topic that faust fetched but never delivered.

    ``reset(positions)`` after each seek gives where each partition is read from next.
    `check` takes each delivered message in order and returns the range of offsets
    missing before it (to read with `fetch_range` and step first), or None. A message
    before the expected offset is one read again; the engine knows it by its position.
    Pure: no I/O, no clock.
    """

    def __init__(self) -> None:
        self.next: dict[Partition, int] = {}
        self.source: object = None  # the positions it was last reset from
        self.suspects: dict[Partition, tuple[int, int]] = {}  # see `tails`

    def reset(self, positions: Mapping[Partition, int], source: object = None) -> None:
        self.next, self.source, self.suspects = dict(positions), source, {}

    def tails(self, read: Mapping[Partition, int]) -> dict[Partition, tuple[int, int]]:
        """The holes at the end of partitions: offsets faust fetched (``read``: the
        highest, per partition) that never reached the agent. A hole at the end has no
        later message to show it, so it counts when two calls in a row see the same one
        (a message on its way to the agent between them is not one)."""
        holes, suspects = {}, {}
        for partition, expected in self.next.items():
            last = read.get(partition)
            if last is None or last < expected:
                continue
            if self.suspects.get(partition) == (expected, last):
                holes[partition] = (expected, last + 1)
            else:
                suspects[partition] = (expected, last)
        self.suspects = suspects
        return holes

    def filled(self, partition: Partition, end: int) -> None:
        """A hole up to ``end`` (excluded) was read another way."""
        self.next[partition] = max(self.next.get(partition, end), end)
        self.suspects.pop(partition, None)

    def check(self, partition: Partition, offset: int) -> tuple[int, int] | None:
        expected = self.next.get(partition)
        if expected is not None and offset < expected:
            return None
        self.next[partition] = offset + 1
        return (expected, offset) if expected is not None and offset > expected else None


async def fetch_range(bootstrap: Servers, topic: str, partition: int, start: int, end: int,
                      timeout: float = 30.0) -> list[Any]:
    """The records of a partition from offset ``start`` up to ``end`` (excluded), read
    with a consumer of no group (nothing committed, no rebalance). Offsets the topic
    does not hold (compacted, transaction markers) are simply absent."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    try:
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, start)
        records: list[Any] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while await consumer.position(tp) < end:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: offsets {start}..{end - 1} "
                                   f"not readable within {timeout:.0f} s")
            batch = await consumer.getmany(tp, timeout_ms=1000)
            records.extend(r for r in batch.get(tp, ()) if start <= r.offset < end)
        return records
    finally:
        await consumer.stop()


async def undelivered(guard: OffsetGuard, consumer: Any, bootstrap: Servers, message: Any
                      ) -> tuple[list[Any], range]:
    """The records faust fetched but never delivered before ``message`` (read again with
    `read_hole`), and their offsets, to `mark_acked` once they are handled."""
    sync(guard, consumer, message.topic)
    hole = guard.check(message.tp, message.offset)
    if hole is None:
        return [], range(0)
    return await read_hole(bootstrap, (message.topic, message.partition), hole), range(*hole)


def sync(guard: OffsetGuard, consumer: Any, topic: str) -> None:
    """Start the guard again from the positions of the consumer's last seek in
    ``topic`` (the guard's agent reads that topic alone), if there was a seek since."""
    positions = consumer.positions
    if positions is not guard.source:
        guard.reset({tp: offset for tp, offset in positions.items() if tp[0] == topic},
                    source=positions)


async def read_hole(bootstrap: Servers, partition: Partition, hole: tuple[int, int]) -> list[Any]:
    """`fetch_range` for offsets faust did not deliver, tried again until the broker
    answers: the agent cannot go on without them (as with the broker's writes)."""
    (topic, number), (start, end) = partition, hole
    log.warning("%s[%s]: offsets %s to %s were not delivered by faust; reading them again",
                topic, number, start, end - 1)
    return await until_read(lambda: fetch_range(bootstrap, topic, number, start, end),
                            f"{topic}[{number}] offsets {start} to {end - 1}")


async def until_read(read: Callable[[], Awaitable[Any]], what: str) -> Any:
    """``await read()``, tried again (after 1 s, doubling up to 30 s) until the broker
    answers: for a reader that cannot go on safely without it."""
    delay = 1.0
    while True:
        try:
            return await read()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("could not read %s, trying again in %.0f s: %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def read_since(bootstrap: Servers, topic: str, starts: Mapping[int, int],
                     pick: Callable[[Any], Any], idle: float = 30.0
                     ) -> tuple[set[Any], dict[int, int]]:
    """``pick(record)`` of the records of every partition ``p`` of a topic from offset
    ``starts.get(p, 0)`` (0: its beginning) to its end, None left out; and the ends the
    broker gave when the reading began (each at most the true end). Read with a
    consumer of no group; gives up (TimeoutError) after ``idle`` seconds without a
    record while short of an end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    try:
        await consumer.start()
        # the topic's partitions as the broker has them (private: aiokafka's client)
        partitions = (await consumer._client.fetch_all_metadata()).partitions_for_topic(topic)
        tps = [TopicPartition(topic, partition) for partition in sorted(partitions or ())]
        if not tps:
            return set(), {}
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        firsts = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(starts.get(tp.partition, 0), firsts[tp]))
        picked: set[Any] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + idle
        while True:
            # past the ends, until a fetch brings nothing more: tansu may give as a
            # partition's end the first offset of its last produce batch + 1
            batches = await consumer.getmany(*tps, timeout_ms=250)
            for records in batches.values():
                picked.update(pick(record) for record in records)
            if batches:
                deadline = loop.time() + idle
            elif all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                picked.discard(None)
                return picked, {tp.partition: ends[tp] for tp in tps}
            elif loop.time() > deadline:
                raise TimeoutError(f"{topic}: no record for {idle:.0f} s short of its end")
    finally:
        await consumer.stop()


class Carrier:
    """Stands for faust's event around a record read again (`read_hole`) when no event
    of its partition is at hand: what a table write asks of the current event is its
    message's topic and partition."""

    __slots__ = ("__weakref__", "message")  # faust keeps a weak reference to it

    def __init__(self, message: Any) -> None:
        self.message = message


async def fill_tails(guard: OffsetGuard, consumer: Any, bootstrap: Servers, topic: str,
                     handle: Callable[[Partition, list[Any]], Awaitable[None]]) -> int:
    """For an agent's timer: read the records faust fetched at the end of partitions of
    ``topic`` and never delivered (`OffsetGuard.tails`), await ``handle(partition,
    records)``, then count them as acked. Returns how many offsets it filled."""
    sync(guard, consumer, topic)
    filled = 0
    for partition, hole in guard.tails(consumer.fetched).items():
        await handle(partition, await read_hole(bootstrap, partition, hole))
        guard.filled(partition, hole[1])
        mark_acked(consumer, TP(*partition), range(*hole))
        filled += hole[1] - hole[0]
    return filled


def drop(consumer: Any, message: Any) -> None:
    """Leave a message faust delivered unacked for good, without holding faust up: it
    is never committed (the seek that ends a rebalance reads it again), and faust does
    not wait for its ack. ``message.acked`` makes faust's acks skip it; private."""
    message.acked = True
    consumer.unacked.discard(message)


def mark_acked(consumer: Any, tp: Any, offsets: range) -> None:
    """Count offsets that faust never delivered as acked (they were read and stepped
    another way), so that commits go past them; as faust's own ack does. Private."""
    index, acked = consumer._acked_index[tp], consumer._acked[tp]
    committed = consumer._committed_offset[tp]
    for offset in offsets:
        if (committed is None or offset >= committed) and offset not in index:
            index.add(offset)
            acked.append(offset)


class RewindingConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[Any, int]:
        # only the topics whose offsets faust commits (the agents' topics): table
        # changelogs have no committed offsets, and their recovery seeks them itself
        positions: dict[Partition, int] = {}
        committed = await self.call_thread(seek_to_committed, self._ensure_consumer(),
                                           self.app.topics.acks_enabled_for, positions)
        self.consumer.positions = positions  # a new dict at each seek: see OffsetGuard
        for partition in positions:  # what was fetched before the seek is read again
            self.consumer.fetched.pop(partition, None)
        return committed


class RewindingConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer with `seek_to_committed` and `commit_offset`.
    ``positions``: where each partition of the agents' topics was read from after the
    last seek to the committed offsets. ``fetched``: the highest offset faust fetched,
    by partition (the offsets `OffsetGuard.tails` knows exist)."""

    positions: dict[Partition, int] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetched: dict[Any, int] = {}

    async def getmany(self, timeout: float) -> Any:
        # faust's, noting what it fetched
        fetched = self.fetched
        async for tp, message in super().getmany(timeout):
            if message.offset > fetched.get(tp, -1):
                fetched[tp] = message.offset
            message.time_in = time.monotonic()  # arrival: `ArrivalMonitor` keeps it
            yield tp, message

    def _new_offset(self, tp: Any) -> int | None:
        # faust's own, but for its check of a hole at the head (see `commit_offset`)
        acked = self._acked[tp]
        if not acked:
            return None
        gaps = self._gap[tp]
        if gaps:  # offsets the topic does not have: count them as acked
            top = max(acked)
            spans = sorted(gaps.overlap(0, top), key=lambda span: span.begin)
            if spans:
                missing = [offset for span in spans for offset in range(span.begin, span.end)]
                acked.extend(missing)
                gaps.chop(0, max(missing[-1], top + 1))
        acked.sort()
        offset, covered = commit_offset(acked, self._committed_offset[tp])
        if offset is not None:
            self._acked_index[tp].difference_update(acked[:covered])
            del acked[:covered]
        return offset

    def _new_consumer_thread(self) -> RewindingConsumerThread:
        return RewindingConsumerThread(self, loop=self.loop, beacon=self.beacon)


class ArrivalMonitor(Monitor):
    """faust's monitor (the ``Monitor`` setting), but a message keeps the ``time_in``
    that `RewindingConsumer.getmany` gave it when fetched: faust's own stamps it when
    a stream takes it from its queue. Both clocks are ``time.monotonic``."""

    def on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        arrived = message.time_in
        super().on_message_in(tp, offset, message)
        if arrived is not None:
            message.time_in = arrived


def install_rewinding_consumer(app: faust.App) -> None:
    """Make ``app`` use `seek_to_committed` above; before the app starts."""
    if app._consumer is not None:  # faust makes its consumer once, on start
        raise RuntimeError("the app has its consumer already")
    transport = app.transport
    if not isinstance(transport, faust_aiokafka.Transport):
        raise TypeError(f"not faust's aiokafka transport: {type(transport).__name__}")
    transport.Consumer = RewindingConsumer


@contextlib.contextmanager
def current_event(event: Any) -> Iterator[None]:
    """Make ``event`` faust's current event, as ``async for event in stream`` does.

    Inside ``take_events()`` faust has no current event, and a table write needs one: it
    goes to the changelog partition of the current event. We only write keys of the
    trials on that event's partition. ``_current_event`` is private to faust.streams;
    faust-streaming is pinned below 0.16 for that reason.
    """
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class ConfirmedTable(faust.Table):
    """A faust ``Table`` whose changelog writes can be awaited. `unconfirmed` holds,
    for each write, the future of its changelog record (done once the broker has it;
    with ``producer_acks=-1``, for good) and what `send_changelog` was called with, so
    that a refused write can be sent again; `written` waits for them all.

    `write` sets many rows at once, for the worker's batches: faust's own path costs
    each row a future, a buffer hop, a serializer lookup, a send and a callback that
    writes an offset to the store (about 80 µs of the event loop each, most of a
    batch's time); `write` puts the rows in the local store and `send_rows` sends them
    as one produce batch per partition, then records the last offset once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.unconfirmed: list[tuple[asyncio.Future, tuple, dict]] = []
        self.queued: dict[int, list[tuple[bytes, bytes]]] = {}  # rows `write` took, unsent
        # produce batches sent and not yet confirmed: (future, partition, their rows)
        self.batches: list[tuple[asyncio.Future, int, list[tuple[bytes, bytes]]]] = []
        super().__init__(*args, **kwargs)

    def write(self, event: Any, rows: list[tuple[Any, Any]]) -> None:
        """``table[key] = value`` for each row, in the changelog partition of ``event``
        (a faust event): the local store has them now, the changelog once `send_rows`
        has sent them and `confirm_rows` has seen the broker take them."""
        store, partition = self.data, event.message.partition
        dumps_key, dumps_value = self.app.serializers.dumps_key, self.app.serializers.dumps_value
        encoded = [(dumps_key(self.key_type, key, serializer=self.key_serializer),
                    dumps_value(self.value_type, value, serializer=self.value_serializer))
                   for key, value in rows]  # as faust encodes a changelog record
        with current_event(event):  # the store writes to the event's partition
            if isinstance(store, SerializedStore):  # RocksDB: it keeps those bytes
                for key, value in encoded:
                    store._set(key, value)
            else:  # the memory store keeps keys and values as they are
                for key, value in rows:
                    store[key] = value
        self.queued.setdefault(partition, []).extend(encoded)

    async def send_rows(self) -> None:
        """Send the rows `write` took, as few produce batches as fit (each partition's
        rows in order, in batches of up to ``producer_max_batch_size``)."""
        while self.queued:
            partition, rows = next(iter(self.queued.items()))
            await self._send_batches(partition, rows)
            del self.queued[partition]

    async def _send_batches(self, partition: int, rows: list[tuple[bytes, bytes]]) -> None:
        producer = self.app.producer._ensure_producer()  # private: faust's aiokafka producer
        topic = self.changelog_topic.get_topic_name()
        start = 0
        while start < len(rows):
            batch, end = producer.create_batch(), start
            while end < len(rows) and batch.append(key=rows[end][0], value=rows[end][1],
                                                   timestamp=None) is not None:
                end += 1
            end = max(end, start + 1)  # aiokafka always takes a batch's first record
            batch.close()  # ours alone: no other send joins it (see `confirm_rows`)
            while True:
                try:
                    future = await producer.send_batch(batch, topic, partition=partition)
                    break
                except KafkaError as exc:
                    log.warning("could not send %d table rows, trying again: %s",
                                end - start, exc)
                    await asyncio.sleep(1.0)
            self.batches.append((future, partition, rows[start:end]))
            start = end

    async def confirm_rows(self) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
        """Wait for the batches sent; record each partition's last offset in the store
        (what faust does per record, so that a restart reads the changelog on from
        there). Returns the rows to send again, by partition: those of a batch the
        broker refused, and of every later batch of its partition, so that the
        changelog keeps the order of the writes (a checkpoint before its subject rows)."""
        batches, self.batches = self.batches, []
        refused, broken = [], set()
        topic = self.changelog_topic.get_topic_name()
        for future, partition, rows in batches:
            try:
                metadata = await future
            except KafkaError as exc:
                log.warning("the broker did not take %d table rows, sending them again: %s",
                            len(rows), exc)
                broken.add(partition)
            if partition in broken:
                refused.append((partition, rows))
            else:
                self.data.set_persisted_offset(TopicPartition(topic, partition),
                                               metadata.offset + len(rows) - 1)
        return refused

    async def resend(self, refused: list[tuple[int, list[tuple[bytes, bytes]]]]) -> None:
        for partition, rows in refused:
            await self._send_batches(partition, rows)

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        # every write (set, delete) of the table made the faust way goes through here
        future = super().send_changelog(*args, **kwargs)
        self.unconfirmed.append((future, args, kwargs))
        return future

    async def written(self) -> None:
        """Wait until the broker has every write made so far; raises if one failed."""
        while self.unconfirmed:
            await self.unconfirmed.pop(0)[0]

    @classmethod
    def add_to(cls, app: faust.App, name: str, **kwargs: Any) -> ConfirmedTable:
        """``app.Table(name, **kwargs)``, of this class."""
        return app.tables.add(cls(app, name=name, beacon=app.tables.beacon, **kwargs))
