"""Durable records: a trial saved as table rows and loaded back is the same trial; a
redelivered message is not a duplicate; a ledger that lags its subjects is reconciled."""

from __future__ import annotations

import datetime as dt
import random

import msgspec
import orjson

from monitor.engine import records
from monitor.engine.events import parse_event
from monitor.engine.report import trial_report
from monitor.engine.rules import parse_rules
from monitor.engine.state import (
    ACCEPTED,
    DUPLICATE,
    REDELIVERED,
    new_trial,
    reconcile,
    step,
)
from monitor.engine.trials import Trials
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir
from tests.builders import TRIAL, ae, encode, event, infusion
from tests.engine.test_state import DOSE, REASSESSED, RULES, SAE_1, SAE_2
from tests.test_replay import RULES as RULES_DIR
from tests.test_replay import SAMPLE

RULES_ISC = parse_rules(RULES)
AS_OF = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def rows_of(trial) -> list[tuple[str, bytes]]:
    rows = []
    for subject in trial.subjects.values():
        changed = [("ae", a) for a in subject.aes] + [("lab", t) for t in subject.labs]
        rows += list(records.subject_records(trial, subject.subject_id, changed))
    return [*rows, records.trial_record(trial)]


def test_a_saved_trial_loads_back_the_same() -> None:
    catalog = load_rules_dir(RULES_DIR)
    result = replay(SAMPLE.read_bytes().splitlines(), catalog)
    trial = result.trials.trials["ISC.19.29"]
    rows = rows_of(trial)
    random.Random(4).shuffle(rows)
    loaded = records.load_trial("ISC.19.29", catalog["ISC.19.29"], rows)
    as_of = result.effective_as_of
    assert trial_report(loaded, as_of) == trial_report(trial, as_of)
    assert reconcile(loaded) == []
    assert all(records.key_trial(key) == "ISC.19.29" for key, _ in rows)


def test_each_record_is_small_whatever_the_history() -> None:
    trial = new_trial(TRIAL, RULES_ISC)
    step(trial, event(infusion("S1", "2021-01-01")))
    sizes = []
    for number in range(300):
        message = ae("S1", f"A{number}", "2021-02-01", grade=1 + number % 3)
        changes = step(trial, event(message))[1]
        written = list(records.subject_records(trial, "S1", [changes.record]))
        sizes.append(sum(len(value) for _, value in written if not _.startswith("s")))
    assert max(sizes) == min(sizes) or max(sizes) - min(sizes) < 20


def test_redelivery_at_the_same_position_is_neither_applied_nor_counted() -> None:
    trial = new_trial(TRIAL, RULES_ISC)
    message = event(infusion("S1", "2021-01-01"))
    assert step(trial, message, position=7)[1].outcome == ACCEPTED
    assert step(trial, message, position=7)[1].outcome == REDELIVERED
    assert step(trial, message, position=9)[1].outcome == DUPLICATE
    assert step(trial, message)[1].outcome == DUPLICATE
    assert trial.counts.duplicates["infusion"] == 2 and trial.counts.accepted["infusion"] == 1


def test_a_ledger_that_lags_its_subjects_is_reconciled_once() -> None:
    trial = new_trial(TRIAL, RULES_ISC)
    for message in (infusion("S1", "2021-01-01"), infusion("S2", "2021-01-01")):
        step(trial, event(message))
    stale = records.trial_record(trial)  # the ledger before the breach
    breach = [ae("S1", "A", "2021-02-01", serious=True), ae("S2", "B", "2021-02-02",
                                                          serious=True)]
    raised = [a for m in breach for a in step(trial, event(m))[1].alerts]
    assert [a.transition for a in raised] == ["raised"]
    rows = [r for r in rows_of(trial) if not r[0].startswith("t")] + [stale]
    loaded = records.load_trial(TRIAL, RULES_ISC, rows)
    again = reconcile(loaded)
    assert [(a.id, a.transition, a.sequence) for a in again] == [
        (raised[0].id, "raised", raised[0].sequence)]
    assert again[0].event_id == breach[-1]["event_id"]
    assert reconcile(loaded) == []


