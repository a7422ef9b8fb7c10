"""Feeding the rules' trackers and deciding alert transitions, for `state.step`.

Each function takes the trial state (`state.TrialState`) and the rules that changed;
pure like the rest of the engine.
"""

from __future__ import annotations

import datetime as dt
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from . import alerts
from .events import AdverseEvent, Infusion
from .kinds import EvidenceItem, Rule
from .window import IN_WINDOW, Placement, place_onset

if TYPE_CHECKING:
    from .state import Subject, TrialState


def cache_infusions(trial: TrialState, subject: Subject) -> bool:
    """(first infusion, last day of the window, every infusion day) of the subject, and
    its place in `TrialState.infusion_order`; True when its first infusion day changed
    (or it has its first infusion)."""
    if not subject.infusions:
        return False
    days = sorted(i.infused_on for i in subject.infusions)
    subject_id = subject.subject_id
    known = trial.infusion_days.get(subject_id)
    same = known is not None and known[0] == days[0]
    last = known[1] if same else trial.window.last_day(days[0])  # same first day: same window
    trial.infusion_days[subject_id] = (days[0], last, days)
    if not same:
        order = trial.infusion_order
        if known is not None:
            del order[bisect_left(order, (known[0], subject_id))]
        insort(order, (days[0], subject_id))
    return not same


def track_ae(trial: TrialState, subject_id: str, ae: AdverseEvent,
             first: bool = False) -> list[Rule]:
    """Give the AE's current version to every rule that looks at AEs. ``first``: no
    earlier version of this AE was ever current, so no rule counts it yet.

    This is `Rule.evidence_for` of every rule, inline: the AE is placed once, then the
    trial's `compile_plan` function checks it against each rule in turn."""
    plan = trial.ae_plan
    if plan is None:
        return []
    known = trial.infusion_days.get(subject_id)
    if known is None:  # not placed (awaiting the first infusion): no rule counts it
        if first:
            return []
        placement, days = place_onset(ae.onset_earliest, ae.onset_latest, None, None), ()
    else:
        placement = place_onset(ae.onset_earliest, ae.onset_latest, known[0], known[1])
        days = known[2]
    counts = placement.onset is not None and not ae.retracted
    if first and not counts:
        return []
    return plan(subject_id, ae, placement, days, counts, placement.period == IN_WINDOW, first)


AePlan = Callable[[str, AdverseEvent, Placement, Sequence[dt.date], bool, bool, bool],
                  list[Rule]]


def compile_plan(rules: Sequence[Rule], trackers: dict[str, object]) -> AePlan | None:
    """One function that gives an AE to each rule that looks at AEs, as `track_ae` calls
    it: ``(subject_id, ae, placement, infusion days, counts, in_window, first)`` -> the
    rules whose tracker changed. None when no rule looks at AEs.

    It runs for every AE and every rule, so each rule's conditions (`kinds.Condition`)
    are inlined into its source, which reads (``_bN``: the values bound to it; here the
    rule's ``RELATED``, ``item``, its tracker's ``set``, the rule, the tracker's ``items``)::

        # related-sae
        if counts and in_window and (ae.serious is True) and ((ae.relatedness is None or
                                                               ae.relatedness in _b5)):
            if _b7(subject_id, ae_id, _b6(subject_id, ae, p)):
                dirty.append(_b8)
        elif not first and ae_id in _b9.get(subject_id, ()):  # counted before: not now
            if _b7(subject_id, ae_id, None):
                dirty.append(_b8)

    The rules go by lowest ``grade_min``, so a new AE stops at the first rule above its
    grade (`evaluate` puts the rules that changed back in rules-file order). The source
    depends on the rules alone, so trials with the same rules share its compilation."""
    plan = sorted((r for r in rules if r.watches_adverse_events),
                  key=lambda r: r.match.grade_min or 1)
    if not plan:
        return None
    values: list[object] = []

    def bind(value: object) -> str:
        values.append(value)
        return f"_b{len(values) - 1}"

    lines, lowest = [], 1
    for rule in plan:
        grade_min = rule.match.grade_min or 1
        tracker = trackers[rule.id]
        conditions = (*rule.match.conditions_after_grade, *rule.extra_conditions())
        tests = ["counts", *([f"grade >= {grade_min}"] if grade_min > 1 else []),
                 *(["in_window"] if rule.match.in_window else []),
                 *(f"({c.expression([bind(v) for v in c.values])})" for c in conditions)]
        item, tally, changed, mine = (bind(rule.item), bind(tracker.set), bind(rule),
                                      bind(tracker.items))
        if grade_min > lowest:
            lines += [f"    if first and grade < {grade_min}:", "        return dirty"]
            lowest = grade_min
        lines += [f"    # {rule.id}",
                  f"    if {' and '.join(tests)}:",
                  f"        if {tally}(subject_id, ae_id, {item}(subject_id, ae, p)):",
                  f"            dirty.append({changed})",
                  f"    elif not first and ae_id in {mine}.get(subject_id, ()):",
                  f"        if {tally}(subject_id, ae_id, None):",
                  f"            dirty.append({changed})"]
    names = ", ".join(f"_b{index}" for index in range(len(values)))
    source = "\n".join([f"def make({names}):",
                        "  def plan(subject_id, ae, p, d, counts, in_window, first):",
                        "    dirty, grade, ae_id = [], ae.grade, ae.ae_id",
                        *lines, "    return dirty", "  return plan", ""])
    plan_function = _maker(source)(*values)
    plan_function.source = source  # for a person debugging it
    return plan_function


