"""Stopping-boundary rule kinds (SPEC section 4): ``toxicity_boundary`` and ``bayesian``.

The numerator is the subjects with a matching AE, the denominator the subjects infused
so far, look by look in order of first infusion: a rule is breached once a look crosses
its boundary, and more subjects infused later do not undo that (`BoundaryTracker`). Each
rule computes its boundary once, when the rules load (`monitor.engine.stats`), so an
event costs a comparison or, when a subject's AE starts or stops counting or its first
infusion day moves, a pass over the subjects infused.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from . import stats
from .kinds import EvidenceItem, Rule, RuleResult, Tally

LOOKS_HINT = "give a range like 1-20, a list like 5,10,15,20, or both like 1-10,15,20"


def parse_looks(looks: str | Sequence[int]) -> tuple[int, ...]:
    """The looks of a boundary, n_1 < ... < n_K subjects: a list, or text ``1-20`` (after
    every subject), ``5,10,15,20`` (cohorts) or a mix ``1-10,15,20``; one number is
    one look."""
    if isinstance(looks, int) and not isinstance(looks, bool):
        looks = [looks]
    if not isinstance(looks, str):
        return stats.checked_looks(looks)
    if not looks.strip():
        raise ValueError(f"is empty; {LOOKS_HINT}")
    counts: list[int] = []
    for part in (p.strip() for p in looks.split(",")):
        first, dash, last = part.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise ValueError(f"{part!r} is not a whole number or a range; {LOOKS_HINT}")
        start, stop = int(first), int(last) if dash else int(first)
        if stop < start:
            raise ValueError(f"the range {part!r} runs backwards")
        counts.extend(range(start, stop + 1))
    return stats.checked_looks(counts)


class BoundaryRule(Rule):
    """What ``toxicity_boundary`` and ``bayesian`` share. The numerator is the subjects with
    a matching AE, the denominator the subjects infused so far (SPEC section 4). The
    boundary is computed once, when the rules load: at ``looks`` (default: after every
    subject up to ``planned_subjects``), the count that stops; between looks the latest
    look's holds, and past the last look the last look's."""

    planned_subjects: int | None = Field(None, ge=1)
    looks: tuple[int, ...] | None = None

    watches_infused: ClassVar[bool] = True
    _boundary: stats.Boundary | None = PrivateAttr(None)

    @field_validator("looks", mode="before")
    @classmethod
    def _parse_looks(cls, value: object) -> object:
        return value if value is None else parse_looks(value)

    @model_validator(mode="after")
    def _compute_boundary(self) -> BoundaryRule:
        planned, looks = self.planned_subjects, self.looks
        if looks is None and planned is None:
            raise ValueError("give 'planned_subjects' (a look after every subject) or 'looks'")
        if looks is not None and planned is not None and looks[-1] != planned:
            raise ValueError(f"the last look ({looks[-1]}) must be the planned_subjects "
                             f"({planned})")
        self._boundary = self.compute_boundary(looks or tuple(range(1, planned + 1)))
        return self

    @property
    def boundary(self) -> stats.Boundary:
        return self._boundary

    def compute_boundary(self, looks: tuple[int, ...]) -> stats.Boundary:
        raise NotImplementedError

    def detail(self, subjects: int, count: int) -> dict:
        """What the kind adds to the tracker's detail (its parameters, a posterior)."""
        return {}

    def tracker(self) -> BoundaryTracker:
        return BoundaryTracker(self)


def _rates_in_order(p0: float | None, p1: float | None) -> None:
    if p0 is not None and p1 is not None and not p1 > p0:
        raise ValueError(f"p1, the unacceptable rate, must be above p0 (got p0 {p0}, p1 {p1})")


