"""Stopping-rule kinds (SPEC section 4): each kind is one class, here.

A kind is a frozen pydantic model (its fields are the rule file's keys) with two duties:

* ``tracker()`` makes the kind's running tally for one trial: plain values that the
  engine updates one adverse event or infusion at a time, so that no event costs work
  proportional to the trial's history;
* the tracker's ``result()`` says the rule's value, threshold, breached state and
  evidence (`RuleResult`); its ``breached()`` says the state alone, cheaply.

The engine feeds a tracker what the kind's ``watches_*`` flags ask for (see `Rule`).

To add a kind, write its class (here, or beside it as `boundary_kinds` does) and add it
to ``RULE_KINDS`` in `monitor.engine.rules`.
"""

from __future__ import annotations

import datetime as dt
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from sys import intern
from typing import Annotated, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .events import RELATED, AdverseEvent, SeriousCriterion
from .window import IN_WINDOW, Placement

RuleId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
Severity = Literal["halt", "pause", "review"]


class EvidenceItem(NamedTuple):
    """One adverse event (or infusion) behind a rule's value."""

    subject_id: str
    ae_id: str
    term: str
    grade: int | None
    serious: bool | None
    relatedness: str | None
    onset_day: int | None  # days after the first infusion
    onset: dt.date | None
    group: str | None = None  # the MedDRA SOC or PT of a cluster

    @property
    def key(self) -> str:
        return f"{self.subject_id}/{self.ae_id}"

    def as_dict(self) -> dict:
        out = self._asdict()
        out["onset"] = self.onset.isoformat() if self.onset else None
        out["related"] = self.relatedness is None or self.relatedness in RELATED
        return out


# EvidenceItem(...) without the NamedTuple's Python-level constructor (a third of the
# cost): every matching adverse event makes one
_evidence_item = partial(tuple.__new__, EvidenceItem)


class RuleResult(NamedTuple):
    """A rule's state now: value against threshold, and the evidence behind the value
    (with each item's key, in the same order: the tracker keeps them, and an alert
    compares them several times)."""

    value: float
    threshold: float
    breached: bool
    evidence: tuple[EvidenceItem, ...]
    detail: dict
    evidence_keys: tuple[str, ...]


Check = Callable[[AdverseEvent, Placement, Sequence[dt.date]], bool]


class Condition(NamedTuple):
    """One condition on an adverse event: a Python expression over ``ae`` (the AE),
    ``p`` (its `Placement`) and ``d`` (its subject's infusion days), where ``{0}``,
    ``{1}`` ... stand for ``values`` (a set, a function). As an expression, the engine
    inlines a trial's conditions into one function (`tracking.compile_plan`), where a
    call per condition would cost more than the condition; `compile_check` makes it a
    `Check` for everything else."""

    source: str
    values: tuple = ()

    def expression(self, names: Sequence[str]) -> str:
        """The expression, with ``names`` for its values."""
        return self.source.format(*names)


