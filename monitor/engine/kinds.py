"""Stopping-rule kinds (SPEC section 4): each kind is one class, here.

A kind is a frozen pydantic model (its fields are the rule file's keys) with two duties:

* ``tracker()`` makes the kind's running tally for one trial: plain values that the
  engine updates one adverse event or infusion at a time, so that no event costs work
  proportional to the trial's history;
* the tracker's ``result()`` says the rule's value, threshold, breached state and
  evidence (`RuleResult`).

To add a kind, write its class below and add it to ``RULE_KINDS`` at the bottom.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .events import AdverseEvent, SeriousCriterion
from .window import IN_WINDOW, Placement

RuleId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
Severity = Literal["halt", "pause", "review"]


class EvidenceItem(tuple):
    """One adverse event (or infusion) behind a rule's value; a tuple for speed."""

    __slots__ = ()
    _fields = ("subject_id", "ae_id", "term", "grade", "serious", "relatedness", "onset_day",
               "onset", "group")

    def __new__(cls, subject_id: str, ae_id: str, term: str, grade: int | None,
                serious: bool | None, relatedness: str | None, onset_day: int | None,
                onset: dt.date | None, group: str | None = None) -> EvidenceItem:
        return tuple.__new__(cls, (subject_id, ae_id, term, grade, serious, relatedness,
                                   onset_day, onset, group))

    subject_id = property(lambda self: self[0])
    ae_id = property(lambda self: self[1])
    term = property(lambda self: self[2])
    grade = property(lambda self: self[3])
    serious = property(lambda self: self[4])
    relatedness = property(lambda self: self[5])
    onset_day = property(lambda self: self[6])
    onset = property(lambda self: self[7])
    group = property(lambda self: self[8])

    @property
    def key(self) -> str:
        return f"{self[0]}/{self[1]}"

    def as_dict(self) -> dict:
        out = dict(zip(self._fields, self, strict=True))
        out["onset"] = self[7].isoformat() if self[7] else None
        out["related"] = self[5] is None or self[5] in ("possible", "probable", "definite")
        return out


class RuleResult(tuple):
    """A rule's state now: value against threshold, and the evidence behind the value."""

    __slots__ = ()

    def __new__(cls, value: float, threshold: float, breached: bool,
                evidence: tuple[EvidenceItem, ...], detail: dict | None = None) -> RuleResult:
        return tuple.__new__(cls, (value, threshold, breached, evidence, detail or {}))

    value = property(lambda self: self[0])
    threshold = property(lambda self: self[1])
    breached = property(lambda self: self[2])
    evidence = property(lambda self: self[3])
    detail = property(lambda self: self[4])

    @property
    def evidence_keys(self) -> tuple[str, ...]:
        return tuple(item.key for item in self[3])


class Match(BaseModel):
    """Which adverse events a rule looks at. Every condition given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grade_min: int | None = Field(None, ge=1, le=5)
    serious: bool | None = None
    related: bool | None = None
    fatal: bool | None = None
    expected: bool | None = None
    serious_criteria: tuple[SeriousCriterion, ...] = ()
    meddra_pt: tuple[str, ...] = ()
    meddra_soc: tuple[str, ...] = ()
    within_hours_of_infusion: int | None = Field(None, ge=1)
    in_window: bool = True

    def matches(self, ae: AdverseEvent, placement: Placement,
                infusions: list[dt.date]) -> bool:
        if self.in_window and placement.period != IN_WINDOW:
            return False
        if placement.onset is None:
            return False
        if self.grade_min is not None and ae.grade < self.grade_min:
            return False
        if self.serious is not None and ae.serious != self.serious:
            return False
        if self.related is not None and ae.related != self.related:
            return False
        if self.fatal is not None and ae.fatal != self.fatal:
            return False
        if self.expected is not None and (ae.expected is True) != self.expected:
            return False
        return self._matches_lists(ae) and self._near_infusion(placement.onset, infusions)

    def _matches_lists(self, ae: AdverseEvent) -> bool:
        if self.serious_criteria and not set(self.serious_criteria) & set(ae.serious_criteria):
            return False
        if self.meddra_pt and _folded(ae.meddra_pt) not in _folded_all(self.meddra_pt):
            return False
        return not self.meddra_soc or _folded(ae.meddra_soc) in _folded_all(self.meddra_soc)

    def _near_infusion(self, onset: dt.date, infusions: list[dt.date]) -> bool:
        """Onsets are dates: within H hours means on day 0 .. ceil(H/24) after an infusion."""
        if self.within_hours_of_infusion is None:
            return True
        days = math.ceil(self.within_hours_of_infusion / 24)
        return any(0 <= (onset - day).days <= days for day in infusions)


def _folded(text: str | None) -> str | None:
    return text.casefold() if text else None


def _folded_all(texts: tuple[str, ...]) -> frozenset[str]:
    return frozenset(t.casefold() for t in texts)


class Rule(BaseModel):
    """What every rule has. Subclasses add their parameters and a tracker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: RuleId
    severity: Severity
    description: str = ""
    action: str = ""
    match: Match = Match()

    watches_adverse_events: ClassVar[bool] = True
    watches_halts: ClassVar[bool] = False

    def evidence_for(self, subject_id: str, ae: AdverseEvent, placement: Placement,
                     infusions: list[dt.date]) -> EvidenceItem | None:
        """The evidence item this AE adds, or None when the rule does not look at it."""
        if ae.retracted or not self.match.matches(ae, placement, infusions):
            return None
        return EvidenceItem(subject_id, ae.ae_id, ae.term, ae.grade, ae.serious,
                            ae.relatedness, placement.day, placement.onset,
                            self.group_of(ae))

    def group_of(self, ae: AdverseEvent) -> str | None:
        return None


