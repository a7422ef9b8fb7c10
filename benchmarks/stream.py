#!/usr/bin/env python3
"""The stream worker end to end, beside a no-op faust agent (issue #3, items 7 and 1).

    python benchmarks/stream.py                          # 20 trials (~18k events), 2 rounds
    python benchmarks/stream.py --trials 5 --rounds 1 --latency-events 50   # a quick look
    python benchmarks/stream.py --pure-marks 1000,100000 --kafka-marks 1000,10000

One embedded tansu broker for everything. A log of ``--trials`` generated trials (every
trial gets a copy of the ISC.19.29 rules, as in benchmarks/replay.py, so every event
goes through the rules) is published once to a fresh topic. Then, ``--rounds`` times:

* throughput, no-op: the no-op agent of benchmarks/noop_agent.py (fresh group) reads
  the topic; events/s from its first to its last event;
* throughput, worker: ``safety-monitor worker`` (fresh app id, topics and state dir;
  MONITOR_EVENTS_TOPIC = that topic) reads it; events/s between the first and the last
  sample of ``safety_events_total`` (its /metrics, scraped every 0.5 s: a scrape costs
  the worker tens of ms, the figure printed says how much) taken while it was
  processing. An event counts once the engine has stepped it: the state it changed is
  in memory and its table write follows in the same batch. Also printed: CPU seconds
  per 1,000 events of the worker and of tansu, and changelog records per event;

and the ratio of the two (target: the worker >= 50% of the no-op rate). A worker that
stops making progress after its first batch (fewer than 200 events in 10 s) is counted
as stalled and replaced by a fresh one (see the report of issue #3: an aiokafka producer
metadata bug). ``--set MONITOR_X=VALUE`` passes settings to the workers.

Latency, on the last worker once it is caught up: subjects of a fresh trial are infused,
then one serious related AE per subject is published at ``--latency-rate`` per second;
from the second on each raises or updates ``related-sae``. Each alert on the alerts topic
is matched to its event by ``event_id``: p50/p99 of (alert's broker timestamp - publish
time) and of (alert received by this script - publish time).

Changelog bytes per event, for ONE trial: on Kafka, the same worker is fed the first
``--kafka-marks`` events of a generated one-trial log and the records of that trial in
``<app_id>-state-changelog`` are summed; pure, without Kafka, the worker's own
`Pipeline` steps ``--pure-marks`` events in batches of MONITOR_BATCH_SIZE (1000) and
sums what each batch would write, and what a single event writes (a batch of one) near
each mark.

Everything it starts (broker, agents, workers) is stopped on the way out, Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "examples")]

import noop_agent  # noqa: E402
import orjson  # noqa: E402
from replay import prepare  # noqa: E402

from monitor.embedded import EmbeddedBroker  # noqa: E402
from monitor.publish import bootstrap, publish  # noqa: E402
from tests.integration.workers import Topics, Worker  # noqa: E402

PARTITIONS = 4  # tests.integration.workers.Worker sets MONITOR_PARTITIONS=4
SAMPLE_EVERY = 0.5  # s between /metrics scrapes while timing (a scrape costs the worker)
STALL_SECONDS, STALL_EVENTS, MAX_STALLS = 10.0, 200, 3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LATENCY_TRIAL, CHANGELOG_TRIAL = "LAT.0001", "SIM.9001"
EVENTS_PER_SUBJECT = 44  # about, in examples/generate.py


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def add_rules(rules: Path, trial_id: str) -> None:
    """A copy of the ISC.19.29 rules for ``trial_id``, as benchmarks/replay.py writes."""
    template = (ROOT / "rules" / "isc-19-29.yaml").read_text()
    (rules / f"{trial_id}.yaml").write_text(
        template.replace("trial_id: ISC.19.29", f"trial_id: {trial_id}"))


def readable(lines: list[bytes]) -> list[bytes]:
    """The lines the no-op agent can decode (it parses JSON): the generated log's two
    broken lines would stop it short of the last event."""
    kept = []
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError):
            if isinstance(orjson.loads(line), dict):
                kept.append(line)
    return kept


def one_trial_log(events: int, seed: int) -> list[bytes]:
    """The first ``events`` events (by recorded_at) of one generated trial."""
    import generate

    subjects = events // EVENTS_PER_SUBJECT + 2
    log = generate.trial_events(CHANGELOG_TRIAL, subjects, random.Random(seed))
    while len(log) < events:  # a sparse draw: a few more subjects
        subjects += max(1, subjects // 10)
        log = generate.trial_events(CHANGELOG_TRIAL, subjects, random.Random(seed))
    return [orjson.dumps(event) for event in log[:events]]


# ---------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass(frozen=True)
class Sample:
    """The worker's messages processed at one moment, and CPU seconds used so far."""

    at: float
    processed: int
    worker_cpu: float | None = None
    broker_cpu: float | None = None


