"""faust against the embedded tansu broker: throughput, restart after SIGKILL, web routes.

    python benchmarks/noop_agent.py throughput --events 20000 --mode noop
    python benchmarks/noop_agent.py throughput --events 20000 --mode per-event --store rocksdb
    python benchmarks/noop_agent.py throughput --events 20000 --mode per-batch --batch 500
    python benchmarks/noop_agent.py restart --profile fast
    python benchmarks/noop_agent.py worker ...     (the faust worker; started by the above)

`throughput` publishes N JSON events (key = trial id) to a fresh topic, then starts one
worker that reads them all and reports events/s between its first and N-th event.
Modes: `noop` (count only), `per-event` (one table write per event), `per-batch`
(`stream.take_events(batch, within)`, one table write per batch and partition) and
`take-naive` (a table write in a `stream.take()` body: fails, see as_current_event).

`restart` keeps publishing events at a steady rate, starts a worker, SIGKILLs it
mid-stream, starts a new one at once (same group, same data dir) and reports the
seconds from the kill until the new worker consumes again. Profiles are sets of faust
settings (see PROFILES); `--set name=value` adds or overrides single settings.

Both start an embedded broker unless `--broker kafka://host:port` is given. Each run
uses fresh topic and group names, so runs never see each other's data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: faust settings per profile. "fast" made a SIGKILLed worker's successor consume again
#: ~12.6 s after the kill on tansu (faust defaults: ~110 s); 6 s is also the smallest
#: session timeout Apache Kafka accepts by default (group.min.session.timeout.ms).
FAST = {
    "broker_session_timeout": 6.0,
    "broker_heartbeat_interval": 1.0,
    "broker_rebalance_timeout": 6.0,
}
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": FAST,
    "static": {**FAST, "consumer_group_instance_id": "bench-worker-1"},
}
#: tansu's ListOffsets(latest) answers (base offset of the last batch + 1), not (last
#: offset + 1): after a restart faust's recovery check then sees RocksDB ahead of the
#: changelog and crashes the worker (ConsistencyError). One record per produced batch
#: keeps the answer right for the topics the worker writes; the other way out,
#: recovery_consistency_check=false, also works but drops a safety check.
TANSU_WORKAROUNDS = ["producer_max_batch_size=1"]
TRIALS = [f"TRIAL-{n:02d}" for n in range(16)]


# ---------------------------------------------------------------------------- events


def make_event(number: int) -> tuple[bytes, bytes]:
    trial = TRIALS[number % len(TRIALS)]
    event = {
        "type": "adverse_event",
        "trial_id": trial,
        "subject_id": f"{trial}-S{number % 20:03d}",
        "event_id": f"evt-{number:08d}",
        "recorded_at": datetime.now(UTC).isoformat(),
        "ae_id": f"AE-{number:08d}",
        "version": 1,
        "term": "Pyrexia",
        "onset": "2021-03-04",
        "grade": 1 + number % 5,
        "serious": number % 7 == 0,
    }
    return trial.encode(), json.dumps(event).encode()


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, replication_factor=1)])
    finally:
        await admin.close()


async def read_partitions(bootstrap: str, topic: str) -> dict[bytes, list[tuple[int, bytes]]]:
    """Every key of a topic with the (partition, value) of each of its records."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # loads the metadata partitions_for_topic reads
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: dict[bytes, list[tuple[int, bytes]]] = {}
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                for record in batch:
                    records.setdefault(record.key, []).append((record.partition, record.value))
        return records
    finally:
        await consumer.stop()


async def check_changelog(bootstrap: str, topic: str, changelog: str) -> dict[str, Any]:
    """Is each table key's changelog in its source partition; what do the keys sum to?"""
    await asyncio.sleep(3)  # let the worker's last changelog writes land
    source = {
        key: {p for p, _ in seen} for key, seen in (await read_partitions(bootstrap, topic)).items()
    }
    written = await read_partitions(bootstrap, changelog)
    misplaced = [
        key.decode()
        for key, seen in written.items()
        if {p for p, _ in seen} != source.get(json.loads(key).encode())
    ]
    total = sum(json.loads(seen[-1][1]) for seen in written.values())
    return {"keys": len(written), "misplaced": misplaced, "sum_of_latest_values": total}


