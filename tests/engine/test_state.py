"""The engine's step: versions, duplicates, held AEs, rules and alert transitions."""

from __future__ import annotations

import datetime as dt

import pytest

from monitor.engine import records
from monitor.engine.rules import parse_rules
from monitor.engine.trials import Trials
from tests.builders import TRIAL, ae, event, infusion, status

AS_OF = dt.datetime(2023, 12, 31, tzinfo=dt.UTC)

RULES = f"""
trial_id: {TRIAL}
planned_subjects: 20
rules:
  - {{id: related-sae, kind: count, severity: halt, threshold: 2,
      match: {{serious: true, related: true}}}}
  - {{id: grade3-events, kind: count, count: events, severity: review, threshold: 2,
      match: {{grade_min: 3}}}}
  - {{id: early, kind: count, severity: review, threshold: 1,
      match: {{grade_min: 3, within_hours_of_infusion: 48}}}}
  - {{id: gi-cluster, kind: cluster, severity: review, subjects: 3, within_days: 30,
      match: {{grade_min: 2}}}}
  - {{id: dosing-while-halted, kind: dosing_while_halted, severity: halt}}
"""


def run(messages: list[dict], rules: str = RULES) -> tuple[Trials, list]:
    trials = Trials({TRIAL: parse_rules(rules)})
    alerts = []
    for message in messages:
        alerts.extend(trials.apply(event(message)).alerts)
    return trials, alerts


def report(trials: Trials, as_of: dt.datetime = AS_OF) -> dict:
    return trials.report(as_of)[TRIAL]


def rule(trials: Trials, rule_id: str) -> dict:
    return report(trials)["rules"][rule_id]


def test_highest_version_wins_whatever_the_arrival_order() -> None:
    v1 = ae("S1", "A", "2021-02-01", version=1, grade=1)
    v2 = ae("S1", "A", "2021-02-01", version=2, grade=4, recorded_at="2021-03-01T00:00:00Z")
    for order in ([v1, v2], [v2, v1]):
        trials, _ = run([infusion("S1", "2021-01-01"), *order])
        assert report(trials)["adverse_events"]["by_grade"]["4"] == 1
        assert report(trials)["primary_endpoint"]["ae"] == 1


def test_same_version_conflict_later_recorded_at_then_greater_event_id_wins() -> None:
    early = ae("S1", "A", "2021-02-01", grade=1, recorded_at="2021-02-02T00:00:00Z",
               event_id="b")
    late = ae("S1", "A", "2021-02-01", grade=3, recorded_at="2021-02-03T00:00:00Z",
              event_id="a")
    tie = ae("S1", "A", "2021-02-01", grade=2, recorded_at="2021-02-03T00:00:00Z",
             event_id="c")
    for order in ([early, late, tie], [tie, late, early], [late, tie, early]):
        trials, _ = run([infusion("S1", "2021-01-01"), *order])
        out = report(trials)["adverse_events"]
        assert out["by_grade"]["2"] == 1 and out["conflicts"] == 2, order


def test_a_duplicate_event_id_changes_nothing() -> None:
    sae = ae("S1", "A", "2021-02-01", serious=True, event_id="dup")
    trials, alerts = run([infusion("S1", "2021-01-01"), sae, {**sae, "grade": 5}])
    assert report(trials)["adverse_events"]["by_grade"] == {"1": 1, "2": 0, "3": 0, "4": 0,
                                                              "5": 0}
    assert report(trials)["events"]["duplicates"]["adverse_event"] == 1


def test_retraction_withdraws_the_ae() -> None:
    trials, _ = run([infusion("S1", "2021-01-01"), ae("S1", "A", "2021-02-01"),
                     ae("S1", "A", "2021-02-01", version=2, retracted=True)])
    out = report(trials)
    assert out["primary_endpoint"]["ae"] == 0 and out["adverse_events"]["retracted"] == 1


def test_an_ae_waits_for_its_subjects_first_infusion() -> None:
    held = ae("S1", "A", "2021-02-01", grade=3, serious=True)
    trials, _ = run([held])
    assert report(trials)["adverse_events"]["awaiting_infusion"] == 1
    assert report(trials)["primary_endpoint"]["ae"] == 0
    trials, _ = run([held, infusion("S1", "2021-01-01", recorded_at="2021-03-01T00:00:00Z")])
    assert report(trials)["primary_endpoint"] == {"ae": 1, "sae": 1, "subjects_with_ae": 1,
                                                  "subjects_with_sae": 1}


