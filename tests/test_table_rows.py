"""`ConfirmedTable` without a broker: what `write` puts in the store and queues, and
what `confirm_rows` does when the broker refuses a produce batch (a failure the tests
cannot cause on a real broker without losing its memory storage)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import RecordMetadata

from monitor.faust_ext import Carrier, current_event
from monitor.runner import worker_app
from monitor.settings import Settings


def test_a_refused_batch_and_the_later_ones_of_its_partition_go_again(
        tmp_path: Path) -> None:
    async def run() -> None:
        app = worker_app(Settings(broker="kafka://127.0.0.1:9", state_dir=tmp_path,
                                  store="memory://"), {})
        table = app.tables["state"]
        topic = table.changelog_topic.get_topic_name()
        recorded: list[tuple[TopicPartition, int]] = []
        table.data.set_persisted_offset = lambda tp, offset: recorded.append((tp, offset))
        loop = asyncio.get_running_loop()

        def took(partition: int, offset: int) -> asyncio.Future:
            future = loop.create_future()
            future.set_result(RecordMetadata(topic, partition, TopicPartition(topic, partition),
                                             offset, -1, 0, 0))
            return future

        refused = loop.create_future()
        refused.set_exception(KafkaTimeoutError())
        first, second = [(b"a", b"1"), (b"b", b"2")], [(b"c", b"3")]
        not_taken, after_it = [(b"d", b"4")], [(b"e", b"5")]
        table.batches = [(took(0, 40), 0, first), (refused, 2, not_taken),
                         (took(2, 7), 2, after_it), (took(0, 42), 0, second)]
        # the partition's later batch goes again too, after the refused one: the
        # changelog keeps the order of the writes
        assert await table.confirm_rows() == [(2, not_taken), (2, after_it)]
        assert recorded == [(TopicPartition(topic, 0), 41), (TopicPartition(topic, 0), 42)]
        assert table.batches == []

    asyncio.run(run())


def _event(partition: int) -> Carrier:
    """What a table write needs of faust's event: its message's topic and partition."""
    return Carrier(SimpleNamespace(topic="safety.events", partition=partition))


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_written_rows_are_in_the_store_and_queued_as_faust_encodes_them(
        tmp_path: Path, store: str) -> None:
    app = worker_app(Settings(broker="kafka://127.0.0.1:9", state_dir=tmp_path,
                              store=store), {})
    table = app.tables["state"]
    table.write(_event(3), [("t\x1fT1", b"{}"), ("s\x1fT1\x1fS1", b"[1]")])
    assert table["s\x1fT1\x1fS1"] == b"[1]"  # read back through the store
    assert table.queued == {3: [(b'"t\\u001fT1"', b"{}"), (b'"s\\u001fT1\\u001fS1"', b"[1]")]}


def test_a_write_made_the_faust_way_is_kept_to_be_confirmed(tmp_path: Path) -> None:
    """The e-mail log writes one key at a time through faust (`table[key] = value`);
    `written` can wait for those writes only if each one's future is kept."""
    async def run() -> None:
        app = worker_app(Settings(broker="kafka://127.0.0.1:9", state_dir=tmp_path,
                                  store="memory://"), {})
        table = app.tables["state"]
        with current_event(_event(1)):
            table["s\x1fT1\x1fS1"] = b"[1]"
        assert len(table.unconfirmed) == 1
        future, args, _kwargs = table.unconfirmed[0]
        assert args[:3] == (1, "s\x1fT1\x1fS1", b"[1]")  # partition, key, value: to resend
        future.cancel()

    asyncio.run(run())