@lru_cache(maxsize=64)
def _maker(source: str) -> Callable[..., AePlan]:
    namespace: dict[str, object] = {}
    exec(compile(source, "<ae plan>", "exec"), namespace)  # noqa: S102 - our own source
    return namespace["make"]


def track_subject(trial: TrialState, subject: Subject) -> list[Rule]:
    dirty: dict[str, Rule] = {}
    for history in subject.aes.values():
        for rule in track_ae(trial, subject.subject_id, history.current):
            dirty[rule.id] = rule
    return list(dirty.values())


def track_infused(trial: TrialState) -> list[Rule]:
    """Tell the rules whose denominator is the subjects infused so far, in order."""
    rules = trial.rules.rules if trial.rules else ()
    order = tuple(trial.infusion_order)
    return [r for r in rules if r.watches_infused and trial.trackers[r.id].infused(order)]


def halted_now(trial: TrialState) -> bool:
    """Whether a ``halt`` rule (other than those watching halts) is breached now."""
    trackers = trial.trackers
    return any(trackers[rule.id].breached() for rule in trial.halt_rules)


def judge_infusion(trial: TrialState, subject_id: str, infusion: Infusion,
                   halted: bool) -> list[Rule]:
    """Tell the rules watching halts whether this infusion was given during one."""
    item = _dosing_item(subject_id, infusion) if halted else None
    return [rule for rule in trial.halt_watchers
            if trial.trackers[rule.id].set(subject_id, infusion.event_id, item)]


def _dosing_item(subject_id: str, infusion: Infusion) -> EvidenceItem:
    return EvidenceItem(subject_id, infusion.event_id, f"infusion dose {infusion.dose_number}",
                        None, None, None, None, infusion.infused_on, None)


def evaluate(trial: TrialState, dirty: list[Rule], event) -> list[alerts.AlertTransition]:  # noqa: ANN001
    """Decide the transitions of the rules that changed, in rules-file order; ``event``
    (anything with ``event_id`` and ``recorded_at``) is the cause."""
    out: list[alerts.AlertTransition] = []
    if trial.halt_watchers and any(rule.severity == "halt" for rule in dirty):
        trial.halted = halted_now(trial)
    if len(dirty) > 1:
        order = [r.id for r in trial.rules.rules]
        dirty = sorted({r.id: r for r in dirty}.values(), key=lambda r: order.index(r.id))
    for rule in dirty:
        entry, tracker = trial.ledger[rule.id], trial.trackers[rule.id]
        if not entry.breached and not tracker.breached():
            entry.value = tracker.value()  # ok before and after: no evidence to build
            continue
        before = trial.evidence.get(rule.id, ())
        if (entry.breached and tracker.breached() and tracker.value() == entry.value
                and tracker.evidence_keys() == before):
            continue  # breached before and after, nothing new: no evidence to build
        result = tracker.result()
        transition = alerts.decide(entry, result, before)
        alerts.record(entry, result, transition, event.recorded_at)
        trial.evidence[rule.id] = result.evidence_keys if result.breached else ()
        if transition is not None:
            out.append(alerts.transition_of(trial.trial_id, rule, entry, before, result,
                                            transition, event.event_id, event.recorded_at))
    return out