def test_an_earlier_infusion_arriving_late_moves_the_window() -> None:
    trials, _ = run([infusion("S1", "2021-03-01", dose=2), ae("S1", "A", "2021-02-15"),
                     infusion("S1", "2021-02-01", dose=1, recorded_at="2021-03-02T00:00:00Z")])
    out = report(trials)
    assert out["primary_endpoint"]["ae"] == 1 and out["adverse_events"]["pre_treatment"] == 0


def test_pre_treatment_post_window_and_imputed_counts() -> None:
    trials, _ = run([infusion("S1", "2020-12-06"), ae("S1", "A", "2020-11"),
                     ae("S1", "B", "2022-01-02"), ae("S1", "C", "2021")])
    out = report(trials)["adverse_events"]
    assert (out["pre_treatment"], out["post_window"], out["imputed_onset"]) == (1, 1, 2)


def test_the_report_says_which_onsets_were_imputed_and_where_they_fell() -> None:
    # SPEC section 3's examples: 2020-11 stays 2020-11-01 (a known month is never moved)
    trials, _ = run([ae("S2", "D", "2021-03", recorded_at="2021-04-01T00:00:00Z"),
                     infusion("S1", "2020-12-06"), ae("S1", "A", "2020-11"),
                     ae("S1", "B", "2022-01-02"), ae("S1", "C", "2021"),
                     ae("S1", "E", "2021-02", retracted=True),
                     infusion("S2", "2021-03-10")])
    assert report(trials)["imputed_onsets"] == [
        {"subject_id": "S1", "ae_id": "A", "onset": "2020-11", "placed_on": "2020-11-01",
         "placement": "pre_treatment"},
        {"subject_id": "S1", "ae_id": "C", "onset": "2021", "placed_on": "2021-01-01",
         "placement": "in_window"},
        {"subject_id": "S2", "ae_id": "D", "onset": "2021-03", "placed_on": "2021-03-10",
         "placement": "in_window"}]  # not before the first infusion; by subject and AE


def test_aes_whose_causality_is_not_assessed_are_counted() -> None:
    trials, _ = run([infusion("S1", "2021-01-01"), ae("S1", "A", "2021-02-01"),
                     ae("S1", "B", "2021-02-02", relatedness="possible"),
                     ae("S1", "C", "2021-02-03", relatedness="not_related"),
                     ae("S1", "D", "2021-02-04", retracted=True),
                     ae("S2", "E", "2021-02-05")])  # no infusion yet: still current
    assert report(trials)["adverse_events"]["causality_not_assessed"] == 2


def test_subject_states_partition_the_infused() -> None:
    messages = [infusion("S1", "2021-01-01"), infusion("S2", "2021-06-01"),
                infusion("S3", "2021-06-01"), infusion("S4", "2021-06-01"),
                status("S3", "withdrawn", "2021-08-01"), status("S4", "died", "2021-09-01"),
                status("S5", "enrolled", "2021-09-01")]
    trials, _ = run(messages)
    as_of = dt.datetime(2022, 3, 1, tzinfo=dt.UTC)
    assert report(trials, as_of)["subjects"] == {
        "infused": 4, "in_window": 1, "window_completed": 1, "withdrawn": 1, "died": 1,
        "known": 5}
    # the window's last day is still in window; the day after it is completed
    assert report(trials, dt.datetime(2022, 1, 1, tzinfo=dt.UTC))["subjects"]["in_window"] == 2
    assert report(trials, dt.datetime(2022, 1, 2, tzinfo=dt.UTC))["subjects"]["in_window"] == 1


def test_withdrawn_before_the_first_infusion_is_not_withdrawn_from_the_window() -> None:
    messages = [status("S2", "withdrawn", "2021-02-01"), infusion("S2", "2021-03-10")]
    trials, _ = run(messages)
    subjects = report(trials, dt.datetime(2021, 6, 5, tzinfo=dt.UTC))["subjects"]
    assert (subjects["infused"], subjects["in_window"], subjects["withdrawn"]) == (1, 1, 0)


