"""Shared fixtures: a real Kafka-compatible broker and a real SMTP server, on loopback.

- `kafka_broker`: one tansu broker per test session; yields its `kafka://127.0.0.1:PORT`
  URL. Topics outlive a test, so each test uses its own topic and group names.
- `kafka_bootstrap_servers`: the same broker as aiokafka wants it, `127.0.0.1:PORT`.
- `smtp_server`: a fresh `LocalMailbox` per test, storing `.eml` files under `tmp_path`;
  `smtp_server.stop()` / `.start()` simulate an outage on the same port, and
  `smtp_server.messages()` returns what arrived.
- `free_port`: a TCP port free on loopback (call `monitor.embedded.free_port()` for more).
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor import embedded


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    with embedded.EmbeddedBroker() as broker:
        yield broker.url


@pytest.fixture(scope="session")
def kafka_bootstrap_servers(kafka_broker: str) -> str:
    return kafka_broker.removeprefix("kafka://")


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[embedded.LocalMailbox]:
    with embedded.LocalMailbox(tmp_path / "mailbox") as mailbox:
        yield mailbox


@pytest.fixture
def free_port() -> int:
    return embedded.free_port()
