"""The worker's write protocol survives a crash at any point (no broker needed).

`Pipeline.plan` says what a batch writes and sends, in order; `monitor.stream.flush`
carries it out against faust. Here the same plan is carried out against a dict (the
table) and a list (the alerts topic), and the worker "crashes" after any prefix of
it: a new pipeline loads the table, reads the alerts topic from where the checkpoints
say (`alert_starts`), sends what `load` returns, and the broker redelivers the batch.
The final state and the alerts must be replay's, each alert sent once, wherever the
crash fell (also after a batch's alerts were sent and before its checkpoint).
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import NamedTuple

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine.report import trial_report
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir
from monitor.settings import Settings
from monitor.stream import ENDS, JOURNAL_ROWS, Batch, Pipeline, alert_starts, emitted_of
from tests.builders import ae, encode, infusion
from tests.test_replay import RULES, SAMPLE

CATALOG = load_rules_dir(RULES)
LINES = SAMPLE.read_bytes().splitlines()
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # the sample log's windows have all ended
BATCH = 40


def message(offset: int, line: bytes) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(
        topic="safety.events", partition=0, offset=offset, key=b"ISC.19.29", value=line))


def effects(pipeline: Pipeline, batch: Batch, alerts_end: int = 0) -> list[tuple]:
    """The plan of a batch as a sequence of effects: alert messages, then table rows."""
    writes = pipeline.plan(batch, NOW, {0: alerts_end})
    return [("alert", m) for m in writes.alerts] + [
        ("row", row) for rows in writes.rows.values() for row in rows]


class Run(NamedTuple):
    table: dict[str, bytes]
    topic: list[tuple[bytes, bytes]]
    pipeline: Pipeline
    plans: list[list[str]]  # the kinds of effect of each batch's plan, without a crash


def run(crashes: dict[int, int] | None = None, sizes: list[int] | None = None) -> Run:
    """Process the sample in batches of ``sizes`` in turn (else `BATCH` events each);
    crash after ``crashes[n]`` effects of the n-th batch planned (counted across
    restarts), restart, and go on: the broker redelivers from the crashed batch on."""
    crashes = dict(crashes or {})
    table: dict[str, bytes] = {}
    topic: list[tuple[bytes, bytes]] = []
    plans: list[list[str]] = []
    pipeline = Pipeline(Settings(), CATALOG)
    start = planned = 0
    while start < len(LINES):
        end = min(start + (sizes[planned % len(sizes)] if sizes else BATCH), len(LINES))
        batch = Batch()
        for offset in range(start, end):
            pipeline.handle(batch, message(offset, LINES[offset]))
        done = effects(pipeline, batch, len(topic))
        crash_after = crashes.pop(planned, None)
        planned += 1
        if crash_after is not None:
            done = done[:crash_after]
        for kind, item in done:
            if kind == "row":
                table[item[0]] = item[1]
            else:
                topic.append(item)
        if crash_after is not None:
            pipeline = restart(table, topic)
            continue
        plans.append([kind for kind, _item in done])
        start = end
    return Run(table, topic, pipeline, plans)


def restart(table: dict[str, bytes], topic: list[tuple[bytes, bytes]]) -> Pipeline:
    """A new worker, as `monitor.stream.emitted_alerts` starts one: load the table, read
    the alerts topic from where its checkpoints say, send what the load decided."""
    pipeline = Pipeline(Settings(), CATALOG)
    messages = pipeline.load(iter(dict(table).items()))
    start_at = alert_starts(pipeline.recorded_ends, [0]).get(0, 0)
    emitted = {emitted_of(value) for _key, value in topic[start_at:]}
    pipeline.found(emitted, {0: start_at}, {0: len(LINES)})  # the log is all on the topic
    topic.extend(m for m in messages if emitted_of(m[1]).key not in pipeline.unsent)
    return pipeline


def summary(pipeline: Pipeline) -> dict:
    return {trial_id: trial_report(trial, NOW)
            for trial_id, trial in pipeline.trials.trials.items()}


def check(crashed: Run) -> None:
    """Replay's state and alerts, each alert once."""
    assert summary(crashed.pipeline) == summary(CLEAN.pipeline)
    keys = [orjson.loads(value)["key"] for _key, value in crashed.topic]
    assert sorted(keys) == sorted(alert.key for alert in REPLAYED.alerts)
    assert reloaded(crashed.table) == reloaded(CLEAN.table)


