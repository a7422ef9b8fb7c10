"""The alert e-mail, rendered: a pure function of the alert, the rules and the counts."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import email.utils
from pathlib import Path

import msgspec
import pytest

from monitor.alert_email import message_id, render, subject_line, text_table, trial_summary
from monitor.engine.alerts import AlertTransition
from monitor.engine.kinds import EvidenceItem
from monitor.engine.report import trial_report
from monitor.engine.rules import parse_rules
from monitor.engine.trials import Trials
from monitor.notify import alert_from_payload, alert_payload
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir

from . import builders as b

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"

RULES = parse_rules("""
trial_id: ISC.19.29
title: UC-MSC infusion in adult liver cirrhosis (phase I)
recipients:
  halt: [dsmb-chair@example.org, safety@example.org]
  review: [monitor@example.org]
rules:
  - id: related-sae
    kind: count
    severity: halt
    description: Two or more subjects with a related SAE in their 12-month window.
    action: Stop all dosing now.
    match: {serious: true, related: true}
    threshold: 2
""", "test.yaml")

PERITONITIS = EvidenceItem("ISC-019", "ISC-019-AE-902", "peritonitis", 3, True, "possible", 80,
                           dt.date(2022, 10, 8))
CONFUSION = EvidenceItem("ISC-020", "ISC-020-AE-903", "confusion", 3, True, None, 63,
                         dt.date(2022, 10, 23))
FEVER = EvidenceItem("ISC-003", "ISC-003-AE-004", "fever", 4, True, "definite", 5,
                     dt.date(2022, 11, 2))
RECORDED = dt.datetime(2022, 10, 24, 13, 0, tzinfo=dt.timezone(dt.timedelta(hours=7)))


def transition(sequence: int = 1, kind: str = "raised", evidence=(PERITONITIS, CONFUSION),
               added=(), removed=(), value: float = 2, **fields) -> AlertTransition:
    return AlertTransition(
        id="ISC.19.29/related-sae/1", trial_id="ISC.19.29", rule_id="related-sae",
        kind="count", severity="halt", episode=1, sequence=sequence, transition=kind,
        event_id="evt-0906", recorded_at=RECORDED, value=value, threshold=2,
        evidence=tuple(evidence), added=tuple(added), removed=tuple(removed),
        detail={"count": "subjects"}, **fields)


def text_of(message) -> str:
    return message.get_body(("plain",)).get_content()


def html_of(message) -> str:
    return message.get_body(("html",)).get_content()


def reparsed(message):
    return email.message_from_bytes(message.as_bytes(), policy=email.policy.default)


def test_subject_puts_severity_trial_and_rule_first() -> None:
    assert subject_line(transition()) == "[HALT] ISC.19.29: related-sae — 2 subjects (threshold 2)"
    resolved = transition(2, "resolved", evidence=(CONFUSION,), value=1)
    assert subject_line(resolved) == ("[HALT] ISC.19.29: related-sae — resolved: 1 subject "
                                      "(threshold 2)")


def test_message_has_plain_text_and_html_alternatives_and_headers() -> None:
    message = reparsed(render(transition(), RULES, sender="monitor@example.org"))
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["Subject"] == "[HALT] ISC.19.29: related-sae — 2 subjects (threshold 2)"
    assert message["From"] == "monitor@example.org"
    assert message["To"] == "dsmb-chair@example.org, safety@example.org"
    assert email.utils.parsedate_to_datetime(message["Date"]) == RECORDED
    assert message["X-Safety-Monitor-Alert"] == "ISC.19.29/related-sae/1#1"


def test_body_says_what_happened_what_it_means_and_what_to_do() -> None:
    text = text_of(render(transition(), RULES))
    assert "2 subjects with a matching adverse event; the threshold is 2." in text
    assert "Two or more subjects with a related SAE in their 12-month window." in text
    assert "WHAT THE CHARTER ASKS YOU TO DO\nStop all dosing now." in text
    assert "severity HALT: stop dosing now" in text


def test_a_dosing_alert_says_the_dose_was_judged_on_what_was_recorded_then() -> None:
    rules = parse_rules("""
trial_id: ISC.19.29
rules:
  - {id: dosing-while-halted, kind: dosing_while_halted, severity: halt}
