"""The event contract: every bad input gets a one-line reason naming the field."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from monitor.engine.events import (
    AdverseEvent,
    Infusion,
    LabResult,
    RegulatoryReport,
    Rejection,
    SubjectStatus,
    parse_event,
)
from tests.builders import ae, infusion, status

BASE = {"trial_id": "ISC.19.29", "subject_id": "ISC-001", "event_id": "e-1",
        "recorded_at": "2021-03-01T10:00:00+07:00"}
GOOD_AE = {**BASE, "type": "adverse_event", "ae_id": "AE-1", "version": 1, "term": "fever",
           "onset": "2021-02-20", "grade": 2, "serious": False}


def parsed(doc: dict | bytes) -> object:
    return parse_event(doc if isinstance(doc, bytes) else orjson.dumps(doc))


@pytest.mark.parametrize("message, kind", [
    (GOOD_AE, AdverseEvent),
    ({**BASE, "type": "infusion", "infused_at": "2021-02-01", "dose_number": 1}, Infusion),
    ({**BASE, "type": "infusion", "infused_at": "2021-02-01T23:30:00+07:00",
      "dose_number": 2, "cells_per_kg": 1e6}, Infusion),
    ({**BASE, "type": "subject_status", "status": "withdrawn", "effective_on": "2021-02-01"},
     SubjectStatus),
    ({**BASE, "type": "regulatory_report", "ae_id": "AE-1",
      "submitted_at": "2021-03-01T10:00:00Z"}, RegulatoryReport),
    ({**BASE, "type": "lab_result", "test": "ALT", "value": 41.5, "unit": "U/L", "uln": 40,
      "collected_at": "2021-02-28"}, LabResult),
    ({**BASE, "type": "lab_result", "test": "XYZ", "value": 1, "unit": "",
      "collected_at": "2021-02-28T08:00:00+07:00", "dialysis": True}, LabResult),
])
def test_valid_events_decode_to_their_type(message: dict, kind: type) -> None:
    assert type(parsed(message)) is kind


def test_unknown_extra_fields_are_accepted_and_ignored() -> None:
    event = parsed({**GOOD_AE, "site": "HCMC-01", "nested": {"x": [1, 2]}})
    assert isinstance(event, AdverseEvent) and event.term == "fever"


def test_infusion_date_is_the_calendar_date_as_written() -> None:
    event = parsed({**BASE, "type": "infusion", "dose_number": 1,
                    "infused_at": "2021-02-01T23:30:00-05:00"})
    assert event.infused_on == dt.date(2021, 2, 1)


@pytest.mark.parametrize("onset, earliest, latest, precision", [
    ("2021-02-20", dt.date(2021, 2, 20), dt.date(2021, 2, 20), "day"),
    ("2021-02", dt.date(2021, 2, 1), dt.date(2021, 2, 28), "month"),
    ("2020-02", dt.date(2020, 2, 1), dt.date(2020, 2, 29), "month"),
    ("2020", dt.date(2020, 1, 1), dt.date(2020, 12, 31), "year"),
    ("2021-02-20T08:15", dt.date(2021, 2, 20), dt.date(2021, 2, 20), "day"),
])
def test_partial_onsets_give_their_range(onset, earliest, latest, precision) -> None:
    event = parsed({**GOOD_AE, "onset": onset})
    assert (event.onset_earliest, event.onset_latest, event.onset_precision) == (
        earliest, latest, precision)


def test_derived_fields_cannot_be_injected() -> None:
    event = parsed({**GOOD_AE, "onset_earliest": "1999-01-01", "onset_precision": "year"})
    assert event.onset_earliest == dt.date(2021, 2, 20) and event.onset_precision == "day"


INFUSION = {**BASE, "type": "infusion", "infused_at": "2021-02-01T23:30:00-05:00", "dose_number": 1}
LAB = {**BASE, "type": "lab_result", "test": "ALT", "value": 41.5, "unit": "U/L",
       "collected_at": "2021-02-28"}


@pytest.mark.parametrize("message, derived", [
    ({**INFUSION, "infused_on": "n/a"}, {"infused_on": dt.date(2021, 2, 1)}),
    ({**INFUSION, "infused_on": {"x": 1}}, {"infused_on": dt.date(2021, 2, 1)}),
    ({**GOOD_AE, "onset_earliest": "n/a", "onset_latest": 7, "onset_precision": ["year"]},
     {"onset_earliest": dt.date(2021, 2, 20), "onset_latest": dt.date(2021, 2, 20),
      "onset_precision": "day"}),
    ({**GOOD_AE, "onset": "2021-02", "onset_precision": None},
     {"onset_latest": dt.date(2021, 2, 28), "onset_precision": "month"}),
    ({**LAB, "collected_on": "unknown"}, {"collected_on": dt.date(2021, 2, 28)}),
])
def test_input_fields_named_like_derived_ones_are_ignored(message: dict, derived: dict) -> None:
    """SPEC: unknown extra fields are kept but ignored, whatever their name."""
    event = parsed(message)
    assert not isinstance(event, Rejection), event
    assert {name: getattr(event, name) for name in derived} == derived


BAD_DAYS = ["2021-03-10T99:99:00+00:00", "2021-03-10garbage", "2021-03-10 nonsense",
            "2021-03-10T", "2021-W10-3", "2021-W10-3T10:00"]

# Every case of SPEC "Bad input": the message a person reads, one line, field named.
BAD = [
    (b"not json", "not JSON"),
    (b'{"type": "adverse_event", ', "not JSON"),
    (b"", "empty message"),
    (b'{"type": "\xff"}', "not UTF-8"),
    (b'{"type": "infusion", "subject_id": "\xc3\x28"}', "not UTF-8"),
    (b"[1, 2]", "not a JSON object (got array)"),
    (b'"text"', "not a JSON object (got string)"),
    ({**GOOD_AE, "grade": 7}, "adverse_event.grade: 7 is not a CTCAE grade (1-5)"),
    ({**GOOD_AE, "grade": 0}, "adverse_event.grade: 0 is not a CTCAE grade (1-5)"),
    ({**GOOD_AE, "grade": "3"}, "adverse_event.grade: expected int, got str"),
    ({**GOOD_AE, "version": 0}, "adverse_event.version: 0 is not allowed; version counts from 1"),
    ({k: v for k, v in GOOD_AE.items() if k != "ae_id"},
     "adverse_event.ae_id: missing (required for adverse_event)"),
    ({k: v for k, v in GOOD_AE.items() if k != "recorded_at"},
     "adverse_event.recorded_at: missing (required for adverse_event)"),
    ({k: v for k, v in GOOD_AE.items() if k != "type"}, "type: missing; expected one of"),
    ({**GOOD_AE, "type": "vital_sign"}, "type: 'vital_sign' is not an event type"),
    ({**GOOD_AE, "onset": "2019---07"}, "adverse_event.onset: '2019---07' has a gap inside"),
    ({**GOOD_AE, "onset": "2021-02-30"}, "adverse_event.onset: '2021-02-30' is not a calendar"),
    ({**GOOD_AE, "onset": "21-02-03"}, "adverse_event.onset: '21-02-03' is not an ISO 8601 date"),
    ({**GOOD_AE, "onset": "2021-02T10:00:00Z"},
     "adverse_event.onset: '2021-02T10:00:00Z' has a time after a partial date"),
    ({**GOOD_AE, "onset": "2021T10:00"}, "adverse_event.onset: '2021T10:00' has a time after a "
     "partial date"),
    ({**GOOD_AE, "onset": "٢٠٢١-٠٢"},  # Arabic-Indic digits: ISO 8601 dates are ASCII
     "adverse_event.onset: '٢٠٢١-٠٢' is not an ISO 8601 date"),
    ({**GOOD_AE, "onset": "2021-0٢"}, "adverse_event.onset: '2021-0٢' is not an ISO 8601 date"),
    ({**GOOD_AE, "onset": "2021-02-20T99:99"},
     "adverse_event.onset: '2021-02-20T99:99' is not an ISO 8601 date-time"),
    ({**GOOD_AE, "onset": "2021-02-20T1:2:3:4"},
     "adverse_event.onset: '2021-02-20T1:2:3:4' is not an ISO 8601 date-time"),
    ({**GOOD_AE, "onset": "2021-03-02"},
     "adverse_event.onset: '2021-03-02' is after recorded_at (2021-03-01)"),
    ({**GOOD_AE, "onset": "2021-04"}, "adverse_event.onset: '2021-04' is after recorded_at"),
    ({**GOOD_AE, "recorded_at": "2021-03-01T10:00:00"},
     "adverse_event.recorded_at: '2021-03-01T10:00:00' has no UTC offset"),
    ({**GOOD_AE, "recorded_at": "2021-03-01"},
     "adverse_event.recorded_at: '2021-03-01' is not an ISO 8601 date-time with offset"),
    ({**GOOD_AE, "relatedness": "maybe"},
     "adverse_event.relatedness: 'maybe' is not one of not_related, unlikely"),
    ({**GOOD_AE, "serious_criteria": ["death", "boredom"]},
     "adverse_event.serious_criteria: 'boredom' is not one of death"),
    ({**GOOD_AE, "outcome": "fine"}, "adverse_event.outcome: 'fine' is not one of recovered"),
    ({**GOOD_AE, "resolved": "2021/03/01"},
     "adverse_event.resolved: '2021/03/01' is not an ISO 8601 date"),
    ({**GOOD_AE, "subject_id": ""}, "adverse_event.subject_id: must not be empty"),
    ({**GOOD_AE, "serious": "yes"}, "adverse_event.serious: expected bool, got str"),
    ({**BASE, "type": "infusion", "infused_at": "2021-13-01", "dose_number": 1},
     "infusion.infused_at: '2021-13-01' is not an ISO 8601 date"),
    ({**BASE, "type": "infusion", "infused_at": "2021-02-01", "dose_number": 0},
     "infusion.dose_number: 0 is not allowed; dose_number counts from 1"),
    ({**BASE, "type": "subject_status", "status": "gone", "effective_on": "2021-01-01"},
     "subject_status.status: 'gone' is not one of enrolled, withdrawn"),
    ({**BASE, "type": "regulatory_report", "ae_id": "A", "submitted_at": "2021-03-01T10:00:00"},
     "regulatory_report.submitted_at: '2021-03-01T10:00:00' has no UTC offset"),
    ({**BASE, "type": "lab_result", "test": "ALT", "value": "high", "unit": "U/L",
      "collected_at": "2021-02-28"}, "lab_result.value: expected float, got str"),
    # what is actually wrong (these were "not a JSON object (got null)", raised, or misread)
    (b"[" * 100_000, "nested too deep"),
    (b'{"type": "infusion", "note": ' + b"[" * 100_000, "nested too deep"),
    (b'{"type": "infusion", "note": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001, "nested too deep"),
    (orjson.dumps(LAB).replace(b"41.5", b"1e999"), "lab_result.value: 1e999 is out of range"),
    (orjson.dumps({**LAB, "uln": 40}).replace(b"40", b"-2e308"),
     "lab_result.uln: -2e308 is out of range"),
    (orjson.dumps({**GOOD_AE, "grade": 7, "note": 1}).replace(b'"note":1', b'"note":1e999'),
     "adverse_event.grade: 7 is not a CTCAE grade (1-5)"),
    (b"1e999", "not a JSON object (got number)"),
    # a number of many digits: shortened in the reason, and still named by its field
    (orjson.dumps(GOOD_AE).replace(b'"grade":2', b'"grade":' + b"9" * 400),
     "adverse_event.grade: 999999999999... (400 characters) is not a CTCAE grade (1-5)"),
    (orjson.dumps(LAB).replace(b"41.5", b"1" + b"0" * 400 + b".5"),
     "lab_result.value: 100000000000... (403 characters) is out of range"),
    (orjson.dumps(GOOD_AE).replace(b'"grade":2', b'"grade":-' + b"9" * 5000),
     "adverse_event.grade: an integer of thousands of digits is out of range"),
    (b'{"note": ' + b"9" * 5000 + b"}", "note: an integer of thousands of digits is out of"),
    (b"[" + b"9" * 5000 + b"]", "an integer out of range (thousands of digits)"),
    (b"[1, 2", "not JSON"),
    (b'{"type": "adverse_event", "grade": "3", ', "not JSON"),
    (b"\xef\xbb\xbf" + orjson.dumps(LAB),
     "not JSON (it starts with a UTF-8 byte-order mark; send the JSON without it)"),
    ({**GOOD_AE, "version": True}, "adverse_event.version: expected int, got bool"),
    ({**INFUSION, "dose_number": True}, "infusion.dose_number: expected int, got bool"),
    # the whole of a date or date-time, not only its first ten characters
    *[({**BASE, "type": "infusion", "infused_at": bad, "dose_number": 1},
       f"infusion.infused_at: '{bad}' is not an ISO 8601 date or date-time") for bad in BAD_DAYS],
    *[({**BASE, "type": "lab_result", "test": "ALT", "value": 1, "unit": "U/L",
        "collected_at": bad}, f"lab_result.collected_at: '{bad}' is not an ISO 8601 date or "
       "date-time") for bad in BAD_DAYS],
]


@pytest.mark.parametrize("message, reason", BAD, ids=[r for _, r in BAD])
def test_bad_input_is_rejected_with_a_reason_naming_the_field(message, reason: str) -> None:
    rejection = parsed(message)
    assert isinstance(rejection, Rejection)
    assert rejection.reason.startswith(reason), rejection.reason
    assert "\n" not in rejection.reason


def test_rejection_keeps_the_ids_it_could_read() -> None:
    rejection = parsed({**GOOD_AE, "grade": 9})
    assert (rejection.event_id, rejection.trial_id, rejection.type) == (
        "e-1", "ISC.19.29", "adverse_event")


def test_builders_make_valid_events() -> None:
    for message in (ae("S", "A", "2021-01-02"), infusion("S", "2021-01-01"),
                    status("S", "withdrawn", "2021-05-01")):
        assert not isinstance(parsed(message), Rejection), message


@pytest.mark.parametrize("onset, reported, latest", [
    ("2021-03", "2021-03-05", dt.date(2021, 3, 5)),  # its days after the report cannot be
    ("2021", "2021-02-15", dt.date(2021, 2, 15)),
    ("2021-03", "2021-04-01", dt.date(2021, 3, 31)),  # the whole month was before it
    ("2021-03-05", "2021-03-05", dt.date(2021, 3, 5)),
])
def test_a_partial_onset_ends_no_later_than_the_day_it_was_reported(onset, reported,
                                                                      latest) -> None:
    message = parsed({**GOOD_AE, "onset": onset, "recorded_at": f"{reported}T09:00:00+07:00"})
    assert isinstance(message, AdverseEvent), message
    assert message.onset_latest == latest


def test_null_in_an_optional_field_is_as_if_it_were_missing() -> None:
    nulls = {"meddra_pt": None, "meddra_soc": None, "resolved": None, "relatedness": None,
             "expected": None, "outcome": None, "serious_criteria": None, "retracted": None}
    message = parsed({**GOOD_AE, **nulls})
    assert isinstance(message, AdverseEvent), message
    assert (message.serious_criteria, message.retracted) == ((), False)
    assert message == parsed(GOOD_AE)
