"""The durable records of a trial as key/value pairs, for a changelog-backed table.

Keys (``\\x1f`` separates parts, which no id contains in practice)::

    t|TRIAL                     Checkpoint    (alert ledger, journal)
    s|TRIAL|SUBJECT             SubjectHeader (infusions, statuses, reports, counts)
    a|TRIAL|SUBJECT|AE_ID       AeHistory     (the messages of one AE)
    l|TRIAL|SUBJECT|TEST        LabSeries     (one lab test's results)

Values are JSON (msgspec), which keeps each date-time's offset as written. What one
event writes is one small record and its subject's header, whatever the trial's size.

The trial row is a `Checkpoint`: the trial record, and the subject rows the batch that
wrote it changed (the *journal*). The worker writes a batch's checkpoint first, then
its subject rows. A crash in between leaves rows from which `load` rebuilds the trial
exactly as the batch left it (the journal overrides older subject rows); the batch's
messages, redelivered, then change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import msgspec

from .events import AdverseEvent, reading_stored
from .rules import TrialRules
from .state import (
    AE,
    LAB,
    AeHistory,
    LabSeries,
    Seen,
    Subject,
    SubjectHeader,
    TrialRecord,
    TrialState,
    new_trial,
)

SEP = "\x1f"
TRIAL, HEADER, AE_KEY, LAB_KEY = "t", "s", "a", "l"


class Checkpoint(msgspec.Struct, omit_defaults=True):
    """The value of a trial row (see the module's docstring)."""

    record: TrialRecord
    journal: dict[str, msgspec.Raw] = {}  # subject row key -> its value


class AeHistoryObject(msgspec.Struct):
    """An AE row as builds before 2026-12-03 wrote it: a JSON object with the winning
    message of each version number and the ids taken. Read, never written."""

    versions: dict[int, AdverseEvent] = {}
    seen: Seen = msgspec.field(default_factory=Seen)
    conflicts: int = 0

    def upgrade(self) -> AeHistory:
        messages = tuple(ae for _, ae in sorted(self.versions.items()))
        kept = {ae.event_id for ae in messages}
        lost = {event_id: at for event_id, at in self.seen.first.items() if event_id not in kept}
        return AeHistory(messages, tuple(self.seen.first.get(ae.event_id) for ae in messages),
                         self.seen.again, lost or None)


_encode = msgspec.json.Encoder().encode
_DECODERS = {TRIAL: msgspec.json.Decoder(Checkpoint), HEADER: msgspec.json.Decoder(SubjectHeader),
             AE_KEY: msgspec.json.Decoder(AeHistory), LAB_KEY: msgspec.json.Decoder(LabSeries)}
_decode_ae_object = msgspec.json.Decoder(AeHistoryObject).decode


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


def trial_record(trial: TrialState, journal: Iterable[tuple[str, bytes]] = ()
                 ) -> tuple[str, bytes]:
    """The trial row: its record, with a batch's subject rows."""
    checkpoint = Checkpoint(trial.record, {key: msgspec.Raw(value) for key, value in journal})
    return trial_key(trial.trial_id), _encode(checkpoint)


def load_trial(trial_id: str, rules: TrialRules | None,
               rows: Iterable[tuple[str, bytes]]) -> TrialState:
    """A trial's state from its rows (any order); unknown keys are an error."""
    return load(trial_id, rules, rows)[0]


class Loaded(NamedTuple):
    trial: TrialState
    journal: list[tuple[str, bytes]]  # subject rows that may not have been written


def load(trial_id: str, rules: TrialRules | None, rows: Iterable[tuple[str, bytes]]
         ) -> Loaded:
    """A trial's state from its rows (any order), with the journal of its last
    checkpoint: the next checkpoint must carry that journal on until its rows are
    written again. Unknown keys are an error."""
    with reading_stored():  # what an earlier build stored loads as it read it
        return _load(trial_id, rules, rows)


def _load(trial_id: str, rules: TrialRules | None, rows: Iterable[tuple[str, bytes]]
          ) -> Loaded:
    checkpoint, latest = None, {}
    for key, value in rows:
        if key.startswith(TRIAL + SEP):
            checkpoint = _DECODERS[TRIAL].decode(value)
        else:
            latest[key] = value
    if checkpoint is None:
        return Loaded(_build(trial_id, rules, None, latest.items()), [])
    # the journal is never older than a subject row: it was written just before them
    journal = [(key, bytes(raw)) for key, raw in checkpoint.journal.items()]
    latest.update(journal)
    return Loaded(_build(trial_id, rules, checkpoint.record, latest.items()), journal)


def _build(trial_id: str, rules: TrialRules | None, record: TrialRecord | None,
           rows: Iterable[tuple[str, bytes]]) -> TrialState:
    subjects: dict[str, Subject] = {}
    for key, value in rows:
        kind, *parts = key.split(SEP)
        if kind == AE_KEY and value.lstrip()[:1] == b"{":  # an AE row of an earlier build
            decoded = _decode_ae_object(value).upgrade()
        else:
            decoded = _DECODERS[kind].decode(value)
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
