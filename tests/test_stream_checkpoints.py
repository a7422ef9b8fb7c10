"""The worker's write protocol survives a crash at any point (no broker needed).

`Pipeline.plan` says what a batch writes and sends, in order; `monitor.stream.flush`
carries it out against faust. Here the same plan is carried out against a dict (the
table) and a list (the alerts topic), and the worker "crashes" after any prefix of
it: a new pipeline loads the table, sends what `load` returns, and the broker
redelivers the batch. The final state and the alerts must be replay's, and an alert
may be sent twice (the very same message) only when the crash fell after it was sent
and before the trial's checkpoint was written.
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
from monitor.stream import JOURNAL_ROWS, Batch, Pipeline
from tests.builders import ae, encode, infusion
from tests.test_replay import RULES, SAMPLE

CATALOG = load_rules_dir(RULES)
LINES = SAMPLE.read_bytes().splitlines()
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # the sample log's windows have all ended
BATCH = 40


def message(offset: int, line: bytes) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(
        topic="safety.events", partition=0, offset=offset, key=b"ISC.19.29", value=line))


def effects(pipeline: Pipeline, batch: Batch) -> list[tuple]:
    """The plan of a batch as a sequence of effects: alert messages, then table rows."""
    writes = pipeline.plan(batch, NOW)
    return [("alert", m) for m in writes.alerts] + [
        ("row", row) for rows in writes.rows.values() for row in rows]


class Run(NamedTuple):
    table: dict[str, bytes]
    topic: list[tuple[bytes, bytes]]
    pipeline: Pipeline
    plans: list[list[str]]  # the kinds of effect of each batch's plan, without a crash


def run(crash_batch: int | None = None, crash_after: int = 0) -> Run:
    """Process the sample in batches; optionally crash after ``crash_after`` effects of
    batch ``crash_batch``, restart, and go on."""
    table: dict[str, bytes] = {}
    topic: list[tuple[bytes, bytes]] = []
    plans: list[list[str]] = []
    pipeline = Pipeline(Settings(), CATALOG)
    start = 0
    while start < len(LINES):
        batch = Batch()
        for offset in range(start, min(start + BATCH, len(LINES))):
            pipeline.handle(batch, message(offset, LINES[offset]))
        done = effects(pipeline, batch)
        crash = len(plans) == crash_batch
        if crash:
            done, crash_batch = done[:crash_after], None
        for kind, item in done:
            if kind == "row":
                table[item[0]] = item[1]
            else:
                topic.append(item)
        if crash:  # restart: load, re-send, and the broker redelivers the batch
            pipeline = Pipeline(Settings(), CATALOG)
            topic.extend(pipeline.load(iter(dict(table).items())))
            continue
        plans.append([kind for kind, _item in done])
        start += BATCH
    return Run(table, topic, pipeline, plans)


def summary(pipeline: Pipeline) -> dict:
    return {trial_id: trial_report(trial, NOW)
            for trial_id, trial in pipeline.trials.trials.items()}


def check(crashed: Run) -> None:
    """Replay's state and alerts; a repeated alert is the very same message."""
    assert summary(crashed.pipeline) == summary(CLEAN.pipeline)
    values: dict[str, bytes] = {}
    for _key, value in crashed.topic:
        alert = orjson.loads(value)
        assert values.setdefault(alert["key"], value) == value
    assert sorted(values) == sorted(alert.key for alert in REPLAYED.alerts)
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
    check(run(number, where))


def test_every_crash_point_of_a_batch_that_sends_alerts() -> None:
    number = WITH_ALERTS[len(WITH_ALERTS) // 2]
    plan = CLEAN.plans[number]
    for where in range(len(plan) + 1):
        crashed = run(number, where)
        check(crashed)
        repeats = len(crashed.topic) - len(CLEAN.topic)
        sent_before_checkpoint = 0 < where <= plan.count("alert")
        assert (repeats > 0) == sent_before_checkpoint, (where, plan)
        assert plan[0] == "alert" and plan[-1] == "row"


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
    writes = pipeline.plan(batch, NOW)
    rows = writes.rows[0]
    checkpoint = next(value for key, value in rows if key.startswith("t"))
    assert len(rows) == JOURNAL_ROWS + 1  # the checkpoint and its journal's rows
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
