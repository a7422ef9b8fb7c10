"""Per-trial state and the step function: ``step(trial, event) -> (trial, changes)``.

The durable part of a trial's state is plain values, split into records so that what
one event changes does not grow with the trial's history:

* per subject, a `SubjectHeader` (infusions, statuses, regulatory reports, event counts),
  one `AeHistory` per AE (the messages of its versions) and one `LabSeries` per
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

import copy
import datetime as dt
import enum
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from sys import intern
from typing import Literal, NamedTuple

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
from .kinds import Check, Rule
from .rules import TrialRules
from .window import Placement, WindowLength, place_onset

ACCEPTED, DUPLICATE, REDELIVERED = "accepted", "duplicate", "redelivered"
HEADER, AE, LAB = "header", "ae", "lab"


def _zero_by_type() -> dict[str, int]:
    return dict.fromkeys(EVENT_TYPES, 0)


class Seen(msgspec.Struct, gc=False):
    """The messages a record took, by event id, with their stream positions (None in
    replay), and the positions of later copies of the same id (the duplicates). Each
    kind of header message and each lab series carries its own, so it is always written
    together with what it counts (an `AeHistory` keeps its ids itself)."""

    first: dict[str, int | None] = {}
    again: dict[str, list[int | None]] | None = None  # rare: made on the first duplicate

    def count(self) -> tuple[int, int]:
        """(accepted, duplicates)."""
        return len(self.first), sum(len(copies) for copies in (self.again or {}).values())


class AeHistory(msgspec.Struct, array_like=True, gc=False):
    """One AE: the winning message of each version number, with its stream position
    (None in replay); the ids and positions of messages that lost a tie on their version
    (made on the first); the positions of later copies of a taken id (the duplicates;
    made on the first); and the messages that lost a tie (what was known until the
    winner was recorded: `judge_infusions` reads them). Of two messages with one
    version, the later ``recorded_at`` wins, then the greater ``event_id``; the current
    version is the highest.

    Tuples, not dicts: an AE has one message or a few, and a trial keeps many AEs. Stored
    as a JSON array ``[messages, positions, again, lost, losers]``."""

    messages: tuple[AdverseEvent, ...] = ()  # by version number
    positions: tuple[int | None, ...] = ()
    again: dict[str, list[int | None]] | None = None
    lost: dict[str, int | None] | None = None
    losers: tuple[AdverseEvent, ...] = ()  # none in rows of builds before 2026-12-04

    @property
    def current(self) -> AdverseEvent:
        return self.messages[-1]

    @property
    def conflicts(self) -> int:
        """How many messages lost a tie on their version number."""
        return len(self.lost) if self.lost else 0

    def position_of(self, event_id: str) -> int | None | Literal[_Taken.NOT]:
        """The position of the message taken with this id, or `_NOT_TAKEN`."""
        for index, ae in enumerate(self.messages):
            if ae.event_id == event_id:
                return self.positions[index]
        return self.lost.get(event_id, _NOT_TAKEN) if self.lost else _NOT_TAKEN

    def take(self, ae: AdverseEvent, position: int | None) -> None:
        """Keep a message not taken before: as the winner of its version number, or,
        losing the tie on it, as an id in ``lost``."""
        if not self.messages:  # the usual case: the AE's first message
            self.messages = (ae,)
            self.positions = _NO_POSITION if position is None else (position,)
            return
        messages, positions = list(self.messages), list(self.positions)
        at = bisect_left([rival.version for rival in messages], ae.version)
        if at < len(messages) and messages[at].version == ae.version:  # a tie
            rival = messages[at]
            if (ae.recorded_at, ae.event_id) > (rival.recorded_at, rival.event_id):
                loser, loser_at = rival, positions[at]
                messages[at], positions[at] = ae, position
            else:
                loser, loser_at = ae, position
            if self.lost is None:
                self.lost = {}
            self.lost[loser.event_id] = loser_at
            loser.onset_latest = loser.onset_latest_own  # as it says alone: see cap_onset
            self.losers = tuple(sorted((*self.losers, loser),  # in any order of arrival
                                       key=lambda m: (m.recorded_at, m.event_id)))
        else:
            messages.insert(at, ae)
            positions.insert(at, position)
        self.messages, self.positions = tuple(messages), tuple(positions)
        self.cap_onset()

    def cap_onset(self) -> None:
        """The AE existed when it was first reported: the current version's onset is no
        later than the earliest day a kept version (the winner of each version number)
        was reported, as each message's own onset is no later than its own report;
        unless the current version's onset starts after that day: a correction, and the
        current version wins. Derived from the kept messages alone, whatever their order
        of arrival, so a load derives it again."""
        if len(self.messages) > 1:
            *earlier, current = self.messages
            for ae in earlier:  # no longer current: as it says alone, whatever came first
                ae.onset_latest = ae.onset_latest_own
            reported, own = min(ae.recorded_at.date() for ae in self.messages), \
                current.onset_latest_own
            current.onset_latest = reported if current.onset_earliest <= reported < own else own

    def count(self) -> tuple[int, int]:
        """(accepted, duplicates)."""
        return (len(self.messages) + self.conflicts,
                sum(len(copies) for copies in (self.again or {}).values()))


class _Taken(enum.Enum):
    NOT = enum.auto()


_NOT_TAKEN = _Taken.NOT
_NO_POSITION = (None,)  # the positions of an AE's first message in replay, shared


class Lab(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What the engine keeps of a lab result (the log or topic keeps the message). Stored
    as a JSON array, as a tuple would be; in memory 72 bytes where a tuple takes 112,
    and labs are most of a trial's messages."""

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
    # what gives an AE to the rules (`tracking.compile_plan`); None: no rule looks at AEs.
    # It holds this trial's trackers, as `halt_lookup` holds its halt states: a copy of
    # the trial is rebuilt (`rebuild`) before it steps
    ae_plan: tracking.AePlan | None = None
    trackers: dict[str, object] = field(default_factory=dict)
    # per rule, the evidence keys of its last decision (None: unknown, see rebuild)
    evidence: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    infusion_days: dict[str, tuple[dt.date, dt.date, list[dt.date]]] = field(default_factory=dict)
    # (first infusion day, subject id) of every infused subject, in order
    infusion_order: list[tuple[dt.date, str]] = field(default_factory=list)
    # for the rules that watch halts (`_watch_halts`): those rules; the halt rules they
    # watch, and the trial's rules file with those alone; the latest recorded_at of an
    # AE message or infusion kept, and of an infusion; whether a halt rule is breached
    # now (as of the last `tracking.evaluate`; kept only where a rule watches halts),
    # and before that latest instant (None: unknown, since a late message)
    halt_watchers: tuple[Rule, ...] = ()
    halt_rules: tuple[Rule, ...] = ()
    halt_only: TrialRules | None = None
    halt_input_at: dt.datetime | None = None
    last_infusion_at: dt.datetime | None = None
    halted: bool = False
    halted_before_latest: bool | None = None
    # (subject id, infusion) of the infusions recorded at halt_input_at; and, per halt
    # rule, the checks an AE alone must pass to be its evidence anywhere
    latest_infusions: list[tuple[str, Infusion]] = field(default_factory=list)
    halt_checks: tuple[tuple[Check, ...], ...] = ()
    # the AEs a halt rule may count, by subject: made by the first `judge_infusions`;
    # whether a halt rule counts the subjects infused so far (then every infusion counts)
    halt_aes: dict[str, set[str]] | None = None
    halt_every_infusion: bool = False
    # the last `judge_infusions`'s halt states by instant, while no message a halt rule
    # may count has come since (see `_halted_around`)
    halt_lookup: Callable[[dt.datetime], tuple[bool, bool]] | None = None

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
    trial.ae_plan = tracking.compile_plan(rules, trial.trackers)
    trial.halt_watchers = tuple(r for r in rules if r.watches_halts)
    trial.halt_rules = tuple(r for r in rules if r.severity == "halt" and not r.watches_halts)
    trial.halt_only = trial.rules.model_copy(update={"rules": trial.halt_rules}) \
        if trial.halt_watchers else None
    trial.halt_checks = tuple(r.match.checks_of_the_ae_alone + r.extra_checks()
                              for r in trial.halt_rules)
    trial.halt_every_infusion = any(r.watches_infused for r in trial.halt_rules)
    trial.infusion_days, trial.infusion_order, trial.counts = {}, [], Counts()
    trial.halt_input_at = trial.last_infusion_at = None
    for subject in trial.subjects.values():
        for history in subject.aes.values():
            history.cap_onset()  # derived, as `take` leaves it
            for ae in history.messages:
                trial.halt_input_at = _later(trial.halt_input_at, ae.recorded_at)
        for infusion in subject.infusions:
            trial.last_infusion_at = _later(trial.last_infusion_at, infusion.recorded_at)
        _count_subject(trial.counts, subject)
        tracking.cache_infusions(trial, subject)
        tracking.track_subject(trial, subject)
    trial.halt_input_at = _later(trial.halt_input_at, trial.last_infusion_at)
    tracking.track_infused(trial)
    trial.halted, trial.halted_before_latest = tracking.halted_now(trial), None
    trial.latest_infusions, trial.halt_aes, trial.halt_lookup = [], None, None
    judge_infusions(trial)
    # the ledger keeps a digest of each rule's evidence, not the keys: they are the
    # trackers' own, unless the rules changed since it was written
    trial.evidence = {}
    for rule in rules:
        entry = trial.ledger[rule.id]
        keys = trial.trackers[rule.id].evidence_keys() if entry.breached else ()
        trial.evidence[rule.id] = alerts.known_evidence(entry, keys)
    return trial


