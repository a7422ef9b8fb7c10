"""Real worker processes, real topics: helpers for the integration tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from monitor.embedded import free_port
from monitor.publish import publish
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"


@dataclass
class Topics:
    """Fresh topic and group names, so tests on one broker never see each other."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def env(self) -> dict[str, str]:
        return {"MONITOR_APP_ID": f"monitor-{self.tag}",
                "MONITOR_EVENTS_TOPIC": f"events-{self.tag}",
                "MONITOR_DEAD_LETTER_TOPIC": f"dead-{self.tag}",
                "MONITOR_ALERTS_TOPIC": f"alerts-{self.tag}"}

    @property
    def events(self) -> str:
        return self.env["MONITOR_EVENTS_TOPIC"]

    @property
    def alerts(self) -> str:
        return self.env["MONITOR_ALERTS_TOPIC"]

    @property
    def dead(self) -> str:
        return self.env["MONITOR_DEAD_LETTER_TOPIC"]


class Worker:
    """``safety-monitor worker`` in its own process."""

    def __init__(self, broker: str, topics: Topics, state_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.state_dir = state_dir
        self.log_path = state_dir.with_suffix(f".{self.port}.log")
        self.env = {**os.environ, **topics.env, "MONITOR_BROKER": broker,
                    "MONITOR_RULES_DIR": str(RULES), "MONITOR_STATE_DIR": str(state_dir),
                    "MONITOR_WEB_PORT": str(self.port), "MONITOR_PARTITIONS": "4",
                    "MONITOR_SESSION_TIMEOUT": "6", "MONITOR_BROKER_IS_TANSU": "true", **env}
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.started_at = time.monotonic()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "monitor.cli", "worker",
                                         "--loglevel", os.environ.get("TEST_WORKER_LOGLEVEL",
                                                                      "warning")],
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=ROOT)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str) -> tuple[int, dict | None]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, None

    def status(self) -> dict:
        code, body = self.get("/status")
        return body if code == 200 and body is not None else {}

    def wait_ready(self, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            if self.get("/readyz")[0] == 200:
                return time.monotonic() - self.started_at
            time.sleep(0.3)
        raise AssertionError(f"worker not ready: {self.log_path.read_text()[-3000:]}")


def accepted(status: dict) -> int:
    return sum(sum(t["events"]["accepted"].values()) + sum(t["events"]["duplicates"].values())
               for t in status.values())


def wait_for(condition, timeout: float, what: str, step: float = 0.3):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def send(broker: str, topic: str, lines: list[bytes]) -> int:
    return asyncio.run(publish(broker, topic, lines, partitions=4))


def read_topic(broker: str, topic: str, idle_ms: int = 1500) -> list:
    async def run() -> list:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.removeprefix("kafka://"),
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        out = []
        try:
            while batch := await consumer.getmany(timeout_ms=idle_ms):
                for messages in batch.values():
                    out.extend(messages)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


def alerts_on(broker: str, topic: str) -> list[dict]:
    return [orjson.loads(m.value) for m in read_topic(broker, topic)]


def expected(lines: list[bytes]) -> tuple[dict, list[dict]]:
    """What replay says of the same lines, judged now as the worker judges /status."""
    now = dt.datetime.now(dt.UTC)
    result = replay(lines, load_rules_dir(RULES), as_of=now)
    report = orjson.loads(orjson.dumps(result.trials.report(now)))
    return report, [orjson.loads(orjson.dumps(a.to_json())) for a in result.alerts]


def comparable(report: dict) -> dict:
    return {trial: {k: body[k] for k in ("subjects", "primary_endpoint", "adverse_events",
                                         "events", "rules")}
            for trial, body in report.items()}


def transitions(alerts: list[dict]) -> list[tuple]:
    return sorted((a["key"], a["rule_id"], a["transition"], a["event_id"]) for a in alerts)
