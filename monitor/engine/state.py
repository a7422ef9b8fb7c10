"""Per-trial state and the step function: ``step(trial, event) -> (trial, changes)``.

The durable part of a trial's state is plain values, split so that what one event
changes does not grow with the trial's history:

* one `Subject` record per subject (its infusions, statuses, the winning message of each
  AE version, regulatory reports, labs and the event ids it has seen);
* one `LedgerEntry` per rule (alert episodes) and the trial's event counters.

Everything else (`TrialState.trackers`, the infusion cache) is derived and rebuilt by
`rebuild` after a restart. For speed, ``step`` updates the trial in place and returns
it; it does no I/O and reads no clock, so the same events give the same state and the
same alerts, in the worker and in replay.

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

from . import alerts
from .events import (
    EVENT_TYPES,
    AdverseEvent,
    Event,
    Infusion,
    LabResult,
    RegulatoryReport,
    SubjectStatus,
)
from .kinds import DosingWhileHalted, EvidenceItem, Rule
from .rules import TrialRules
from .window import Placement, WindowLength, place_onset

ACCEPTED, DUPLICATE = "accepted", "duplicate"


class AeHistory(msgspec.Struct, array_like=True, gc=False):
    """The winning message of each version number of one AE, and how many messages lost
    a tie on their version (conflicts)."""

    versions: dict[int, AdverseEvent]
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


class Subject(msgspec.Struct):
    subject_id: str
    infusions: list[Infusion] = []
    statuses: list[SubjectStatus] = []
    aes: dict[str, AeHistory] = {}
    reports: dict[str, RegulatoryReport] = {}
    labs: list[Lab] = []
    seen: set[str] = set()

    @property
    def first_infusion(self) -> dt.date | None:
        return min((i.infused_on for i in self.infusions), default=None)


def _zero_by_type() -> dict[str, int]:
    return dict.fromkeys(EVENT_TYPES, 0)


class Counts(msgspec.Struct):
    """Events of one trial by outcome and type, and when the latest was recorded."""

    accepted: dict[str, int] = msgspec.field(default_factory=_zero_by_type)
    duplicates: dict[str, int] = msgspec.field(default_factory=_zero_by_type)
    last_recorded_at: dt.datetime | None = None


class Changes(NamedTuple):
    """What one step did: accepted or duplicate, and the alert transitions it caused."""

    outcome: str
    alerts: tuple[alerts.AlertTransition, ...] = ()


_DUPLICATE = Changes(DUPLICATE)
_QUIET = Changes(ACCEPTED)


@dataclass(slots=True)
class TrialState:
    trial_id: str
    rules: TrialRules | None = None
    subjects: dict[str, Subject] = field(default_factory=dict)
    ledger: dict[str, alerts.LedgerEntry] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    # derived, rebuilt by `rebuild`:
    window: WindowLength = WindowLength()
    ae_rules: tuple[Rule, ...] = ()
    trackers: dict[str, object] = field(default_factory=dict)
    infusion_days: dict[str, tuple[dt.date, dt.date, list[dt.date]]] = field(default_factory=dict)

    def placement(self, subject_id: str, ae: AdverseEvent) -> Placement:
        known = self.infusion_days.get(subject_id)
        if known is None:
            return place_onset(ae.onset_earliest, ae.onset_latest, None, None)
        return place_onset(ae.onset_earliest, ae.onset_latest, known[0], known[1])


def new_trial(trial_id: str, rules: TrialRules | None) -> TrialState:
    trial = TrialState(trial_id, rules)
    return rebuild(trial)


def rebuild(trial: TrialState) -> TrialState:
    """Derive the trackers and caches from the durable state (after load or restart)."""
    rules = trial.rules.rules if trial.rules else ()
    for rule in rules:
        trial.ledger.setdefault(rule.id, alerts.LedgerEntry(rule.id, rule.severity))
    trial.window = trial.rules.window.length if trial.rules else WindowLength()
    trial.ae_rules = tuple(r for r in rules if r.watches_adverse_events)
    trial.trackers = {rule.id: rule.tracker() for rule in rules}
    trial.infusion_days = {}
    for subject in trial.subjects.values():
        _cache_infusions(trial, subject)
        _track_subject(trial, subject)
    _track_infused(trial)
    _track_halts(trial)
    return trial


def step(trial: TrialState, event: Event) -> tuple[TrialState, Changes]:
    """Apply one valid event of this trial; return the trial and what changed."""
    subject = trial.subjects.get(event.subject_id)
    if subject is None:
        subject = trial.subjects[event.subject_id] = Subject(event.subject_id)
    counts, kind = trial.counts, type(event)
    if event.event_id in subject.seen:
        counts.duplicates[_TAGS[kind]] += 1
        return trial, _DUPLICATE
    subject.seen.add(event.event_id)
    counts.accepted[_TAGS[kind]] += 1
    if counts.last_recorded_at is None or event.recorded_at > counts.last_recorded_at:
        counts.last_recorded_at = event.recorded_at
    dirty = _APPLY[kind](trial, subject, event)
    if not dirty:
        return trial, _QUIET
    found = _evaluate(trial, dirty, event)
    return trial, Changes(ACCEPTED, tuple(found)) if found else _QUIET


def _apply_ae(trial: TrialState, subject: Subject, ae: AdverseEvent) -> list[Rule]:
    _share_strings(trial, subject, ae)
    history = subject.aes.get(ae.ae_id)
    if history is None:
        subject.aes[ae.ae_id] = AeHistory({ae.version: ae})
    else:
        before = history.current
        rival = history.versions.get(ae.version)
        if rival is None or _wins(ae, rival):
            history.versions[ae.version] = ae
        history.conflicts += rival is not None
        if history.current is before:
            return []
    return _track_ae(trial, subject.subject_id, ae if history is None else history.current)


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
    newly_infused = not subject.infusions
    subject.infusions.append(infusion)
    _cache_infusions(trial, subject)
    dirty = _track_subject(trial, subject)
    if newly_infused:
        dirty += _track_infused(trial)
    return dirty + _track_halts(trial)


def _track_infused(trial: TrialState) -> list[Rule]:
    """Tell the rules whose denominator is the subjects infused so far."""
    rules = trial.rules.rules if trial.rules else ()
    infused = len(trial.infusion_days)
    return [r for r in rules if r.watches_infused and trial.trackers[r.id].infused(infused)]


def _apply_status(trial: TrialState, subject: Subject, status: SubjectStatus) -> list[Rule]:
    subject.statuses.append(status)
    return []


def _apply_report(trial: TrialState, subject: Subject, report: RegulatoryReport) -> list[Rule]:
    known = subject.reports.get(report.ae_id)
    if known is None or report.submitted_at < known.submitted_at:
        subject.reports[report.ae_id] = report
    return []


def _apply_lab(trial: TrialState, subject: Subject, lab: LabResult) -> list[Rule]:
    subject.labs.append(Lab(intern(lab.test), lab.value, intern(lab.unit), lab.collected_on,
                            lab.uln, lab.lln, lab.dialysis))
    return []


_TAGS = {kind: kind.__struct_config__.tag for kind in
         (AdverseEvent, Infusion, SubjectStatus, RegulatoryReport, LabResult)}
_APPLY = {AdverseEvent: _apply_ae, Infusion: _apply_infusion, SubjectStatus: _apply_status,
          RegulatoryReport: _apply_report, LabResult: _apply_lab}


def _cache_infusions(trial: TrialState, subject: Subject) -> None:
    """(first infusion, last day of the window, every infusion day) of the subject."""
    if subject.infusions:
        days = sorted(i.infused_on for i in subject.infusions)
        trial.infusion_days[subject.subject_id] = (days[0], trial.window.last_day(days[0]), days)


def _track_ae(trial: TrialState, subject_id: str, ae: AdverseEvent) -> list[Rule]:
    """Give the AE's current version to every rule that looks at AEs."""
    if not trial.ae_rules:
        return []
    placement = trial.placement(subject_id, ae)
    known = trial.infusion_days.get(subject_id)
    days = known[2] if known else ()
    trackers, dirty, retracted = trial.trackers, [], ae.retracted
    for rule in trial.ae_rules:
        item = None if retracted else rule.evidence_for(subject_id, ae, placement, days)
        if trackers[rule.id].set(subject_id, ae.ae_id, item):
            dirty.append(rule)
    return dirty