def _later(known: dt.datetime | None, at: dt.datetime | None) -> dt.datetime | None:
    return at if known is None or (at is not None and at > known) else known


def _watch_halts(trial: TrialState, at: dt.datetime, halted_before: bool,
                 infusion: tuple[str, Infusion] | None = None,
                 history: AeHistory | None = None) -> list[Rule]:
    """After an AE message (of ``history``) or an infusion (``(subject_id, infusion)``)
    recorded at ``at`` was applied, with ``halted_before`` the halt state before it:
    judge again the infusions it concerns, for the rules that watch halts; the rules
    that changed.

    None when the message is the latest: the usual case. Those recorded at ``at``
    (several messages of one instant), on the state before that instant and now. Every
    infusion, from the kept messages, when a message is late: recorded before an
    infusion already kept (unless no halt rule can count its AE)."""
    latest = trial.halt_input_at
    if infusion is not None:
        trial.last_infusion_at = _later(trial.last_infusion_at, at)
        if trial.halt_lookup is not None and _places_counted(trial, infusion[0]):
            trial.halt_lookup = None  # the halt states may change
    if latest is None or at > latest:  # the latest: the halt state before it is known
        trial.halt_input_at, trial.halted_before_latest = at, halted_before
        trial.latest_infusions = [] if infusion is None else [infusion]
        if infusion is None or not halted_before:
            # an AE: no infusion is recorded at it or after it; an infusion: no halt
            # held before it, so it is not counted, and was not
            return []
        return tracking.judge_infusion(trial, *infusion, tracking.halted_now(trial))
    if at == latest and trial.halted_before_latest is not None:
        if infusion is not None:
            trial.latest_infusions.append(infusion)
        halted = trial.halted_before_latest and tracking.halted_now(trial)
        return _judged(trial, ((*given, halted) for given in trial.latest_infusions))
    if history is not None and not _may_halt(trial, history):
        return []  # no halt rule counts this AE, whichever version and wherever placed
    if trial.last_infusion_at is None or at > trial.last_infusion_at:
        trial.halted_before_latest = None  # late, but before no infusion: it may be later
        return []
    if infusion is not None and trial.halt_lookup is not None:
        # an infusion that changes no halt rule's state: it alone is judged
        before, after = trial.halt_lookup(at)
        return tracking.judge_infusion(trial, *infusion, before and after)
    return judge_infusions(trial)


