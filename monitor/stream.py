"""The stream worker: faust app, topics, the state table, and the web routes.

Data flows one way: bytes -> `parse_event` -> `engine.step` -> records, alerts, dead
letters. The engine state of the trials on this worker's partitions lives in memory
(`Pipeline.trials`); the table ``state`` is its durable copy, written once per batch
and per changed record, not once per event (see `monitor.engine.records`). Within a
batch the order of writes is: subject records, then alerts (awaited until the broker
has them), then the trial record (the ledger). A crash therefore never loses an alert:
at worst the ledger lags and `reconcile` re-sends the same transition (same key), which
the e-mail ledger drops.

Delivery is at least once; the engine makes it effectively once: a message redelivered
after a crash (same event id, same partition and offset) changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import faust
import orjson

from .alert_email import trial_summary
from .engine import records
from .engine.alerts import AlertTransition
from .engine.events import Rejection, parse_event
from .engine.report import trial_report
from .engine.rules import TrialRules
from .engine.state import REDELIVERED, reconcile, step
from .engine.trials import Trials
from .notify import alert_payload
from .settings import Settings

OFFSET_BITS = 40  # position = partition << 40 | offset


def position(partition: int, offset: int) -> int:
    return (partition << OFFSET_BITS) | offset


@contextlib.contextmanager
def current_event(event: Any) -> Iterator[None]:
    """Make ``event`` faust's current event, as ``async for event in stream`` does.

    Inside ``take_events()`` faust has no current event, and a table write needs one: it
    goes to the changelog partition of the current event. We only write keys of the
    trials on that event's partition. ``_current_event`` is private to faust.streams;
    faust-streaming is pinned below 0.16 for that reason.
    """
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class Batch:
    """What one batch changed, grouped by the partition its writes belong to."""

    def __init__(self) -> None:
        self.last_event: dict[int, Any] = {}
        self.touched: dict[int, dict[str, dict[str, set]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(set)))
        self.alerts: list[AlertTransition] = []
        self.dead: list[tuple[bytes | None, bytes]] = []


class Pipeline:
    """The engine inside the worker: decode, step, and what to write and send."""

    def __init__(self, settings: Settings, catalog: dict[str, TrialRules],
                 metrics: Any = None) -> None:
        self.settings = settings
        self.trials = Trials(catalog)
        self.metrics = metrics  # optional: monitor.metrics.Metrics
        self.settled = False  # the tables of the current assignment are recovered
        self.loaded = False  # the trials in memory are those of the table

    def handle(self, batch: Batch, event: Any) -> None:
        """Step one Kafka message; remember what to write, send and dead-letter."""
        message = event.message
        batch.last_event[message.partition] = event
        parsed = parse_event(message.value)
        if type(parsed) is Rejection:
            batch.dead.append((message.key, dead_letter(message, parsed)))
            self._observe("rejected", parsed)
            return
        trial = self.trials.trial(parsed.trial_id)
        changes = step(trial, parsed, position(message.partition, message.offset))[1]
        self._observe(changes.outcome, parsed)
        if changes.outcome == REDELIVERED:
            return
        touched = batch.touched[message.partition][parsed.trial_id]
        touched[parsed.subject_id].add(changes.record)
        if changes.alerts:
            batch.alerts.extend(changes.alerts)
            if self.metrics is not None:
                self.metrics.observe_alerts(changes.alerts)

    def _observe(self, outcome: str, parsed: Any) -> None:
        if self.metrics is not None:
            self.metrics(outcome, parsed)

    def payload(self, alert: AlertTransition, now: dt.datetime) -> bytes:
        """The alerts-topic value: the alert, and its trial's counts now (for e-mail)."""
        trial = self.trials.trials.get(alert.trial_id)
        summary = trial_summary(trial_report(trial, now), now) if trial else None
        return orjson.dumps(alert_payload(alert, summary))

    def writes(self, batch: Batch, partition: int) -> tuple[list, list]:
        """(subject records, trial records) to write for one partition."""
        subjects, trials = [], []
        for trial_id, by_subject in batch.touched[partition].items():
            trial = self.trials.trials[trial_id]
            for subject_id, changed in by_subject.items():
                subjects.extend(records.subject_records(trial, subject_id, changed))
            trials.append(records.trial_record(trial))
        return subjects, trials

    def load(self, rows: Iterator[tuple[str, bytes]]) -> list[AlertTransition]:
        """Replace the trials in memory with those in the table; reconcile each."""
        by_trial: dict[str, list] = defaultdict(list)
        for key, value in rows:
            by_trial[records.key_trial(key)].append((key, value))
        self.trials.trials = {}
        pending: list[AlertTransition] = []
        for trial_id, rows_of_trial in by_trial.items():
            trial = records.load_trial(trial_id, self.trials.catalog.get(trial_id),
                                       rows_of_trial)
            self.trials.trials[trial_id] = trial
            pending.extend(reconcile(trial))
        self.loaded = True
        return pending

    def forget(self) -> None:
        self.trials.trials = {}
        self.settled = self.loaded = False

    def status(self, now: dt.datetime) -> dict:
        return self.trials.report(now)


def is_ready(app: Any) -> bool:
    """Table recovery has finished, and no rebalance or recovery is under way."""
    recovered = app.tables.recovery.completed.is_set()
    return recovered and not app.rebalancing and not app.in_recovery