@cache
def compile_check(condition: Condition) -> Check:
    """The condition as a function of (ae, placement, infusion days)."""
    names = [f"_v{index}" for index in range(len(condition.values))]
    return eval(f"lambda ae, p, d: {condition.expression(names)}",  # noqa: S307 - our own
                dict(zip(names, condition.values, strict=True)))


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

    def model_post_init(self, _context: object) -> None:
        self._conditions = tuple(self._compile())
        self._checks = tuple(map(compile_check, self._conditions))
        self._unplaced = self._checks[:-1] if self.within_hours_of_infusion is not None \
            else self._checks

    @property
    def checks_of_the_ae_alone(self) -> tuple[Check, ...]:
        """`checks` but those that need the onset's place (hours since an infusion): an
        AE that fails one never matches, wherever it is placed."""
        return self._unplaced

    @property
    def conditions_after_grade(self) -> tuple[Condition, ...]:
        """The conditions besides the window and ``grade_min``, as expressions, for a
        caller that compares the grade itself."""
        return self._conditions[1:] if self.grade_min is not None else self._conditions

    def matches(self, ae: AdverseEvent, placement: Placement,
                infusions: Sequence[dt.date]) -> bool:
        """All given conditions hold."""
        if placement.onset is None or (self.in_window and placement.period != IN_WINDOW):
            return False
        for check in self._checks:  # noqa: SIM110 - a loop is faster than all(genexpr)
            if not check(ae, placement, infusions):
                return False
        return True

    def _compile(self) -> Iterator[Condition]:
        if self.grade_min is not None:  # first: see conditions_after_grade
            yield Condition(f"ae.grade >= {int(self.grade_min)}")
        if self.serious is not None:
            yield Condition(f"ae.serious is {bool(self.serious)}")
        if self.related is not None:
            yield Condition(("" if self.related else "not ") +
                            "(ae.relatedness is None or ae.relatedness in {0})", (RELATED,))
        if self.fatal is not None:
            yield Condition(("" if self.fatal else "not ") + '(ae.grade == 5 or ae.outcome '
                            '== "fatal" or "death" in ae.serious_criteria)')
        if self.expected is not None:
            yield Condition("ae.expected is True" if self.expected else
                            "ae.expected is not True")
        if criteria := frozenset(self.serious_criteria):
            yield Condition("not {0}.isdisjoint(ae.serious_criteria)", (criteria,))
        if pts := _folded_all(self.meddra_pt):
            yield Condition("{1}(ae.meddra_pt) in {0}", (pts, _folded))
        if socs := _folded_all(self.meddra_soc):
            yield Condition("{1}(ae.meddra_soc) in {0}", (socs, _folded))
        if self.within_hours_of_infusion is not None:  # last: see checks_of_the_ae_alone
            days = math.ceil(self.within_hours_of_infusion / 24)
            yield Condition(f"{{0}}(p.onset, d, {int(days)})", (near_infusion,))


def near_infusion(onset: dt.date, infusions: Sequence[dt.date], days: int) -> bool:
    """Onsets are dates: within H hours of an infusion means on day 0 .. ceil(H/24) after
    it (conservative: a day-2 onset may be 47 hours after a late-evening infusion)."""
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

    # Which changes the engine tells this kind's tracker about, besides nothing:
    watches_adverse_events: ClassVar[bool] = True  # tracker.set(subject, ae_id, item)
    watches_halts: ClassVar[bool] = False  # tracker.set(subject, infusion_id, item)
    watches_infused: ClassVar[bool] = False  # tracker.infused(order) -> changed, order:
    # ((first infusion day, subject id), ...) of the subjects infused so far, in order

    def evidence_for(self, subject_id: str, ae: AdverseEvent, placement: Placement,
                     infusions: Sequence[dt.date]) -> EvidenceItem | None:
        """The evidence item this AE (current, not retracted) adds, or None. The engine
        runs the same steps inline (`tracking.track_ae`), for speed."""
        if not self.match.matches(ae, placement, infusions):
            return None
        if any(not check(ae, placement, infusions) for check in self.extra_checks()):
            return None
        return self.item(subject_id, ae, placement)

    def extra_checks(self) -> tuple[Check, ...]:
        """`extra_conditions` as functions."""
        return tuple(map(compile_check, self.extra_conditions()))

    def extra_conditions(self) -> tuple[Condition, ...]:
        """Conditions the kind adds to its ``match``."""
        return ()

    def item(self, subject_id: str, ae: AdverseEvent, placement: Placement) -> EvidenceItem:
        return _evidence_item((subject_id, ae.ae_id, ae.term, ae.grade, ae.serious,
                               ae.relatedness, placement.day, placement.onset,
                               self.group_of(ae)))

    def group_of(self, ae: AdverseEvent) -> str | None:
        return None