def _track_subject(trial: TrialState, subject: Subject) -> list[Rule]:
    dirty: dict[str, Rule] = {}
    for history in subject.aes.values():
        for rule in _track_ae(trial, subject.subject_id, history.current):
            dirty[rule.id] = rule
    return list(dirty.values())


def _track_halts(trial: TrialState) -> list[Rule]:
    """Re-derive the rules that watch halts from every infusion and the halt episodes."""
    dirty = []
    rules = trial.rules.rules if trial.rules else ()
    for rule in (r for r in rules if r.watches_halts):
        periods = alerts.halt_periods(trial.ledger, exclude=rule.id)
        tracker, changed = trial.trackers[rule.id], False
        if not periods and not tracker.items:
            continue  # no halt ever, nothing counted: nothing can change
        for subject in trial.subjects.values():
            for infusion in subject.infusions:
                item = _dosing_item(subject.subject_id, infusion) \
                    if DosingWhileHalted.during_halt(infusion.recorded_at, periods) else None
                changed |= tracker.set(subject.subject_id, infusion.event_id, item)
        if changed:
            dirty.append(rule)
    return dirty


def _dosing_item(subject_id: str, infusion: Infusion) -> EvidenceItem:
    return EvidenceItem(subject_id, infusion.event_id, f"infusion dose {infusion.dose_number}",
                        None, None, None, None, infusion.infused_on, None)


def _evaluate(trial: TrialState, dirty: list[Rule], event: Event) -> list[alerts.AlertTransition]:
    out: list[alerts.AlertTransition] = []
    if len(dirty) > 1:
        order = [r.id for r in trial.rules.rules]
        dirty = sorted({r.id: r for r in dirty}.values(), key=lambda r: order.index(r.id))
    halted = _decide(trial, dirty, event, out)
    if halted:
        _decide(trial, _track_halts(trial), event, out)
    return out


def _decide(trial: TrialState, dirty: list[Rule], event: Event,
            out: list[alerts.AlertTransition]) -> bool:
    halt_changed = False
    for rule in dirty:
        entry, tracker = trial.ledger[rule.id], trial.trackers[rule.id]
        if not entry.breached and not tracker.breached():
            entry.value = tracker.value()  # ok before and after: no evidence to build
            continue
        result = tracker.result()
        transition = alerts.decide(entry, result)
        before = entry.evidence
        alerts.record(entry, result, transition, event.recorded_at)
        if transition is not None:
            out.append(alerts.transition_of(trial.trial_id, rule, entry, before, result,
                                            transition, event.event_id, event.recorded_at))
            halt_changed |= rule.severity == "halt" and transition != alerts.UPDATED
    return halt_changed