def test_count_rule_raises_updates_and_resolves_with_stable_ids() -> None:
    first = ae("S1", "A", "2021-02-01", serious=True, relatedness="possible")
    second = ae("S2", "B", "2021-02-05", serious=True)  # causality not assessed: related
    third = ae("S3", "C", "2021-02-07", serious=True, relatedness="definite")
    downgrade = ae("S2", "B", "2021-02-05", serious=True, version=2, relatedness="unlikely",
                   recorded_at="2021-03-01T00:00:00Z")
    downgrade3 = ae("S3", "C", "2021-02-07", serious=True, version=2,
                    relatedness="not_related", recorded_at="2021-03-02T00:00:00Z")
    infusions = [infusion(s, "2021-01-10") for s in ("S1", "S2", "S3")]
    trials, alerts = run([*infusions, first, second, third, downgrade, downgrade3])
    halt = [a for a in alerts if a.rule_id == "related-sae"]
    assert [(a.id, a.transition, a.value) for a in halt] == [
        (f"{TRIAL}/related-sae/1", "raised", 2),
        (f"{TRIAL}/related-sae/1", "updated", 3),
        (f"{TRIAL}/related-sae/1", "updated", 2),
        (f"{TRIAL}/related-sae/1", "resolved", 1),
    ]
    assert halt[0].event_id == second["event_id"]
    assert halt[1].added == ("S3/C",) and halt[2].removed == ("S2/B",)
    assert [a.sequence for a in halt] == [1, 2, 3, 4]
    again = ae("S2", "B", "2021-02-05", serious=True, version=3, relatedness="probable",
               recorded_at="2021-03-03T00:00:00Z")
    trials.apply(event(infusion("S9", "2021-01-01")))
    raised = trials.apply(event(again)).alerts
    assert [(a.id, a.transition) for a in raised] == [(f"{TRIAL}/related-sae/2", "raised")]


def test_events_count_rule_counts_aes_not_subjects() -> None:
    trials, alerts = run([infusion("S1", "2021-01-01"), ae("S1", "A", "2021-05-01", grade=3),
                          ae("S1", "B", "2021-06-01", grade=4)])
    assert rule(trials, "grade3-events")["state"] == "breached"
    assert rule(trials, "grade3-events")["evidence"] == ["S1/A", "S1/B"]


def test_within_48_hours_of_any_infusion() -> None:
    messages = [infusion("S1", "2021-01-01"), infusion("S1", "2021-02-01", dose=2)]
    for onset, expected in (("2021-01-03", "breached"), ("2021-01-04", "ok"),
                            ("2021-02-02", "breached"), ("2020-12-31", "ok")):
        trials, _ = run([*messages, ae("S1", "A", onset, grade=3)])
        assert rule(trials, "early")["state"] == expected, onset


def test_cluster_needs_distinct_subjects_within_the_days_in_one_soc() -> None:
    gi = {"meddra_soc": "Gastrointestinal disorders", "grade": 2}
    base = [infusion(s, "2021-01-01") for s in ("S1", "S2", "S3", "S4")]
    near = [ae("S1", "A", "2021-03-01", **gi), ae("S2", "B", "2021-03-20", **gi),
            ae("S3", "C", "2021-03-31", **gi)]
    trials, _ = run([*base, *near])
    assert rule(trials, "gi-cluster")["state"] == "breached"
    assert rule(trials, "gi-cluster")["evidence"] == ["S1/A", "S2/B", "S3/C"]
    trials, _ = run([*base, *near[:2], ae("S3", "C", "2021-04-01", **gi)])  # 31 days apart
    assert rule(trials, "gi-cluster")["value"] == 2
    same_subject = [ae("S1", "A", "2021-03-01", **gi), ae("S1", "B", "2021-03-02", **gi),
                    ae("S2", "C", "2021-03-03", **gi)]
    trials, _ = run([*base, *same_subject])
    assert rule(trials, "gi-cluster")["value"] == 2
    other_soc = {**gi, "meddra_soc": "Nervous system disorders"}
    trials, _ = run([*base, *near[:2], ae("S3", "C", "2021-03-05", **other_soc)])
    assert rule(trials, "gi-cluster")["state"] == "ok"


def test_cluster_groups_meddra_names_whatever_their_case() -> None:
    """As `match` compares MedDRA names: one SOC, however a site spelled its case."""
    rules = f"""
trial_id: {TRIAL}
rules:
  - {{id: liver, kind: cluster, severity: review, subjects: 3, within_days: 3}}
"""
    spellings = ("Hepatobiliary disorders", "HEPATOBILIARY DISORDERS",
                 "hepatobiliary disorders", "Hepatobiliary Disorders")
    base = [infusion(s, "2021-01-01") for s in ("S1", "S2", "S3", "S4")]
    aes = [ae(f"S{n}", f"A{n}", f"2021-03-0{n}", meddra_soc=soc)
           for n, soc in enumerate(spellings, start=1)]
    for order in (aes, aes[::-1]):
        trials, alerts = run([*base, *order], rules)
        out = rule(trials, "liver")
        assert out["state"] == "breached" and out["value"] == 4
        assert out["evidence"] == ["S1/A1", "S2/A2", "S3/A3", "S4/A4"]
        assert alerts[-1].detail["group"] == "hepatobiliary disorders"