class Tally:
    """Evidence items by subject, as the engine reports them; shared by the kinds."""

    __slots__ = ("items", "subjects_with", "events", "_keys")

    def __init__(self) -> None:
        self.items: dict[str, dict[str, EvidenceItem]] = {}
        self.events = 0
        self._keys: tuple[str, ...] | None = None  # evidence_keys, until an item comes or goes

    def set(self, subject_id: str, key: str, item: EvidenceItem | None) -> bool:
        """Record (or clear, with None) one item; True when the tally changed (False
        tells the engine that the rule's result cannot have changed)."""
        mine = self.items.get(subject_id)
        old = mine.get(key) if mine else None
        if old == item:
            return False
        if item is None:
            del mine[key]
            self.events -= 1
            self._keys = None
            if not mine:
                del self.items[subject_id]
        else:
            if mine is None:
                mine = self.items[subject_id] = {}
            mine[key] = item
            if old is None:
                self.events += 1
                self._keys = None
        return True

    def breached(self) -> bool:
        """Cheap: whether the rule is breached now, without building its evidence."""
        return self.value() >= self.rule.threshold

    def evidence_keys(self) -> tuple[str, ...]:
        """The keys of `result`'s evidence, without building it (what an update compares):
        ``subject/key`` in the order of `all_items` (an item's ``ae_id`` is its key)."""
        if self._keys is None:
            self._keys = tuple(f"{subject_id}/{key}" for subject_id in sorted(self.items)
                               for key in sorted(self.items[subject_id]))
        return self._keys

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
        return CountTracker(self, self.count)


class CountTracker(Tally):
    __slots__ = ("rule", "count")

    def __init__(self, rule: Rule, count: str) -> None:
        super().__init__()
        self.rule, self.count = rule, count

    def value(self) -> int:
        return len(self.items) if self.count == "subjects" else self.events

    def result(self) -> RuleResult:  # sorts the evidence: call when it is needed
        value = self.value()
        return RuleResult(value, self.rule.threshold, value >= self.rule.threshold,
                          self.all_items(), {"count": self.count}, self.evidence_keys())


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
        """The SOC (or PT) casefolded, as `Match` compares it; the alert shows this name,
        whatever the spelling of the AEs. Interned: every AE of a group shares it."""
        name = ae.meddra_soc if self.by == "soc" else ae.meddra_pt
        return intern(name.casefold()) if name else None

    def extra_conditions(self) -> tuple[Condition, ...]:
        return (Condition("bool(ae.meddra_soc)" if self.by == "soc" else "bool(ae.meddra_pt)"),)

    def tracker(self) -> ClusterTracker:
        return ClusterTracker(self)


class ClusterTracker(Tally):
    """Matching items by group (`ClusterGroup`): an AE costs work in its own group only,
    and there only around its onset."""

    __slots__ = ("rule", "groups", "sizes", "_best")

    def __init__(self, rule: ClusterRule) -> None:
        super().__init__()
        self.rule = rule
        self.groups: dict[str, ClusterGroup] = {}
        self.sizes: dict[str, int] = {}  # each group's densest window, in subjects
        self._best: tuple[int, str | None] | None = None  # (value, group), until a change

    def set(self, subject_id: str, key: str, item: EvidenceItem | None) -> bool:
        """As `Tally.set`, but False also when the rule's value and evidence stay the
        same: the densest group kept its densest window, and no other group caught up."""
        mine = self.items.get(subject_id)
        old = mine.get(key) if mine else None
        if not Tally.set(self, subject_id, key, item):
            return False
        size, best = self._best_group()
        within_days = self.rule.within_days
        touched = []  # (group, whether its densest window may have changed)
        if old is not None:
            group = self.groups[old.group]
            touched.append((old.group, group.remove(_sort_key(old), within_days)))
            if group.ordered:
                self.sizes[old.group] = group.size
            else:
                del self.groups[old.group], self.sizes[old.group]
        if item is not None:
            group = self.groups.get(item.group)
            if group is None:
                group = self.groups[item.group] = ClusterGroup()
            touched.append((item.group, group.add(_sort_key(item), within_days)))
            self.sizes[item.group] = group.size
        for name, moved in touched:
            if name == best:
                stays = not moved  # the densest group kept its densest window
            else:  # still below the densest group, or level with it and after it by name
                stays = best is not None and (self.sizes.get(name, 0), best) < (size, name)
            if not stays:
                self._best = None
                return True
        return False

    def _best_group(self) -> tuple[int, str | None]:
        """The densest window's size, and its group (the first by name on a tie)."""
        if self._best is None:
            size = max(self.sizes.values(), default=0)
            self._best = size, min((g for g, n in self.sizes.items() if n == size), default=None)
        return self._best

    def value(self) -> int:
        return self._best_group()[0]

    def evidence_keys(self) -> tuple[str, ...]:
        group = self._best_group()[1]
        return self.groups[group].best(self.rule.within_days)[1] if group is not None else ()

    def result(self) -> RuleResult:
        size, group = self._best_group()
        members, keys = self.groups[group].best(self.rule.within_days) \
            if group is not None else ((), ())
        return RuleResult(size, self.rule.subjects, size >= self.rule.subjects, members,
                          {"group": group, "by": self.rule.by,
                           "within_days": self.rule.within_days}, keys)


