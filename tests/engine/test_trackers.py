"""The trackers' shortcuts against the plain computation they stand for (hypothesis).

* a cluster group keeps its densest window up to date one item at a time: it must be
  what `densest_window` finds counting every window;
* a cluster tracker answers ``False`` from ``set`` when the rule's result cannot have
  changed: then it must not have;
* a tally caches its evidence keys: they must be the keys of its evidence, in order;
* a trial's compiled AE plan inlines its rules' conditions: it must give each tracker
  what `Rule.evidence_for` finds;
* the trackers a trial builds event by event are the ones `rebuild` derives at the end.
"""

from __future__ import annotations

import copy
import datetime as dt

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.engine.events import RELATEDNESS, SERIOUS_CRITERIA
from monitor.engine.kinds import (
    ClusterGroup,
    ClusterRule,
    CountRule,
    EvidenceItem,
    Match,
    _order,
    _sort_key,
)
from monitor.engine.state import rebuild
from monitor.engine.tracking import compile_plan
from monitor.engine.trials import Trials
from monitor.engine.window import IN_WINDOW, POST_WINDOW, PRE_TREATMENT, Placement
from tests.builders import TRIAL, ae, event, infusion
from tests.engine.test_properties import CATALOG, trial_log

START = dt.date(2021, 1, 1)
SUBJECTS = ("S1", "S2", "S3", "S4", "S5")
GROUPS = ("Gastrointestinal disorders", "Nervous system disorders", "Infections")
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def densest_window(ordered: list[tuple], within_days: int) -> tuple[int, tuple]:
    """The most distinct subjects whose onsets lie within ``within_days`` of each other,
    and the items of that window (the earliest such window on a tie), counting every
    window: what `ClusterGroup` keeps up to date, found the slow way. ``ordered``
    holds `_sort_key` tuples in order."""
    subjects: dict[str, int] = {}
    best, best_span, start = 0, (0, 0), 0
    for end, (day, subject_id, _ae, _item) in enumerate(ordered):
        subjects[subject_id] = subjects.get(subject_id, 0) + 1
        while day - ordered[start][0] > within_days:
            left = ordered[start][1]
            subjects[left] -= 1
            if not subjects[left]:
                del subjects[left]
            start += 1
        if len(subjects) > best:
            best, best_span = len(subjects), (start, end + 1)
    return best, tuple(entry[3] for entry in ordered[best_span[0]:best_span[1]])


def item(subject: str, ae: str, day: int, group: str) -> EvidenceItem:
    onset = START + dt.timedelta(days=day)
    return EvidenceItem(subject, ae, "fever", 2, False, None, day, onset, group)


# (subject, ae id, item or None to clear): a small pool of keys, so items come and go
changes = st.lists(st.tuples(
    st.sampled_from(SUBJECTS), st.sampled_from(("A1", "A2", "A3", "A4")),
    st.one_of(st.none(), st.tuples(st.integers(0, 90), st.sampled_from(GROUPS)))),
    max_size=60)


PTS = ("Pyrexia", "Ascites", "pyrexia")
SOCS = ("Infections and infestations", "Gastrointestinal disorders")
matches = st.builds(
    Match, grade_min=st.none() | st.integers(1, 5), serious=st.none() | st.booleans(),
    related=st.none() | st.booleans(), fatal=st.none() | st.booleans(),
    expected=st.none() | st.booleans(),
    serious_criteria=st.lists(st.sampled_from(SERIOUS_CRITERIA), max_size=2).map(tuple),
    meddra_pt=st.lists(st.sampled_from(PTS), max_size=2).map(tuple),
    meddra_soc=st.lists(st.sampled_from(SOCS), max_size=1).map(tuple),
    within_hours_of_infusion=st.none() | st.integers(1, 96), in_window=st.booleans())
adverse_events = st.fixed_dictionaries({
    "grade": st.integers(1, 5), "serious": st.booleans(),
    "relatedness": st.sampled_from((None, *RELATEDNESS)),
    "expected": st.sampled_from((None, True, False)),
    "outcome": st.sampled_from((None, "fatal", "recovered")),
    "serious_criteria": st.lists(st.sampled_from(SERIOUS_CRITERIA), max_size=2, unique=True),
    "meddra_pt": st.sampled_from((None, "", *PTS)),
    "meddra_soc": st.sampled_from((None, "", *SOCS)), "retracted": st.booleans()})