def span_of(samples: list[Sample], total: int) -> tuple[Sample, Sample]:
    """The two samples to time the run between: the first one after the first batch
    and the last one before the end (both exact points of the curve); when they
    coincide, up to the first sample that saw the end."""
    moving = [s for s in samples if 0 < s.processed < total]
    end = next(s for s in samples if s.processed >= total)
    first = moving[0] if moving else end
    last = moving[-1] if len(moving) > 1 else end
    if last.at <= first.at:
        raise RuntimeError(f"too few samples to time {total} events: {samples[:5]}")
    return first, last


def per_1k(first: Sample, last: Sample, cpu: str) -> float | None:
    """CPU seconds per 1,000 messages between two samples (None off Linux)."""
    used = [getattr(first, cpu), getattr(last, cpu)]
    if None in used:
        return None
    return 1000 * (used[1] - used[0]) / (last.processed - first.processed)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# ---------------------------------------------------------------------------- the worker


class Stalled(RuntimeError):
    """The worker stopped making progress after its first batch (see the report)."""


def scrape(worker: Worker) -> tuple[int | None, float]:
    """(sum of safety_events_total over every outcome, seconds the scrape took)."""
    started = time.monotonic()
    try:
        url = f"http://127.0.0.1:{worker.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None, time.monotonic() - started
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("safety_events_total{"))), time.monotonic() - started


def stalled(samples: list[Sample]) -> bool:
    """Fewer than STALL_EVENTS messages in the last STALL_SECONDS, after a first batch."""
    moving = [s for s in samples if s.processed > 0]
    if not moving or moving[-1].at - moving[0].at < STALL_SECONDS:
        return False
    recent = [s for s in moving if s.at >= moving[-1].at - STALL_SECONDS]
    return recent[-1].processed - recent[0].processed < STALL_EVENTS


async def follow(run: Run, worker: Worker, total: int, timeout: float,
                 every: float = 0.1) -> list[Sample]:
    """Samples until the worker has processed ``total`` messages."""
    samples: list[Sample] = []
    deadline = time.monotonic() + timeout
    while not samples or samples[-1].processed < total:
        if stalled(samples):
            raise Stalled(f"stalled at {samples[-1].processed} of {total} messages")
        if worker.process.poll() is not None or time.monotonic() > deadline:
            log = worker.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker did not process {total} (last {samples[-1:]}); "
                               f"the end of its log:\n{log}")
        processed, _ = await asyncio.to_thread(scrape, worker)
        if processed is not None:
            samples.append(Sample(time.monotonic(), processed,
                                  cpu_seconds(worker.process.pid), cpu_seconds(run.broker_pid)))
        await asyncio.sleep(every)
    return samples


@dataclass
class Run:
    """What this run started, so that all of it is stopped on the way out."""

    broker: str
    topic: str
    rules: Path
    workdir: Path
    broker_pid: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # more MONITOR_* for the workers
    workers: list[Worker] = field(default_factory=list)

    def worker(self) -> Worker:
        topics = Topics()
        worker = Worker(self.broker, topics, self.workdir / f"monitor-{topics.tag}",
                        MONITOR_EVENTS_TOPIC=self.topic, MONITOR_RULES_DIR=str(self.rules),
                        **self.env)
        self.workers.append(worker)
        return worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@dataclass
