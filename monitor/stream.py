"""The stream worker: faust app, topics, the state table, and the web routes.

Data flows one way: bytes -> `parse_event` -> `engine.step` -> records, alerts, dead
letters. The engine state of the trials on this worker's partitions lives in memory
(`Pipeline.trials`); the table ``state`` is its durable copy, written once per batch
and per changed record, not once per event (see `monitor.engine.records`).

A batch is written in this order (`flush`): its alerts; once the broker has them, per
trial its checkpoint (the ledger, and the batch's subject rows as a journal), then its
subject rows, and last per partition the alerts topic's ends as they were before the
batch's alerts. A crash before the checkpoint is durable loses nothing: the batch's
events come again, and from the same state `step` decides the same alerts again (same
keys). The alerts the dead worker sent are not sent twice: after a load, the worker
reads the alerts topic from the ends the checkpoints recorded and leaves out each
transition there that no loaded ledger records (`emitted_alerts`); until it is past
the events the dead worker may have stepped, its checkpoints record where that read
began, so a second crash reads it again (`Pipeline.plan`). A crash after the
checkpoint leaves a table from which `Pipeline.load` rebuilds each trial exactly as
the batch left it.

Delivery is at least once; the engine makes it effectively once: a message redelivered
after a crash (same event id, same partition and offset) changes nothing. faust can
drop a message it fetched without reading it again (around a rebalance or the end of a
table recovery); `admitted` notices the hole in the offsets and reads the missing
messages itself, and the consumer never commits past an offset not acked
(`monitor.faust_ext`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import faust
import orjson
from aiokafka.errors import KafkaError

from .alert_email import trial_summary
from .engine import records
from .engine.alerts import AlertTransition, recorded
from .engine.events import Rejection, parse_event
from .engine.report import trial_report
from .engine.rules import TrialRules
from .engine.state import REDELIVERED, reconcile, step
from .engine.trials import Trials
from .faust_ext import (
    ArrivalMonitor,
    Carrier,
    ConfirmedTable,
    OffsetGuard,
    drop,
    fill_tails,
    install_rewinding_consumer,
    mark_acked,
    read_hole,
    read_since,
    sync,
    until_read,
)
from .notify import alert_payload
from .publish import bootstrap
from .settings import Settings

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # before sending again what the broker did not take
OFFSET_BITS = 40  # position = partition << 40 | offset
JOURNAL_ROWS = 300  # subject rows in one trial's checkpoint, at most (see Batch.count)
PRODUCE_BATCH_BYTES = 512 * 1024  # the table rows of one produce batch, at most
TAIL_CHECK_SECONDS = 5.0  # how often to look for a message dropped at a partition's end
MARKER = "~"  # tansu only: the key of the row that ends a batch's writes to a partition
ENDS = f"{MARKER}alerts"  # the row of a partition's checkpoint: the alerts topic's ends


def position(partition: int, offset: int) -> int:
    return (partition << OFFSET_BITS) | offset


def alert_starts(recorded: dict[int, dict[int, int]], assigned: list[int]
                 ) -> dict[int, int] | None:
    """Where to read the alerts topic from after a load, to see every alert a worker
    sent and no checkpoint records (it died between the two): per alerts partition,
    the lowest end recorded by the last checkpoint of an assigned events partition
    (``recorded``: events partition -> alerts partition -> end), 0 (its beginning)
    where one recorded none; a partition left out starts at 0 too. Nothing assigned:
    None, nothing to read."""
    if not assigned:
        return None
    partitions = {p for q in assigned for p in recorded.get(q, {})}
    return {p: min(recorded.get(q, {}).get(p, 0) for q in assigned) for p in sorted(partitions)}


class Emitted(NamedTuple):
    """An alert transition found on the alerts topic (`emitted_of`)."""

    key: str  # `AlertTransition.key`
    trial_id: str
    rule_id: str
    episode: int
    sequence: int


class Batch:
    """What one batch changed, grouped by the partition its writes belong to."""

    def __init__(self) -> None:
        self.last_event: dict[int, Any] = {}
        self.last_offset: dict[int, int] = {}  # of the messages stepped, by partition
        self.touched: dict[int, dict[str, dict[str, set]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(set)))
        self.rows: dict[str, int] = defaultdict(int)  # subject rows to write, by trial
        self.alerts: list[AlertTransition] = []
        self.dead: list[tuple[bytes | None, bytes]] = []
        self.full = False  # write it now: a trial's checkpoint is as large as we allow

    def count(self, trial_id: str) -> None:
        """Count a subject row of a trial; the batch is full once its checkpoint may
        near what one Kafka message may hold (1 MB by default): `JOURNAL_ROWS` subject
        rows, each well under 3 kB."""
        self.rows[trial_id] += 1
        if self.rows[trial_id] >= JOURNAL_ROWS:
            self.full = True


class Writes(NamedTuple):
    """A batch's writes, in order: the ``alerts`` messages; once the broker has them,
    the ``rows`` per partition (per trial, its checkpoint with the journal, then its
    subject rows)."""

    alerts: list[tuple[bytes, bytes]]
    rows: dict[int, list[tuple[str, bytes]]]


class Pipeline:
    """The engine inside the worker: decode, step, and what to write and send."""

    def __init__(self, settings: Settings, catalog: dict[str, TrialRules],
                 metrics: Any = None) -> None:
        self.settings = settings
        self.trials = Trials(catalog)
        self.metrics = metrics  # optional: monitor.metrics.Metrics
        self.settled = False  # the tables of the current assignment are recovered
        self.loaded = False  # the trials in memory are those of the table
        self.unwritten: dict[str, list[tuple[str, bytes]]] = {}  # journals loaded, by trial
        # each trial's report and the day it is for, until an event of the trial comes:
        # a scrape of /metrics, /status and each alert message read it
        self.reports: dict[str, tuple[dt.date, dict]] = {}
        # what keeps an alert from going out twice (`plan`, `emitted_alerts`): the
        # alerts topic ends each partition's last checkpoint recorded, where the last
        # load read the alerts topic from, the transitions it found there that no ledger
        # loaded records, the events partitions still to pass the end they had at the
        # load, and the trials whose alerts the load sent (`reconcile`) until their
        # checkpoint is written
        self.recorded_ends: dict[int, dict[int, int]] = {}
        self.load_starts: dict[int, int] = {}
        self.unsent: set[str] = set()
        self.redo: dict[int, int] = {}
        self.reconciled: set[str] = set()
        self.generation = 0  # one more at each `forget`

    def handle(self, batch: Batch, event: Any) -> None:
        """Step one Kafka message; remember what to write, send and dead-letter."""
        message = event.message
        # the event whose partition the table writes go to: a faust event
        batch.last_event[message.partition] = event.carrier if type(event) is Refetched else event
        batch.last_offset[message.partition] = message.offset
        parsed = parse_event(message.value)
        if type(parsed) is Rejection:
            batch.dead.append((message.key, dead_letter(message, parsed)))
            self._observe("rejected", parsed)
            return
        trial = self.trials.trial(parsed.trial_id)
        self.reports.pop(parsed.trial_id, None)
        changes = step(trial, parsed, position(message.partition, message.offset))[1]
        self._observe(changes.outcome, parsed)
        touched = batch.touched[message.partition][parsed.trial_id]
        if changes.outcome == REDELIVERED:
            return  # the trial gets a checkpoint: it writes what a journal loaded holds
        changed = touched.get(parsed.subject_id)
        if changed is None:
            changed = touched[parsed.subject_id]
            batch.count(parsed.trial_id)  # the subject's header
        if changes.record is not None and changes.record not in changed:
            batch.count(parsed.trial_id)
        changed.add(changes.record)
        if changes.alerts:
            batch.alerts.extend(changes.alerts)
            if self.metrics is not None:
                self.metrics.observe_alerts(changes.alerts)

    def _observe(self, outcome: str, parsed: Any) -> None:
        if self.metrics is not None:
            self.metrics(outcome, parsed)

    def message(self, alert: AlertTransition, now: dt.datetime) -> tuple[bytes, bytes]:
        """The alerts-topic message: key the alert id, value the alert and its trial's
        counts now (for e-mail)."""
        summary = trial_summary(self.report(alert.trial_id, now), now) \
            if alert.trial_id in self.trials.trials else None
        return alert.id.encode(), orjson.dumps(alert_payload(alert, summary))

    def report(self, trial_id: str, now: dt.datetime) -> dict:
        """`trial_report` of a trial in memory as of now; a report depends on the
        trial's state and on the date alone, so it is kept until either changes."""
        cached, day = self.reports.get(trial_id), now.date()
        if cached is not None and cached[0] == day:
            return cached[1]
        report = trial_report(self.trials.trials[trial_id], now)
        self.reports[trial_id] = (day, report)
        return report

    def plan(self, batch: Batch, now: dt.datetime, alert_ends: dict[int, int]) -> Writes:
        """What to send and write for a batch, in the order of `Writes`.

        Each partition's rows end with where a load must read the alerts topic from to
        see every alert sent after this checkpoint: ``alert_ends``, the topic's ends (or
        less) before this batch's alerts; or, while the alerts a dead worker sent may
        still be decided again (the partition has not passed the end it had at the
        load, or a trial reconciled at the load has no checkpoint yet), where the load
        read from. The transitions the load found there (`unsent`) are not sent."""
        pinned = bool(self.reconciled)
        ends_now = orjson.dumps({str(partition): end for partition, end in alert_ends.items()})
        ends_then = orjson.dumps({str(p): end for p, end in self.load_starts.items()})
        rows = {}
        for partition, by_trial in batch.touched.items():
            rows[partition] = written = []
            for trial_id, by_subject in by_trial.items():
                trial = self.trials.trials[trial_id]
                subjects = dict(self.unwritten.pop(trial_id, ()))
                subjects.update(row for subject_id, changed in by_subject.items()
                                for row in records.subject_records(trial, subject_id, changed))
                subjects = list(subjects.items())
                written.append(records.trial_record(trial, subjects))
                written.extend(subjects)
            redo = self.redo.get(partition)
            ends = ends_then if pinned or redo is not None else ends_now
            written.append((f"{ENDS}{records.SEP}{partition}", ends))
            if redo is not None and batch.last_offset.get(partition, -1) >= redo - 1:
                del self.redo[partition]  # from the next batch on, this one is written
            self.reconciled.difference_update(by_trial)
        messages = []
        for alert in batch.alerts:
            if alert.key in self.unsent:
                self.unsent.discard(alert.key)
            else:
                messages.append(self.message(alert, now))
        return Writes(messages, rows)

    def found(self, emitted: set[Emitted], starts: dict[int, int],
              ends: dict[int, int]) -> None:
        """After `load`: the transitions on the alerts topic from ``starts`` on, and
        the ends of the assigned events partitions at the load. What a loaded ledger
        has not recorded was sent by a worker that died before its checkpoint (or by
        another, for trials not here): the events come again, decide it again, and it
        is not sent twice."""
        self.load_starts, self.redo = dict(starts), dict(ends)
        self.unsent = {e.key for e in emitted
                       if e.trial_id not in self.trials.trials or not recorded(
                           self.trials.trials[e.trial_id].ledger, e.rule_id, e.episode,
                           e.sequence)}

    def load(self, rows: Iterator[tuple[str, bytes]]) -> list[tuple[bytes, bytes]]:
        """Replace the trials in memory with those in the table. Returns the alert
        messages to send: what `reconcile` finds the ledger has not recorded (after a
        change of the rules, say)."""
        by_trial: dict[str, list] = defaultdict(list)
        ends_rows: dict[int, dict[int, int]] = {}
        for key, value in rows:
            if not key.startswith(MARKER):
                by_trial[records.key_trial(key)].append((key, value))
            elif key.startswith(ENDS + records.SEP):
                ends_rows[int(key.rsplit(records.SEP, 1)[1])] = {
                    int(partition): end for partition, end in orjson.loads(value).items()}
        self._clear()
        self.recorded_ends = ends_rows
        messages: list[tuple[bytes, bytes]] = []
        now = dt.datetime.now(dt.UTC)
        for trial_id, rows_of_trial in by_trial.items():
            trial, journal = records.load(
                trial_id, self.trials.catalog.get(trial_id), rows_of_trial)
            self.trials.trials[trial_id] = trial
            if journal:
                self.unwritten[trial_id] = journal
            reconciled = reconcile(trial)
            if reconciled:
                self.reconciled.add(trial_id)
            messages.extend(self.message(alert, now) for alert in reconciled)
        self.loaded = True
        return messages

    def forget(self) -> None:
        self._clear()
        self.generation += 1
        self.settled = self.loaded = False

    def _clear(self) -> None:
        """Drop the trials in memory and all that was derived from the last load."""
        self.trials.trials, self.unwritten, self.reports = {}, {}, {}
        self.recorded_ends, self.load_starts, self.unsent = {}, {}, set()
        self.redo, self.reconciled = {}, set()

    def status(self, now: dt.datetime) -> dict:
        """`Trials.report`: the ``trials`` part of the replay JSON, for the trials here."""
        return {trial_id: self.report(trial_id, now) for trial_id in sorted(self.trials.trials)}