placements = st.one_of(st.just(Placement(None, False, "awaiting_infusion", None)), st.builds(
    lambda day, period: Placement(START + dt.timedelta(days=day), False, period, day),
    st.integers(-5, 40), st.sampled_from((PRE_TREATMENT, IN_WINDOW, POST_WINDOW))))


@FAST
@given(st.lists(st.tuples(matches, st.booleans()), min_size=1, max_size=4),
       st.lists(st.tuples(adverse_events, placements), min_size=1, max_size=4),
       st.lists(st.integers(-3, 30), max_size=3))
def test_the_compiled_plan_is_each_rules_evidence_for(rules, aes, infused) -> None:
    """Rule by rule, AE by AE, and again with each AE changed (the plan clears what it
    counted before), the plan's trackers hold what `evidence_for` says."""
    rules = [ClusterRule(id=f"r{n}", kind="cluster", severity="review", match=match,
                         subjects=2, within_days=30) if cluster else
             CountRule(id=f"r{n}", kind="count", severity="review", match=match, threshold=1)
             for n, (match, cluster) in enumerate(rules)]
    trackers = {rule.id: rule.tracker() for rule in rules}
    plan = compile_plan(rules, trackers)
    days = sorted(START + dt.timedelta(days=n) for n in infused)
    for first, (fields, placement) in [(True, pair) for pair in aes] + [
            (False, (aes[(n + 1) % len(aes)][0], placement)) for n, (_f, placement) in
            enumerate(aes)]:
        message = event(ae("S1", "A1", "2021-01-01", recorded_at="2022-01-01T00:00:00+00:00",
                           **fields))
        counts = placement.onset is not None and not message.retracted
        if first:  # a new AE each time: no rule counts it yet
            trackers = {rule.id: rule.tracker() for rule in rules}
            plan = compile_plan(rules, trackers)
        if first and not counts:
            continue  # as `track_ae`: such an AE never reaches the plan
        changed = plan("S1", message, placement, days, counts, placement.period == IN_WINDOW,
                       first)
        for rule in rules:
            expected = rule.evidence_for("S1", message, placement, days) if counts else None
            assert trackers[rule.id].items == ({"S1": {"A1": expected}} if expected else {})
            assert (rule in changed) <= (expected is not None or not first)


def plain_cluster(items: dict[tuple[str, str], EvidenceItem], within_days: int) -> tuple:
    """(value, group, members) of a cluster rule, counting every window of every group."""
    best = (0, None, ())
    for group in sorted({i.group for i in items.values()}):
        ordered = sorted(_sort_key(i) for i in items.values() if i.group == group)
        size, window = densest_window(ordered, within_days)
        if size > best[0]:
            best = (size, group, tuple(sorted(window, key=_order)))
    return best


@FAST
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(SUBJECTS), st.integers(0, 60)),
                max_size=50), st.integers(0, 30))
def test_a_cluster_group_keeps_the_densest_window_of_every_window(steps, within_days) -> None:
    group, entries = ClusterGroup(), set()
    for number, (add, subject, day) in enumerate(steps):
        if add or not entries:
            entry = _sort_key(item(subject, f"A{number}", day, GROUPS[0]))
            group.add(entry, within_days)
            entries.add(entry)
        else:
            entry = sorted(entries)[day % len(entries)]
            group.remove(entry, within_days)
            entries.discard(entry)
        ordered = sorted(entries)
        assert group.ordered == ordered
        size, window = densest_window(ordered, within_days)
        assert group.size == size
        if entries:
            assert group.best(within_days)[0] == tuple(sorted(window, key=_order))


