"""Properties of the engine that must hold for any events (hypothesis).

* the final state does not depend on the arrival order of the same events;
* a redelivered event (same event_id) changes nothing and raises no alert;
* replaying the same log twice gives identical output.
"""

from __future__ import annotations

import datetime as dt

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.engine.rules import parse_rules
from monitor.engine.trials import Trials
from monitor.replay import replay
from tests.builders import TRIAL, event
from tests.engine.test_state import RULES

CATALOG = {TRIAL: parse_rules(RULES)}
AS_OF = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
START = dt.date(2021, 1, 1)
SUBJECTS = ("S1", "S2", "S3", "S4")
SOCS = ("Gastrointestinal disorders", "GASTROINTESTINAL DISORDERS", "Nervous system disorders",
        None)


def day(offset: int) -> dt.date:
    return START + dt.timedelta(days=offset)


def stamp(when: dt.date, minute: int) -> str:
    return dt.datetime.combine(when, dt.time(12, minute % 60), tzinfo=dt.UTC).isoformat()


@st.composite
def infusions(draw: st.DrawFn, subject: str) -> list[dict]:
    first = draw(st.integers(0, 60))
    out = []
    for dose in range(1, draw(st.integers(1, 2)) + 1):
        when = day(first + 28 * (dose - 1))
        out.append({"type": "infusion", "trial_id": TRIAL, "subject_id": subject,
                    "event_id": f"{subject}-inf-{dose}", "recorded_at": stamp(when, dose),
                    "infused_at": when.isoformat(), "dose_number": dose})
    return out


@st.composite
def adverse_event(draw: st.DrawFn, subject: str, number: int) -> list[dict]:
    onset = day(draw(st.integers(-20, 420)))
    precision = draw(st.sampled_from(("day", "day", "day", "month", "year")))
    text = {"day": onset.isoformat(), "month": onset.isoformat()[:7],
            "year": str(onset.year)}[precision]
    # a partial onset may be reported from the first day it allows: its report then caps
    # it (`AeHistory.cap_onset`), and each version's report may differ
    start = {"day": onset, "month": onset.replace(day=1),
             "year": onset.replace(month=1, day=1)}[precision]
    reported = start + dt.timedelta(days=draw(st.integers(0, 60)))
    versions = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    out = []
    for index, version in enumerate(versions):
        out.append({
            "type": "adverse_event", "trial_id": TRIAL, "subject_id": subject,
            "event_id": f"{subject}-ae{number}-{index}",
            "recorded_at": stamp(reported + dt.timedelta(days=draw(st.integers(0, 30))), index),
            "ae_id": f"{subject}-AE{number}", "version": version, "term": "fever",
            "onset": text, "grade": draw(st.integers(1, 5)), "serious": draw(st.booleans()),
            "meddra_soc": draw(st.sampled_from(SOCS)),
            "relatedness": draw(st.sampled_from((None, "not_related", "possible"))),
            "retracted": draw(st.booleans()) and draw(st.booleans()),
        })
    return out


@st.composite
def trial_log(draw: st.DrawFn) -> list[dict]:
    messages: list[dict] = []
    for subject in draw(st.lists(st.sampled_from(SUBJECTS), min_size=1, max_size=4,
                                 unique=True)):
        if draw(st.booleans()) or not messages:
            messages += draw(infusions(subject))
        for number in range(draw(st.integers(0, 4))):
            messages += draw(adverse_event(subject, number))
        if draw(st.booleans()):
            when = day(draw(st.integers(10, 400)))
            messages.append({"type": "subject_status", "trial_id": TRIAL,
                             "subject_id": subject, "event_id": f"{subject}-status",
                             "recorded_at": stamp(when, 0), "effective_on": when.isoformat(),
                             "status": draw(st.sampled_from(("withdrawn", "completed")))})
    return messages


def final_state(messages: list[dict]) -> tuple[dict, list]:
    trials = Trials(CATALOG)
    alerts = []
    for message in messages:
        alerts.extend(trials.apply(event(message)).alerts)
    report = trials.report(AS_OF)[TRIAL]
    for rule_id in list(report["rules"]):
        report["rules"][rule_id].pop("episodes")  # how often it flapped depends on order
    return report, alerts


def kept(messages: list[dict]) -> dict:
    """What the engine keeps of each AE (its messages by version, the ties lost), and
    each subject's and trial's latest event."""
    trials = Trials(CATALOG)
    for message in messages:
        trials.apply(event(message))
    return {**{(subject.subject_id, ae_id): history
               for trial in trials.trials.values() for subject in trial.subjects.values()
               for ae_id, history in subject.aes.items()},
            **{subject.subject_id: (subject.header.last_recorded_at, subject.header.last_event_id)
               for trial in trials.trials.values() for subject in trial.subjects.values()},
            **{trial.trial_id: (trial.counts.last_recorded_at, trial.counts.last_event_id)
               for trial in trials.trials.values()}}


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(trial_log(), st.randoms(use_true_random=False))
def test_final_state_does_not_depend_on_arrival_order(messages, rng) -> None:
    shuffled = list(messages)
    rng.shuffle(shuffled)
    assert final_state(shuffled)[0] == final_state(messages)[0]
    assert kept(shuffled) == kept(messages)


@FAST
@given(trial_log(), st.data())
def test_redelivered_events_change_nothing(messages, data) -> None:
    again = data.draw(st.lists(st.sampled_from(messages), max_size=len(messages)))
    once, _ = final_state(messages)
    trials = Trials(CATALOG)
    for message in messages:
        trials.apply(event(message))
    for message in again:
        changes = trials.apply(event(message))
        assert changes.outcome == "duplicate" and changes.alerts == ()
    twice = trials.report(AS_OF)[TRIAL]
    assert sum(twice["events"]["duplicates"].values()) == len(again)
    twice["events"] = once["events"]
    for rule in twice["rules"].values():
        rule.pop("episodes")
    assert twice == once


@FAST
@given(trial_log())
def test_replaying_twice_gives_identical_output(messages) -> None:
    lines = [orjson.dumps(m) for m in messages]
    first = replay(lines, CATALOG).to_json()
    assert replay(lines, CATALOG).to_json() == first
    assert first["events"]["accepted"] == len(messages)


@FAST
@given(trial_log())
def test_primary_endpoint_counts_are_consistent(messages) -> None:
    report, _ = final_state(messages)
    endpoint, aes = report["primary_endpoint"], report["adverse_events"]
    assert sum(aes["by_grade"].values()) == endpoint["ae"]
    assert endpoint["sae"] <= endpoint["ae"]
    assert endpoint["subjects_with_sae"] <= endpoint["subjects_with_ae"] <= len(SUBJECTS)
    placed = endpoint["ae"] + aes["pre_treatment"] + aes["post_window"]
    assert placed + aes["awaiting_infusion"] == aes["current"]
