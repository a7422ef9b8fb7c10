"""The durable records of a trial as key/value pairs, for a changelog-backed table.

Keys (``\\x1f`` separates parts, which no id contains in practice)::

    t|TRIAL                     TrialRecord   (alert ledger)
    s|TRIAL|SUBJECT             SubjectHeader (infusions, statuses, reports, counts)
    a|TRIAL|SUBJECT|AE_ID       AeHistory     (the versions of one AE)
    l|TRIAL|SUBJECT|TEST        LabSeries     (one lab test's results)

Values are JSON (msgspec), which keeps each date-time's offset as written. What one
event writes is one small record and its subject's header, whatever the trial's size.
Write the subject records of a batch before the trial record: after a crash the ledger
is then never ahead of the subjects, and `state.reconcile` closes the gap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import msgspec

from .rules import TrialRules
from .state import (
    AE,
    LAB,
    AeHistory,
    LabSeries,
    Subject,
    SubjectHeader,
    TrialRecord,
    TrialState,
    new_trial,
)

SEP = "\x1f"
TRIAL, HEADER, AE_KEY, LAB_KEY = "t", "s", "a", "l"

_encode = msgspec.json.Encoder().encode
_DECODERS = {TRIAL: msgspec.json.Decoder(TrialRecord), HEADER: msgspec.json.Decoder(SubjectHeader),
             AE_KEY: msgspec.json.Decoder(AeHistory), LAB_KEY: msgspec.json.Decoder(LabSeries)}


def trial_key(trial_id: str) -> str:
    return f"{TRIAL}{SEP}{trial_id}"


def key_trial(key: str) -> str:
    """The trial id a key belongs to."""
    return key.split(SEP, 2)[1]


def subject_records(trial: TrialState, subject_id: str,
                    changed: Iterable[tuple[str, str] | None]) -> Iterator[tuple[str, bytes]]:
    """The records of one subject that a batch changed: its header, then each changed
    AE and lab series, as (key, value)."""
    subject = trial.subjects[subject_id]
    prefix = f"{trial.trial_id}{SEP}{subject_id}"
    for record in set(changed):
        if record is None:
            continue
        kind, name = record
        if kind == AE:
            yield f"{AE_KEY}{SEP}{prefix}{SEP}{name}", _encode(subject.aes[name])
        elif kind == LAB:
            yield f"{LAB_KEY}{SEP}{prefix}{SEP}{name}", _encode(subject.labs[name])
    yield f"{HEADER}{SEP}{prefix}", _encode(subject.header)


def trial_record(trial: TrialState) -> tuple[str, bytes]:
    return trial_key(trial.trial_id), _encode(trial.record)


def load_trial(trial_id: str, rules: TrialRules | None,
               rows: Iterable[tuple[str, bytes]]) -> TrialState:
    """A trial's state from its rows (any order); unknown keys are an error."""
    record, subjects = None, {}
    for key, value in rows:
        kind, *parts = key.split(SEP)
        decoded = _DECODERS[kind].decode(value)
        if kind == TRIAL:
            record = decoded
            continue
        subject = subjects.get(parts[1])
        if subject is None:
            subject = subjects[parts[1]] = Subject(parts[1])
        if kind == HEADER:
            subject.header = decoded
        elif kind == AE_KEY:
            subject.aes[parts[2]] = decoded
        else:
            subject.labs[parts[2]] = decoded
    return new_trial(trial_id, rules, record, subjects)