""", "test.yaml")
    dose = EvidenceItem("ISC-005", "evt-0910", "infusion dose 2", None, None, None, None,
                        dt.date(2022, 10, 25))
    alert = msgspec.structs.replace(transition(evidence=(dose,), value=1),
                                    rule_id="dosing-while-halted", kind="dosing_while_halted",
                                    detail={"count": "events"})
    text = text_of(render(alert, rules))
    assert ("recorded while a halt rule of this trial was breached on what had been "
            "recorded by then; the threshold is 2.") in text


def test_evidence_table_has_one_row_per_item_in_both_parts() -> None:
    message = render(transition(), RULES)
    text, html = text_of(message), html_of(message)
    assert text_table(("Subject", "Term"), [("ISC-019", "peritonitis")]) == [
        "Subject  Term", "ISC-019  peritonitis"]
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("ISC-0")]
    assert rows == [["ISC-019", "ISC-019-AE-902", "peritonitis", "3", "yes", "possible", "80"],
                    ["ISC-020", "ISC-020-AE-903", "confusion", "3", "yes", "not", "assessed",
                     "63"]]
    assert html.count("<tr") == 4 + 2 + 1  # header table, evidence header + 2 rows
    for cell in ("ISC-019-AE-902", "peritonitis", "ISC-020-AE-903", "not assessed"):
        assert f">{cell}</td>" in html
    assert 'counts as related' in text


def test_html_escapes_what_came_from_events() -> None:
    odd = PERITONITIS._replace(term="rash <b>& itch</b>")
    html = html_of(render(transition(evidence=(odd, CONFUSION)), RULES))
    assert "rash &lt;b&gt;&amp; itch&lt;/b&gt;" in html
    assert "<b>&" not in html


def test_updated_and_resolved_say_what_changed_since_the_last_message() -> None:
    updated = transition(2, "updated", evidence=(PERITONITIS, CONFUSION, FEVER),
                         added=(FEVER.key,), value=3)
    text = text_of(render(updated, RULES, previous={"value": 2, "threshold": 2}))
    assert "WHAT CHANGED SINCE THE LAST MESSAGE" in text
    assert "- Value: 2 → 3 (threshold 2)." in text
    assert "- New evidence: subject ISC-003, ISC-003-AE-004." in text
    assert "* ISC-003  ISC-003-AE-004" in text  # the new row is marked

    resolved = transition(3, "resolved", evidence=(CONFUSION,), value=1,
                          removed=(PERITONITIS.key, FEVER.key))
    text = text_of(render(resolved, RULES, previous=None))
    assert "is no longer breached" in text
    assert "No longer counted: subject ISC-019, ISC-019-AE-902" in text
    assert "WHAT THE CHARTER ASKED WHILE THE RULE WAS BREACHED" in text


def test_first_message_of_an_episode_starts_a_thread() -> None:
    message = render(transition(), RULES)
    assert message["Message-ID"] == "<ISC.19.29=related-sae=1.1@safety-monitor>"
    assert message["In-Reply-To"] is None and message["References"] is None


def test_later_messages_reply_in_the_episode_thread() -> None:
    third = reparsed(render(transition(3, "updated"), RULES))
    assert third["Message-ID"] == "<ISC.19.29=related-sae=1.3@safety-monitor>"
    assert third["In-Reply-To"] == "<ISC.19.29=related-sae=1.2@safety-monitor>"
    assert third["References"].split() == ["<ISC.19.29=related-sae=1.1@safety-monitor>",
                                           "<ISC.19.29=related-sae=1.2@safety-monitor>"]


@pytest.mark.parametrize("trial_id", ["ISC.19.29", "A B/C", "x=y", "..odd..", "Zürich-1",
                                      "a%2Eb"])
def test_message_ids_are_valid_and_distinct(trial_id: str) -> None:
    ids = {message_id(f"{trial_id}/rule.1/2", 3), message_id(f"{trial_id}/rule/1", 23),
           message_id(f"{trial_id}/rule/12", 3), message_id(f"{trial_id}x/rule/1", 3)}
    assert len(ids) == 4
    for mid in ids:
        local, _, domain = mid.strip("<>").partition("@")
        assert domain == "safety-monitor" and mid.isascii() and " " not in mid
        assert ".." not in local and not local.startswith(".") and not local.endswith(".")
        parsed = email.message_from_string(f"Message-ID: {mid}\n\n",
                                           policy=email.policy.default)
        assert parsed["Message-ID"] == mid
    assert message_id("a.b/c/1", 1) != message_id("a%2Eb/c/1", 1)


def test_rendering_is_pure_the_same_alert_gives_the_same_bytes() -> None:
    summary = {"as_of": "2022-10-24 13:00 +07:00", "subjects": {"infused": 20},
               "primary_endpoint": {"ae": 230, "sae": 11}, "planned_subjects": 20}
    first = render(transition(), RULES, summary).as_bytes()
    assert first == render(transition(), RULES, summary).as_bytes()
    assert b"20 of 20 planned" in first


def test_no_free_text_beyond_the_ae_term_ever_reaches_the_e_mail() -> None:
    secrets = {"patient_name": "Jane Roe", "birth_date": "1961-04-09",
               "narrative": "found at home by her husband", "initials": "JRX"}
    later = "2021-02-01T09:00:00+00:00"
    log = [b.infusion("ISC-001", "2021-01-04"), b.infusion("ISC-002", "2021-01-05"),
           b.ae("ISC-001", "AE-1", "2021-01-10", grade=3, serious=True, recorded_at=later,
                relatedness="possible", term="pneumonia", **secrets),
           b.ae("ISC-002", "AE-2", "2021-01-12", grade=3, serious=True, term="sepsis",
                recorded_at=later, outcome="fatal", meddra_pt="Sepsis", **secrets)]
    catalog = {"ISC.19.29": RULES}
    trials = Trials(catalog)
    seen: list[str] = []

    def on_alert(alert: AlertTransition) -> None:
        report = trial_report(trials.trial(alert.trial_id), alert.recorded_at)
        message = render(alert, RULES, trial_summary(report, alert.recorded_at))
        seen.append(reparsed(message).as_string() + text_of(message) + html_of(message))

    replay([b.encode(m) for m in log], catalog, on_alert=on_alert, trials=trials)
    [message] = seen
    assert "pneumonia" in message and "sepsis" in message
    for value in (*secrets.values(), "2021-01-10", "2021-01-12", "fatal", "Sepsis"):
        assert value not in message, value


def test_every_sample_alert_renders_and_round_trips_through_the_topic_payload() -> None:
    catalog = load_rules_dir(ROOT / "rules")
    result = replay(SAMPLE.read_bytes().splitlines(), catalog)
    assert result.alerts
    for alert in result.alerts:
        payload = alert_payload(alert, {"as_of": "x"})
        again, summary = alert_from_payload(payload)
        assert again == alert and summary == {"as_of": "x"}
        message = render(alert, catalog[alert.trial_id])
        assert message["Subject"] == subject_line(alert)
        assert text_of(message) and html_of(message)


def readme_alert_text() -> str:
    """The README's example: the sample log's first related-sae message, as sent."""
    catalog = load_rules_dir(ROOT / "rules")
    trials = Trials(catalog)
    found = []

    def on_alert(alert: AlertTransition) -> None:
        if alert.rule_id == "related-sae" and alert.sequence == 1:
            report = trial_report(trials.trial(alert.trial_id), alert.recorded_at)
            found.append(render(alert, catalog[alert.trial_id],
                                trial_summary(report, alert.recorded_at),
                                sender="safety-monitor@example.org"))

    replay(SAMPLE.read_bytes().splitlines(), catalog, on_alert=on_alert, trials=trials)
    message = found[0]
    headers = "".join(f"{name}: {message[name]}\n"
                      for name in ("From", "To", "Subject", "Date", "Message-ID"))
    return f"{headers}\n{text_of(message)}".rstrip()


def test_readme_shows_the_alert_as_it_is_rendered_now() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Alert e-mails"):]
    start = section.index("```text\n") + len("```text\n")
    shown = section[start:section.index("\n```", start)]
    assert shown == readme_alert_text(), "paste the fresh text into README.md"


def test_a_boundary_alert_says_where_it_crossed_and_that_it_stays_crossed() -> None:
    crossed = AlertTransition(
        id="ISC.19.29/tox/1", trial_id="ISC.19.29", rule_id="related-sae",
        kind="toxicity_boundary", severity="halt", episode=1, sequence=2,
        transition="updated", event_id="evt-0906", recorded_at=RECORDED, value=2,
        threshold=2, evidence=(PERITONITIS, CONFUSION),
        detail={"subjects": 5, "count": 2, "stop_at": 3, "look": 5, "planned_subjects": 20,
                "proportion": 0.4, "crossed": {"subjects": 2, "count": 2, "stop_at": 2}})
    text = " ".join(text_of(render(crossed, RULES)).split())
    assert "2 subjects with a matching adverse event among 5 subjects infused so far" in text
    assert ("The boundary was crossed at 2 subjects infused: 2 of them with a matching "
            "adverse event, where it stops at 2. A crossed boundary stays crossed as more "
            "subjects are infused.") in text
