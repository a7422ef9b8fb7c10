"""``publish``: send a JSON-lines log to the events topic, keyed by ``trial_id``.

Every line is sent, unreadable ones too (without a key): the worker dead-letters them
with a reason, so nothing is dropped on the way. Sends are batched by the producer
(linger) and awaited in windows, so a large log goes at the broker's pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import MessageSizeTooLargeError, TopicAlreadyExistsError

from .settings import broker_servers, host_port

WINDOW = 5000  # sends in flight before we wait for the broker


def bootstrap(url: str) -> list[str]:
    """aiokafka's bootstrap servers for a ``kafka://`` URL: every broker it names."""
    return [host_port(host, port) for host, port in broker_servers(url)]


def trial_key(line: bytes) -> bytes | None:
    """The partition key of a line: its trial_id, or None when it has none."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    trial = doc.get("trial_id") if isinstance(doc, dict) else None
    return trial.encode() if isinstance(trial, str) and trial else None


async def ensure_topic(url: str, topic: str, partitions: int) -> None:
    """Create the topic with ``partitions`` partitions unless it exists."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap(url))
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            await admin.create_topics([NewTopic(topic, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def publish(url: str, topic: str, lines: Iterable[bytes], partitions: int,
                  progress: Callable[[int], None] | None = None,
                  too_large: list[tuple[int, int]] | None = None) -> int:
    """Send every non-blank line; return how many were sent (all acknowledged). A line
    over the producer's message limit (1 MiB) is not sent: with ``too_large`` given, its
    (line number, bytes) goes there and the rest is sent; without, it raises."""
    await ensure_topic(url, topic, partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(url), acks="all", linger_ms=20,
                                max_batch_size=1 << 20, request_timeout_ms=30000)
    await producer.start()
    sent, pending = 0, []
    try:
        for number, line in enumerate(lines, 1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                pending.append(await producer.send(topic, value=line, key=trial_key(line)))
            except MessageSizeTooLargeError:
                if too_large is None:
                    raise
                too_large.append((number, len(line)))
                continue
            sent += 1
            if len(pending) >= WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
                if progress:
                    progress(sent)
        await asyncio.gather(*pending)
        if progress:
            progress(sent)
    finally:
        await producer.stop()
    return sent
