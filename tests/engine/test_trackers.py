"""The trackers' shortcuts against the plain computation they stand for (hypothesis).

* a cluster group keeps its densest window up to date one item at a time: it must be
  what `densest_window` finds counting every window;
* a cluster tracker answers ``False`` from ``set`` when the rule's result cannot have
  changed: then it must not have;
* a tally caches its evidence keys: they must be the keys of its evidence, in order;
* the trackers a trial builds event by event are the ones `rebuild` derives at the end.
"""

from __future__ import annotations

import copy
import datetime as dt

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.engine.kinds import (
    ClusterGroup,
    ClusterRule,
    CountRule,
    EvidenceItem,
    _order,
    _sort_key,
)
from monitor.engine.state import rebuild
from monitor.engine.trials import Trials
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
