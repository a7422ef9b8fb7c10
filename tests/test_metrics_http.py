"""``GET /metrics`` over real HTTP, checked by prometheus_client's parser, by ``promtool``
and by a real Prometheus server scraping it.

The exporter is ``safety-monitor replay --metrics-port`` on the sample log, in its own
process; its JSON report is the reference. ``promtool`` and ``prometheus`` come from
Debian's ``prometheus`` package (``.ci/run`` installs it); where they are missing, the
tests that need them are skipped with a message saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitor.embedded import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"
RULES = ROOT / "rules"
TIMEOUT = 60.0


def wait_for(what: str, probe: Callable[[], object], timeout: float = TIMEOUT) -> object:
    """Call ``probe`` until it returns something truthy without raising."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            found = probe()
        except (OSError, ValueError) as exc:
            found, last = None, exc
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=15)


@dataclass
class Exporter:
    url: str
    report: dict
    text: str


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exporter]:
    """``replay --metrics-port`` on the sample log, holding its metrics for scraping."""
    port = free_port()
    out = tmp_path_factory.mktemp("replay") / "report.json"
    with out.open("wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "replay", str(SAMPLE), "--rules", str(RULES),
             "--format", "json", "--metrics-port", str(port), "--metrics-hold", "300"],
            cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
            env={**os.environ, "MONITOR_WEB_HOST": LOOPBACK})
    url = f"http://{LOOPBACK}:{port}/metrics"
    try:
        # the state gauges appear last, once the whole replay is recorded
        wait_for("the replay's metrics", lambda: b"safety_subjects{" in get(url))
        report = wait_for("the replay's report", lambda: json.loads(out.read_text()))
        yield Exporter(url, report, get(url).decode())
    finally:
        status = stop(process, signal.SIGINT)  # Ctrl-C ends the hold; the replay is done
        stderr = process.stderr.read().decode()
        process.stderr.close()
    assert status == 0, stderr


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_scraped_values_equal_the_replay_report(exporter: Exporter) -> None:
    found, report = samples(exporter.text), exporter.report
    events = report["events"]
    by_outcome: dict[str, float] = {}
    for (name, labels), count in found.items():
        if name == "safety_events_total":
            outcome = dict(labels)["outcome"]
            by_outcome[outcome] = by_outcome.get(outcome, 0) + count
    assert by_outcome == {"accepted": events["accepted"], "duplicate": events["duplicates"],
                          "rejected": events["rejected"]}
    assert sum(count for (name, _), count in found.items()
               if name == "safety_dead_letters_total") == events["rejected"]
    assert sum(count for (name, _), count in found.items()
               if name == "safety_alerts_total") == len(report["alerts"])
    for trial, body in report["trials"].items():
        for event_type, count in body["events"]["duplicates"].items():
            assert value(found, "safety_events_total", trial=trial, type=event_type,
                         outcome="duplicate") == count
        for state, count in body["subjects"].items():
            if state != "known":
                assert value(found, "safety_subjects", trial=trial, state=state) == count
        endpoint = body["primary_endpoint"]
        assert value(found, "safety_in_window_aes", trial=trial) == endpoint["ae"]
        assert value(found, "safety_in_window_saes", trial=trial) == endpoint["sae"]
        for grade, count in body["adverse_events"]["by_grade"].items():
            assert value(found, "safety_in_window_aes_by_grade", trial=trial,
                         grade=grade) == count
        for rule_id, rule in body["rules"].items():
            labels = {"trial": trial, "rule": rule_id, "severity": rule["severity"]}
            assert value(found, "safety_rule_value", **labels) == rule["value"]
            assert value(found, "safety_rule_threshold", **labels) == rule["threshold"]
            assert value(found, "safety_rule_breached", **labels) == \
                (rule["state"] == "breached")


def test_openmetrics_is_served_to_who_asks(exporter: Exporter) -> None:
    body = get(exporter.url, "application/openmetrics-text; version=1.0.0").decode()
    assert body.endswith("# EOF\n")
    assert "# TYPE safety_events counter" in body


def test_promtool_finds_the_exposition_valid(exporter: Exporter) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: apt-get install prometheus (.ci/run does)")
    checked = subprocess.run([promtool, "check", "metrics"], input=exporter.text.encode(),
                             capture_output=True, timeout=60)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


@pytest.fixture(scope="module")
def prometheus(exporter: Exporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus server on loopback scraping the exporter every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is missing: apt-get install prometheus (.ci/run does)")
    folder = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlsplit(exporter.url).netloc
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [{"job_name": "safety-monitor",
                                  "static_configs": [{"targets": [target]}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"{LOOPBACK}:{free_port()}"
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={address}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        wait_for("Prometheus to be ready", lambda: get(f"http://{address}/-/ready"))
        yield f"http://{address}"
    finally:
        stop(process)


def query(server: str, promql: str) -> list[dict]:
    url = f"{server}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = json.loads(get(url))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_scrapes_the_rule_states(exporter: Exporter, prometheus: str) -> None:
    expected = {(trial, rule_id, rule["severity"]): float(rule["state"] == "breached")
                for trial, body in exporter.report["trials"].items()
                for rule_id, rule in body["rules"].items()}
    assert 1.0 in expected.values(), "the sample log should leave a rule breached"

    def series() -> list[dict]:
        found = query(prometheus, "safety_rule_breached")
        return found if len(found) == len(expected) else []

    found = wait_for("safety_rule_breached in Prometheus", series)
    got = {(s["metric"]["trial"], s["metric"]["rule"], s["metric"]["severity"]):
           float(s["value"][1]) for s in found}
    assert got == expected
    assert all(s["metric"]["job"] == "safety-monitor" for s in found)
    assert query(prometheus, 'up{job="safety-monitor"}')[0]["value"][1] == "1"


def test_prometheus_answers_a_dashboard_query(exporter: Exporter, prometheus: str) -> None:
    promql = 'sum by (outcome) (safety_events_total{trial=~".*"})'
    found = wait_for("events by outcome", lambda: query(prometheus, promql))
    got = {s["metric"]["outcome"]: float(s["value"][1]) for s in found}
    events = exporter.report["events"]
    assert got == {"accepted": events["accepted"], "duplicate": events["duplicates"],
                   "rejected": events["rejected"]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" /
                            "safety-monitor.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    grafana = {"$trial": ".*", "$__rate_interval": "1m", "$__range": "5m"}
    for name, value in grafana.items():
        exprs = [e.replace(name, value) for e in exprs]
    return exprs


def test_every_dashboard_query_runs_and_finds_series(exporter: Exporter,
                                                     prometheus: str) -> None:
    wait_for("two scrapes", lambda: query(prometheus, "count_over_time(up[1m]) >= 3"))
    for promql in dashboard_queries():
        found = query(prometheus, promql)  # a syntax error fails here
        assert found, f"no series: {promql}"