async def publish(bootstrap: str, topic: str, numbers: range, rate: float | None = None) -> None:
    """Publish events; `rate` (events/s) paces them, else as fast as possible."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        started = time.monotonic()
        for sent, number in enumerate(numbers):
            key, value = make_event(number)
            await producer.send(topic, value, key=key)
            if rate is not None:
                await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()


# ---------------------------------------------------------------------------- the worker


def run_worker(args: argparse.Namespace) -> None:
    """The faust worker process: one agent, progress lines to `args.progress`."""
    import faust
    from faust.worker import Worker

    settings = {**PROFILES[args.profile], **dict(parse_setting(s) for s in args.set)}
    app = faust.App(
        args.app_id,
        broker=args.broker,
        store="rocksdb://" if args.store == "rocksdb" else "memory://",
        datadir=args.datadir,
        topic_partitions=args.partitions,
        web_host="127.0.0.1",  # the host faust advertises
        web_bind="127.0.0.1",  # the address it listens on (default 0.0.0.0)
        web_port=args.web_port,
        env={},  # else faust lets WEB_PORT, BROKER_URL, ... in os.environ override these
        **settings,
    )
    topic = app.topic(
        args.topic,
        partitions=args.partitions,
        internal=True,  # faust creates only "internal" topics when missing
        key_type=bytes,
        value_type=bytes,
        value_serializer="json",
    )
    counts = app.Table("counts", default=int, key_type=str, value_type=int)
    progress = Progress(Path(args.progress), args.target)
    add_agent(app, topic, counts, progress, args)
    add_web_routes(app, progress, counts)

    @app.timer(interval=0.1)
    async def report_progress() -> None:
        progress.write("progress")

    progress.write("starting")
    Worker(app, loglevel=args.loglevel, redirect_stdouts=False).execute_from_commandline()


def parse_setting(text: str) -> tuple[str, Any]:
    name, _, raw = text.partition("=")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


class Progress:
    """What the worker has consumed, appended as JSON lines to a file the parent reads."""

    def __init__(self, path: Path, target: int) -> None:
        self.path = path
        self.target = target
        self.consumed = 0
        self.first_at: float | None = None
        self.target_at: float | None = None
        self.errors: list[str] = []

    def add(self, count: int) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at = now
            self.write("first")
        self.consumed += count
        if self.target and self.target_at is None and self.consumed >= self.target:
            self.target_at = now
            self.write("target")

    def write(self, kind: str) -> None:
        line = {
            "kind": kind,
            "t": time.time(),
            "pid": os.getpid(),
            "consumed": self.consumed,
            "first_at": self.first_at,
            "target_at": self.target_at,
            "errors": self.errors,
        }
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")


def add_agent(app: Any, topic: Any, counts: Any, progress: Progress, args: Any) -> None:
    if args.mode == "noop":

        @app.agent(topic)
        async def noop(stream: Any) -> None:
            async for _event in stream:
                progress.add(1)

    elif args.mode == "per-event":

        @app.agent(topic)
        async def count_each(stream: Any) -> None:
            async for event in stream:
                counts[event["trial_id"]] += 1
                progress.add(1)

    elif args.mode == "per-batch":

        @app.agent(topic)
        async def count_batches(stream: Any) -> None:
            async for events in stream.take_events(args.batch, within=args.within):
                for same_partition in by_partition(events):
                    last = same_partition[-1]
                    with as_current_event(last):  # table writes go to last's partition
                        counts[last.value["trial_id"]] += len(same_partition)
                progress.add(len(events))

    else:  # "take-naive": shows that a table write in a stream.take() body fails

        @app.agent(topic)
        async def count_batches_naively(stream: Any) -> None:
            async for batch in stream.take(args.batch, within=args.within):
                try:
                    counts[batch[-1]["trial_id"]] += len(batch)
                except Exception as error:  # reported to the parent, not fatal
                    if len(progress.errors) < 3:
                        progress.errors.append(repr(error))
                progress.add(len(batch))


def by_partition(events: list[Any]) -> list[list[Any]]:
    groups: dict[int, list[Any]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return list(groups.values())


@contextlib.contextmanager
def as_current_event(event: Any) -> Iterator[None]:
    """Make `event` faust's current event, as `async for event in stream` does.

    Inside a `stream.take()`/`take_events()` body faust has no current event (the
    buffer is filled by another task), and a table write then fails with "Cannot
    modify table key from outside of stream iteration". A table write goes to the
    changelog partition (and the RocksDB partition) of the current event, so only
    keys that live in `event`'s partition may be written here. `_current_event` is
    private to faust.streams: pin faust's version.
    """
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def add_web_routes(app: Any, progress: Progress, counts: Any) -> None:
    """GET /healthz, /readyz, /status, /metrics on the worker's web port."""

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"ok": True})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready = is_ready(app)
        return web.json({"ready": ready}, status=200 if ready else 503)

    @app.page("/status")
    async def status(web: Any, request: Any) -> Any:
        table_total = sum(counts.values())  # reading a table outside a stream is fine
        return web.json({"consumed": progress.consumed, "table_total": table_total})

    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    consumed = Gauge("benchmark_events_consumed", "Events this worker consumed", registry=registry)
    consumed.set_function(lambda: progress.consumed)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type; web.text adds "; charset=utf-8"
        body = generate_latest(registry).decode()
        return web.text(body, content_type="text/plain; version=0.0.4")