def test_records_keep_offsets_of_date_times() -> None:
    trial = new_trial(TRIAL, RULES_ISC)
    message = infusion("S1", "2021-01-01", recorded_at="2021-01-01T09:00:00+07:00")
    step(trial, event(message))
    loaded = records.load_trial(TRIAL, RULES_ISC, rows_of(trial))
    assert loaded.subjects["S1"].infusions[0].recorded_at.isoformat() == \
        "2021-01-01T09:00:00+07:00"
    assert encode(message)  # the builder's message is valid JSON


def test_the_trial_record_stays_small_however_much_evidence_a_rule_holds() -> None:
    """The ledger keeps a digest of each rule's evidence, not its keys: a breached
    count rule with 300 items writes a trial row no larger than with 3."""
    trial = new_trial(TRIAL, RULES_ISC)
    sizes = {}
    for number in range(300):
        subject = f"S{number:03d}"
        step(trial, event(infusion(subject, "2021-01-01")))
        step(trial, event(ae(subject, "A", "2021-02-01", grade=3, serious=True)))
        sizes[number + 1] = len(records.trial_record(trial)[1])
    assert trial.evidence["related-sae"] and len(trial.evidence["related-sae"]) == 300
    assert sizes[300] - sizes[3] < 20  # numbers may gain a digit
    loaded = records.load_trial(TRIAL, RULES_ISC, rows_of(trial))
    assert loaded.evidence == trial.evidence  # given again by the trackers
    assert reconcile(loaded) == []


def test_evidence_the_ledger_did_not_decide_on_is_reported_as_added() -> None:
    """A rules file changed between runs: the loaded trackers give other evidence than
    the ledger's digest; the update says so, with every key as added."""
    trial = new_trial(TRIAL, RULES_ISC)
    for subject, grade in (("S1", 3), ("S2", 3), ("S3", 2)):
        step(trial, event(infusion(subject, "2021-01-01")))
        step(trial, event(ae(subject, "A", "2021-02-01", grade=grade, serious=True)))
    assert trial.evidence["grade3-events"] == ("S1/A", "S2/A")
    wider = parse_rules(RULES.replace("threshold: 2,\n      match: {grade_min: 3}",
                                      "threshold: 2,\n      match: {grade_min: 2}"))
    loaded = records.load_trial(TRIAL, wider, rows_of(trial))
    assert loaded.evidence["grade3-events"] is None  # not what the ledger decided on
    assert loaded.evidence["related-sae"] == trial.evidence["related-sae"]
    updates = reconcile(loaded)
    assert [(a.rule_id, a.transition, a.added, a.removed) for a in updates] == [
        ("grade3-events", "updated", ("S1/A", "S2/A", "S3/A"), ())]
    assert reconcile(loaded) == []


def test_a_ledger_written_before_the_digest_loads_without_a_new_alert() -> None:
    """Checkpoints written before the ledger kept a digest hold the evidence keys
    themselves; they load as the evidence the ledger decided on (no spurious update)."""
    trial = new_trial(TRIAL, RULES_ISC)
    for subject in ("S1", "S2"):
        step(trial, event(infusion(subject, "2021-01-01")))
        step(trial, event(ae(subject, "A", "2021-02-01", grade=3, serious=True)))
    key, value = records.trial_record(trial)
    old = orjson.loads(value)
    for entry in old["record"]["ledger"].values():  # as the earlier format wrote it
        entry["evidence"] = list(trial.evidence[entry["rule_id"]] or ())
        entry.pop("evidence_count", None), entry.pop("evidence_digest", None)
    rows = [r for r in rows_of(trial) if not r[0].startswith("t")] + [(key, orjson.dumps(old))]
    loaded = records.load_trial(TRIAL, RULES_ISC, rows)
    assert loaded.evidence == trial.evidence
    assert reconcile(loaded) == []
    assert loaded.ledger == trial.ledger  # the keys became the digest


