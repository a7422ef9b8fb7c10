"""Two small extensions of faust that the worker needs to lose nothing and send nothing
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
- `ConfirmedTable`: a faust table that can wait until the broker has its writes. A
  table write only joins faust's producer buffer, and faust drops the future of its
  changelog record: a worker killed before the buffer drained loses the write (the
  worker that takes an e-mail log over then e-mails the alert again), and a write the
  broker refused is lost while the events that made it are acked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

__all__ = ["ConfirmedTable", "install_rewinding_consumer", "seek_to_committed"]


async def seek_to_committed(consumer: AIOKafkaConsumer, rewinds: Callable[[str], bool]
                            ) -> Mapping[TopicPartition, int | None]:
    """Seek every assigned partition to its committed offset, as aiokafka does, and a
    partition of a topic ``rewinds`` accepts that has no committed offset (None, or 0,
    which aiokafka does not seek to either) to its beginning. Returns the committed
    offsets, as aiokafka does."""
    committed = await consumer.seek_to_committed()
    unset = [tp for tp, offset in committed.items() if not offset and rewinds(tp.topic)]
    if unset:
        await consumer.seek_to_beginning(*unset)
    return committed


class RewindingConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[Any, int]:
        # only the topics whose offsets faust commits (the agents' topics): table
        # changelogs have no committed offsets, and their recovery seeks them itself
        return await self.call_thread(seek_to_committed, self._ensure_consumer(),
                                      self.app.topics.acks_enabled_for)


class RewindingConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> RewindingConsumerThread:
        return RewindingConsumerThread(self, loop=self.loop, beacon=self.beacon)


def install_rewinding_consumer(app: faust.App) -> None:
    """Make ``app`` use `seek_to_committed` above; before the app starts."""
    if app._consumer is not None:  # faust makes its consumer once, on start
        raise RuntimeError("the app has its consumer already")
    transport = app.transport
    if not isinstance(transport, faust_aiokafka.Transport):
        raise TypeError(f"not faust's aiokafka transport: {type(transport).__name__}")
    transport.Consumer = RewindingConsumer


class ConfirmedTable(faust.Table):
    """A faust ``Table`` whose changelog writes can be awaited. `unconfirmed` holds,
    for each write, the future of its changelog record (done once the broker has it;
    with ``producer_acks=-1``, for good) and what `send_changelog` was called with, so
    that a refused write can be sent again; `written` waits for them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.unconfirmed: list[tuple[asyncio.Future, tuple, dict]] = []
        super().__init__(*args, **kwargs)

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        # every write (set, delete) of the table goes through here
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