class ToxicityBoundaryRule(BoundaryRule):
    """Continuous toxicity monitoring (Ivanova, Qaqish and Schell 2005; clinfun
    ``toxbdry``): breached when the subjects with a matching AE reach the boundary's
    ``stop_at`` for the subjects infused so far. The boundary crosses with probability at
    most ``alpha`` when the true rate is ``p0``; ``p1``, the unacceptable rate, is for its
    operating characteristics. ``shape``: pocock (default), obrien-fleming or a number in
    [0, 0.5]."""

    kind: Literal["toxicity_boundary"]
    p0: float = Field(gt=0, lt=1)
    p1: float = Field(gt=0, lt=1)
    alpha: float = Field(gt=0, lt=1)
    shape: float = stats.POCOCK

    @field_validator("shape", mode="before")
    @classmethod
    def _parse_shape(cls, value: object) -> float:
        if not isinstance(value, str | int | float):
            raise ValueError("give pocock, obrien-fleming or a number in [0, 0.5]")
        return stats.parse_shape(value)

    @model_validator(mode="after")
    def _p1_above_p0(self) -> ToxicityBoundaryRule:
        _rates_in_order(self.p0, self.p1)
        return self

    def compute_boundary(self, looks: tuple[int, ...]) -> stats.Boundary:
        return stats.toxicity_boundary(self.p0, self.alpha, looks, self.shape)

    def detail(self, subjects: int, count: int) -> dict:
        return {"p0": self.p0, "p1": self.p1, "alpha": self.alpha, "shape": self.shape}