class Round:
    """One round of the throughput measure."""

    noop: float
    worker: float = 0.0
    worker_cpu: float | None = None  # CPU s per 1,000 events
    broker_cpu: float | None = None
    changelog_records: int = 0
    scrapes: int = 0
    scrape_s: float = 0.0
    stalls: int = 0


async def worker_rate(run: Run, total: int, timeout: float, figures: Round) -> Worker:
    """Start a worker on the log; time it (a stalled one is counted and replaced)."""
    while True:
        worker = run.worker()
        try:
            samples = await follow(run, worker, total, timeout, every=SAMPLE_EVERY)
            break
        except Stalled as stall:
            figures.stalls += 1
            say(f"  worker {worker.env['MONITOR_APP_ID']} {stall}; starting another")
            worker.stop()
            if figures.stalls >= MAX_STALLS:
                raise
    first, last = span_of(samples, total)
    figures.worker = (last.processed - first.processed) / (last.at - first.at)
    figures.worker_cpu = per_1k(first, last, "worker_cpu")
    figures.broker_cpu = per_1k(first, last, "broker_cpu")
    figures.scrapes = sum(first.at <= s.at <= last.at for s in samples)
    costs = [(await asyncio.to_thread(scrape, worker))[1] for _ in range(5)]  # it is idle now
    figures.scrape_s = sorted(costs)[2]
    figures.changelog_records = await topic_records(
        run.broker, f"{worker.env['MONITOR_APP_ID']}-state-changelog")
    return worker


async def topic_records(url: str, topic: str) -> int:
    """Records in a topic (the sum of its end offsets, once two reads agree). Right on
    tansu because the worker sends one record per batch there."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(url), enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        counts = [-1, sum((await consumer.end_offsets(partitions)).values())]
        while counts[-1] != counts[-2]:
            await asyncio.sleep(0.5)
            counts.append(sum((await consumer.end_offsets(partitions)).values()))
        return counts[-1]
    finally:
        await consumer.stop()


async def noop_rate(run: Run, total: int, timeout: float) -> float:
    """The no-op agent of benchmarks/noop_agent.py on the same topic, a fresh group."""
    args = noop_agent.parse_args(["throughput", "--mode", "noop", "--profile", "fast"])
    tag = uuid.uuid4().hex[:6]
    args.broker, args.topic, args.app_id = run.broker, run.topic, f"bench-noop-{tag}"
    args.datadir, args.set = str(run.workdir / f"noop-{tag}"), list(noop_agent.TANSU_WORKAROUNDS)
    agent = noop_agent.WorkerProcess(args, run.workdir, target=total)
    try:
        done = await agent.wait_for("target", timeout=timeout)
    finally:
        agent.kill()
    return (total - 1) / (done["target_at"] - done["first_at"])


async def throughput(run: Run, total: int, rounds: int,
                     timeout: float) -> tuple[list[Round], Worker]:
    """The no-op agent, then the worker, ``rounds`` times; the last worker is left
    running (caught up) for the latency and changelog measures."""
    figures, worker = [], None
    for number in range(1, rounds + 1):
        if worker is not None:
            worker.stop()
        this = Round(await noop_rate(run, total, timeout))
        say(f"round {number}: no-op agent {this.noop:,.0f} events/s")
        figures.append(this)
        worker = await worker_rate(run, total, timeout, this)
        say(f"round {number}: worker     {this.worker:,.0f} events/s "
            f"({this.worker / this.noop:.0%})")
    return figures, worker


# ---------------------------------------------------------------------------- latency


def latency_events(count: int) -> tuple[list[bytes], list[tuple[str, Callable[[], bytes]]]]:
    """Infusions of ``count`` new subjects, and one serious related AE per subject
    (made when sent, so its recorded_at is the send time)."""
    today = dt.datetime.now(dt.UTC)
    infused = (today - dt.timedelta(days=20)).isoformat()
    subjects = [f"LAT0001-{n:04d}" for n in range(count)]

    def base(kind: str, subject: str, event_id: str) -> dict:
        return {"type": kind, "trial_id": LATENCY_TRIAL, "subject_id": subject,
                "event_id": event_id, "recorded_at": dt.datetime.now(dt.UTC).isoformat()}

    infusions = [orjson.dumps({**base("infusion", s, f"{s}-inf"), "infused_at": infused,
                               "dose_number": 1}) for s in subjects]

    def sae(subject: str) -> Callable[[], bytes]:
        return lambda: orjson.dumps({
            **base("adverse_event", subject, f"{subject}-sae"), "ae_id": f"{subject}-AE-1",
            "version": 1, "term": "peritonitis", "meddra_pt": "Spontaneous bacterial peritonitis",
            "meddra_soc": "Infections and infestations",
            "onset": (today - dt.timedelta(days=5)).date().isoformat(), "grade": 2,
            "serious": True, "serious_criteria": ["hospitalization"],
            "relatedness": "probable"})

    return infusions, [(f"{s}-sae", sae(s)) for s in subjects]


async def alert_times(url: str, topic: str, wanted: set[str],
                      timeout: float) -> dict[str, tuple[float, float]]:
    """event_id -> (broker timestamp, receive time) of its first alert, in epoch s; reads
    the alerts topic from the start, until every wanted event has an alert."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(url), fetch_max_wait_ms=20,
                                enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, tuple[float, float]] = {}
    try:
        await consumer.topics()
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout
        while not wanted <= seen.keys() and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=100)).values():
                now = time.time()
                for message in messages:
                    event_id = orjson.loads(message.value)["event_id"]
                    seen.setdefault(event_id, (message.timestamp / 1000, now))
    finally:
        await consumer.stop()
    return seen


