"""Per-trial state and the step function: ``step(trial, event) -> (trial, changes)``.

The durable part of a trial's state is plain values, split into records so that what
one event changes does not grow with the trial's history:

* per subject, a `SubjectHeader` (infusions, statuses, regulatory reports, event counts),
  one `AeHistory` per AE (the winning message of each version) and one `LabSeries` per
  lab test;
* per trial, a `TrialRecord`: the alert ledger, one entry per rule.

Each record remembers the ids (and stream positions) of the messages it took, so a
repeated ``event_id`` is recognised as a duplicate, and a message redelivered by the
broker after a crash (same id, same position) changes nothing and is not counted.
Everything else (`TrialState.trackers`, caches) is derived and rebuilt by `rebuild`.

For speed, ``step`` updates the trial in place and returns it; it does no I/O and reads
no clock, so the same events give the same state and alerts in the worker and replay.
Arrival order does not change the final state: the current version of an AE is the
highest version number, and two messages with the same version are settled by the
later ``recorded_at``, then the greater ``event_id``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from sys import intern
from typing import NamedTuple

import msgspec

from . import alerts, tracking
from .events import (
    EVENT_TYPES,
    AdverseEvent,
    Event,
    Infusion,
    LabResult,
    RegulatoryReport,
    SubjectStatus,
)
from .kinds import Rule
from .rules import TrialRules
from .window import Placement, WindowLength, place_onset

ACCEPTED, DUPLICATE, REDELIVERED = "accepted", "duplicate", "redelivered"
HEADER, AE, LAB = "header", "ae", "lab"
_NEW = object()


def _zero_by_type() -> dict[str, int]:
    return dict.fromkeys(EVENT_TYPES, 0)


class Seen(msgspec.Struct, gc=False):
    """The messages a record took, by event id, with their stream positions (None in
    replay), and the positions of later copies of the same id (the duplicates). Each
    record carries its own, so it is always written together with what it counts."""

    first: dict[str, int | None] = {}
    again: dict[str, list[int | None]] | None = None  # rare: made on the first duplicate

    def count(self) -> tuple[int, int]:
        """(accepted, duplicates)."""
        return len(self.first), sum(len(copies) for copies in (self.again or {}).values())


class AeHistory(msgspec.Struct, gc=False):
    """One AE: the winning message of each version number, the messages taken, and how
    many lost a tie on their version (conflicts)."""

    versions: dict[int, AdverseEvent] = {}
    seen: Seen = msgspec.field(default_factory=Seen)
    conflicts: int = 0

    @property
    def current(self) -> AdverseEvent:
        return self.versions[max(self.versions)]


class Lab(NamedTuple):
    """What the engine keeps of a lab result (the log or topic keeps the message)."""

    test: str
    value: float
    unit: str
    collected_on: dt.date
    uln: float | None
    lln: float | None
    dialysis: bool | None


class LabSeries(msgspec.Struct, gc=False):
    """The results of one lab test of one subject."""

    results: list[Lab] = []
    seen: Seen = msgspec.field(default_factory=Seen)


def _seen_by_type() -> dict[str, Seen]:
    return {tag: Seen() for tag in ("infusion", "subject_status", "regulatory_report")}


class SubjectHeader(msgspec.Struct):
    """A subject's infusions, statuses and reports, and its latest event."""

    infusions: list[Infusion] = []
    statuses: list[SubjectStatus] = []
    reports: dict[str, RegulatoryReport] = {}
    seen: dict[str, Seen] = msgspec.field(default_factory=_seen_by_type)
    last_recorded_at: dt.datetime | None = None
    last_event_id: str | None = None


@dataclass(slots=True)
class Subject:
    subject_id: str
    header: SubjectHeader = field(default_factory=SubjectHeader)
    aes: dict[str, AeHistory] = field(default_factory=dict)
    labs: dict[str, LabSeries] = field(default_factory=dict)

    @property
    def infusions(self) -> list[Infusion]:
        return self.header.infusions

    @property
    def statuses(self) -> list[SubjectStatus]:
        return self.header.statuses

    @property
    def first_infusion(self) -> dt.date | None:
        return min((i.infused_on for i in self.header.infusions), default=None)


class TrialRecord(msgspec.Struct):
    """The durable part of a trial that is not a subject's: the alert ledger."""

    ledger: dict[str, alerts.LedgerEntry] = {}


class Counts(msgspec.Struct):
    """Events of one trial by outcome and type (derived: the sum of subject headers)."""

    accepted: dict[str, int] = msgspec.field(default_factory=_zero_by_type)
    duplicates: dict[str, int] = msgspec.field(default_factory=_zero_by_type)
    last_recorded_at: dt.datetime | None = None
    last_event_id: str | None = None