def test_dosing_while_halted_and_not_after_resolution() -> None:
    saes = [ae("S1", "A", "2021-02-01", serious=True, recorded_at="2021-02-02T00:00:00Z"),
            ae("S2", "B", "2021-02-03", serious=True, recorded_at="2021-02-04T00:00:00Z")]
    base = [infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02")]
    dose_during = infusion("S3", "2021-02-10")
    trials, alerts = run([*base, *saes, dose_during])
    assert rule(trials, "dosing-while-halted")["evidence"] == [f"S3/{dose_during['event_id']}"]
    assert alerts[-1].rule_id == "dosing-while-halted" and alerts[-1].transition == "raised"
    before = infusion("S4", "2021-02-03", recorded_at="2021-02-03T12:00:00Z")
    trials, _ = run([*base, *saes, before])
    assert rule(trials, "dosing-while-halted")["state"] == "ok"
    resolve = ae("S2", "B", "2021-02-03", serious=True, version=2, relatedness="not_related",
                 recorded_at="2021-02-05T00:00:00Z")
    trials, _ = run([*base, *saes, resolve, infusion("S5", "2021-02-06")])
    assert rule(trials, "dosing-while-halted")["state"] == "ok"


SAE_1 = ae("S1", "A", "2021-02-01", serious=True, recorded_at="2021-02-02T00:00:00Z")
SAE_2 = ae("S2", "B", "2021-02-03", serious=True, recorded_at="2021-02-04T00:00:00Z")
REASSESSED = ae("S2", "B", "2021-02-03", serious=True, version=2, relatedness="not_related",
                recorded_at="2021-02-06T00:00:00Z")
DOSE = infusion("S3", "2021-02-05", recorded_at="2021-02-05T00:00:00Z")  # while halted


@pytest.mark.parametrize("order", [
    [SAE_1, SAE_2, DOSE, REASSESSED],  # as recorded
    [REASSESSED, SAE_1, SAE_2, DOSE],  # the re-assessment first: no halt ever open here
    [DOSE, REASSESSED, SAE_2, SAE_1],
    [SAE_1, DOSE, REASSESSED, SAE_2]])
def test_dosing_while_halted_is_judged_on_what_was_recorded_before_the_dose(order) -> None:
    """The halt was open from 02-04 (two related SAEs) to 02-06 (one re-assessed as not
    related), and the dose was recorded on 02-05: dosing while halted, whatever order
    the messages arrive in."""
    trials, alerts = run([infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02"), *order])
    assert rule(trials, "related-sae")["state"] == "ok"
    assert rule(trials, "dosing-while-halted")["evidence"] == [f"S3/{DOSE['event_id']}"]
    raised = [a for a in alerts if a.rule_id == "dosing-while-halted"]
    assert [a.transition for a in raised] == ["raised"]


@pytest.mark.parametrize("arrival", ["in order", "correction before the dose"])
def test_a_message_that_loses_a_tie_later_stood_until_the_winner_was_recorded(
        arrival) -> None:
    """A second message of the same version, recorded later, wins the tie (SPEC 3);
    until it was recorded, the first was what the sponsor knew."""
    correction = ae("S2", "B", "2021-02-03", serious=True, relatedness="not_related",
                    recorded_at="2021-02-06T00:00:00Z")  # version 1 again
    given = [infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02"), SAE_1, SAE_2]
    trials, _ = run([*given, DOSE, correction] if arrival == "in order"
                    else [*given, correction, DOSE])
    assert rule(trials, "related-sae")["state"] == "ok"
    assert rule(trials, "dosing-while-halted")["evidence"] == [f"S3/{DOSE['event_id']}"]


def test_late_doses_of_subjects_no_halt_rule_counts_are_judged_on_the_halt_states() -> None:
    """Doses recorded during the halt (02-04 to 02-06) that arrive after its end: the
    first makes the engine step the halt's messages again; the second, of another
    subject with no SAE, changes no halt rule and is judged on the same states."""
    doses = [infusion("S4", "2021-02-05", recorded_at="2021-02-05T00:00:00Z"),
             infusion("S5", "2021-02-05", recorded_at="2021-02-05T06:00:00Z")]
    trials, _ = run([infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02"), SAE_1, SAE_2,
                     REASSESSED, *doses])
    assert rule(trials, "dosing-while-halted")["evidence"] == [
        f"S4/{doses[0]['event_id']}", f"S5/{doses[1]['event_id']}"]
    assert trials.trials[TRIAL].halt_lookup is not None  # the states were not made again


@pytest.mark.parametrize("late", [False, True])
def test_a_dose_at_the_instant_of_the_latest_message_is_judged_on_all_before_it(late) -> None:
    """Two SAEs recorded before the instant of the latest message but arriving after it
    (``late``) open the halt before that instant, for a dose recorded at it."""
    base = [infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02")]
    latest = ae("S1", "A", "2021-02-01", serious=True, version=2,
                recorded_at="2021-02-12T12:00:00Z")
    earlier = [ae("S1", "A", "2021-02-01", serious=True, recorded_at="2021-02-10T00:00:00Z"),
               ae("S2", "B", "2021-02-03", serious=True, recorded_at="2021-02-11T00:00:00Z")]
    dose = infusion("S3", "2021-02-12", recorded_at="2021-02-12T12:00:00Z")
    trials, _ = run([*base, latest, *earlier, dose] if late else [*base, *earlier, latest, dose])
    assert rule(trials, "dosing-while-halted")["evidence"] == [f"S3/{dose['event_id']}"]


@pytest.mark.parametrize("arrival", ["in order", "dose first"])
def test_a_dose_recorded_at_the_instant_a_halt_resolves_is_not_dosing_while_halted(
        arrival) -> None:
    base = [infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02"),
            ae("S1", "A", "2021-02-01", serious=True, recorded_at="2021-02-02T00:00:00Z"),
            ae("S2", "B", "2021-02-03", serious=True, recorded_at="2021-02-04T00:00:00Z")]
    resolve = ae("S2", "B", "2021-02-03", serious=True, version=2, relatedness="not_related",
                 recorded_at="2021-02-05T00:00:00Z")
    dose = infusion("S3", "2021-02-05", recorded_at="2021-02-05T00:00:00Z")
    trials, _ = run([*base, resolve, dose] if arrival == "in order" else [*base, dose, resolve])
    assert rule(trials, "related-sae")["state"] == "ok"
    assert rule(trials, "dosing-while-halted")["state"] == "ok"
    trials, _ = run([*base, dose])  # not resolved: the halt holds at the dose and after it
    assert rule(trials, "dosing-while-halted")["evidence"] == [f"S3/{dose['event_id']}"]


def test_a_trial_without_rules_is_counted_with_a_warning() -> None:
    trials = Trials({})
    trials.apply(event(infusion("S1", "2021-01-01", trial="OTHER.1")))
    trials.apply(event(ae("S1", "A", "2021-01-05", trial="OTHER.1")))
    out = trials.report(AS_OF)["OTHER.1"]
    assert out["rules"] == {} and "no rules file" in out["warning"]
    assert out["primary_endpoint"]["ae"] == 1


def test_a_rule_listed_after_a_stricter_one_still_counts_a_low_grade_ae() -> None:
    """The engine looks at the rules by lowest grade and stops at the first above a new
    AE's grade; the rules file's own order must not hide an AE from a later rule."""
    rules = f"""
trial_id: {TRIAL}
planned_subjects: 20
rules:
  - {{id: severe, kind: count, severity: review, threshold: 1, match: {{grade_min: 4}}}}
  - {{id: moderate, kind: count, severity: review, threshold: 1, match: {{grade_min: 2}}}}
  - {{id: any, kind: count, severity: review, threshold: 1, match: {{}}}}
"""
    trials, alerts = run([infusion("S1", "2021-01-01"), ae("S1", "A", "2021-02-01", grade=1),
                          ae("S1", "B", "2021-02-02", grade=2)], rules)
    assert rule(trials, "any")["evidence"] == ["S1/A", "S1/B"]
    assert rule(trials, "moderate")["evidence"] == ["S1/B"]
    assert rule(trials, "severe")["state"] == "ok"
    assert [a.rule_id for a in alerts] == ["any", "moderate", "any"]


def test_the_infusion_that_causes_a_halt_is_not_dosing_while_halted() -> None:
    """A held related SAE placed by the subject's infusion raises a halt at that
    infusion's recorded_at: the infusion was not recorded after the halt."""
    rules = f"""
trial_id: {TRIAL}
rules:
  - {{id: any-related-sae, kind: count, severity: halt, threshold: 1,
      match: {{serious: true, related: true}}}}
  - {{id: dosing-while-halted, kind: dosing_while_halted, severity: halt}}
"""
    held = ae("S1", "A", "2021-03-09", serious=True, recorded_at="2021-03-10T00:00:00Z")
    cause = infusion("S1", "2021-03-08", recorded_at="2021-03-12T00:00:00Z")
    trials, alerts = run([held, cause], rules)
    assert [(a.rule_id, a.transition) for a in alerts] == [("any-related-sae", "raised")]
    assert rule(trials, "dosing-while-halted")["state"] == "ok"
    later = infusion("S2", "2021-03-12", recorded_at="2021-03-12T00:00:01Z")
    trials, _ = run([held, cause, later], rules)
    assert rule(trials, "dosing-while-halted")["evidence"] == [f"S2/{later['event_id']}"]


@pytest.mark.parametrize("arrival", ["in order", "follow-up first"])
def test_a_partial_onset_is_capped_by_the_first_report_of_any_version(arrival) -> None:
    """Version 1 says `2021-03` on 03-05: the AE started by then, so a follow-up of
    04-02 that repeats `2021-03` cannot place it on the infusion day (03-10)."""
    first = ae("S1", "A", "2021-03", grade=3, serious=True, recorded_at="2021-03-05T09:00:00Z")
    follow = ae("S1", "A", "2021-03", grade=3, serious=True, version=2, outcome="recovered",
                recorded_at="2021-04-02T09:00:00Z")
    aes = [first, follow] if arrival == "in order" else [follow, first]
    other = ae("S2", "B", "2021-03-20", grade=3, serious=True, relatedness="possible")
    trials, _ = run([infusion("S1", "2021-03-10"), infusion("S2", "2021-03-10"), *aes, other])
    counted = report(trials)
    assert counted["adverse_events"]["pre_treatment"] == 1
    assert counted["primary_endpoint"]["sae"] == 1  # S2's
    assert counted["rules"]["related-sae"]["evidence"] == ["S2/B"]  # the rules agree
    assert [rule for rule, body in counted["rules"].items() if "S1/A" in body["evidence"]] == []
    from tests.engine.test_records import rows_of  # it imports this module's RULES

    trial = trials.trials[TRIAL]
    loaded = records.load_trial(TRIAL, trial.rules, rows_of(trial))  # a worker's restart
    assert loaded.placement("S1", loaded.subjects["S1"].aes["A"].current).period == \
        "pre_treatment"


def test_a_follow_up_that_moves_the_onset_later_wins_over_the_first_report() -> None:
    first = ae("S1", "A", "2021-03", recorded_at="2021-03-05T09:00:00Z")
    corrected = ae("S1", "A", "2021-04", version=2, recorded_at="2021-04-20T09:00:00Z")
    trials, _ = run([infusion("S1", "2021-03-10"), first, corrected])
    placed = trials.trials[TRIAL].placement("S1", trials.trials[TRIAL].subjects["S1"].aes[
        "A"].current)
    assert (placed.onset, placed.period) == (dt.date(2021, 4, 1), "in_window")


def test_the_onset_cap_does_not_depend_on_the_order_versions_arrive_in() -> None:
    """Of two messages of version 1, the later report wins the tie; the cap is the first
    report of the kept messages (a tie's loser keeps only its id, as a load has it)."""
    from itertools import permutations

    from tests.engine.test_records import rows_of  # it imports this module's RULES

    fields = {"grade": 3, "serious": True, "relatedness": "possible"}
    a = ae("S1", "A", "2021-03", **fields, recorded_at="2021-03-05T09:00:00Z")
    b = ae("S1", "A", "2021-03", **fields, recorded_at="2021-03-20T09:00:00Z")
    c = ae("S1", "A", "2021-03", **fields, version=2, recorded_at="2021-03-25T09:00:00Z")
    seen = set()
    for order in permutations((a, b, c)):
        trials, _ = run([infusion("S1", "2021-03-10"), *order])
        trial = trials.trial(TRIAL)
        loaded = records.load_trial(TRIAL, trial.rules, rows_of(trial))
        for state in (trial, loaded):
            current = state.subjects["S1"].aes["A"].current
            seen.add((state.placement("S1", current),
                      tuple(state.trackers["related-sae"].evidence_keys())))
    assert len(seen) == 1, seen
    assert seen.pop()[0].onset == dt.date(2021, 3, 10)  # kept: 03-20 and 03-25
