"""`monitor.faust_ext` against the session's real broker (tansu on loopback)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from monitor.faust_ext import (
    Carrier,
    OffsetGuard,
    RewindingConsumerThread,
    fetch_range,
    install_rewinding_consumer,
    read_since,
    seek_to_committed,
    undelivered,
)
from monitor.runner import worker_app
from monitor.settings import Settings


async def produce(bootstrap: str, topic: str, count: int) -> None:
    """``count`` records (b"0", b"1", ...) to partition 0 of ``topic``, one at a time."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for n in range(count):
            await producer.send_and_wait(topic, b"%d" % n, partition=0)
    finally:
        await producer.stop()


async def offsets_read(consumer: AIOKafkaConsumer, tp: TopicPartition) -> list[int]:
    """The offsets ``consumer`` reads from ``tp`` until it has nothing more."""
    out: list[int] = []
    while batch := await consumer.getmany(tp, timeout_ms=1500):
        out.extend(record.offset for record in batch.get(tp, []))
    return out


def test_partitions_without_a_commit_are_read_again_from_the_beginning(
        kafka_bootstrap_servers: str) -> None:
    """After records were read, aiokafka's seek to the committed offsets leaves a
    partition with no commit where it was (its records are never read again: what faust
    dropped is lost); `seek_to_committed` takes it back to its beginning, a committed
    partition to its commit, and leaves the partitions of other topics alone."""
    topic, other = f"t-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers)
        await producer.start()
        try:
            for name in (topic, other):
                for partition in (0, 1):
                    for n in range(5):
                        await producer.send_and_wait(name, b"%d" % n, partition=partition)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, other, bootstrap_servers=kafka_bootstrap_servers,
                                    group_id=f"g-{topic}", auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            uncommitted, committed = TopicPartition(topic, 0), TopicPartition(topic, 1)
            untouched = TopicPartition(other, 0)
            await consumer.commit({committed: OffsetAndMetadata(3, "")})
            for tp in (uncommitted, committed, untouched):
                await offsets_read(consumer, tp)
            assert (await consumer.seek_to_committed())[uncommitted] is None
            assert await offsets_read(consumer, uncommitted) == []  # aiokafka: no seek
            assert await offsets_read(consumer, committed) == [3, 4]

            offsets = await seek_to_committed(consumer, lambda name: name == topic)
            assert offsets[uncommitted] is None and offsets[committed] == 3
            assert await offsets_read(consumer, uncommitted) == [0, 1, 2, 3, 4]
            assert await offsets_read(consumer, committed) == [3, 4]
            assert await offsets_read(consumer, untouched) == []
        finally:
            await consumer.stop()

    asyncio.run(run())


def test_the_worker_app_uses_the_rewinding_consumer(tmp_path: Path) -> None:
    app = worker_app(Settings(broker="kafka://127.0.0.1:9", state_dir=tmp_path), {})
    assert isinstance(app.consumer._thread, RewindingConsumerThread)
    with pytest.raises(RuntimeError, match="has its consumer already"):
        install_rewinding_consumer(app)  # too late: faust would not use it


async def test_fetch_range_reads_exactly_the_missing_offsets(kafka_bootstrap_servers: str
                                                             ) -> None:
    topic = f"h-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers, linger_ms=50)
    await producer.start()
    try:
        sent = [await producer.send(topic, b"%d" % n, partition=0) for n in range(10)]
        await asyncio.gather(*sent)  # one produce batch: the range starts inside it
    finally:
        await producer.stop()
    records = await fetch_range(kafka_bootstrap_servers, topic, 0, 3, 7)
    assert [(r.offset, r.value) for r in records] == [(n, b"%d" % n) for n in range(3, 7)]


async def test_read_since_reads_each_partition_from_its_start_to_its_end(
        kafka_bootstrap_servers: str) -> None:
    """The alert transitions sent since a checkpoint: records of two partitions, the
    last ones in one produce batch (where tansu may give an end short of the last
    record); each partition read from its own start, to its real end."""
    topic = f"r-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers, linger_ms=50)
    await producer.start()
    try:
        for partition in (0, 1):
            await producer.send_and_wait(topic, b"first-%d" % partition, partition=partition)
            sent = [await producer.send(topic, b"v-%d-%d" % (partition, n), partition=partition)
                    for n in range(6)]
            await asyncio.gather(*sent)
        await producer.send_and_wait(topic, b"other", partition=2)
    finally:
        await producer.stop()
    picked, ends = await read_since(kafka_bootstrap_servers, topic, {0: 3, 2: 1},
                                    lambda record: record.value if record.offset % 2 else None)
    # partition 1 from its beginning (no start given), partition 2 from past its record
    assert picked == {b"v-0-2", b"v-0-4", b"v-1-0", b"v-1-2", b"v-1-4"}
    assert ends[2] == 1 and all(1 <= ends[p] <= 7 for p in (0, 1))
    assert all(end == 0 for p, end in ends.items() if p > 2)  # the broker's other ones
    assert await read_since(kafka_bootstrap_servers, f"none-{topic}", {}, bytes) == (set(), {})