class Changes(NamedTuple):
    """What one step did: accepted, duplicate or redelivered; which record of the
    subject it changed besides the header (``(AE, ae_id)``, ``(LAB, test)`` or None);
    and the alert transitions it caused."""

    outcome: str
    record: tuple[str, str] | None = None
    alerts: tuple[alerts.AlertTransition, ...] = ()


@dataclass(slots=True)
class TrialState:
    trial_id: str
    rules: TrialRules | None = None
    subjects: dict[str, Subject] = field(default_factory=dict)
    ledger: dict[str, alerts.LedgerEntry] = field(default_factory=dict)
    # derived, rebuilt by `rebuild`:
    counts: Counts = field(default_factory=Counts)
    window: WindowLength = WindowLength()
    ae_plan: tuple[tuple, ...] = ()  # (rule, in-window only, checks, tracker) per AE rule
    trackers: dict[str, object] = field(default_factory=dict)
    infusion_days: dict[str, tuple[dt.date, dt.date, list[dt.date]]] = field(default_factory=dict)

    def placement(self, subject_id: str, ae: AdverseEvent) -> Placement:
        known = self.infusion_days.get(subject_id)
        if known is None:
            return place_onset(ae.onset_earliest, ae.onset_latest, None, None)
        return place_onset(ae.onset_earliest, ae.onset_latest, known[0], known[1])

    @property
    def record(self) -> TrialRecord:
        return TrialRecord(self.ledger)


def new_trial(trial_id: str, rules: TrialRules | None, record: TrialRecord | None = None,
              subjects: dict[str, Subject] | None = None) -> TrialState:
    """A trial from its durable records (none for a new trial)."""
    trial = TrialState(trial_id, rules, subjects or {}, dict(record.ledger) if record else {})
    return rebuild(trial)


def rebuild(trial: TrialState) -> TrialState:
    """Derive the trackers, caches and counts from the durable records."""
    rules = trial.rules.rules if trial.rules else ()
    for rule in rules:
        trial.ledger.setdefault(rule.id, alerts.LedgerEntry(rule.id, rule.severity))
    trial.window = trial.rules.window.length if trial.rules else WindowLength()
    trial.trackers = {rule.id: rule.tracker() for rule in rules}
    trial.ae_plan = tuple((r, r.match.in_window, r.match.checks + r.extra_checks(),
                           trial.trackers[r.id]) for r in rules if r.watches_adverse_events)
    trial.infusion_days, trial.counts = {}, Counts()
    for subject in trial.subjects.values():
        _count_subject(trial.counts, subject)
        tracking.cache_infusions(trial, subject)
        tracking.track_subject(trial, subject)
    tracking.track_infused(trial)
    tracking.track_halts(trial)
    return trial


def _count_subject(counts: Counts, subject: Subject) -> None:
    header = subject.header
    records = [*((tag, seen) for tag, seen in header.seen.items()),
               *(("adverse_event", h.seen) for h in subject.aes.values()),
               *(("lab_result", series.seen) for series in subject.labs.values())]
    for tag, seen in records:
        accepted, duplicates = seen.count()
        counts.accepted[tag] += accepted
        counts.duplicates[tag] += duplicates
    if header.last_recorded_at is not None and (
            counts.last_recorded_at is None or header.last_recorded_at > counts.last_recorded_at):
        counts.last_recorded_at = header.last_recorded_at
        counts.last_event_id = header.last_event_id


def step(trial: TrialState, event: Event,
         position: int | None = None) -> tuple[TrialState, Changes]:
    """Apply one valid event of this trial; return the trial and what changed.

    ``position`` is where the message sits in its stream (partition and offset); a
    message seen before at the same position is a redelivery, not a duplicate.
    """
    subject = trial.subjects.get(event.subject_id)
    if subject is None:
        subject = trial.subjects[event.subject_id] = Subject(event.subject_id)
    kind = type(event)
    seen, record = _SEEN[kind](subject, event)
    known = seen.first.get(event.event_id, _NEW)
    if known is not _NEW:
        return trial, Changes(_repeat(trial, seen, event, position, _TAGS[kind]), record)
    seen.first[event.event_id] = position
    _count(trial.counts, subject.header, _TAGS[kind], event)
    dirty = _APPLY[kind](trial, subject, event)
    if not dirty:
        return trial, Changes(ACCEPTED, record)
    return trial, Changes(ACCEPTED, record, tuple(tracking.evaluate(trial, dirty, event)))


def _repeat(trial: TrialState, seen: Seen, event: Event, position: int | None,
            tag: str) -> str:
    """A message whose id the record took before: a redelivery of a message at a
    position already taken, else a duplicate (counted, and its position kept)."""
    copies = seen.again.get(event.event_id) if seen.again is not None else None
    if position is not None and (seen.first[event.event_id] == position or
                                 (copies is not None and position in copies)):
        return REDELIVERED
    if seen.again is None:
        seen.again = {}
    seen.again.setdefault(event.event_id, []).append(position)
    trial.counts.duplicates[tag] += 1
    return DUPLICATE


