"""The stream worker against a real Kafka-compatible broker (tansu on loopback).

Each test starts real `safety-monitor worker` processes and compares what they hold
(GET /status) and what they emit (the alerts topic) with `replay` of the same log.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from monitor.publish import ensure_topic
from tests.integration.workers import (
    ROOT,
    Topics,
    Worker,
    accepted,
    alerts_on,
    comparable,
    expected,
    read_topic,
    send,
    transitions,
    wait_for,
)


def generator():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("generate", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def awkward_log(trials: int, seed: int) -> list[bytes]:
    """Generated trials plus what streams really bring: follow-ups before the version
    they follow, redelivered duplicates, and broken lines."""
    lines = list(generator().lines(trials, 20, seed, bad_lines=2))
    rng = random.Random(seed)
    by_ae: dict[tuple, int] = {}
    for index, line in enumerate(lines):
        doc = orjson.loads(line) if line.startswith(b"{") and line.endswith(b"}") else {}
        if doc.get("type") == "adverse_event":
            if doc["version"] == 2 and (doc["ae_id"], 1) in by_ae:
                first = by_ae[(doc["ae_id"], 1)]
                lines[first], lines[index] = lines[index], lines[first]  # v2 arrives first
            by_ae[(doc["ae_id"], doc["version"])] = index
    for _ in range(10):
        lines.insert(rng.randrange(len(lines)), rng.choice(lines))
    lines[rng.randrange(len(lines)):0] = [b"{not json", b'{"type": "nonsense"}']
    return lines


def settled(worker_list: list[Worker], total: int) -> dict | None:
    merged: dict = {}
    for worker in worker_list:
        merged.update(worker.status())
    return merged if accepted(merged) >= total else None


def explain_shortfall(worker_list: list[Worker], lines: list[bytes]) -> None:
    """Print, for a failed wait, which trials the workers hold short of replay."""
    got: dict = {}
    for worker in worker_list:
        got.update(worker.status())
        print("worker", worker.port, "readyz", worker.get("/readyz"), "log", worker.log_path)
    want, _ = expected(lines)
    print("accepted", accepted(got), "of", events_in(lines))
    for trial in want:
        if trial not in got or got[trial]["events"] != want[trial]["events"]:
            print(trial, got.get(trial, {}).get("events"), want[trial]["events"])


def events_in(lines: list[bytes]) -> int:
    """How many lines are valid events (what the workers accept or count as duplicates)."""
    from monitor.engine.events import Rejection, parse_event

    return sum(type(parse_event(line)) is not Rejection for line in lines)


@pytest.fixture
def topics() -> Topics:
    return Topics()


def test_stream_and_replay_agree(kafka_broker: str, topics: Topics, tmp_path: Path) -> None:
    lines = awkward_log(trials=3, seed=11)
    worker = Worker(kafka_broker, topics, tmp_path / "state").start()
    try:
        worker.wait_ready()
        assert send(kafka_broker, topics.events, lines) == len(lines)
        status = wait_for(lambda: settled([worker], events_in(lines)), 90, "all events")
        report, alerts = expected(lines)
        assert comparable(status) == comparable(report)
        assert transitions(alerts_on(kafka_broker, topics.alerts)) == transitions(alerts)
        dead = [orjson.loads(m.value) for m in read_topic(kafka_broker, topics.dead)]
        assert len(dead) == len(lines) - events_in(lines) >= 4
        assert all(d["reason"] and "offset" in d and d["raw"] is not None for d in dead)
    finally:
        worker.stop()


def test_crash_recovery(kafka_broker: str, topics: Topics, tmp_path: Path) -> None:
    lines = awkward_log(trials=12, seed=12)
    total = events_in(lines)
    first = Worker(kafka_broker, topics, tmp_path / "state").start()
    try:
        first.wait_ready()
        send(kafka_broker, topics.events, lines)
        wait_for(lambda: 0 < accepted(first.status()) < total * 0.8 or None, 60, "some progress")
        first.kill()
        killed_at = time.monotonic()
        done_before = accepted(first.status())  # 0: it is dead; keep for the record
        second = Worker(kafka_broker, topics, tmp_path / "state").start()
        second.wait_ready(90)
        consuming = wait_for(lambda: accepted(second.status()) > 0 and time.monotonic(), 60,
                             "the restarted worker consuming")
        restart_seconds = consuming - killed_at
        print(f"restart after SIGKILL: consuming again after {restart_seconds:.1f} s")
        assert restart_seconds < 30
        try:
            status = wait_for(lambda: settled([second], total), 120, "all events after restart")
        except AssertionError:
            explain_shortfall([second], lines)
            raise
        report, alerts = expected(lines)
        assert comparable(status) == comparable(report)
        emitted = alerts_on(kafka_broker, topics.alerts)
        keys = [a["key"] for a in emitted]
        assert len(keys) == len(set(keys)), "an alert transition was emitted twice"
        assert {a["key"] for a in alerts} == set(keys)
        assert done_before == 0
    finally:
        first.kill()
        if "second" in locals():
            second.stop()


def test_alerts_a_dead_worker_sent_before_its_checkpoint_are_not_sent_again(
        kafka_broker: str, topics: Topics, tmp_path: Path) -> None:
    """The state a worker leaves when SIGKILL falls after a batch's alerts reached the
    broker and before its checkpoint did: the alerts topic holds them, the table does
    not know of them. The next worker steps the batch's events again and decides the
    same transitions; it must send none of them twice."""
    lines = awkward_log(trials=3, seed=14)
    report, alerts = expected(lines)
    already = alerts[: len(alerts) // 2]
    assert already
    asyncio.run(ensure_topic(kafka_broker, topics.alerts, 4))
    asyncio.run(publish_alerts(kafka_broker, topics.alerts, already))
    worker = Worker(kafka_broker, topics, tmp_path / "state").start()
    try:
        worker.wait_ready()
        send(kafka_broker, topics.events, lines)
        status = wait_for(lambda: settled([worker], events_in(lines)), 90, "all events")
        assert comparable(status) == comparable(report)
        keys = [a["key"] for a in alerts_on(kafka_broker, topics.alerts)]
        assert sorted(keys) == sorted(a["key"] for a in alerts)  # each one once
    finally:
        worker.stop()


async def publish_alerts(broker: str, topic: str, alerts: list[dict]) -> None:
    """Alert messages as the worker sends them: key the alert id, value the alert."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.removeprefix("kafka://"))
    await producer.start()
    try:
        for alert in alerts:
            await producer.send_and_wait(topic, orjson.dumps(alert), key=alert["id"].encode())
    finally:
        await producer.stop()