async def trickle(url: str, topic: str, events: list[tuple[str, Callable[[], bytes]]],
                  rate: float) -> dict[str, float]:
    """Send the events at ``rate`` per second; event_id -> publish time (epoch s)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(url), acks="all", linger_ms=0)
    await producer.start()
    sent: dict[str, float] = {}
    try:
        started = time.monotonic()
        for number, (event_id, make) in enumerate(events):
            await asyncio.sleep(max(0.0, started + number / rate - time.monotonic()))
            value = make()
            sent[event_id] = time.time()
            await producer.send(topic, value, key=LATENCY_TRIAL.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def latency(run: Run, worker: Worker, done: int, count: int,
                  rate: float) -> tuple[list[float], list[float], int]:
    """(timestamp latencies, receive latencies, alerts expected) in seconds."""
    infusions, saes = latency_events(count)
    await publish(run.broker, run.topic, infusions, PARTITIONS)
    await follow(run, worker, done + count, timeout=60)
    wanted = {event_id for event_id, _ in saes[1:]}  # the first SAE is one subject only
    reader = asyncio.create_task(alert_times(run.broker, worker.env["MONITOR_ALERTS_TOPIC"],
                                             wanted, count / rate + 30))
    sent = await trickle(run.broker, run.topic, saes, rate)
    seen = await reader
    stamped = [seen[e][0] - sent[e] for e in wanted if e in seen]
    received = [seen[e][1] - sent[e] for e in wanted if e in seen]
    return stamped, received, len(wanted)


# ---------------------------------------------------------------------------- changelog


def record_trial(key: bytes) -> str:
    from monitor.engine.records import key_trial

    return key_trial(orjson.loads(key) if key.startswith(b'"') else key.decode())


async def changelog_bytes(url: str, changelog: str, trial_id: str) -> tuple[int, int, int]:
    """(records, key bytes, value bytes) of ``trial_id`` in the changelog, once the
    worker's writes have landed (two equal reads 1 s apart)."""
    previous = None
    while True:
        written = await noop_agent.read_partitions(bootstrap(url), changelog)
        mine = [(key, value) for key, seen in written.items() if record_trial(key) == trial_id
                for _, value in seen]
        figures = (len(mine), sum(len(k) for k, _ in mine), sum(len(v) for _, v in mine))
        if figures == previous:
            return figures
        previous = figures
        await asyncio.sleep(1)