def _places_counted(trial: TrialState, subject_id: str) -> bool:
    """Whether an infusion of the subject may change a halt rule's state."""
    return trial.halt_every_infusion or subject_id in (trial.halt_aes or ())


def _may_halt(trial: TrialState, history: AeHistory) -> bool:
    """Whether a version of the AE, or a message that lost a tie, passes the checks of
    some halt rule that do not need its placement."""
    known = trial.halt_aes
    if known is not None:
        ae = history.current
        return ae.ae_id in known.get(ae.subject_id, ())
    return any(_may_halt_alone(trial, ae) for ae in (*history.messages, *history.losers))


def _may_halt_alone(trial: TrialState, ae: AdverseEvent) -> bool:
    return any(all(check(ae, None, ()) for check in checks) for checks in trial.halt_checks)


def judge_infusions(trial: TrialState) -> list[Rule]:
    """Judge every infusion of the trial, for the rules that watch halts (see
    `kinds.DosingWhileHalted`), from the kept messages; the rules that changed."""
    if not trial.halt_watchers or trial.last_infusion_at is None:
        return []
    halted = trial.halt_lookup = _halted_around(trial)
    trial.halted_before_latest = halted(trial.halt_input_at)[0]
    every = [(subject.subject_id, infusion) for subject in trial.subjects.values()
             for infusion in subject.infusions]
    trial.latest_infusions = [given for given in every
                              if given[1].recorded_at == trial.halt_input_at]
    return _judged(trial, ((*given, all(halted(given[1].recorded_at))) for given in every))