def dead_letter(message: Any, rejection: Rejection) -> bytes:
    """The dead-letter value: raw bytes (as text when they are UTF-8), position, reason."""
    raw = message.value or b""
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        import base64

        text, encoding = base64.b64encode(raw).decode(), "base64"
    return orjson.dumps({"reason": rejection.reason, "topic": message.topic,
                         "partition": message.partition, "offset": message.offset,
                         "raw": text, "raw_encoding": encoding,
                         "event_id": rejection.event_id, "trial_id": rejection.trial_id})


def faust_settings(settings: Settings) -> dict[str, Any]:
    """The faust App settings that follow from ours."""
    return {
        "broker": settings.broker,
        "store": settings.store,
        "datadir": str(settings.state_dir),
        "topic_partitions": settings.partitions,
        "web_host": settings.web_host,
        "web_bind": settings.web_host,
        "web_port": settings.web_port,
        "broker_session_timeout": settings.session_timeout,
        "broker_heartbeat_interval": settings.heartbeat_interval,
        "broker_rebalance_timeout": settings.session_timeout,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "table_standby_replicas": 0,
        "web_enabled": True,
        "web_tables_enabled": False,  # no /table/<name>/<key>/ pages: they expose state
        "web_router_enabled": False,
        # tansu's ListOffsets answer is right only when every batch holds one record, and
        # faust's table recovery reads the changelog up to that answer
        **({"producer_max_batch_size": 1} if settings.broker_is_tansu else {}),
    }


def build_app(settings: Settings, catalog: dict[str, TrialRules],
              metrics: Any = None, notifier: Any = None) -> tuple[faust.App, Pipeline]:
    """``notifier(app, alerts_topic)``, when given, adds the e-mail agent."""
    """The faust app of the worker, and the pipeline it drives."""
    # env={}: faust would otherwise let BROKER_URL, WEB_PORT ... override our settings
    app = faust.App(settings.app_id, env={}, **faust_settings(settings))
    # internal=True: faust creates the topics with our partition count (a topic the
    # broker auto-creates may have another, and faust then refuses the table writes)
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
           "value_serializer": "raw", "partitions": settings.partitions, "internal": True}
    events = app.topic(settings.events_topic, **raw)
    dead = app.topic(settings.dead_letter_topic, **raw)
    alerts_out = app.topic(settings.alerts_topic, **raw)
    table = app.Table("state", key_type=str, value_type=bytes, partitions=settings.partitions)
    table.value_serializer = "raw"  # our records are JSON already
    pipeline = Pipeline(settings, catalog, metrics=metrics)
    if metrics is not None:
        metrics.set_trials(lambda: pipeline.status(dt.datetime.now(dt.UTC)))

    async def load_if_needed() -> None:
        if pipeline.settled and not pipeline.loaded:
            await send_alerts(alerts_out, pipeline, pipeline.load(iter(table.items())))

    @app.agent(events)
    async def monitor(stream: Any) -> None:
        async for batch_events in stream.take_events(settings.batch_size,
                                                     within=settings.batch_within):
            await load_if_needed()
            started, batch = time.monotonic(), Batch()
            for event in batch_events:
                pipeline.handle(batch, event)
            await flush(batch, pipeline, table, dead, alerts_out)
            if metrics is not None:
                metrics.observe_latency(time.monotonic() - started, len(batch_events))

    @app.on_partitions_revoked.connect
    async def forget(_sender: Any, *_args: Any, **_kwargs: Any) -> None:
        pipeline.forget()  # the trials may move: reload from the table when settled

    @app.on_rebalance_complete.connect
    async def settle(_sender: Any, *_args: Any, **_kwargs: Any) -> None:
        # sent once the tables of this assignment are recovered, before the streams
        # resume: the only moment the table is whole and no event is being processed
        pipeline.settled = True
        await load_if_needed()

    if notifier is not None:
        notifier(app, alerts_out)
    from .web import add_routes

    add_routes(app, pipeline, metrics)
    return app, pipeline


async def flush(batch: Batch, pipeline: Pipeline, table: Any, dead: Any,
                alerts_out: Any) -> None:
    """Write the batch: dead letters and subject records, then alerts, then ledgers."""
    for key, value in batch.dead:
        await dead.send(key=key, value=value)
    trial_rows = []
    for partition, event in batch.last_event.items():
        subjects, trials = pipeline.writes(batch, partition)
        with current_event(event):
            for key, value in subjects:
                table[key] = value
        trial_rows.append((event, trials))
    await send_alerts(alerts_out, pipeline, batch.alerts)
    for event, trials in trial_rows:
        with current_event(event):
            for key, value in trials:
                table[key] = value
    await drained(table.app.producer)


async def drained(producer: Any, poll: float = 0.005) -> None:
    """Wait until faust's producer buffer has handed every table write to the Kafka
    client. faust's own flush before an offset commit gives up when no message left the
    buffer for 0.1 s, so offsets could be committed for events whose changelog writes
    were still waiting in it, and a crash then lost them. Acking a batch's events only
    after this makes the commit's flush of the Kafka client cover every write."""
    buffer = producer.buffer
    while buffer.size:
        await asyncio.sleep(poll)


async def send_alerts(topic: Any, pipeline: Pipeline, alerts: list[AlertTransition]) -> None:
    """Send alert transitions and wait until the broker has every one."""
    now = dt.datetime.now(dt.UTC)
    pending = [await topic.send(key=alert.id.encode(), value=pipeline.payload(alert, now))
               for alert in alerts]
    for future in pending:
        await future
