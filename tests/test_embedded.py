"""The embedded broker and mailbox, exercised for real: tansu, aiokafka, aiosmtplib."""

import asyncio
import os
import uuid
from email.message import EmailMessage

import aiosmtplib
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from monitor.embedded import EmbeddedBroker, LocalMailbox, free_port, kafka_metadata_probe


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_broker_answers_kafka_metadata(kafka_broker: str) -> None:
    host, port = kafka_broker.removeprefix("kafka://").split(":")
    assert kafka_metadata_probe(host, int(port))


async def test_a_message_round_trips_through_the_broker(kafka_bootstrap_servers: str) -> None:
    topic = unique("round-trip")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"type": "infusion"}', key=b"ISC.19.29")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap_servers,
        group_id=unique("round-trip-group"),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"ISC.19.29", b'{"type": "infusion"}')


async def test_broker_started_in_an_event_loop_stops_on_exit() -> None:
    async with EmbeddedBroker() as broker:
        assert broker.url == f"kafka://127.0.0.1:{broker.port}"
        assert kafka_metadata_probe(broker.host, broker.port)
    assert broker.pid is None
    assert not kafka_metadata_probe(broker.host, broker.port)


async def test_a_broker_cancelled_while_it_starts_is_stopped() -> None:
    """tansu runs in a session of its own, where no Ctrl-C reaches it: whoever stops
    waiting for it to start stops it."""
    broker = EmbeddedBroker()
    starting = asyncio.create_task(broker.start_async())
    await asyncio.sleep(0)  # spawned, and waiting for its first answer
    pid = broker.pid
    assert pid is not None
    starting.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert broker.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped, and reaped
    finally:
        broker.stop()


def alert_email(to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "monitor@example.org"
    message["To"] = to
    message["Subject"] = "[HALT] ISC.19.29 related-sae breached"
    message.set_content("2 related SAEs, threshold 2.\n")
    return message


async def test_mailbox_stores_a_sent_message_as_eml(smtp_server: LocalMailbox) -> None:
    await aiosmtplib.send(
        alert_email("dsmb@example.org"),
        hostname=smtp_server.host,
        port=smtp_server.port,
        recipients=["dsmb@example.org", "bcc-safety@example.org"],
    )

    [stored] = smtp_server.message_files()
    [message] = smtp_server.messages()
    assert stored.suffix == ".eml"
    assert message["Subject"] == "[HALT] ISC.19.29 related-sae breached"
    assert message.get_content() == "2 related SAEs, threshold 2.\n"
    assert message["X-RcptTo"] == "dsmb@example.org, bcc-safety@example.org"


async def test_mailbox_outage_refuses_mail_then_recovers_on_the_same_port(
    smtp_server: LocalMailbox,
) -> None:
    port = smtp_server.port
    smtp_server.stop()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await aiosmtplib.send(alert_email("dsmb@example.org"), hostname="127.0.0.1", port=port)

    smtp_server.start()
    await aiosmtplib.send(alert_email("dsmb@example.org"), hostname="127.0.0.1", port=port)
    assert smtp_server.port == port
    assert len(smtp_server.messages()) == 1


async def test_publish_takes_a_url_of_several_brokers(kafka_broker: str,
                                                      kafka_bootstrap_servers: str) -> None:
    """``kafka://a:1;b:2``: the clients try each broker; a dead first one is passed over."""
    from monitor.publish import publish

    topic = unique("several")
    url = f"kafka://127.0.0.1:{free_port()};{kafka_broker}"
    assert await publish(url, topic, [b'{"trial_id": "T.1"}', b'{"trial_id": "T.2"}'], 1) == 2
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap_servers,
                                group_id=unique("several-group"), auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = [await consumer.getone(), await consumer.getone()]
    finally:
        await consumer.stop()
    assert [r.key for r in records] == [b"T.1", b"T.2"]


def test_publish_sends_what_fits_and_names_each_line_too_large(
        kafka_broker: str, kafka_bootstrap_servers: str, tmp_path, monkeypatch, capsys) -> None:
    import asyncio

    from monitor.cli import main

    topic = unique("large")
    monkeypatch.setenv("MONITOR_EVENTS_TOPIC", topic)
    log = tmp_path / "events.jsonl"
    log.write_bytes(b'{"trial_id": "T.1", "n": 1}\n{"trial_id": "T.1", "pad": "'
                    + b"x" * 1_200_000 + b'"}\n{"trial_id": "T.1", "n": 3}\n')
    assert main(["publish", "--broker", kafka_broker, str(log)]) == 1
    err = capsys.readouterr().err
    assert "published 2 events" in err and "line 2 not sent: 1,200," in err

    async def read() -> list[bytes]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap_servers,
                                    group_id=unique("large-group"),
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            return [(await consumer.getone()).value, (await consumer.getone()).value]
        finally:
            await consumer.stop()

    assert asyncio.run(read()) == [b'{"trial_id": "T.1", "n": 1}', b'{"trial_id": "T.1", "n": 3}']
    dead = free_port()
    assert main(["publish", "--broker", f"kafka://127.0.0.1:{dead}", str(log)]) == 1
    assert f"no broker answers (127.0.0.1:{dead}: Connection refused)" in capsys.readouterr().err