def _judged(trial: TrialState, judged: Iterable[tuple[str, Infusion, bool]]) -> list[Rule]:
    """Tell the rules that watch halts whether each infusion was given during one; the
    rules that changed."""
    dirty: dict[str, Rule] = {}
    for subject_id, infusion, halted in judged:
        for rule in tracking.judge_infusion(trial, subject_id, infusion, halted):
            dirty[rule.id] = rule
    return list(dirty.values())


def _halted_around(trial: TrialState) -> Callable[[dt.datetime], tuple[bool, bool]]:
    """Whether a halt rule was breached on what was recorded before an instant, and on
    what was recorded up to it (what the sponsor knew). The messages a halt rule may
    count are stepped again in order of recorded_at through a trial with the halt rules
    alone: the AE messages that may be evidence (with those that lost a tie), and the
    infusions that place them (every infusion, when a halt rule counts the subjects
    infused so far)."""
    scratch = rebuild(TrialState(trial.trial_id, trial.halt_only))
    if trial.halt_aes is None:  # kept from now on by `_apply_ae`
        found = {}
        for subject in trial.subjects.values():
            if counted := {ae_id for ae_id, history in subject.aes.items()
                           if _may_halt(trial, history)}:
                found[subject.subject_id] = counted
        trial.halt_aes = found
    kept: list[Infusion | AdverseEvent] = []
    for subject in trial.subjects.values():
        counted = trial.halt_aes.get(subject.subject_id, ())
        if counted or trial.halt_every_infusion:
            kept += subject.infusions
        for ae_id in sorted(counted):
            history = subject.aes[ae_id]
            kept += map(_as_reported, (*history.messages, *history.losers))
    kept.sort(key=_recorded_at)
    instants: list[dt.datetime] = []
    after: list[bool] = []  # the halt state after each instant's messages
    for at, messages in groupby(kept, key=_recorded_at):
        for message in messages:
            step(scratch, message)
        instants.append(at)
        after.append(tracking.halted_now(scratch))

    def around(at: dt.datetime) -> tuple[bool, bool]:
        before, upto = bisect_left(instants, at), bisect_right(instants, at)
        return (before > 0 and after[before - 1], upto > 0 and after[upto - 1])

    return around


