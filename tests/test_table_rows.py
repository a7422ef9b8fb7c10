"""`ConfirmedTable.confirm_rows` when the broker refuses a produce batch (a failure the
tests cannot cause on a real broker without losing its memory storage)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import RecordMetadata

from monitor.runner import worker_app
from monitor.settings import Settings


def test_a_refused_batch_is_returned_to_send_again_and_no_offset_is_recorded_for_it(
        tmp_path: Path) -> None:
    async def run() -> None:
        app = worker_app(Settings(broker="kafka://127.0.0.1:9", state_dir=tmp_path,
                                  store="memory://"), {})
        table = app.tables["state"]
        topic = table.changelog_topic.get_topic_name()
        recorded: list[tuple[TopicPartition, int]] = []
        table.data.set_persisted_offset = lambda tp, offset: recorded.append((tp, offset))
        loop = asyncio.get_running_loop()
        taken, refused = loop.create_future(), loop.create_future()
        taken.set_result(RecordMetadata(topic, 0, TopicPartition(topic, 0), 40, -1, 0, 0))
        refused.set_exception(KafkaTimeoutError())
        rows_taken, rows_refused = [(b"a", b"1"), (b"b", b"2")], [(b"c", b"3")]
        table.batches = [(taken, 0, rows_taken), (refused, 2, rows_refused)]
        assert await table.confirm_rows() == [(2, rows_refused)]
        assert recorded == [(TopicPartition(topic, 0), 41)]  # the batch's last offset
        assert table.batches == []

    asyncio.run(run())