def is_ready(app: Any) -> bool:
    """Table recovery has finished once, and no rebalance or recovery is under way."""
    recovered = app.tables.recovery.completed.is_set()
    return recovered and not app.rebalancing and not app.in_recovery


# ---------------------------------------------------------------------------- the parent


class WorkerProcess:
    """A `worker` subprocess and the progress lines it writes."""

    def __init__(self, args: argparse.Namespace, workdir: Path, **extra: Any):
        self.progress_path = workdir / f"progress-{uuid.uuid4().hex[:6]}.jsonl"
        self.log_path = self.progress_path.with_suffix(".log")
        web_port = free_port()
        options = {**vars(args), **extra, "web_port": web_port, "progress": self.progress_path}
        command = [sys.executable, __file__, "worker", *worker_options(options)]
        self.web_port = web_port
        self.started_at = time.time()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def lines(self) -> list[dict[str, Any]]:
        if not self.progress_path.exists():
            return []
        return [json.loads(line) for line in self.progress_path.read_text().splitlines()]

    async def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines() if line["kind"] == kind]
            if found:
                return found[0]
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited; see {self.log_path}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no {kind!r} line within {timeout} s; see {self.log_path}")

    async def wait_ready(self, timeout: float) -> float:
        """Poll /readyz until 200; `readyz_seen` keeps each new status (0 = no answer)."""
        self.readyz_seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = await asyncio.to_thread(http_status, self.web_port, "/readyz")
            if not self.readyz_seen or self.readyz_seen[-1] != code:
                self.readyz_seen.append(code)
            if code == 200:
                return time.time()
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited; see {self.log_path}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"/readyz not 200 within {timeout} s")

    def kill(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def worker_options(options: dict[str, Any]) -> list[str]:
    names = [
        "broker",
        "app_id",
        "topic",
        "partitions",
        "mode",
        "store",
        "datadir",
        "web_port",
        "progress",
        "profile",
        "target",
        "batch",
        "within",
        "loglevel",
    ]
    flags = [f"--{name.replace('_', '-')}={options[name]}" for name in names]
    return flags + [f"--set={setting}" for setting in options["set"]]


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def http_get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def throughput(args: argparse.Namespace, broker_url: str, workdir: Path) -> dict[str, Any]:
    bootstrap = broker_url.removeprefix("kafka://")
    await create_topic(bootstrap, args.topic, args.partitions)
    published_at = time.monotonic()
    await publish(bootstrap, args.topic, range(args.events))
    publish_seconds = time.monotonic() - published_at
    worker = WorkerProcess(args, workdir, broker=broker_url, target=args.events)
    try:
        ready_at = await worker.wait_ready(timeout=args.timeout)
        done = await worker.wait_for("target", timeout=args.timeout)
        web = {
            path: http_get(worker.web_port, path)
            for path in ["/healthz", "/readyz", "/status", "/metrics", "/status/"]
        }
    finally:
        worker.kill()
    changelog = await check_changelog(bootstrap, args.topic, f"{args.app_id}-counts-changelog")
    seconds = done["target_at"] - done["first_at"]
    return {
        "mode": args.mode,
        "store": args.store,
        "events": args.events,
        "publish_events_per_s": round(args.events / publish_seconds),
        "worker_ready_after_s": round(ready_at - worker.started_at, 2),
        "first_event_after_s": round(done["first_at"] - worker.started_at, 2),
        "events_per_s": round((args.events - 1) / seconds) if seconds else None,
        "errors": done["errors"],
        "changelog": changelog,
        "web": web,
    }


async def restart(args: argparse.Namespace, broker_url: str, workdir: Path) -> dict[str, Any]:
    bootstrap = broker_url.removeprefix("kafka://")
    await create_topic(bootstrap, args.topic, args.partitions)
    numbers = range(10**9)
    publisher = asyncio.create_task(publish(bootstrap, args.topic, numbers, rate=args.rate))
    try:
        first = WorkerProcess(args, workdir, broker=broker_url, target=0)
        await first.wait_for("first", timeout=args.timeout)
        first_up = time.time() - first.started_at
        await asyncio.sleep(args.run_before_kill)
        first.kill(signal.SIGKILL)
        killed_at = time.time()
        consumed_before = first.lines()[-1]["consumed"]
        second = WorkerProcess(args, workdir, broker=broker_url, target=0)
        try:
            resumed, ready_at = await asyncio.gather(
                second.wait_for("first", timeout=args.timeout),
                second.wait_ready(timeout=args.timeout),
            )
            await asyncio.sleep(2)
            publisher.cancel()
            await asyncio.sleep(3)  # let the worker drain the topic and write its table
            _, _, status = await asyncio.to_thread(http_get, second.web_port, "/status")
        finally:
            second.kill()
    finally:
        publisher.cancel()
    changelog = await check_changelog(bootstrap, args.topic, f"{args.app_id}-counts-changelog")
    return {
        "profile": args.profile,
        "settings": {**PROFILES[args.profile], **dict(parse_setting(s) for s in args.set)},
        "store": args.store,
        "mode": args.mode,
        "first_worker_consuming_after_s": round(first_up, 2),
        "consumed_before_kill": consumed_before,
        "kill_to_consuming_s": round(resumed["first_at"] - killed_at, 2),
        "kill_to_ready_s": round(ready_at - killed_at, 2),
        "restarted_worker_readyz_seen": second.readyz_seen,
        "restarted_worker_status": json.loads(status),
        "changelog": changelog,
    }


def free_port() -> int:
    from monitor.embedded import free_port as pick

    return pick()


async def run_parent(args: argparse.Namespace) -> None:
    from monitor.embedded import EmbeddedBroker

    suffix = uuid.uuid4().hex[:6]
    args.topic = f"bench-events-{suffix}"
    args.app_id = f"bench-{suffix}"
    if not args.broker:
        args.set = [*TANSU_WORKAROUNDS, *args.set]
    with tempfile.TemporaryDirectory(prefix="faust-bench-") as tmp:
        workdir = Path(tmp)
        args.datadir = str(workdir / "data")
        measure = throughput if args.command == "throughput" else restart
        try:
            if args.broker:
                result = await measure(args, args.broker, workdir)
            else:
                async with EmbeddedBroker() as broker:
                    result = await measure(args, broker.url, workdir)
        finally:
            if args.keep_logs:
                for log in sorted(workdir.glob("*.log"), key=lambda path: path.stat().st_mtime):
                    print(f"--- {log.name}\n{log.read_text()[-20000:]}", file=sys.stderr)
    print(json.dumps(result, indent=2))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["throughput", "restart", "worker"])
    parser.add_argument("--broker", default=None, help="kafka://host:port; default embedded")
    parser.add_argument("--events", type=int, default=20000)
    modes = ["noop", "per-event", "per-batch", "take-naive"]
    parser.add_argument("--mode", choices=modes, default="noop")
    parser.add_argument("--store", choices=["memory", "rocksdb"], default="memory")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--within", type=float, default=0.5)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="fast")
    parser.add_argument("--set", action="append", default=[], help="faust setting name=value")
    parser.add_argument("--rate", type=float, default=200.0, help="restart: events/s")
    parser.add_argument("--run-before-kill", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--loglevel", default="warning")
    parser.add_argument("--keep-logs", action="store_true", help="print worker logs")
    # set by the parent for the worker process
    for name in ["--app-id", "--topic", "--datadir", "--progress"]:
        parser.add_argument(name)
    parser.add_argument("--web-port", type=int, default=6066)
    parser.add_argument("--target", type=int, default=0)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.command == "worker":
        run_worker(args)
    else:
        asyncio.run(run_parent(args))


if __name__ == "__main__":
    main()