def _count(counts: Counts, header: SubjectHeader, tag: str, event: Event) -> None:
    counts.accepted[tag] += 1
    if header.last_recorded_at is None or event.recorded_at > header.last_recorded_at:
        header.last_recorded_at, header.last_event_id = event.recorded_at, event.event_id
        if counts.last_recorded_at is None or event.recorded_at > counts.last_recorded_at:
            counts.last_recorded_at, counts.last_event_id = event.recorded_at, event.event_id


# --- where each kind of message is remembered ----------------------------------------

def _seen_ae(subject: Subject, ae: AdverseEvent) -> tuple[Seen, tuple[str, str]]:
    history = subject.aes.get(ae.ae_id)
    if history is None:
        history = subject.aes[ae.ae_id] = AeHistory()
    return history.seen, (AE, ae.ae_id)


def _seen_lab(subject: Subject, lab: LabResult) -> tuple[Seen, tuple[str, str]]:
    series = subject.labs.get(lab.test)
    if series is None:
        series = subject.labs[lab.test] = LabSeries()
    return series.seen, (LAB, lab.test)


def _seen_header(subject: Subject, event: Event) -> tuple[Seen, None]:
    return subject.header.seen[_TAGS[type(event)]], None


_SEEN = {AdverseEvent: _seen_ae, LabResult: _seen_lab, Infusion: _seen_header,
         SubjectStatus: _seen_header, RegulatoryReport: _seen_header}


# --- applying each kind of message ---------------------------------------------------

def _apply_ae(trial: TrialState, subject: Subject, ae: AdverseEvent) -> list[Rule]:
    _share_strings(trial, subject, ae)
    history = subject.aes[ae.ae_id]
    before = history.current if history.versions else None
    rival = history.versions.get(ae.version)
    if rival is None or _wins(ae, rival):
        history.versions[ae.version] = ae
    history.conflicts += rival is not None
    if history.current is before:
        return []
    return tracking.track_ae(trial, subject.subject_id, history.current)


def _share_strings(trial: TrialState, subject: Subject, ae: AdverseEvent) -> None:
    """Kept AEs share one copy of the strings that repeat (memory, not meaning)."""
    ae.trial_id, ae.subject_id = trial.trial_id, subject.subject_id
    ae.term = intern(ae.term)
    if ae.meddra_pt is not None:
        ae.meddra_pt = intern(ae.meddra_pt)
    if ae.meddra_soc is not None:
        ae.meddra_soc = intern(ae.meddra_soc)


def _wins(ae: AdverseEvent, rival: AdverseEvent) -> bool:
    return (ae.recorded_at, ae.event_id) > (rival.recorded_at, rival.event_id)


def _apply_infusion(trial: TrialState, subject: Subject, infusion: Infusion) -> list[Rule]:
    newly_infused = not subject.header.infusions
    subject.header.infusions.append(infusion)
    tracking.cache_infusions(trial, subject)
    dirty = tracking.track_subject(trial, subject)
    if newly_infused:
        dirty += tracking.track_infused(trial)
    return dirty + tracking.track_halts(trial)


def _apply_status(trial: TrialState, subject: Subject, status: SubjectStatus) -> list[Rule]:
    subject.header.statuses.append(status)
    return []


def _apply_report(trial: TrialState, subject: Subject, report: RegulatoryReport) -> list[Rule]:
    known = subject.header.reports.get(report.ae_id)
    if known is None or report.submitted_at < known.submitted_at:
        subject.header.reports[report.ae_id] = report
    return []


def _apply_lab(trial: TrialState, subject: Subject, lab: LabResult) -> list[Rule]:
    subject.labs[lab.test].results.append(
        Lab(intern(lab.test), lab.value, intern(lab.unit), lab.collected_on, lab.uln,
            lab.lln, lab.dialysis))
    return []


_TAGS = {kind: kind.__struct_config__.tag for kind in
         (AdverseEvent, Infusion, SubjectStatus, RegulatoryReport, LabResult)}
_APPLY = {AdverseEvent: _apply_ae, Infusion: _apply_infusion, SubjectStatus: _apply_status,
          RegulatoryReport: _apply_report, LabResult: _apply_lab}


def reconcile(trial: TrialState) -> list[alerts.AlertTransition]:
    """After loading durable records, the alert transitions the ledger has not recorded
    yet (a crash between writing subjects and writing the ledger). They are attributed
    to the trial's latest event. Nothing to do after a clean stop."""
    if trial.rules is None or trial.counts.last_event_id is None:
        return []
    cause = _Cause(trial.counts.last_event_id, trial.counts.last_recorded_at)
    return tracking.evaluate(trial, list(trial.rules.rules), cause)


class _Cause(NamedTuple):
    event_id: str
    recorded_at: dt.datetime
