"""What a trial looks like as of a date: the ``trials`` part of the replay JSON and of
``GET /status`` (SPEC section 7). Pure: the date is an argument.

Subjects who were infused fall in exactly one of: ``in_window``, ``window_completed``
(the last day of the window is before the as-of date), ``withdrawn`` (withdrawn or lost
to follow-up inside the window) or ``died`` (inside the window); so
``infused == in_window + window_completed + withdrawn + died``.
"""

from __future__ import annotations

import datetime as dt

from .events import SubjectStatus
from .state import Subject, TrialState
from .window import AWAITING_INFUSION, IN_WINDOW, POST_WINDOW, PRE_TREATMENT

NO_RULES_WARNING = "no rules file watches this trial: events are validated and counted only"
_GONE = {"withdrawn": "withdrawn", "lost_to_follow_up": "withdrawn", "died": "died"}


def trial_report(trial: TrialState, as_of: dt.datetime) -> dict:
    out = {
        "subjects": _subjects(trial, as_of.date()),
        **_adverse_events(trial),
        "rules": _rules(trial),
        "events": {"accepted": dict(sorted(trial.counts.accepted.items())),
                   "duplicates": dict(sorted(trial.counts.duplicates.items()))},
    }
    if trial.rules is None:
        out["warning"] = NO_RULES_WARNING
    else:
        out["title"] = trial.rules.title
        out["planned_subjects"] = trial.rules.planned_subjects
    return out


def status_on(subject: Subject, day: dt.date) -> SubjectStatus | None:
    """The status in effect on a day: the latest effective one, ties by recorded_at."""
    known = [s for s in subject.statuses if s.effective_on <= day]
    return max(known, key=lambda s: (s.effective_on, s.recorded_at, s.event_id), default=None)


def subject_state(trial: TrialState, subject: Subject, day: dt.date) -> str | None:
    """in_window, window_completed, withdrawn or died for an infused subject; else None.
    Withdrawn and died count when effective inside the window. (An infusion reported
    ahead of its date counts from its report, as in the rules' subjects infused.)"""
    first = subject.first_infusion
    if first is None:
        return None
    last = trial.window.last_day(first)
    status = status_on(subject, day)
    if status is not None and status.status in _GONE and first <= status.effective_on <= last:
        return _GONE[status.status]
    return "window_completed" if day > last else "in_window"


def _subjects(trial: TrialState, day: dt.date) -> dict:
    out = {"infused": 0, "in_window": 0, "window_completed": 0, "withdrawn": 0, "died": 0,
           "known": len(trial.subjects)}
    for subject in trial.subjects.values():
        state = subject_state(trial, subject, day)
        if state is not None:
            out["infused"] += 1
            out[state] += 1
    return out


def _adverse_events(trial: TrialState) -> dict:
    endpoint = {"ae": 0, "sae": 0, "subjects_with_ae": 0, "subjects_with_sae": 0}
    aes = {PRE_TREATMENT: 0, POST_WINDOW: 0, "retracted": 0, "imputed_onset": 0,
           "by_grade": {str(g): 0 for g in range(1, 6)}, AWAITING_INFUSION: 0,
           "conflicts": 0, "current": 0, "causality_not_assessed": 0}
    imputed = []  # which onsets were placed (SPEC section 3), not only how many
    for subject in trial.subjects.values():
        with_ae = with_sae = False
        for history in subject.aes.values():
            aes["conflicts"] += history.conflicts
            ae = history.current
            if ae.retracted:
                aes["retracted"] += 1
                continue
            aes["current"] += 1
            aes["causality_not_assessed"] += ae.relatedness is None  # counts as related
            placement = trial.placement(subject.subject_id, ae)
            if placement.imputed and placement.onset is not None:
                aes["imputed_onset"] += 1
                imputed.append({"subject_id": subject.subject_id, "ae_id": ae.ae_id,
                                "onset": ae.onset, "placed_on": placement.onset.isoformat(),
                                "placement": placement.period})
            if placement.period != IN_WINDOW:
                aes[placement.period] += 1
                continue
            endpoint["ae"] += 1
            endpoint["sae"] += ae.serious
            aes["by_grade"][str(ae.grade)] += 1
            with_ae, with_sae = True, with_sae or ae.serious
        endpoint["subjects_with_ae"] += with_ae
        endpoint["subjects_with_sae"] += with_sae
    imputed.sort(key=lambda item: (item["subject_id"], item["ae_id"]))
    return {"primary_endpoint": endpoint, "adverse_events": aes, "imputed_onsets": imputed}


def _rules(trial: TrialState) -> dict:
    if trial.rules is None:
        return {}
    out = {}
    for rule in trial.rules.rules:
        result = trial.trackers[rule.id].result()
        entry = trial.ledger[rule.id]
        out[rule.id] = {
            "kind": rule.kind, "severity": rule.severity,
            "state": "breached" if result.breached else "ok",
            "value": result.value, "threshold": result.threshold,
            "evidence": list(result.evidence_keys), "episodes": entry.episode,
            "description": rule.description,
        }
    return out