def test_scale_out_and_take_over(kafka_broker: str, topics: Topics, tmp_path: Path) -> None:
    lines = awkward_log(trials=8, seed=13)
    half = len(lines) // 2
    workers = [Worker(kafka_broker, topics, tmp_path / f"state-{n}").start() for n in (1, 2)]
    try:
        for worker in workers:
            worker.wait_ready(90)
        send(kafka_broker, topics.events, lines[:half])
        wait_for(lambda: settled(workers, events_in(lines[:half])), 240, "first half")
        held = [set(w.status()) for w in workers]
        assert held[0] and held[1] and not held[0] & held[1], held  # both work, no overlap
        workers[0].kill()
        send(kafka_broker, topics.events, lines[half:])
        try:
            status = wait_for(lambda: settled(workers[1:], events_in(lines)), 240, "take-over")
        except AssertionError:
            explain_shortfall(workers[1:], lines)
            raise
        report, alerts = expected(lines)
        assert comparable(status) == comparable(report)
        emitted = alerts_on(kafka_broker, topics.alerts)
        assert {a["key"] for a in emitted} == {a["key"] for a in alerts}
        assert len(emitted) == len({a["key"] for a in emitted})
    finally:
        for worker in workers:
            worker.stop()


def test_latency_runs_from_a_message_s_arrival(kafka_broker: str, topics: Topics,
                                               tmp_path: Path) -> None:
    """safety_processing_latency_seconds runs from when the worker fetched a message: it
    includes the wait for its batch to fill (batches of two, a message sent two seconds
    before the next waits that long) and the wait in faust's queue behind a backlog."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    sample = (ROOT / "examples" / "isc-19-29" / "events.jsonl").read_bytes().splitlines()
    worker = Worker(kafka_broker, topics, tmp_path / "state", MONITOR_BATCH_SIZE="2",
                    MONITOR_BATCH_WITHIN="600").start()

    def latency() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics") as answer:
            body = answer.read().decode()
        return {s.labels.get("le", s.name): s.value for family in
                text_string_to_metric_families(body) for s in family.samples
                if s.name.startswith("safety_processing_latency_seconds")}

    try:
        worker.wait_ready()
        for line in sample[:3]:  # {1, 2} make a batch, or (a timeout cut in) {1}, {2, 3}
            send(kafka_broker, topics.events, [line])
            time.sleep(2)
        wait_for(lambda: accepted(worker.status()) >= 2, 60, "a batch")
        waited = latency()
        assert waited["1.0"] < waited["safety_processing_latency_seconds_count"] >= 2
        backlog = sample * 2  # fetched at once, stepped two by two
        send(kafka_broker, topics.events, backlog)
        wait_for(lambda: accepted(worker.status()) >= 2 + events_in(backlog), 120, "the backlog")
        queued = latency()
    finally:
        worker.stop()
    after = queued["safety_processing_latency_seconds_count"] - waited[
        "safety_processing_latency_seconds_count"]
    assert after >= events_in(backlog)
    # most of the backlog waited behind the messages ahead of it
    assert queued["safety_processing_latency_seconds_count"] - queued["0.1"] > after / 2