def track_changelog(app: Any, changelog: str) -> None:
    """Make the producer's client keep the changelog in its metadata.

    aiokafka (0.14) adds a topic to the set its metadata refreshes ask for only when a
    send finds the topic missing from its metadata. After a full refresh (one made while
    that set is empty, e.g. after faust creates a topic) the changelog is present, so its
    first send does not add it; the first send to another topic then refreshes that
    topic alone, the changelog's partitions drop out, and its writes wait for a leader
    forever while the client refreshes in a loop. With the changelog in the set from
    the start, every refresh asks for it.
    """
    app.producer._producer.client.add_topic(changelog)  # private: faust's aiokafka producer


def is_ready(app: Any) -> bool:
    """Table recovery has finished, and no rebalance or recovery is under way."""
    recovered = app.tables.recovery.completed.is_set()
    return recovered and not app.rebalancing and not app.in_recovery


DEAD_LETTER_RAW = 128 * 1024  # bytes of a message a dead letter keeps: JSON escaping
# can make each byte six (\u0000), and the letter must stay under Kafka's 1 MB default


def dead_letter(message: Any, rejection: Rejection) -> bytes:
    """The dead-letter value: raw bytes (as text when they are UTF-8), position, reason.
    A message longer than `DEAD_LETTER_RAW` keeps its first bytes (``raw_truncated``,
    ``raw_bytes`` its length): a letter over the broker's limit would stop the agent,
    and the position says where the whole message is."""
    raw = message.value or b""
    kept = raw[:DEAD_LETTER_RAW]
    text = encoding = None
    for cut in range(4 if len(kept) < len(raw) else 1):  # a character cut in two: drop it
        try:
            text, encoding = kept[:len(kept) - cut].decode("utf-8"), "utf-8"
            break
        except UnicodeDecodeError:
            continue
    if text is None:
        import base64

        text, encoding = base64.b64encode(kept).decode(), "base64"
    letter = {"reason": rejection.reason, "topic": message.topic,
              "partition": message.partition, "offset": message.offset,
              "raw": text, "raw_encoding": encoding,
              "event_id": rejection.event_id, "trial_id": rejection.trial_id}
    if len(kept) < len(raw):
        letter["raw_truncated"], letter["raw_bytes"] = True, len(raw)
    return orjson.dumps(letter)


