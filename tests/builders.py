"""Small builders of event messages for tests: dicts in the SPEC's contract."""

from __future__ import annotations

import itertools

import orjson

from monitor.engine.events import Event, parse_event

_serial = itertools.count(1)
TRIAL = "ISC.19.29"


def _base(kind: str, subject: str, recorded_at: str, trial: str, event_id: str | None) -> dict:
    return {"type": kind, "trial_id": trial, "subject_id": subject,
            "event_id": event_id or f"evt-{next(_serial):06d}", "recorded_at": recorded_at}


def infusion(subject: str, day: str, dose: int = 1, *, recorded_at: str | None = None,
             trial: str = TRIAL, event_id: str | None = None) -> dict:
    return {**_base("infusion", subject, recorded_at or f"{day}T18:00:00+00:00", trial, event_id),
            "infused_at": day, "dose_number": dose}


def ae(subject: str, ae_id: str, onset: str, *, recorded_at: str | None = None, version: int = 1,
       grade: int = 1, serious: bool = False, trial: str = TRIAL, event_id: str | None = None,
       **extra) -> dict:
    recorded = recorded_at or f"{onset if len(onset) == 10 else '2023-12-31'}T20:00:00+00:00"
    return {**_base("adverse_event", subject, recorded, trial, event_id), "ae_id": ae_id,
            "version": version, "term": extra.pop("term", "fever"), "onset": onset,
            "grade": grade, "serious": serious, **extra}


def status(subject: str, value: str, effective_on: str, *, recorded_at: str | None = None,
           trial: str = TRIAL, event_id: str | None = None) -> dict:
    return {**_base("subject_status", subject, recorded_at or f"{effective_on}T20:00:00+00:00",
                    trial, event_id), "status": value, "effective_on": effective_on}


def encode(message: dict) -> bytes:
    return orjson.dumps(message)


def event(message: dict) -> Event:
    parsed = parse_event(encode(message))
    assert not hasattr(parsed, "reason"), parsed
    return parsed