async def kafka_changelog(run: Run, worker: Worker, done: int, log: list[bytes],
                          marks: list[int]) -> list[tuple[int, tuple[int, int, int]]]:
    """Feed the one-trial log up to each mark; the trial's changelog totals at each."""
    changelog = f"{worker.env['MONITOR_APP_ID']}-state-changelog"
    out, fed = [], 0
    for mark in marks:
        await publish(run.broker, run.topic, log[fed:mark], PARTITIONS)
        done, fed = done + mark - fed, mark
        await follow(run, worker, done, timeout=120)
        out.append((mark, await changelog_bytes(run.broker, changelog, CHANGELOG_TRIAL)))
    return out


@dataclass
class Tally:
    """Bytes and records written, by record kind (t trial, s subject, a AE, l lab)."""

    records: int = 0
    keys: int = 0
    values: int = 0
    by_kind: Counter = field(default_factory=Counter)

    def add(self, rows: Iterator[tuple[str, bytes]]) -> None:
        for key, value in rows:
            self.records += 1
            self.keys += len(key.encode())
            self.values += len(value)
            self.by_kind[key[0]] += len(value)


def fake_event(line: bytes, offset: int) -> SimpleNamespace:
    """What `Pipeline.handle` reads of a faust event: its message."""
    message = SimpleNamespace(value=line, key=None, topic="bench", partition=0, offset=offset)
    return SimpleNamespace(message=message)


def written(pipeline, batch) -> Iterator[tuple[str, bytes]]:  # noqa: ANN001
    """The table rows a batch writes (checkpoints with journal, subject rows, and per
    partition the alerts topic's ends, counted under "~"); the tansu-only marker rows
    are left out."""
    for rows in pipeline.plan(batch, dt.datetime.now(dt.UTC), {}).rows.values():
        yield from rows


def merge(batch, one) -> None:  # noqa: ANN001
    """Add what batch ``one`` touched to ``batch``."""
    for partition, by_trial in one.touched.items():
        for trial_id, by_subject in by_trial.items():
            for subject_id, changed in by_subject.items():
                batch.touched[partition][trial_id][subject_id] |= changed


@dataclass
class PureFigures:
    """At one mark: what the batches wrote up to it (cumulative), what they wrote for
    the ``window`` events before it (marginal), and what each of those events writes
    alone, in a batch of one (single; `worst` the largest)."""

    cumulative: Tally
    marginal: Tally
    single: Tally
    worst: int = 0


def pure_changelog(log: list[bytes], rules: Path, marks: list[int], batch_size: int,
                   window: int) -> dict[int, PureFigures]:
    """The worker's own `Pipeline` without Kafka: step the log, write like `flush`."""
    from monitor.rules_loader import load_rules_dir
    from monitor.settings import Settings
    from monitor.stream import Batch, Pipeline

    pipeline = Pipeline(Settings(), load_rules_dir(rules))
    bounds = {b for mark in marks for b in (mark - window, mark)}
    total, at, single = Tally(), {}, {mark: Tally() for mark in marks}
    worst = dict.fromkeys(marks, 0)
    batch, in_batch = Batch(), 0
    for offset, line in enumerate(log[:max(marks)]):
        mark = next((m for m in marks if m - window <= offset < m), None)
        if mark is None:
            pipeline.handle(batch, fake_event(line, offset))
        else:  # also what this event writes alone
            one = Batch()
            pipeline.handle(one, fake_event(line, offset))
            alone = Tally()
            alone.add(written(pipeline, one))
            single[mark].add(written(pipeline, one))
            worst[mark] = max(worst[mark], alone.values)
            merge(batch, one)
        in_batch += 1
        if in_batch == batch_size or offset + 1 in bounds:
            total.add(written(pipeline, batch))
            batch, in_batch = Batch(), 0
            if offset + 1 in bounds:
                at[offset + 1] = Tally(total.records, total.keys, total.values,
                                       Counter(total.by_kind))
    return {mark: PureFigures(at[mark], minus(at[mark], at.get(mark - window, Tally())),
                              single[mark], worst[mark]) for mark in marks}


def minus(a: Tally, b: Tally) -> Tally:
    return Tally(a.records - b.records, a.keys - b.keys, a.values - b.values,
                 a.by_kind - b.by_kind)


# ---------------------------------------------------------------------------- report


