"""`monitor.faust_ext` against the session's real broker (tansu on loopback)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from monitor.faust_ext import (
    RewindingConsumerThread,
    install_rewinding_consumer,
    seek_to_committed,
)
from monitor.runner import worker_app
from monitor.settings import Settings


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
