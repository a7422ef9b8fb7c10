"""The metrics bundle against a fresh registry, read back with ``get_sample_value``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor.engine.events import Rejection, parse_event
from monitor.engine.trials import Trials
from monitor.metrics import (
    DEAD_LETTER_REASONS,
    Metrics,
    dead_letter_reason,
    exported_names,
    exposition,
    new_registry,
)
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir

from . import builders

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"
RULES = ROOT / "rules"
TRIAL = builders.TRIAL
NOW = dt.datetime(2021, 1, 10, 12, 0, tzinfo=dt.UTC)
ALLOWED_LABELS = {"trial", "rule", "severity", "grade", "type", "outcome", "transition",
                  "reason", "state", "placement", "le"}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


@pytest.fixture(scope="module")
def catalog() -> dict:
    return load_rules_dir(RULES)


@pytest.fixture(scope="module")
def sample():  # noqa: ANN201
    catalog = load_rules_dir(RULES)
    result = replay(SAMPLE.read_bytes().splitlines(keepends=True), catalog)
    return result, catalog, json.loads(orjson.dumps(result.to_json()))


# --- dead-letter reasons: a small, closed set -----------------------------------------

AE = {"type": "adverse_event", "trial_id": TRIAL, "subject_id": "ISC-001", "event_id": "e1",
      "recorded_at": "2021-01-05T00:00:00+00:00", "ae_id": "A1", "version": 1,
      "term": "fever", "onset": "2021-01-01", "grade": 2, "serious": False}
INFUSION = {"type": "infusion", "trial_id": TRIAL, "subject_id": "ISC-001", "event_id": "e2",
            "recorded_at": "2021-01-05T00:00:00+00:00", "infused_at": "2021-01-01",
            "dose_number": 1}


def without(message: dict, key: str) -> dict:
    return {k: v for k, v in message.items() if k != key}


@pytest.mark.parametrize(("raw", "expected"), [
    (b"   ", "not_json"),
    (b"{oops", "not_json"),
    (b'{"type": "adverse_event", "trial_id": "ISC', "not_json"),
    (b"[1, 2]", "not_an_object"),
    (b"null", "not_an_object"),
    (b'"an event"', "not_an_object"),
    (without(AE, "type"), "missing_field"),
    (without(AE, "grade"), "missing_field"),
    (without(INFUSION, "dose_number"), "missing_field"),
    ({**AE, "type": "lab"}, "unknown_type"),
    ({**AE, "type": 3}, "unknown_type"),
    ({**AE, "grade": 7}, "bad_value"),
    ({**AE, "grade": "2"}, "bad_value"),
    ({**AE, "relatedness": "maybe"}, "bad_value"),
    ({**AE, "term": ""}, "bad_value"),
    ({**AE, "serious_criteria": ["bored"]}, "bad_value"),
    ({**INFUSION, "cells_per_kg": -1}, "bad_value"),
    ({**AE, "version": 0}, "out_of_bounds"),
    ({**INFUSION, "dose_number": 0}, "out_of_bounds"),
    ({**AE, "onset": "2021-02-01"}, "out_of_bounds"),
    ({**AE, "onset": "2019---07"}, "bad_date"),
    ({**AE, "onset": "yesterday"}, "bad_date"),
    ({**AE, "onset": "2021-02-30"}, "bad_date"),
    ({**AE, "recorded_at": "2021-01-05T00:00:00"}, "bad_date"),
    ({**AE, "recorded_at": "soon"}, "bad_date"),
    ({**INFUSION, "infused_at": "bad"}, "bad_date"),
])
def test_each_rejection_falls_in_one_bounded_class(raw: bytes | dict, expected: str) -> None:
    rejection = parse_event(raw if isinstance(raw, bytes) else orjson.dumps(raw))
    assert type(rejection) is Rejection
    assert dead_letter_reason(rejection.reason) == expected, rejection.reason


@pytest.mark.parametrize(("reason", "expected"), [
    ("not UTF-8 (byte 0xff at 9); each line must be one JSON object", "not_json"),
    ("the engine failed on this message: ZeroDivisionError", "other"),
    ("", "other"),
])
def test_reasons_from_elsewhere_are_classified_too(reason: str, expected: str) -> None:
    assert dead_letter_reason(reason) == expected


@given(st.text(max_size=200))
def test_any_reason_text_gives_a_known_class(reason: str) -> None:
    assert dead_letter_reason(reason) in DEAD_LETTER_REASONS


# --- counters and histograms -----------------------------------------------------------

def test_events_are_counted_by_trial_type_and_outcome(registry, metrics) -> None:
    metrics.observe_event(TRIAL, "adverse_event", "accepted", latency_s=0.002, lag_s=30)
    metrics.observe_event(TRIAL, "adverse_event", "accepted")
    metrics.observe_event(TRIAL, "infusion", "duplicate")
    value = registry.get_sample_value
    assert value("safety_events_total", {"trial": TRIAL, "type": "adverse_event",
                                         "outcome": "accepted"}) == 2
    assert value("safety_events_total", {"trial": TRIAL, "type": "infusion",
                                         "outcome": "duplicate"}) == 1
    # a trial's first event starts its other series at zero, so rate() sees the first one
    assert value("safety_events_total", {"trial": TRIAL, "type": "lab_result",
                                         "outcome": "rejected"}) == 0
    assert value("safety_processing_latency_seconds_count") == 1
    assert value("safety_processing_latency_seconds_bucket", {"le": "0.0025"}) == 1
    assert value("safety_processing_latency_seconds_bucket", {"le": "0.001"}) == 0
    assert value("safety_event_lag_seconds_count", {"type": "adverse_event"}) == 1
    assert value("safety_event_lag_seconds_sum", {"type": "adverse_event"}) == 30


def test_observe_takes_what_the_pipeline_sees(registry, metrics) -> None:
    event = builders.event(builders.ae("ISC-001", "A1", "2021-01-03",
                                       recorded_at="2021-01-10T11:00:00+00:00"))
    metrics.observe("accepted", event, now=NOW)
    metrics(  # the worker's Pipeline calls the bundle itself: observer(outcome, parsed)
        "redelivered", event, now=NOW)
    value = registry.get_sample_value
    assert value("safety_events_total", {"trial": TRIAL, "type": "adverse_event",
                                         "outcome": "accepted"}) == 1
    assert value("safety_events_total", {"trial": TRIAL, "type": "adverse_event",
                                         "outcome": "redelivered"}) == 1
    assert value("safety_event_lag_seconds_sum", {"type": "adverse_event"}) == 2 * 3600


def test_a_future_recorded_at_counts_as_no_lag(registry, metrics) -> None:
    event = builders.event(builders.infusion("ISC-001", "2021-01-03",
                                             recorded_at="2021-01-11T00:00:00+00:00"))
    metrics.observe("accepted", event, now=NOW)
    assert registry.get_sample_value("safety_event_lag_seconds_bucket",
                                     {"type": "infusion", "le": "1.0"}) == 1


def test_rejections_count_a_dead_letter_and_a_rejected_event(registry, metrics) -> None:
    metrics.observe_event(TRIAL, "infusion", "accepted")
    metrics.observe("rejected", parse_event(orjson.dumps({**AE, "grade": 7})))
    metrics.observe("rejected", parse_event(orjson.dumps({**AE, "trial_id": "NOPE-1",
                                                          "version": 0})))
    metrics.observe("rejected", parse_event(b"{oops"))
    value = registry.get_sample_value
    assert value("safety_dead_letters_total", {"reason": "bad_value"}) == 1
    assert value("safety_dead_letters_total", {"reason": "out_of_bounds"}) == 1
    assert value("safety_dead_letters_total", {"reason": "not_json"}) == 1
    assert value("safety_dead_letters_total", {"reason": "bad_date"}) == 0
    assert value("safety_events_total", {"trial": TRIAL, "type": "adverse_event",
                                         "outcome": "rejected"}) == 1
    # a trial id nobody has seen accepted, and a message with no trial: 'unknown'
    assert value("safety_events_total", {"trial": "unknown", "type": "adverse_event",
                                         "outcome": "rejected"}) == 1
    assert value("safety_events_total", {"trial": "unknown", "type": "unknown",
                                         "outcome": "rejected"}) == 1
    assert not any(s.labels.get("trial") == "NOPE-1" for f in registry.collect()
                   for s in f.samples)


def test_watch_starts_every_trial_and_rule_at_zero(registry, metrics, catalog) -> None:
    metrics.watch(catalog)
    rules = catalog[TRIAL].rules
    for rule in rules:
        for transition in ("raised", "updated", "resolved"):
            assert registry.get_sample_value("safety_alerts_total", {
                "trial": TRIAL, "rule": rule.id, "severity": rule.severity,
                "transition": transition}) == 0
    metrics.observe_rejection("adverse_event.grade: 7 is not a CTCAE grade (1-5)",
                              trial=TRIAL, event_type="adverse_event")
    assert registry.get_sample_value("safety_events_total", {
        "trial": TRIAL, "type": "adverse_event", "outcome": "rejected"}) == 1


def test_alerts_from_a_real_step(registry, metrics, catalog) -> None:
    trials = Trials(catalog)
    messages = [builders.infusion(f"ISC-00{n}", "2021-01-01") for n in (1, 2)] + [
        builders.ae(f"ISC-00{n}", f"A{n}", "2021-01-02", grade=3, serious=True,
                    relatedness="probable", serious_criteria=["hospitalization"])
        for n in (1, 2)]
    transitions = []
    for message in messages:
        event = builders.event(message)
        changes = trials.apply(event)
        metrics.observe_applied(event, changes, now=NOW)
        transitions.extend(changes.alerts)
    assert transitions, "the ISC.19.29 rules should raise on two related SAEs"
    for alert in transitions:
        assert registry.get_sample_value("safety_alerts_total", {
            "trial": TRIAL, "rule": alert.rule_id, "severity": alert.severity,
            "transition": alert.transition}) >= 1
    assert registry.get_sample_value("safety_events_total", {
        "trial": TRIAL, "type": "adverse_event", "outcome": "accepted"}) == 2


def test_emails_by_outcome_and_unknown_outcomes_stay_bounded(registry, metrics) -> None:
    for outcome in ("sent", "sent", "retried", "failed_permanent", "skipped_duplicate",
                    "something new"):
        metrics.observe_email(outcome, None)
    value = registry.get_sample_value
    assert value("safety_emails_total", {"outcome": "sent"}) == 2
    assert value("safety_emails_total", {"outcome": "retried"}) == 1
    assert value("safety_emails_total", {"outcome": "other"}) == 1


def test_batch_latency_counts_every_message(registry, metrics) -> None:
    metrics.observe_latency(0.05, 1000)
    assert registry.get_sample_value("safety_processing_latency_seconds_count") == 1000
    assert registry.get_sample_value("safety_processing_latency_seconds_sum") == \
        pytest.approx(50)


# --- state gauges, from the engine's reports at scrape time ----------------------------

def test_state_gauges_come_from_the_reports_at_scrape_time(registry, metrics) -> None:
    calls = []

    def reports() -> dict:
        calls.append(1)
        return {TRIAL: {
            "subjects": {"infused": 3, "in_window": 2, "window_completed": 0,
                         "withdrawn": 1, "died": 0},
            "primary_endpoint": {"ae": 5, "sae": 1, "subjects_with_ae": 2,
                                 "subjects_with_sae": 1},
            "adverse_events": {"pre_treatment": 1, "post_window": 0, "retracted": 2,
                               "imputed_onset": 1, "awaiting_infusion": 0, "conflicts": 1,
                               "causality_not_assessed": 4,
                               "by_grade": {"1": 3, "2": 1, "3": 1, "4": 0, "5": 0}},
            "rules": {"related-sae": {"kind": "count", "severity": "halt",
                                      "state": "breached", "value": 2, "threshold": 2,
                                      "episodes": 1}},
        }}

    for _ in range(100):
        metrics.observe_event(TRIAL, "adverse_event", "accepted")
    metrics.set_trials(reports)
    assert calls == []  # events never compute a report
    value = registry.get_sample_value
    trial = {"trial": TRIAL}
    assert value("safety_subjects", {**trial, "state": "in_window"}) == 2
    assert value("safety_subjects", {**trial, "state": "withdrawn"}) == 1
    assert value("safety_in_window_aes", trial) == 5
    assert value("safety_in_window_saes", trial) == 1
    assert value("safety_subjects_with_in_window_saes", trial) == 1
    assert value("safety_in_window_aes_by_grade", {**trial, "grade": "3"}) == 1
    assert value("safety_aes", {**trial, "placement": "in_window"}) == 5
    assert value("safety_aes", {**trial, "placement": "retracted"}) == 2
    assert value("safety_ae_version_conflicts", trial) == 1
    assert value("safety_aes_causality_not_assessed", trial) == 4
    assert value("safety_trial_rules", trial) == 1
    rule = {**trial, "rule": "related-sae", "severity": "halt"}
    assert value("safety_rule_value", rule) == 2
    assert value("safety_rule_threshold", rule) == 2
    assert value("safety_rule_breached", rule) == 1
    assert value("safety_rule_episodes", rule) == 1


def test_a_failing_report_leaves_the_other_metrics_up(registry, metrics) -> None:
    def broken() -> dict:
        raise RuntimeError("dictionary changed size during iteration")

    metrics.observe_event(TRIAL, "infusion", "accepted")
    metrics.set_trials(broken)
    body, _ = exposition(registry)
    assert b"safety_events_total" in body
    assert registry.get_sample_value("safety_state_report_errors_total") == 2


def test_a_trial_without_rules_exports_zero_rules(registry, metrics) -> None:
    metrics.set_trials(lambda: Trials({}).report(NOW) | {"X-1": {"rules": {}}})
    assert registry.get_sample_value("safety_trial_rules", {"trial": "X-1"}) == 0


# --- the sample log: values equal replay's, no subject or AE id in any label ----------

def test_a_replay_recorded_equals_its_json(registry, metrics, sample) -> None:
    result, catalog, report = sample
    metrics.observe_replay(result, catalog)
    value = registry.get_sample_value

    def total(outcome: str) -> float:
        return sum(s.value for f in registry.collect() if f.name == "safety_events"
                   for s in f.samples if s.name == "safety_events_total"
                   and s.labels["outcome"] == outcome)

    events = report["events"]
    assert (total("accepted"), total("duplicate"), total("rejected")) == (
        events["accepted"], events["duplicates"], events["rejected"])
    dead = sum(value("safety_dead_letters_total", {"reason": r}) for r in DEAD_LETTER_REASONS)
    assert dead == events["rejected"]
    for trial, body in report["trials"].items():
        for event_type, count in body["events"]["accepted"].items():
            assert value("safety_events_total", {"trial": trial, "type": event_type,
                                                 "outcome": "accepted"}) == count
        for state in ("infused", "in_window", "window_completed", "withdrawn"):
            assert value("safety_subjects", {"trial": trial, "state": state}) == \
                body["subjects"][state]
        assert value("safety_in_window_aes", {"trial": trial}) == body["primary_endpoint"]["ae"]
        assert value("safety_in_window_saes", {"trial": trial}) == \
            body["primary_endpoint"]["sae"]
        for rule_id, rule in body["rules"].items():
            labels = {"trial": trial, "rule": rule_id, "severity": rule["severity"]}
            assert value("safety_rule_value", labels) == rule["value"]
            assert value("safety_rule_threshold", labels) == rule["threshold"]
            assert value("safety_rule_breached", labels) == (rule["state"] == "breached")
    for alert in report["alerts"]:
        labels = {"trial": alert["trial_id"], "rule": alert["rule_id"],
                  "severity": alert["severity"], "transition": alert["transition"]}
        assert value("safety_alerts_total", labels) == sum(
            1 for a in report["alerts"] if (a["trial_id"], a["rule_id"], a["severity"],
                                            a["transition"]) == tuple(labels.values()))


def test_no_label_carries_a_subject_ae_or_event_id(registry, metrics, sample) -> None:
    result, catalog, _report = sample
    metrics.observe_replay(result, catalog)
    ids = set()
    for line in SAMPLE.read_bytes().splitlines():
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(message, dict):
            ids |= {str(message[k]) for k in ("subject_id", "ae_id", "event_id")
                    if k in message}
    assert len(ids) > 100
    body, _ = exposition(registry)
    for family in text_string_to_metric_families(body.decode()):
        for sample_ in family.samples:
            assert set(sample_.labels) <= ALLOWED_LABELS, sample_
            assert not ids & set(sample_.labels.values()), sample_


# --- names, exposition -----------------------------------------------------------------

def test_names_follow_the_conventions(registry, metrics) -> None:
    families = list(registry.collect())
    assert families
    for family in families:
        assert family.name.startswith("safety_"), family.name
        assert family.documentation, family.name
    names = exported_names(registry)
    counters = {f.name for f in families if f.type == "counter"}
    assert {"safety_events", "safety_dead_letters", "safety_alerts", "safety_emails"} <= counters
    for name in counters:
        assert f"{name}_total" in names
    assert "safety_processing_latency_seconds_bucket" in names
    assert "safety_rule_breached" in names  # the state gauges, before any report


def test_exposition_speaks_both_formats(registry, metrics) -> None:
    metrics.observe_event(TRIAL, "infusion", "accepted")
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    assert b'safety_events_total{outcome="accepted",trial="ISC.19.29",type="infusion"} 1.0' \
        in body
    body, content_type = exposition(registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_new_registry_adds_the_process_collectors() -> None:
    names = exported_names(new_registry())
    assert "process_cpu_seconds_total" in names or "python_info" in names
    assert not exported_names(new_registry(process=False))