KINDS = {"t": "trial record", "s": "subject headers", "a": "AE records", "l": "lab records",
         "~": "alerts topic ends"}


def per_event(tally: Tally, events: int) -> str:
    both = (tally.keys + tally.values) / events
    return (f"{tally.values / events:>9,.0f} B values, {both:>9,.0f} B keys+values, "
            f"{tally.records / events:.2f} records")


def by_kind(tally: Tally, events: int) -> str:
    """Value bytes per event by record kind."""
    return ", ".join(f"{KINDS[kind]} {tally.by_kind[kind] / events:,.0f}" for kind in KINDS)


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:,.0f} (min {min(values):,.0f}, max {max(values):,.0f}, " \
           f"spread {(max(values) - min(values)) / mean:.0%})"


def print_throughput(events: int, publish_s: float, rounds: list[Round]) -> None:
    print(f"published {events:,} events once in {publish_s:.1f} s ({events / publish_s:,.0f}/s)")
    print("throughput, events/s from first to last event processed "
          "(CPU s per 1,000 events of the worker and of tansu):")
    print("  round   no-op agent      worker   worker/no-op   worker CPU   tansu CPU")
    for number, r in enumerate(rounds, 1):
        print(f"  {number:>5} {r.noop:>13,.0f} {r.worker:>11,.0f} {r.worker / r.noop:>14.1%} "
              f"{seconds(r.worker_cpu):>12} {seconds(r.broker_cpu):>11}")
    ratios = [r.worker / r.noop for r in rounds]
    print(f"  no-op  mean {spread([r.noop for r in rounds])}")
    print(f"  worker mean {spread([r.worker for r in rounds])}")
    print(f"  ratio  mean {sum(ratios) / len(ratios):.1%} (min {min(ratios):.1%}, max "
          f"{max(ratios):.1%}); target >= 50%")
    last = rounds[-1]
    print(f"  changelog records written per event: {last.changelog_records / events:.2f} "
          f"({last.changelog_records:,} records)")
    span = events / last.worker
    print(f"  timing cost: /metrics scraped every {SAMPLE_EVERY} s; a scrape takes "
          f"{last.scrape_s * 1000:.0f} ms of the worker, ~{last.scrapes * last.scrape_s / span:.0%}"
          " of the timed span")
    stalls = sum(r.stalls for r in rounds)
    if stalls:
        print(f"  STALLED workers replaced: {stalls} (stuck after their first batch; an "
              "aiokafka producer metadata bug, see the report of issue #3)")


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_latency(stamped: list[float], received: list[float], expected: int,
                  rate: float) -> None:
    print(f"latency, publish -> alert message ({len(stamped)} of {expected} alerting events, "
          f"sent at {rate:g}/s):")
    for name, values in (("alert's broker timestamp", stamped), ("received here", received)):
        if values:
            print(f"  to {name:<25} p50 {percentile(values, 50) * 1000:7.0f} ms   p99 "
                  f"{percentile(values, 99) * 1000:7.0f} ms   max {max(values) * 1000:7.0f} ms")


def print_changelog(kafka: list[tuple[int, tuple[int, int, int]]],
                    pure: dict[int, PureFigures], batch_size: int, window: int) -> None:
    print(f"changelog bytes per event, one trial ({CHANGELOG_TRIAL}):")
    before = (0, (0, 0, 0))
    for mark, (records, keys, values) in kafka:
        tally, since = Tally(records, keys, values), minus(
            Tally(records, keys, values), Tally(*before[1]))
        print(f"  kafka, after {mark:>7,}: {per_event(tally, mark)}")
        if before[0]:
            print(f"    events {before[0] + 1:,}-{mark:,}: {per_event(since, mark - before[0])}")
        before = (mark, (records, keys, values))
    for mark, figures in pure.items():
        print(f"  pure, after {mark:>8,}: {per_event(figures.cumulative, mark)}"
              f" (batches of {batch_size})")
        print(f"    its last {window:,} events: {per_event(figures.marginal, window)}")
        print(f"      B/event by record: {by_kind(figures.marginal, window)}")
        print(f"    each of them alone (a batch of 1): {per_event(figures.single, window)}")
        print(f"      B/event by record: {by_kind(figures.single, window)}; largest event "
              f"{figures.worst:,} B")