class ClusterGroup:
    """One group's items in onset order (`_sort_key` tuples) and, for each position, the
    distinct subjects of the window that ends there (``sizes``). Adding or removing an
    item changes only the windows that end within ``within_days`` after its onset, so
    only those are counted again; the densest window is then the first largest size,
    which is what counting every window finds (the tests hold it to that)."""

    __slots__ = ("ordered", "sizes", "size", "end", "_best")

    def __init__(self) -> None:
        self.ordered: list[tuple] = []
        self.sizes: list[int] = []
        self.size, self.end = 0, -1  # the densest window: its subjects, its last position
        self._best: tuple[tuple[EvidenceItem, ...], tuple[str, ...]] | None = None

    def add(self, entry: tuple, within_days: int) -> bool:
        """Add an item; True when the densest window may have changed."""
        at = bisect_left(self.ordered, entry)
        self.ordered.insert(at, entry)
        self.sizes.insert(at, 0)
        return self._resize(at, entry[0], within_days)

    def remove(self, entry: tuple, within_days: int) -> bool:
        """Remove an item; True when the densest window may have changed."""
        at = bisect_left(self.ordered, entry)  # entries are unique: (day, subject, ae, item)
        del self.ordered[at], self.sizes[at]
        return self._resize(at, entry[0], within_days)

    def _resize(self, at: int, day: int, within_days: int) -> bool:
        """Count again the windows ending at ``at`` .. the last onset ``within_days``
        after ``day``: the only ones an item at ``at`` with that onset is in."""
        ordered, sizes = self.ordered, self.sizes
        last = bisect_left(ordered, (day + within_days + 1,)) - 1  # (n,) sorts before (n, ...)
        if at <= last:
            start = bisect_left(ordered, (ordered[at][0] - within_days,))
            subjects: dict[str, int] = {}
            for end in range(start, last + 1):
                end_day, subject_id = ordered[end][0], ordered[end][1]
                subjects[subject_id] = subjects.get(subject_id, 0) + 1
                while end_day - ordered[start][0] > within_days:
                    left = ordered[start][1]
                    subjects[left] -= 1
                    if not subjects[left]:
                        del subjects[left]
                    start += 1
                if end >= at:
                    sizes[end] = len(subjects)
        size = max(sizes, default=0)
        end = sizes.index(size) if sizes else -1
        if size == self.size and end == self.end < at:
            return False  # the same window, ending before any position that moved
        self.size, self.end, self._best = size, end, None
        return True

    def best(self, within_days: int) -> tuple[tuple[EvidenceItem, ...], tuple[str, ...]]:
        """The items of the densest window (the earliest on a tie) and their keys."""
        if self._best is None:
            end = self.end
            start = bisect_left(self.ordered, (self.ordered[end][0] - within_days,), 0, end)
            members = tuple(sorted((entry[3] for entry in self.ordered[start:end + 1]),
                                   key=_order))
            self._best = members, tuple(f"{i.subject_id}/{i.ae_id}" for i in members)
        return self._best


def _sort_key(item: EvidenceItem) -> tuple:
    return (item.onset.toordinal(), item.subject_id, item.ae_id, item)



class DosingWhileHalted(Rule):
    """An infusion recorded after a ``halt`` alert was raised and before it was resolved.

    Judged on what the sponsor knew, as ``replay --as-of`` is: an infusion recorded at
    instant t counts when a ``halt`` rule (other than those of this kind) is breached
    both on the messages recorded before t and on those recorded up to t (a message
    that later lost a tie on its AE's version included, until the winner's). So the
    infusion whose own arrival raises a halt does not count, nor one recorded at the
    instant a halt is resolved; and the arrival order of the same messages does not
    change the result (the engine judges again the infusions a late message concerns,
    `state.judge_infusions`)."""

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
        return CountTracker(self, count="events")