def _as_reported(ae: AdverseEvent) -> AdverseEvent:
    """A copy of a kept message as it arrived: a step caps the onset of the AE's current
    version in place (`AeHistory.cap_onset`). Not `msgspec.structs.replace`, which
    would read the fields again, strictly: a row of an earlier build may hold a value
    read loosely then."""
    copied = copy.copy(ae)
    copied.onset_latest = copied.onset_latest_own
    return copied


def _recorded_at(message: Infusion | AdverseEvent) -> dt.datetime:
    return message.recorded_at


def _count_subject(counts: Counts, subject: Subject) -> None:
    header = subject.header
    records = [*((tag, seen) for tag, seen in header.seen.items()),
               *(("adverse_event", history) for history in subject.aes.values()),
               *(("lab_result", series.seen) for series in subject.labs.values())]
    for tag, holder in records:
        accepted, duplicates = holder.count()
        counts.accepted[tag] += accepted
        counts.duplicates[tag] += duplicates
    if header.last_recorded_at is not None and (
            counts.last_recorded_at is None or (header.last_recorded_at, header.last_event_id)
            > (counts.last_recorded_at, counts.last_event_id)):
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
    tag, apply = _KINDS[kind]
    event_id = event.event_id
    # the record that takes the message, and its key for the caller
    if kind is AdverseEvent:
        held = subject.aes.get(event.ae_id)
        record = (AE, event.ae_id)
        if held is None:
            held = subject.aes[event.ae_id] = AeHistory()
        else:
            taken = held.position_of(event_id)
            if taken is not _NOT_TAKEN:
                return trial, _changes((_repeat(trial, held, taken, event, position, tag),
                                        record, ()))
    else:
        if kind is LabResult:
            held = subject.labs.get(event.test)
            if held is None:
                held = subject.labs[event.test] = LabSeries()
            seen, record = held.seen, (LAB, event.test)
        else:
            held = subject.header
            seen, record = held.seen[tag], None
        if event_id in seen.first:
            return trial, _changes((_repeat(trial, seen, seen.first[event_id], event,
                                            position, tag), record, ()))
        seen.first[event_id] = position
    # counting (inline: every event passes here)
    counts, header, recorded_at = trial.counts, subject.header, event.recorded_at
    counts.accepted[tag] += 1
    # the latest event: the latest recorded_at, then the greatest event_id (any order)
    latest = header.last_recorded_at
    if latest is None or recorded_at > latest or (recorded_at == latest and
                                                  event_id > header.last_event_id):
        header.last_recorded_at, header.last_event_id = recorded_at, event_id
        latest = counts.last_recorded_at
        if latest is None or recorded_at > latest or (recorded_at == latest and
                                                      event_id > counts.last_event_id):
            counts.last_recorded_at, counts.last_event_id = recorded_at, event_id
    if kind is LabResult:  # most messages, with nothing else to apply: inline
        held.results.append(Lab(intern(event.test), event.value, intern(event.unit),
                                event.collected_on, event.uln, event.lln, event.dialysis))
        return trial, _changes((ACCEPTED, record, ()))
    dirty = apply(trial, subject, held, event, position)
    if not dirty:
        return trial, _ACCEPTED_HEADER if record is None else _changes((ACCEPTED, record, ()))
    return trial, _changes((ACCEPTED, record, tuple(tracking.evaluate(trial, dirty, event))))