def test_an_ae_row_written_as_an_object_loads_as_the_same_ae() -> None:
    """AE rows written before 2026-12-03 are JSON objects: the winning message of each
    version, and the ids taken. They load as the same AE, the message that lost a tie
    included (its id and position, not the message): redelivered, none of them changes
    anything."""
    trial = new_trial(TRIAL, RULES_ISC)
    step(trial, event(infusion("S1", "2021-01-01")), position=0)
    first = ae("S1", "A", "2021-02-01", grade=3, serious=True)
    won = ae("S1", "A", "2021-02-01", version=2, grade=4, serious=True,
             recorded_at="2021-02-03T09:00:00+00:00")
    lost = ae("S1", "A", "2021-02-01", version=2, grade=2, serious=True,
              recorded_at="2021-02-02T09:00:00+00:00")
    for position, message in enumerate((first, won, lost), start=1):
        assert step(trial, event(message), position=position)[1].outcome == ACCEPTED
    assert step(trial, event(first), position=9)[1].outcome == DUPLICATE
    history = trial.subjects["S1"].aes["A"]
    assert (history.current.grade, history.conflicts) == (4, 1)
    old = {"versions": {"1": first, "2": won}, "conflicts": 1,
           "seen": {"first": {first["event_id"]: 1, won["event_id"]: 2, lost["event_id"]: 3},
                    "again": {first["event_id"]: [9]}}}
    rows = [(key, orjson.dumps(old) if key.startswith("a") else value)
            for key, value in rows_of(trial)]
    loaded = records.load_trial(TRIAL, RULES_ISC, rows)
    # the lost message itself was not kept then: only what `judge_infusions` reads
    assert loaded.subjects["S1"].aes["A"] == msgspec.structs.replace(history, losers=())
    assert trial_report(loaded, AS_OF) == trial_report(trial, AS_OF)
    assert reconcile(loaded) == []
    for position, message in ((1, first), (2, won), (3, lost), (9, first)):
        assert step(loaded, event(message), position=position)[1].outcome == REDELIVERED
    assert trial_report(loaded, AS_OF) == trial_report(trial, AS_OF)


def test_the_latest_event_does_not_depend_on_arrival_or_load_order() -> None:
    """Two events recorded at the same instant: the latest is the greater event id,
    whichever came first, and after loading the rows in any order (the cause given to
    the alerts `reconcile` raises after a crash)."""
    same = "2021-01-01T18:00:00+00:00"
    messages = [infusion("S1", "2021-01-01", recorded_at=same, event_id="e-2"),
                infusion("S2", "2021-01-01", recorded_at=same, event_id="e-1"),
                infusion("S2", "2021-01-02", dose=2, recorded_at=same, event_id="e-3")]
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        trial = new_trial(TRIAL, RULES_ISC)
        for index in order:
            step(trial, event(messages[index]))
        assert trial.counts.last_event_id == "e-3", order
        assert trial.subjects["S2"].header.last_event_id == "e-3", order
        rows = rows_of(trial)
        for shuffled in (rows, rows[::-1]):
            assert records.load_trial(TRIAL, RULES_ISC, shuffled).counts.last_event_id == "e-3"