async def test_a_hole_is_read_again_once_the_broker_answers(kafka_bootstrap_servers: str,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The broker refuses the first read of the hole (here: nothing listens on the
    port); the agent waits and tries again rather than skip the offsets."""
    from monitor.embedded import free_port

    topic = f"g-{uuid.uuid4().hex[:8]}"
    await produce(kafka_bootstrap_servers, topic, 5)
    tp = TopicPartition(topic, 0)
    positions = {(topic, 0): 1}
    consumer = SimpleNamespace(positions=positions)
    guard = OffsetGuard()
    message = SimpleNamespace(topic=topic, partition=0, offset=4, tp=tp)
    servers = iter([f"127.0.0.1:{free_port()}", kafka_bootstrap_servers])
    real_fetch = fetch_range

    async def fetch(_bootstrap: str, *args: object) -> list:
        return await real_fetch(next(servers), *args, timeout=5)

    monkeypatch.setattr("monitor.faust_ext.fetch_range", fetch)
    records, offsets = await undelivered(guard, consumer, kafka_bootstrap_servers, message)
    assert [r.offset for r in records] == [1, 2, 3] and offsets == range(1, 4)
    assert guard.check(tp, 5) is None  # and the guard goes on after the message


def _event(partition: int) -> Carrier:
    """What a table write needs of faust's event: its message's topic and partition."""
    return Carrier(SimpleNamespace(topic="safety.events", partition=partition))


async def test_table_rows_go_out_as_produce_batches_in_order(kafka_broker: str,
                                                             kafka_bootstrap_servers: str,
                                                             tmp_path: Path) -> None:
    """`ConfirmedTable.write`: the rows are in the local store at once, and in the
    changelog partition of their event, in order, once confirmed, in as many produce
    batches as the batch size needs; the store records the last offset (where a
    restart reads the changelog on from)."""
    settings = Settings(broker=kafka_broker, state_dir=tmp_path,
                        app_id=f"rows-{uuid.uuid4().hex[:8]}")
    app = worker_app(settings, {})
    app.conf.producer_max_batch_size = 4096  # ~30 rows a batch: several batches
    table = app.tables["state"]
    rows = [(f"s\x1fT\x1f{n:03d}", b"x" * 100 + b"%d" % n) for n in range(200)]
    await app.producer.start()
    try:
        table.write(_event(1), rows[:120])
        table.write(_event(1), rows[120:])
        assert table[rows[5][0]] == rows[5][1]  # the local store has them already
        await table.send_rows()
        assert len(table.batches) > 3
        assert await table.confirm_rows() == []
    finally:
        await app.producer.stop()
    changelog = TopicPartition(table.changelog_topic.get_topic_name(), 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([changelog])
        await consumer.seek_to_beginning(changelog)
        records = []
        while batch := await consumer.getmany(changelog, timeout_ms=1500):
            records.extend(batch[changelog])
    finally:
        await consumer.stop()
    # keys as faust encodes a table's keys (JSON), so that its recovery reads them
    assert [(json.loads(r.key), r.value) for r in records] == rows
    assert table.data.persisted_offset(changelog) == records[-1].offset


async def test_a_hole_at_the_end_of_a_partition_is_handled_once_seen_twice(
        kafka_bootstrap_servers: str) -> None:
    """`fill_tails`, as the agents' timers run it: faust fetched offsets 2-4 and never
    delivered them, and no later message shows the hole. (faust's consumer is stood in
    for: making faust drop a message on demand is not possible from outside.)"""
    from faust.types import TP

    from monitor.faust_ext import fill_tails

    topic = f"e-{uuid.uuid4().hex[:8]}"
    await produce(kafka_bootstrap_servers, topic, 5)
    tp = TP(topic, 0)
    consumer = SimpleNamespace(positions={(topic, 0): 2}, fetched={(topic, 0): 4},
                               _acked_index={tp: set()}, _acked={tp: []},
                               _committed_offset={tp: 2})
    guard, handled = OffsetGuard(), []

    async def handle(partition: tuple[str, int], records: list) -> None:
        handled.append((partition, [r.value for r in records]))

    assert await fill_tails(guard, consumer, kafka_bootstrap_servers, topic, handle) == 0
    assert handled == []  # seen once: it may be a message on its way to the agent
    assert await fill_tails(guard, consumer, kafka_bootstrap_servers, topic, handle) == 3
    assert handled == [((topic, 0), [b"2", b"3", b"4"])]
    assert consumer._acked[tp] == [2, 3, 4]  # faust may commit past them now
    assert guard.check(tp, 5) is None  # the guard goes on after them
    assert await fill_tails(guard, consumer, kafka_bootstrap_servers, topic, handle) == 0