def reloaded(table: dict[str, bytes]) -> tuple[dict, list]:
    """What a worker restarted on the table would hold and send."""
    pipeline = Pipeline(Settings(), CATALOG)
    messages = pipeline.load(iter(table.items()))
    return summary(pipeline), messages


CLEAN = run()
REPLAYED = replay(LINES, CATALOG)
WITH_ALERTS = [number for number, plan in enumerate(CLEAN.plans) if "alert" in plan]


def test_without_a_crash_the_worker_emits_replay_s_alerts_once() -> None:
    keys = [orjson.loads(value)["key"] for _key, value in CLEAN.topic]
    assert keys == [alert.key for alert in REPLAYED.alerts]
    assert summary(CLEAN.pipeline) == {trial_id: trial_report(trial, NOW)
                                       for trial_id, trial in REPLAYED.trials.trials.items()}
    assert len(WITH_ALERTS) >= 3  # the sample raises, updates and resolves alerts


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_a_crash_anywhere_loses_nothing(data: st.DataObject) -> None:
    number = data.draw(st.integers(0, len(CLEAN.plans) - 1), label="batch")
    where = data.draw(st.integers(0, len(CLEAN.plans[number])), label="effects done")
    check(run({number: where}))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_two_crashes_and_other_batches_after_a_restart_lose_and_repeat_nothing(
        data: st.DataObject) -> None:
    """The restarted worker groups the redelivered events in other batches, and dies
    again, perhaps right after a checkpoint that covers part of what the first one
    had sent alerts for: what the first worker sent is still not sent again."""
    first = data.draw(st.sampled_from(WITH_ALERTS), label="first crash, a batch with alerts")
    alerts_sent = CLEAN.plans[first].count("alert")
    where = data.draw(st.integers(1, alerts_sent), label="its alerts sent")
    second = data.draw(st.integers(first + 1, first + 6), label="second crash")
    second_where = data.draw(st.integers(0, 60), label="effects done")
    sizes = data.draw(st.lists(st.integers(1, 2 * BATCH), min_size=1, max_size=3),
                      label="batch sizes")
    # the sizes apply from the first restart on: until then, batches as in CLEAN
    crashed = run({first: where, second: second_where}, [BATCH] * (first + 1) + sizes)
    check(crashed)