class BetaPrior(BaseModel):
    """Beta(a, b): mean a / (a + b), worth a + b subjects of evidence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: float = Field(gt=0, allow_inf_nan=False)
    b: float = Field(gt=0, allow_inf_nan=False)


class BayesianRule(BoundaryRule):
    """Bayesian monitoring (Thall, Simon and Estey 1995): breached when, under the Beta
    ``prior``, the posterior probability that the true rate of subjects with a matching AE
    exceeds ``rate`` is above ``probability`` (the boundary holds the smallest such count
    at each look). ``p0`` and ``p1``, optional, are the rates at which ``rules
    boundaries`` shows its operating characteristics."""

    kind: Literal["bayesian"]
    rate: float = Field(gt=0, lt=1)
    probability: float = Field(gt=0, lt=1)
    prior: BetaPrior
    p0: float | None = Field(None, gt=0, lt=1)
    p1: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _p1_above_p0(self) -> BayesianRule:
        _rates_in_order(self.p0, self.p1)
        return self

    def compute_boundary(self, looks: tuple[int, ...]) -> stats.Boundary:
        return stats.bayesian_boundary(self.rate, self.probability, self.prior.a,
                                       self.prior.b, looks)

    def detail(self, subjects: int, count: int) -> dict:
        posterior = stats.posterior_probability_above(
            self.rate, max(subjects, count), count, self.prior.a, self.prior.b)
        return {"posterior_probability": posterior, "rate": self.rate,
                "probability": self.probability,
                "prior": {"a": self.prior.a, "b": self.prior.b}}


def looks(order: Sequence[tuple[object, str]], counted: Container[str]
          ) -> Iterator[tuple[int, int]]:
    """(subjects so far, how many of them are ``counted``) after each infusion day, for
    ``order``, the (first infusion day, subject id) of the subjects infused, in order."""
    count = 0
    for n, (day, subject_id) in enumerate(order, 1):
        count += subject_id in counted
        if n == len(order) or order[n][0] != day:  # the day's last subject: a look
            yield n, count


class BoundaryTracker(Tally):
    """Subjects with a matching AE against the boundary, look by look.

    The subjects infused so far are taken in order of their first infusion day; after
    each day is a look at the n subjects infused up to then (between a rule's looks the
    latest look's count holds, as `stats.Boundary.stop_count` says), counting those of
    the n with a matching AE. The rule is breached once some look's count reaches its
    boundary, and stays breached as more subjects are infused: the boundary's alpha is
    its chance of crossing at any look, so a crossing means stop, and no subject infused
    on a later day makes it "resolved". Only corrections can undo a crossing: evidence
    taken away, a subject found to be infused earlier, or one reported late for a day
    already looked at (subjects infused on one day are one look, which it joins). This
    depends on the events known, not on the order they arrived in."""

    __slots__ = ("rule", "boundary", "order", "stops", "crossed")

    def __init__(self, rule: BoundaryRule) -> None:
        super().__init__()
        self.rule, self.boundary = rule, rule.boundary
        self.order: tuple[tuple[object, str], ...] = ()  # (first infusion day, subject)
        self.stops = [self.boundary.stop_count(0)]  # the count that stops, by subjects
        self.crossed: tuple[int, int] | None = None  # the first look that crossed: (n, count)

    @property
    def subjects(self) -> int:
        return len(self.order)

    @property
    def stop_at(self) -> int | None:
        """The count that stops with the subjects infused now."""
        return self.stops[len(self.order)]

    def infused(self, order: tuple[tuple[object, str], ...]) -> bool:
        """The subjects infused so far, in order; True when that moves the rule's state
        or the bar it shows. (`stop_count` is looked up once per number of subjects.)"""
        before = (self.crossed, self.stop_at)
        # one subject more at the end: its predecessor is the old last (each call follows
        # one subject infused, or one's first day moved; the order is sorted, ids unique)
        known = len(self.order)
        grown = len(order) == known + 1 and (not known or order[-2] == self.order[-1])
        same_day = grown and known and self.order[-1][0] == order[-1][0]
        self.order = order
        while len(self.stops) <= len(order):
            self.stops.append(self.boundary.stop_count(len(self.stops)))
        if not grown:  # a subject's first day moved: every look may have
            self._cross()
            return (self.crossed, self.stop_at) != before
        # the usual: one subject more at the end. The looks before stay; on the last
        # day's, the look at the old last subject gives way to one at the new
        if same_day and self.crossed is not None and self.crossed[0] == known:
            self.crossed = None
        # every subject with a matching AE is infused, so in the order now: all count
        self._look(len(order), len(self.items))
        return (self.crossed, self.stop_at) != before

    def set(self, subject_id: str, key: str, item: EvidenceItem | None) -> bool:
        had = subject_id in self.items
        if not Tally.set(self, subject_id, key, item):
            return False
        if (subject_id in self.items) != had:  # the subject's AE counts now, or no longer
            self._cross()
        return True

    def _look(self, subjects: int, count: int) -> None:
        stop = self.stops[subjects]
        if self.crossed is None and stop is not None and count >= stop:
            self.crossed = (subjects, count)

    def _cross(self) -> None:
        """Find the first look that crosses."""
        self.crossed = None
        for subjects, count in looks(self.order, self.items):
            self._look(subjects, count)
            if self.crossed is not None:
                return

    def value(self) -> int:
        return len(self.items)

    def breached(self) -> bool:
        return self.crossed is not None

    def result(self) -> RuleResult:
        """The value is every subject with a matching AE; the threshold, once crossed,
        the count that stopped at the crossing look (the detail's ``crossed``), else the
        count that stops now; where none can, one more than the subjects infused (out
        of reach), and the detail's ``stop_at`` is None."""
        count, stop, subjects, crossed = len(self.items), self.stop_at, self.subjects, \
            self.crossed
        detail = {
            "subjects": subjects, "count": count, "stop_at": stop,
            "look": max((n for n in self.boundary.looks if n <= subjects), default=None),
            "planned_subjects": self.boundary.planned_subjects,
            "proportion": count / subjects if subjects else None,
            "crossed": None if crossed is None else {
                "subjects": crossed[0], "count": crossed[1], "stop_at": self.stops[crossed[0]]},
            **self.rule.detail(subjects, count),
        }
        if crossed is not None:
            threshold = self.stops[crossed[0]]
        else:
            threshold = subjects + 1 if stop is None else stop
        return RuleResult(count, threshold, crossed is not None, self.all_items(), detail,
                          self.evidence_keys())