def faust_settings(settings: Settings) -> dict[str, Any]:
    """The faust App settings that follow from ours."""
    return {
        "broker": settings.broker,
        "Monitor": ArrivalMonitor,  # time_in: when fetched (the processing latency)
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
        # the table's rows go out as one produce batch per partition (`ConfirmedTable`);
        # half of Kafka's default largest message (message.max.bytes, 1 MB)
        "producer_max_batch_size": PRODUCE_BATCH_BYTES,
        "table_standby_replicas": 0,
        "web_enabled": True,
        "web_tables_enabled": False,  # no /table/<name>/<key>/ pages: they expose state
        "web_router_enabled": False,
        # tansu (see `flush`): a worker killed between a batch's writes and its marker
        # row finds its local store ahead of the end offset tansu reports; what it has
        # is a prefix of the writes, which `Pipeline.load` reads consistently
        **({"recovery_consistency_check": False} if settings.broker_is_tansu else {}),
    }


def build_app(settings: Settings, catalog: dict[str, TrialRules],
              metrics: Any = None, notifier: Any = None) -> tuple[faust.App, Pipeline]:
    """The faust app of the worker, and the pipeline it drives. ``notifier(app,
    alerts_topic)``, when given, adds the e-mail agent."""
    # env={}: faust would otherwise let BROKER_URL, WEB_PORT ... override our settings
    app = faust.App(settings.app_id, env={}, **faust_settings(settings))
    install_rewinding_consumer(app)  # partitions never committed are read from the start
    # internal=True: faust creates the topics with our partition count (a topic the
    # broker auto-creates may have another, and faust then refuses the table writes)
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
           "value_serializer": "raw", "partitions": settings.partitions, "internal": True}
    events = app.topic(settings.events_topic, **raw)
    dead = app.topic(settings.dead_letter_topic, **raw)
    alerts_out = app.topic(settings.alerts_topic, **raw)
    table = ConfirmedTable.add_to(app, "state", key_type=str, value_type=bytes,
                                  partitions=settings.partitions)
    table.value_serializer = "raw"  # our records are JSON already
    pipeline = Pipeline(settings, catalog, metrics=metrics)
    if metrics is not None:
        metrics.set_trials(lambda: pipeline.status(dt.datetime.now(dt.UTC)))

    sink = Sink(table)
    guard = OffsetGuard()
    servers = bootstrap(settings.broker)  # where the guard reads holes again
    busy = asyncio.Lock()  # one batch at a time: the agent's, or `tail_holes`'s
    last_events: dict[Any, Any] = {}  # the last event delivered, by partition

    async def load_if_needed() -> None:
        if pipeline.settled and not pipeline.loaded:
            messages = pipeline.load(iter(table.items()))
            generation = pipeline.generation
            try:
                await emitted_alerts(app, pipeline, sink, servers, alerts_out.get_topic_name())
            except BaseException:
                pipeline.loaded = False  # not safe to step events: load again
                raise
            if pipeline.generation != generation:
                return  # the partitions were revoked meanwhile: the next settle loads
            await send_alerts(sink, alerts_out, [
                m for m in messages if emitted_of(m[1]).key not in pipeline.unsent])

    @app.agent(events)
    async def monitor(stream: Any) -> None:
        track_changelog(app, table.changelog_topic.get_topic_name())
        async for batch_events in stream.take_events(settings.batch_size,
                                                     within=settings.batch_within):
            async with busy:
                await load_if_needed()
                started, filled = time.monotonic(), []
                steps = await admitted(app, pipeline, guard, servers, batch_events, filled)
                await step_all(steps, pipeline, sink, dead, alerts_out)
                for tp, offsets in filled:
                    mark_acked(app.consumer, tp, offsets)
                last_events.update((event.message.tp, event) for event in batch_events)
            if metrics is not None:  # from each message's arrival: the consumer stamps
                done = time.monotonic()  # `time_in` as it fetches (see `ArrivalMonitor`)
                for event in batch_events:
                    arrived = event.message.time_in
                    metrics.observe_latency(done - (started if arrived is None else arrived))

    @app.timer(TAIL_CHECK_SECONDS)
    async def tail_holes() -> None:
        """Step what faust read and dropped at the end of a partition: with no later
        message, `admitted` never sees that hole (`OffsetGuard.tails`)."""
        async def step_records(partition: Any, records: list[Any]) -> None:
            # written under the last event delivered on the partition, or the record
            carrier = last_events.get(partition)
            await step_all([Refetched(record, carrier or Carrier(record)) for record in records],
                           pipeline, sink, dead, alerts_out)

        async with busy:
            if pipeline.loaded:
                await fill_tails(guard, app.consumer, servers, settings.events_topic,
                                 step_records)

    @app.on_partitions_revoked.connect
    async def forget(_sender: Any, *_args: Any, **_kwargs: Any) -> None:
        pipeline.forget()  # the trials may move: reload from the table when settled

    @app.on_rebalance_complete.connect
    async def settle(_sender: Any, *_args: Any, **_kwargs: Any) -> None:
        # sent once the tables of this assignment are recovered, before the streams
        # resume: the only moment the table is whole and no event is being processed
        pipeline.settled = True
        async with busy:  # one `Sink.confirm` at a time
            await load_if_needed()

    if notifier is not None:
        notifier(app, alerts_out)
    from .web import add_routes

    add_routes(app, pipeline, metrics)
    return app, pipeline