def test_every_crash_point_of_a_batch_that_sends_alerts() -> None:
    number = WITH_ALERTS[len(WITH_ALERTS) // 2]
    plan = CLEAN.plans[number]
    for where in range(len(plan) + 1):
        check(run({number: where}))
        assert plan[0] == "alert" and plan[-1] == "row"


def test_a_worker_that_dies_again_right_after_a_partial_redo_repeats_nothing() -> None:
    """The case the review found: alerts out, no checkpoint; the next worker's first
    batch covers one event of the crashed batch and is checkpointed; it dies."""
    for number in WITH_ALERTS:
        alerts_sent = CLEAN.plans[number].count("alert")
        sizes = [BATCH] * (number + 1) + [1, BATCH]
        check(run({number: alerts_sent, number + 2: 0}, sizes))


def test_the_alerts_topic_is_read_from_the_lowest_end_a_checkpoint_recorded() -> None:
    recorded = {0: {0: 7, 1: 3}, 1: {0: 5, 1: 9}}
    assert alert_starts(recorded, [0, 1]) == {0: 5, 1: 3}
    assert alert_starts(recorded, [1]) == {0: 5, 1: 9}
    # a partition with no checkpoint yet (its first batch may have died after its
    # alerts went out): from the beginning; a partition left out starts there too
    assert alert_starts(recorded, [0, 2]) == {0: 0, 1: 0}
    assert alert_starts({0: {0: 7}, 1: {1: 4}}, [0, 1]) == {0: 0, 1: 0}
    assert alert_starts(recorded, []) is None  # nothing assigned: nothing to read


def test_each_partition_s_rows_end_with_the_alerts_topic_ends_and_load_reads_them() -> None:
    pipeline, batch = Pipeline(Settings(), CATALOG), Batch()
    for offset, line in enumerate(LINES[:BATCH]):
        pipeline.handle(batch, message(offset, line))
    rows = pipeline.plan(batch, NOW, {0: 12, 3: 4}).rows[0]
    assert rows[-1] == (f"{ENDS}\x1f0", orjson.dumps({"0": 12, "3": 4}))
    again = Pipeline(Settings(), CATALOG)
    again.load(iter(rows))
    assert again.recorded_ends == {0: {0: 12, 3: 4}}
    assert summary(again) == summary(pipeline)


def test_alerts_already_on_the_topic_are_not_sent_again() -> None:
    number = WITH_ALERTS[0]
    pipeline, batch = Pipeline(Settings(), CATALOG), Batch()
    for offset in range((number + 1) * BATCH):
        pipeline.handle(batch, message(offset, LINES[offset]))
    keys = [alert.key for alert in batch.alerts]
    assert keys
    pipeline.unsent = {keys[0]}
    sent = pipeline.plan(batch, NOW, {}).alerts
    assert [emitted_of(value).key for _key, value in sent] == keys[1:]
    assert not pipeline.unsent  # skipped once: a later transition of that key goes out
    assert emitted_of(b"{not json") is None and emitted_of(b"[1]") is None
    assert emitted_of(b'{"key": "k"}') is None


@pytest.mark.parametrize("grade", [1, 3])
def test_a_batch_is_full_before_a_checkpoint_outgrows_a_kafka_message(grade: int) -> None:
    """Many subjects of one trial in one batch (grade 3 AEs also raise and update an
    alert): the worker writes the batch once a trial's journal holds JOURNAL_ROWS rows,
    so no checkpoint nears Kafka's 1 MB."""
    lines = [encode(m) for number in range(600)
             for m in (infusion(f"S{number}", "2021-01-01"),
                       ae(f"S{number}", f"A{number}", "2021-01-03", grade=grade))]
    pipeline, batch, offset = Pipeline(Settings(), CATALOG), Batch(), 0
    while not batch.full:
        pipeline.handle(batch, message(offset, lines[offset]))
        offset += 1
    assert offset < len(lines)
    writes = pipeline.plan(batch, NOW, {})
    rows = writes.rows[0]
    checkpoint = next(value for key, value in rows if key.startswith("t"))
    assert len(rows) == JOURNAL_ROWS + 2  # the checkpoint, its journal's rows, the ends
    assert bool(writes.alerts) == (grade == 3)
    assert len(checkpoint) < 2**20 // 2


def test_reports_are_kept_until_an_event_of_the_trial_or_a_new_day() -> None:
    """/status, /metrics and each alert message read `Pipeline.report`; it is
    `trial_report`'s answer, computed again only when the trial or the date moved."""
    pipeline = Pipeline(Settings(), CATALOG)
    pipeline.loaded = True
    batch = Batch()
    for offset, line in enumerate(LINES[:200]):
        pipeline.handle(batch, message(offset, line))
    first = pipeline.status(NOW)["ISC.19.29"]
    assert first == trial_report(pipeline.trials.trials["ISC.19.29"], NOW)
    assert pipeline.status(NOW + dt.timedelta(hours=1))["ISC.19.29"] is first  # same day
    early = dt.datetime(2021, 6, 1, tzinfo=dt.UTC)  # another day: windows judged again
    assert pipeline.status(early)["ISC.19.29"] == trial_report(
        pipeline.trials.trials["ISC.19.29"], early)
    for offset, line in enumerate(LINES[200:], 200):
        pipeline.handle(batch, message(offset, line))
    after = pipeline.status(NOW)["ISC.19.29"]
    assert after == trial_report(pipeline.trials.trials["ISC.19.29"], NOW) != first


def test_checkpoints_record_where_the_load_read_from_until_the_redo_is_past() -> None:
    """After a load that read the alerts topic from offset 3 while the events partition
    ended at 45, with a trial the load reconciled: the ends rows keep saying 3 until
    that trial has a checkpoint and the batches have passed offset 44."""
    pipeline = Pipeline(Settings(), CATALOG)
    pipeline.load(iter(()))
    pipeline.found(set(), {0: 3}, {0: 45})
    pipeline.reconciled = {"ISC.19.29"}
    written = []
    for first, last in ((0, 40), (40, 50), (50, 60)):
        batch = Batch()
        for offset in range(first, last):
            pipeline.handle(batch, message(offset, LINES[offset]))
        rows = pipeline.plan(batch, NOW, {0: 12}).rows[0]
        written.append(orjson.loads(rows[-1][1]))
    assert written == [{"0": 3}, {"0": 3}, {"0": 12}]
    assert not pipeline.reconciled and not pipeline.redo


def test_a_load_leaves_to_send_only_what_its_ledgers_have_not_recorded() -> None:
    """Every transition of the clean run is on the topic and in its table's ledgers: a
    load finds nothing to hold back. One of a trial not loaded here (it may be one
    whose first checkpoint never came) is held back."""
    pipeline = Pipeline(Settings(), CATALOG)
    pipeline.load(iter(CLEAN.table.items()))
    emitted = {emitted_of(value) for _key, value in CLEAN.topic}
    stranger = next(iter(emitted))._replace(key="OTHER/r/1#1", trial_id="OTHER")
    pipeline.found(emitted | {stranger}, {0: 0}, {0: len(LINES)})
    assert pipeline.unsent == {"OTHER/r/1#1"}
    later = max(emitted, key=lambda e: (e.episode, e.sequence))
    ahead = later._replace(key="ahead", sequence=later.sequence + 1)
    pipeline.found({ahead}, {0: 0}, {0: len(LINES)})
    assert pipeline.unsent == {"ahead"}  # a transition past the ledger's: not recorded


@pytest.mark.parametrize("raw", [b'"' * 600_000, b"\x01" * 300_000, b"\xff" * 300_000,
                                 "é".encode() * 100_000, b"{not json"])
def test_a_dead_letter_stays_under_the_broker_s_message_limit(raw: bytes) -> None:
    """A huge broken line would make a letter over Kafka's 1 MB default, and the agent
    crashed sending it (the line was lost); it keeps its first bytes and says so."""
    from monitor.engine.events import parse_event
    from monitor.stream import DEAD_LETTER_RAW, dead_letter

    message = SimpleNamespace(value=raw, topic="safety.events", partition=2, offset=41)
    letter = orjson.loads(value := dead_letter(message, parse_event(raw)))
    assert len(value) < 1_000_000 and letter["offset"] == 41 and letter["reason"]
    if len(raw) > DEAD_LETTER_RAW:
        assert letter["raw_truncated"] is True and letter["raw_bytes"] == len(raw)
        kept = letter["raw"].encode() if letter["raw_encoding"] == "utf-8" else \
            __import__("base64").b64decode(letter["raw"])
        assert raw.startswith(kept) and len(kept) > DEAD_LETTER_RAW - 4
    else:
        assert "raw_truncated" not in letter and letter["raw"] == raw.decode()