# A NamedTuple's own constructor is a Python-level call; tuple.__new__ makes the same
# tuple at a third of the cost, and every event makes one `Changes`.
_changes = partial(tuple.__new__, Changes)
_ACCEPTED_HEADER = Changes(ACCEPTED)


def _repeat(trial: TrialState, holder: Seen | AeHistory, taken: int | None, event: Event,
            position: int | None, tag: str) -> str:
    """A message whose id the record took before (at position ``taken``): a redelivery
    of a message at a position already taken, else a duplicate (counted, and its
    position kept in the holder's ``again``)."""
    copies = holder.again.get(event.event_id) if holder.again is not None else None
    if position is not None and (taken == position or
                                 (copies is not None and position in copies)):
        return REDELIVERED
    if holder.again is None:
        holder.again = {}
    holder.again.setdefault(event.event_id, []).append(position)
    trial.counts.duplicates[tag] += 1
    return DUPLICATE


# --- applying each kind of message ---------------------------------------------------

def _apply_ae(trial: TrialState, subject: Subject, history: AeHistory,
              ae: AdverseEvent, position: int | None) -> list[Rule]:
    # kept AEs share one copy of the strings that repeat (memory, not meaning)
    ae.trial_id, ae.subject_id = trial.trial_id, subject.subject_id
    ae.term, ae.onset = intern(ae.term), intern(ae.onset)
    if ae.meddra_pt is not None:
        ae.meddra_pt = intern(ae.meddra_pt)
    if ae.meddra_soc is not None:
        ae.meddra_soc = intern(ae.meddra_soc)
    if not history.messages:  # the usual case: the AE's first message
        history.take(ae, position)
        dirty = tracking.track_ae(trial, subject.subject_id, ae, first=True)
    else:
        before = history.current  # the highest version wins
        latest = before.onset_latest  # an earlier report can move it back (`cap_onset`)
        history.take(ae, position)
        dirty = [] if history.current is before and before.onset_latest == latest else \
            tracking.track_ae(trial, subject.subject_id, history.current)
    if trial.halt_watchers:  # `halted`: as the last step left it
        if trial.halt_aes is not None and _may_halt_alone(trial, ae):
            trial.halt_aes.setdefault(subject.subject_id, set()).add(ae.ae_id)
        if trial.halt_lookup is not None and _may_halt(trial, history):
            trial.halt_lookup = None  # the halt states may change
        dirty += _watch_halts(trial, ae.recorded_at, trial.halted, history=history)
    return dirty


def _apply_infusion(trial: TrialState, subject: Subject, header: SubjectHeader,
                    infusion: Infusion, _position: int | None) -> list[Rule]:
    halted_before = trial.halted
    header.infusions.append(infusion)
    first_changed = tracking.cache_infusions(trial, subject)
    dirty = tracking.track_subject(trial, subject)
    if first_changed:  # a subject infused, or infused earlier than known: the order moves
        dirty += tracking.track_infused(trial)
    if trial.halt_watchers:
        dirty += _watch_halts(trial, infusion.recorded_at, halted_before,
                              (subject.subject_id, infusion))
    return dirty


def _apply_status(trial: TrialState, subject: Subject, header: SubjectHeader,
                  status: SubjectStatus, _position: int | None) -> list[Rule]:
    header.statuses.append(status)
    return []


def _apply_report(trial: TrialState, subject: Subject, header: SubjectHeader,
                  report: RegulatoryReport, _position: int | None) -> list[Rule]:
    known = header.reports.get(report.ae_id)
    if known is None or report.submitted_at < known.submitted_at:
        header.reports[report.ae_id] = report
    return []


# each kind of message: its tag, and how it is applied to its record (a lab result: in
# `step` itself)
_KINDS = {kind: (kind.__struct_config__.tag, apply) for kind, apply in (
    (AdverseEvent, _apply_ae), (LabResult, None), (Infusion, _apply_infusion),
    (SubjectStatus, _apply_status), (RegulatoryReport, _apply_report))}


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