# ---------------------------------------------------------------------------- main


def marks_of(text: str) -> list[int]:
    return sorted(int(part) for part in text.split(",") if part)


async def on_broker(args: argparse.Namespace, run: Run, lines: list[bytes],
                    one_trial: list[bytes]) -> dict:
    started = time.monotonic()
    await publish(run.broker, run.topic, lines, PARTITIONS)
    out: dict = {"publish_s": time.monotonic() - started}
    out["throughput"], worker = await throughput(run, len(lines), args.rounds, args.timeout)
    done = len(lines)
    if args.latency_events > 1:
        say(f"latency: {args.latency_events} subjects at {args.latency_rate:g}/s ...")
        out["latency"] = await latency(run, worker, done, args.latency_events,
                                       args.latency_rate)
        done += 2 * args.latency_events
    say("changelog on kafka ...")
    out["kafka"] = await kafka_changelog(run, worker, done, one_trial,
                                         marks_of(args.kafka_marks))
    return out


async def measure(args: argparse.Namespace, workdir: Path) -> None:
    # SIGTERM as Ctrl-C: cancel, so that every `finally` stops what it started
    with contextlib.suppress(NotImplementedError):  # no signal handlers off Unix
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM,
                                                      asyncio.current_task().cancel)
    say(f"generating {args.trials} trials and a one-trial log ...")
    log_path, rules = prepare(workdir, args.trials)
    for trial_id in (LATENCY_TRIAL, CHANGELOG_TRIAL):
        add_rules(Path(rules), trial_id)
    lines = readable(Path(log_path).read_bytes().splitlines())
    pure_marks, kafka_marks = marks_of(args.pure_marks), marks_of(args.kafka_marks)
    one_trial = one_trial_log(max(pure_marks + kafka_marks), args.seed)
    run = Run("", f"bench-events-{uuid.uuid4().hex[:6]}", Path(rules), workdir,
              env=dict(setting.split("=", 1) for setting in args.set))
    async with EmbeddedBroker() as broker:
        run.broker, run.broker_pid = broker.url, broker.pid
        try:
            out = await on_broker(args, run, lines, one_trial)
        finally:
            run.stop()
    say("changelog, pure ...")
    pure = pure_changelog(one_trial, Path(rules), pure_marks, args.batch, args.window)
    print(f"\n== stream benchmark: {args.trials} trials, {len(lines):,} events, {PARTITIONS} "
          "partitions, embedded tansu, worker store rocksdb ==")
    print_throughput(len(lines), out["publish_s"], out["throughput"])
    if "latency" in out:
        print_latency(*out["latency"], args.latency_rate)
    print_changelog(out["kafka"], pure, args.batch, args.window)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="generated trials (~900 "
                        "events each) for throughput")
    parser.add_argument("--rounds", type=int, default=2, help="no-op + worker measures")
    parser.add_argument("--latency-events", type=int, default=200, help="SAEs of new "
                        "subjects sent one by one (0: no latency measure)")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="SAEs per second")
    parser.add_argument("--kafka-marks", default="1000,10000", help="events of one trial fed "
                        "to the worker, changelog measured at each")
    parser.add_argument("--pure-marks", default="1000,100000", help="events of one trial "
                        "stepped without Kafka, measured at each")
    parser.add_argument("--batch", type=int, default=1000, help="pure: events per batch "
                        "(the worker's MONITOR_BATCH_SIZE)")
    parser.add_argument("--window", type=int, default=1000, help="pure: events before each "
                        "mark measured one by one")
    parser.add_argument("--set", action="append", default=[], metavar="MONITOR_X=VALUE",
                        help="a setting for the monitor workers (repeatable), e.g. "
                        "MONITOR_BATCH_WITHIN=0.05")
    parser.add_argument("--seed", type=int, default=1929)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    try:
        asyncio.run(measure(args, workdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted; everything started was stopped")
        raise SystemExit(130) from None
    finally:
        if args.keep:
            say(f"work folder kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