def test_messages_an_earlier_build_stored_load_as_it_read_them() -> None:
    """Builds before 2026-12-03 read dates less strictly (the first ten characters of
    infused_at; a time after a partial onset). What they stored loads as they read it,
    so that a worker loads its state after an upgrade; new messages are held to the
    stricter reading."""
    trial = new_trial(TRIAL, RULES_ISC)
    given = infusion("S1", "2021-01-01")
    first = ae("S1", "A", "2021-02", recorded_at="2021-03-01T09:00:00+00:00")
    for position, message in enumerate((given, first)):
        assert step(trial, event(message), position=position)[1].outcome == ACCEPTED
    loose = {given["event_id"]: ("infused_at", "2021-01-01garbage"),
             first["event_id"]: ("onset", "2021-02T10:00")}

    def as_stored(value: object) -> object:  # the loose values, where they are stored
        if isinstance(value, dict):
            changed = {key: as_stored(item) for key, item in value.items()}
            if changed.get("event_id") in loose:
                name, text = loose[changed["event_id"]]
                changed[name] = text
            return changed
        return [as_stored(item) for item in value] if isinstance(value, list) else value

    rows = [(key, value if key.startswith("t") else orjson.dumps(as_stored(orjson.loads(value))))
            for key, value in rows_of(trial)]
    assert all(text.encode() in b"".join(value for _, value in rows)
               for _, text in loose.values())
    loaded = records.load_trial(TRIAL, RULES_ISC, rows)
    assert loaded.subjects["S1"].infusions[0].infused_on == dt.date(2021, 1, 1)
    stored = loaded.subjects["S1"].aes["A"].current
    assert (stored.onset, stored.onset_earliest, stored.onset_precision) == (
        "2021-02T10:00", dt.date(2021, 2, 1), "month")
    before, after = trial_report(trial, AS_OF), trial_report(loaded, AS_OF)
    assert [item.pop("onset") for item in after["imputed_onsets"]] == ["2021-02T10:00"]
    assert [item.pop("onset") for item in before["imputed_onsets"]] == ["2021-02"]
    assert after == before
    for message in (given, first):  # a new message is read strictly, after a load too
        name, text = loose[message["event_id"]]
        assert "reason" in msgspec.structs.asdict(parse_event(encode({**message, name: text})))


def test_a_halt_state_survives_a_load_with_late_messages_judged_as_they_were() -> None:
    """`rebuild` (a worker's restart) derives the same dosing judgement from the kept
    messages as the steps did, whatever order they came in."""
    trials = Trials({TRIAL: RULES_ISC})
    for message in [infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02"), REASSESSED,
                    DOSE, SAE_2, SAE_1]:
        trials.apply(event(message))
    trial = trials.trials[TRIAL]
    loaded = records.load_trial(TRIAL, trial.rules, rows_of(trial))
    assert loaded.trackers["dosing-while-halted"].result() == \
        trial.trackers["dosing-while-halted"].result()
    assert loaded.trackers["dosing-while-halted"].value() == 1


def test_a_tie_s_lost_message_is_kept_for_the_halts_after_a_load() -> None:
    """The message that lost a tie on its version is stored with its AE: a worker's
    restart judges the doses recorded before the winner as the steps did, and has no
    transition to send."""
    correction = ae("S2", "B", "2021-02-03", serious=True, relatedness="not_related",
                    recorded_at="2021-02-06T00:00:00Z")  # version 1 again, recorded later
    trials = Trials({TRIAL: RULES_ISC})
    for message in [infusion("S1", "2021-01-01"), infusion("S2", "2021-01-02"), SAE_1, SAE_2,
                    DOSE, correction]:
        trials.apply(event(message))
    trial = trials.trials[TRIAL]
    assert trial.trackers["dosing-while-halted"].value() == 1
    loaded = records.load_trial(TRIAL, trial.rules, rows_of(trial))
    assert loaded.subjects["S2"].aes["B"].losers[0].event_id == SAE_2["event_id"]
    assert loaded.trackers["dosing-while-halted"].value() == 1
    assert reconcile(loaded) == []


def test_a_message_an_earlier_build_stored_loosely_is_stepped_again_without_error() -> None:
    """`judge_infusions` steps kept messages again: one that an earlier build read
    loosely (an onset with a time) is not read again, strictly."""
    trial = new_trial(TRIAL, RULES_ISC)
    for message in (infusion("S1", "2021-01-01", recorded_at="2021-01-01T09:00:00Z"),
                    ae("S1", "A", "2021-02", serious=True, recorded_at="2021-03-01T09:00:00Z")):
        step(trial, event(message))
    rows = []
    for key, value in rows_of(trial):
        if key.startswith("a"):  # the AE row, with its onset as such a build kept it
            value = value.replace(b'"2021-02"', b'"2021-02T10:00"')
            assert b"2021-02T10:00" in value
        rows.append((key, value))
    loaded = records.load_trial(TRIAL, RULES_ISC, rows)
    late = infusion("S2", "2021-02-10", recorded_at="2021-02-10T09:00:00Z")  # before the AE
    assert step(loaded, event(late))[1].outcome == ACCEPTED