@FAST
@given(changes, st.integers(0, 30), st.integers(2, 4))
def test_a_cluster_tracker_is_the_plain_computation(steps, within_days, subjects) -> None:
    rule = ClusterRule(id="c", kind="cluster", severity="review", subjects=subjects,
                       within_days=within_days)
    tracker, items = rule.tracker(), {}
    for subject, ae_id, what in steps:
        before = tracker.result()
        new = item(subject, ae_id, *what) if what is not None else None
        changed = tracker.set(subject, ae_id, new)
        if new is None:
            items.pop((subject, ae_id), None)
        else:
            items[(subject, ae_id)] = new
        value, group, members = plain_cluster(items, within_days)
        result = tracker.result()
        assert (result.value, result.detail["group"], result.evidence) == (value, group, members)
        assert result.breached == (value >= subjects)
        assert result.evidence_keys == tuple(i.key for i in members) == tracker.evidence_keys()
        if not changed:
            assert result == before  # False promises the same value and evidence


@FAST
@given(changes, st.sampled_from(("subjects", "events")))
def test_a_tally_keeps_the_keys_of_its_evidence(steps, count) -> None:
    rule = CountRule(id="n", kind="count", severity="review", count=count, threshold=2)
    tracker = rule.tracker()
    for subject, ae_id, what in steps:
        tracker.set(subject, ae_id, item(subject, ae_id, *what) if what is not None else None)
        result = tracker.result()
        assert result.evidence_keys == tuple(i.key for i in result.evidence)
        assert tracker.evidence_keys() == result.evidence_keys


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trial_log())
def test_trackers_built_event_by_event_are_the_ones_rebuild_derives(messages) -> None:
    assert_trackers_are_those_rebuild_derives(messages)


def assert_trackers_are_those_rebuild_derives(messages: list[dict]) -> None:
    trials = Trials(CATALOG)
    for message in messages:
        trials.apply(event(message))
    trial = trials.trials[TRIAL]
    results = {rule_id: tracker.result() for rule_id, tracker in trial.trackers.items()}
    rebuilt = rebuild(copy.deepcopy(trial))
    assert {rule_id: tracker.result() for rule_id, tracker in rebuilt.trackers.items()} == results


@st.composite
def halting_log(draw: st.DrawFn) -> list[dict]:
    """Infusions and related SAEs that open a halt, and re-assessments that close it,
    often several at one instant (`recorded_at`), and versions that tie: what the rule
    watching halts judges."""
    messages = [infusion(s, "2021-01-01", recorded_at="2021-01-01T09:00:00+00:00")
                for s in ("S1", "S2")]
    for _ in range(draw(st.integers(1, 14))):
        when = (START + dt.timedelta(days=10 + draw(st.integers(0, 5)))).isoformat()
        stamp = f"{when}T12:00:00+00:00"
        kind = draw(st.sampled_from(("sae", "sae", "reassess", "infusion", "infusion")))
        subject = draw(st.sampled_from(("S1", "S2")))
        if kind == "infusion":
            messages.append(infusion(draw(st.sampled_from(("S3", "S4", "S5"))), when,
                                     dose=draw(st.integers(1, 2)), recorded_at=stamp))
        else:
            messages.append(ae(subject, f"{subject}-SAE", "2021-01-05", serious=True,
                               version=draw(st.integers(1, 4)), recorded_at=stamp,
                               relatedness="possible" if kind == "sae" else "not_related"))
    return messages


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(halting_log(), st.randoms(use_true_random=False))
def test_infusions_during_halts_are_judged_as_rebuild_judges_them(messages, rng) -> None:
    """After every message, in any order: the rule watching halts holds what `rebuild`
    derives from the kept messages (it steps them again in order of recorded_at);
    and the end does not depend on the order."""
    finals = []
    for order in (messages, rng.sample(messages, len(messages))):
        trials = Trials(CATALOG)
        for message in order:
            trials.apply(event(message))
            trial = trials.trials[TRIAL]
            rebuilt = rebuild(copy.deepcopy(trial))
            assert (trial.trackers["dosing-while-halted"].result()
                    == rebuilt.trackers["dosing-while-halted"].result())
            assert trial.halted == rebuilt.halted
        finals.append(trial.trackers["dosing-while-halted"].result())
    assert finals[0] == finals[1]