class Tally:
    """Evidence items by subject, as the engine reports them; shared by the kinds."""

    __slots__ = ("items", "subjects_with", "events")

    def __init__(self) -> None:
        self.items: dict[str, dict[str, EvidenceItem]] = {}
        self.events = 0

    def set(self, subject_id: str, key: str, item: EvidenceItem | None) -> bool:
        """Record (or clear, with None) one item; True when the tally changed."""
        mine = self.items.get(subject_id)
        old = mine.get(key) if mine else None
        if old == item:
            return False
        if item is None:
            del mine[key]
            self.events -= 1
            if not mine:
                del self.items[subject_id]
        else:
            if mine is None:
                mine = self.items[subject_id] = {}
            mine[key] = item
            self.events += old is None
        return True

    def all_items(self) -> tuple[EvidenceItem, ...]:
        return tuple(sorted((i for m in self.items.values() for i in m.values()), key=_order))


def _order(item: EvidenceItem) -> tuple:
    return (item.subject_id, item.ae_id)


class CountRule(Rule):
    """At least ``threshold`` subjects (or events) with a matching AE."""

    kind: Literal["count"]
    count: Literal["subjects", "events"] = "subjects"
    threshold: int = Field(ge=1)

    def tracker(self) -> CountTracker:
        return CountTracker(self)


class CountTracker(Tally):
    __slots__ = ("rule",)

    def __init__(self, rule: CountRule) -> None:
        super().__init__()
        self.rule = rule

    def value(self) -> int:
        return len(self.items) if self.rule.count == "subjects" else self.events

    def result(self) -> RuleResult:
        value = self.value()
        return RuleResult(value, self.rule.threshold, value >= self.rule.threshold,
                          self.all_items(), {"count": self.rule.count})


class ClusterRule(Rule):
    """At least ``subjects`` subjects with matching AEs in one MedDRA SOC (or PT) whose
    onsets fall within ``within_days`` days of each other."""

    kind: Literal["cluster"]
    subjects: int = Field(ge=2)
    within_days: int = Field(ge=0)
    by: Literal["soc", "pt"] = "soc"

    @property
    def threshold(self) -> int:
        return self.subjects

    def group_of(self, ae: AdverseEvent) -> str | None:
        return ae.meddra_soc if self.by == "soc" else ae.meddra_pt

    def evidence_for(self, subject_id, ae, placement, infusions):  # noqa: ANN001
        item = super().evidence_for(subject_id, ae, placement, infusions)
        return item if item is not None and item.group else None

    def tracker(self) -> ClusterTracker:
        return ClusterTracker(self)


class ClusterTracker(Tally):
    __slots__ = ("rule",)

    def __init__(self, rule: ClusterRule) -> None:
        super().__init__()
        self.rule = rule

    def result(self) -> RuleResult:
        groups: dict[str, list[EvidenceItem]] = {}
        for mine in self.items.values():
            for item in mine.values():
                groups.setdefault(item.group, []).append(item)
        best: tuple[int, tuple[EvidenceItem, ...], str | None] = (0, (), None)
        for group in sorted(groups):
            size, members = densest_window(groups[group], self.rule.within_days)
            if size > best[0]:
                best = (size, members, group)
        size, members, group = best
        return RuleResult(size, self.rule.subjects, size >= self.rule.subjects,
                          tuple(sorted(members, key=_order)),
                          {"group": group, "by": self.rule.by,
                           "within_days": self.rule.within_days})


def densest_window(items: list[EvidenceItem], within_days: int) -> tuple[int, tuple]:
    """The most distinct subjects whose onsets lie within ``within_days`` of each other,
    and the items of that window (the earliest such window on a tie)."""
    ordered = sorted(items, key=lambda i: (i.onset, i.subject_id, i.ae_id))
    subjects: Counter[str] = Counter()
    best, best_span, start = 0, (0, 0), 0
    for end, item in enumerate(ordered):
        subjects[item.subject_id] += 1
        while (item.onset - ordered[start].onset).days > within_days:
            left = ordered[start].subject_id
            subjects[left] -= 1
            if not subjects[left]:
                del subjects[left]
            start += 1
        if len(subjects) > best:
            best, best_span = len(subjects), (start, end + 1)
    return best, tuple(ordered[best_span[0]:best_span[1]])


class DosingWhileHalted(Rule):
    """An infusion recorded after a ``halt`` alert of another rule was raised and
    before it was resolved (compared on ``recorded_at``)."""

    kind: Literal["dosing_while_halted"]
    threshold: int = Field(1, ge=1)

    watches_adverse_events: ClassVar[bool] = False
    watches_halts: ClassVar[bool] = True

    @model_validator(mode="after")
    def _no_match(self) -> DosingWhileHalted:
        if self.match != Match():
            raise ValueError("dosing_while_halted looks at infusions; it takes no 'match'")
        return self

    def tracker(self) -> CountTracker:
        return CountTracker(CountRule(id=self.id, severity=self.severity, kind="count",
                                      count="events", threshold=self.threshold))

    @staticmethod
    def during_halt(recorded_at: dt.datetime,
                    halts: list[tuple[dt.datetime, dt.datetime | None]]) -> bool:
        return any(start <= recorded_at and (end is None or recorded_at < end)
                   for start, end in halts)


RULE_KINDS = (CountRule, ClusterRule, DosingWhileHalted)
