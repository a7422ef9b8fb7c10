"""``GET /metrics`` of a real worker after the sample log, against replay's counts."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.workers import ROOT, Topics, Worker, expected, send, wait_for

SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"


def scrape(worker: Worker) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5) as r:
        return r.read().decode()


def events_by_outcome(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "safety_events_total":
                outcome = sample.labels["outcome"]
                out[outcome] = out.get(outcome, 0) + sample.value
    return {outcome: count for outcome, count in out.items() if count}


def test_worker_metrics_after_the_sample_log(kafka_broker: str, tmp_path: Path) -> None:
    lines = SAMPLE.read_bytes().splitlines()
    topics = Topics()
    worker = Worker(kafka_broker, topics, tmp_path / "state").start()
    try:
        worker.wait_ready()
        assert "safety_events_total" in scrape(worker)
        assert send(kafka_broker, topics.events, lines) == len(lines)
        report, alerts = expected(lines)
        trial_events = report["ISC.19.29"]["events"]
        want = {"accepted": sum(trial_events["accepted"].values()),
                "duplicate": sum(trial_events["duplicates"].values()),
                "rejected": len(lines) - sum(trial_events["accepted"].values())
                - sum(trial_events["duplicates"].values())}
        text = wait_for(lambda: (t := scrape(worker)) and events_by_outcome(t) == want
                        and t, 90, "every message counted")
        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for f in text_string_to_metric_families(text) for s in f.samples}
        for rule_id, rule in report["ISC.19.29"]["rules"].items():
            key = ("safety_rule_breached", (("rule", rule_id), ("severity", rule["severity"]),
                                            ("trial", "ISC.19.29")))
            assert found[key] == (rule["state"] == "breached")
        for state in ("infused", "in_window", "window_completed", "withdrawn"):
            key = ("safety_subjects", (("state", state), ("trial", "ISC.19.29")))
            assert found[key] == report["ISC.19.29"]["subjects"][state]
        assert sum(v for (name, _), v in found.items() if name == "safety_alerts_total") == \
            len(alerts)
        assert sum(v for (name, _), v in found.items()
                   if name == "safety_event_lag_seconds_count") == want["accepted"] + \
            want["duplicate"]
        promtool = shutil.which("promtool")
        if promtool:
            checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                                     capture_output=True, timeout=60)
            assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
    finally:
        worker.stop()