async def emitted_alerts(app: Any, pipeline: Pipeline, sink: Sink, servers: list[str],
                         alerts_topic: str) -> None:
    """After a load: the alert transitions sent since the checkpoints loaded
    (`Pipeline.found`). A worker that died after sending a batch's alerts and before
    its checkpoint was durable sent alerts the table does not know of; the batch's
    events come again and decide them again, and these are not sent twice."""
    settings = pipeline.settings
    assigned = [tp for tp in app.consumer.assignment() if tp.topic == settings.events_topic]
    starts = alert_starts(pipeline.recorded_ends, [tp.partition for tp in assigned])
    if starts is None:
        return
    emitted, ends = await until_read(
        lambda: read_since(servers, alerts_topic, starts, lambda r: emitted_of(r.value)),
        f"{alerts_topic} for the alerts already sent")
    events_ends = await app.consumer.highwaters(*assigned)
    pipeline.found(emitted, {p: starts.get(p, 0) for p in ends},
                   {tp.partition: end for tp, end in events_ends.items()})
    sink.note(alerts_topic, ends)
    if pipeline.unsent:
        log.info("%d alert transition(s) already on %s are not sent again",
                 len(pipeline.unsent), alerts_topic)


def emitted_of(value: bytes | None) -> Emitted | None:
    """The alert transition an alerts-topic message carries, or None for a message
    that is not one of ours."""
    try:
        doc = orjson.loads(value or b"")
        return Emitted(doc["key"], doc["trial_id"], doc["rule_id"], int(doc["episode"]),
                       int(doc["sequence"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


async def step_all(events: list[Any], pipeline: Pipeline, sink: Sink, dead: Any,
                   alerts_out: Any) -> None:
    """Step events and write what they change, in batches a checkpoint can hold."""
    batch = Batch()
    for event in events:
        pipeline.handle(batch, event)
        if batch.full:
            await flush(batch, pipeline, sink, dead, alerts_out)
            batch = Batch()
    await flush(batch, pipeline, sink, dead, alerts_out)


class Refetched(NamedTuple):
    """A message faust fetched and never delivered, read again (`fetch_range`), and the
    delivered event after it (same partition), whose place the table writes take."""

    message: Any  # aiokafka's ConsumerRecord: topic, partition, offset, key, value
    carrier: Any  # faust's event


async def admitted(app: Any, pipeline: Pipeline, guard: OffsetGuard, servers: list[str],
                   batch_events: list[Any], filled: list[tuple[Any, range]]) -> list[Any]:
    """The events of a batch to step, in order, with what faust never delivered.

    Before the trials are loaded (a rebalance is under way) none is stepped: they stay
    unacked, and the seek that ends the rebalance reads them again. Before a message
    that comes after a hole (offsets faust fetched and dropped), the hole's messages,
    read again; ``filled`` gets their offsets, to count as acked once the batch is
    written (`monitor.faust_ext.OffsetGuard`)."""
    if not pipeline.loaded:
        for event in batch_events:
            drop(app.consumer, event.message)
        return []
    sync(guard, app.consumer, pipeline.settings.events_topic)
    steps: list[Any] = []
    for event in batch_events:
        message = event.message
        hole = guard.check(message.tp, message.offset)
        if hole is not None:
            records = await read_hole(servers, (message.topic, message.partition), hole)
            steps.extend(Refetched(record, event) for record in records)
            filled.append((message.tp, range(*hole)))
        steps.append(event)
    return steps


class Sink:
    """Where a batch goes: rows of the state table (a `ConfirmedTable`) and topic
    messages. `confirm` waits until the broker has taken every one, and sends again
    what it refused, so a batch's events are acked only once everything they caused
    is durable."""

    def __init__(self, table: ConfirmedTable) -> None:
        self.table = table
        self.unconfirmed: list[tuple[asyncio.Future, Callable[[], Awaitable[Any]]]] = []
        self.ends: dict[str, dict[int, int]] = defaultdict(dict)  # see `note`

    def note(self, topic: str, ends: dict[int, int]) -> None:
        """Learn that the partitions of a topic end at ``ends`` or later."""
        known = self.ends[topic]
        for partition, end in ends.items():
            known[partition] = max(known.get(partition, 0), end)

    def rows(self, event: Any, rows: list[tuple[str, bytes]]) -> None:
        """Write rows to the table, in the changelog partition of ``event``."""
        self.table.write(event, rows)

    async def send(self, topic: Any, key: bytes | None, value: bytes) -> None:
        async def again() -> Any:
            while True:
                try:
                    return await topic.send(key=key, value=value)
                except KafkaError as exc:
                    log.warning("could not send to %s, trying again: %s", topic, exc)
                    await asyncio.sleep(RETRY_SECONDS)

        self.unconfirmed.append((await again(), again))

    async def confirm(self) -> None:
        await self.table.send_rows()
        while self.unconfirmed or self.table.unconfirmed or self.table.batches:
            messages, self.unconfirmed = self.unconfirmed, []
            writes, self.table.unconfirmed = self.table.unconfirmed, []
            failed_messages = []
            for future, again in messages:
                if await delivered(future):
                    # the record's metadata (faust's topic.send gives the producer's
                    # own future while stream_publish_on_commit is off, as here)
                    sent = future.result()
                    self.note(sent.topic, {sent.partition: sent.offset + 1})
                else:
                    failed_messages.append(again)
            failed_writes = [(args, kwargs) for future, args, kwargs in writes
                             if not await delivered(future)]
            failed_rows = await self.table.confirm_rows()
            if failed_messages or failed_writes or failed_rows:
                await asyncio.sleep(RETRY_SECONDS)
            for args, kwargs in failed_writes:
                self.table.send_changelog(*args, **kwargs)  # joins table.unconfirmed
            await self.table.resend(failed_rows)  # joins table.batches
            for again in failed_messages:
                self.unconfirmed.append((await again(), again))


async def delivered(future: asyncio.Future) -> bool:
    """Whether the broker took a message; a refusal is logged, to send it again."""
    try:
        await future
    except KafkaError as exc:
        log.warning("the broker did not take a write, sending it again: %s", exc)
        return False
    return True


async def flush(batch: Batch, pipeline: Pipeline, sink: Sink, dead: Any,
                alerts_out: Any) -> None:
    """Write the batch (see the module's docstring for the order and why)."""
    # plan before the first await: a rebalance may replace the trials in memory while
    # this coroutine waits
    writes = pipeline.plan(batch, dt.datetime.now(dt.UTC),
                           dict(sink.ends[alerts_out.get_topic_name()]))
    for key, value in batch.dead:
        await sink.send(dead, key, value)
    await send_alerts(sink, alerts_out, writes.alerts)
    for partition, rows in writes.rows.items():
        sink.rows(batch.last_event[partition], rows)
    await sink.confirm()
    if pipeline.settings.broker_is_tansu and writes.rows:
        # tansu answers ListOffsets with the first offset of a partition's last produce
        # batch + 1, and faust's recovery reads a changelog up to that answer: end each
        # partition's writes with a row of its own, in a produce batch of its own
        for partition in writes.rows:
            sink.rows(batch.last_event[partition], [(f"{MARKER}{records.SEP}{partition}", b"")])
        await sink.confirm()


async def send_alerts(sink: Sink, topic: Any, messages: list[tuple[bytes, bytes]]) -> None:
    """Send alert messages and wait until the broker has every one."""
    for key, value in messages:
        await sink.send(topic, key, value)
    await sink.confirm()
