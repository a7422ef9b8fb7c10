"""The alert e-mail a DSMB member reads (SPEC section 5): a pure rendering.

``render(alert, rules, trial_summary, previous)`` turns one `AlertTransition` into an
`EmailMessage` with a plain-text and an HTML alternative, both from the Jinja2
templates in ``monitor/templates/``. No clock, no I/O beyond reading the packaged
templates, no settings: the same alert always gives the same message.

What goes in: the trial, rule, severity and transition; the value against the
threshold; the evidence table (subject id, AE id, AE term, grade, serious,
relatedness, onset day after the first infusion); the rule's description and the
action the charter asks for; what changed since the episode's last message; and the
trial's counts. What never goes in: names, birth dates, dates of onset, or any free
text of the event other than the AE term (the engine does not even carry it).

Threading: every transition has a stable ``Message-ID`` made from its key
``trial/rule/episode#sequence`` (`message_id`); a later message of the same episode
replies to the one before it and lists the whole episode in ``References``, so mail
clients show one episode as one thread. The first message id is derivable from the
alert id alone, so threading needs no lookup.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import functools
import hashlib
import re
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any

import jinja2

from .engine.alerts import RAISED, RESOLVED, AlertTransition
from .engine.kinds import EvidenceItem
from .engine.rules import TrialRules

MESSAGE_ID_DOMAIN = "safety-monitor"
TERM_MAX = 80  # an AE term longer than this is cut: it is the only free text we show

SEVERITY_MEANS = {
    "halt": "stop dosing now",
    "pause": "pause enrolment; DSMB review",
    "review": "the medical monitor looks",
}
UNITS = {"dosing_while_halted": "infusion"}  # every other kind counts subjects, or AEs


# ----------------------------------------------------------------------- identity


def message_id(alert_id: str, sequence: int) -> str:
    """``<ISC.19.29=related-sae=1.2@safety-monitor>`` for ``ISC.19.29/related-sae/1#2``.

    Reversible, so two alerts never share an id: ``/`` becomes ``=``, ``#`` becomes
    ``.``, and characters of the trial id outside ``[A-Za-z0-9_.-]`` (``=`` too) are
    written ``%XX``; rule ids cannot hold ``=`` and episodes are numbers."""
    trial_id, rule_id, episode = alert_id.rsplit("/", 2)
    return f"<{_atom(trial_id)}={rule_id}={episode}.{sequence}@{MESSAGE_ID_DOMAIN}>"


def _atom(text: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", lambda m: "".join(f"%{b:02X}" for b in
                                                        m.group().encode()), text)
    if ".." in safe or safe.startswith(".") or safe.endswith("."):
        safe = safe.replace(".", "%2E")  # a dot-atom has no empty parts
    return safe


def thread_ids(alert: AlertTransition) -> list[str]:
    """The message ids of the episode's earlier messages, first to last."""
    return [message_id(alert.id, n) for n in range(1, alert.sequence)]


# ----------------------------------------------------------------------- message


def render(alert: AlertTransition, rules: TrialRules, trial_summary: Mapping | None = None,
           previous: Mapping | None = None, *,
           sender: str = f"safety-monitor@{MESSAGE_ID_DOMAIN}") -> EmailMessage:
    """The e-mail for one alert transition.

    ``trial_summary``: the trial's counts when the alert was decided (see
    `trial_summary`), or None. ``previous``: what the notification log recorded for the
    episode's previous message (its ``value``), or None when unknown. Raises a
    ``jinja2.TemplateError`` when a template is broken."""
    context = alert_context(alert, rules, trial_summary, previous)
    message = EmailMessage(policy=email.policy.SMTP)
    message["Subject"] = context["subject"]
    message["From"] = sender
    message["To"] = ", ".join(context["recipients"]) or "undisclosed-recipients:;"
    message["Date"] = email.utils.format_datetime(alert.recorded_at)
    message["Message-ID"] = message_id(alert.id, alert.sequence)
    if earlier := thread_ids(alert):
        message["In-Reply-To"] = earlier[-1]
        message["References"] = " ".join(earlier)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies, please
    message["X-Safety-Monitor-Alert"] = alert.key
    message["X-Safety-Monitor-Severity"] = alert.severity
    if alert.severity == "halt" and alert.transition != RESOLVED:
        message["Importance"] = "high"
    message.set_content(_template("alert.txt.j2").render(context))
    message.add_alternative(_template("alert.html.j2").render(context), subtype="html")
    message.set_boundary(f"==safety-monitor-{hashlib.sha256(alert.key.encode()).hexdigest()[:24]}")
    return message


def recipients_for(rules: TrialRules, severity: str) -> tuple[str, ...]:
    return tuple(getattr(rules.recipients, severity, ()))


def subject_line(alert: AlertTransition) -> str:
    """``[HALT] ISC.19.29: related-sae — 2 subjects (threshold 2)``; an update or a
    resolution says so before the value."""
    change = "" if alert.transition == RAISED else f"{alert.transition}: "
    return (f"[{alert.severity.upper()}] {alert.trial_id}: {alert.rule_id} — {change}"
            f"{quantity(alert.value, unit_of(alert))} (threshold {number(alert.threshold)})")


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("monitor", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                            default_for_string=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)


def _template(name: str) -> jinja2.Template:
    return _environment().get_template(name)


# ----------------------------------------------------------------------- context


def alert_context(alert: AlertTransition, rules: TrialRules, trial_summary: Mapping | None,
                  previous: Mapping | None) -> dict[str, Any]:
    """Everything the templates show, as display strings: the templates only lay out."""
    rule = next((r for r in rules.rules if r.id == alert.rule_id), None)
    rows = [evidence_row(item, item.key in alert.added) for item in alert.evidence]
    return {
        "alert": alert, "subject": subject_line(alert),
        "recipients": recipients_for(rules, alert.severity),
        "severity": alert.severity.upper(),
        "severity_means": SEVERITY_MEANS.get(alert.severity, ""),
        "headline": headline(alert), "trial_title": rules.title,
        "recorded_at": timestamp(alert.recorded_at),
        "what_happened": what_happened(alert),
        "description": rule.description if rule else "",
        "action": rule.action if rule else "",
        "evidence_noun": quantity(len(rows), _evidence_noun(alert)),
        "columns": EVIDENCE_COLUMNS, "rows": rows,
        "table": text_table(EVIDENCE_COLUMNS, [r["cells"] for r in rows]),
        "unassessed": any(item.relatedness is None and item.grade is not None
                          for item in alert.evidence),
        "changes": changes(alert, previous),
        "mark_new": alert.transition != RAISED and any(row["new"] for row in rows),
        "counts": counts(trial_summary),
    }


def headline(alert: AlertTransition) -> str:
    what = {RAISED: "is breached", RESOLVED: "is no longer breached"}
    state = what.get(alert.transition, "is still breached, with changed evidence")
    return f"{alert.severity.upper()}: {alert.trial_id} stopping rule {alert.rule_id} {state}"


def what_happened(alert: AlertTransition) -> list[str]:
    """One or two sentences: the value against the threshold, in the kind's words."""
    detail, unit = alert.detail or {}, unit_of(alert)
    value = quantity(alert.value, unit)
    lines = {
        "count": [f"{value}{' with a matching adverse event' if unit == 'subject' else ''}"
                  f"; the threshold is {number(alert.threshold)}."],
        "cluster": [f"{value} with matching adverse events in "
                    f"{_group(detail)} within {detail.get('within_days', '?')} days of "
                    f"each other; the threshold is {number(alert.threshold)}."],
        "dosing_while_halted": [f"{value} recorded while a halt rule of this trial was "
                                "breached on what had been recorded by then; the threshold "
                                f"is {number(alert.threshold)}."],
    }.get(alert.kind) or _boundary_lines(alert, detail, value)
    if alert.transition == RESOLVED:
        lines.append(f"The rule is below its threshold again; this closes episode "
                     f"{alert.episode} of the alert.")
    return lines


def _group(detail: Mapping) -> str:
    level = "SOC" if detail.get("by", "soc") == "soc" else "PT"
    return f"one MedDRA {level} ({detail.get('group') or 'not coded'})"


def _boundary_lines(alert: AlertTransition, detail: Mapping, value: str) -> list[str]:
    subjects, stop = detail.get("subjects"), detail.get("stop_at")
    lines = [f"{value} with a matching adverse event"
             + (f" among {quantity(subjects, 'subject')} infused so far" if subjects else "")
             + (f"; the boundary stops at {number(stop)}." if stop is not None else
                "; no count can stop the trial at this look.")]
    if (crossed := detail.get("crossed")) is not None:
        lines.append(f"The boundary was crossed at {quantity(crossed['subjects'], 'subject')}"
                     f" infused: {number(crossed['count'])} of them with a matching adverse "
                     f"event, where it stops at {number(crossed['stop_at'])}. A crossed "
                     "boundary stays crossed as more subjects are infused.")
    if (posterior := detail.get("posterior_probability")) is not None:
        lines.append(f"Posterior probability that the rate exceeds {detail.get('rate')}: "
                     f"{posterior:.3f} (stops above {detail.get('probability')}).")
    return lines


def changes(alert: AlertTransition, previous: Mapping | None) -> list[str]:
    """What changed since the episode's last message; empty for a first message."""
    if alert.transition == RAISED:
        return []
    out = []
    was = previous.get("value") if previous is not None else None
    if was is not None and was != alert.value:
        out.append(f"Value: {number(was)} → {number(alert.value)} "
                   f"(threshold {number(alert.threshold)}).")
    bar = previous.get("threshold") if previous is not None else None
    if bar is not None and bar != alert.threshold:
        out.append(f"Threshold: {number(bar)} → {number(alert.threshold)}.")
    out += [f"New evidence: {_ids(key)}." for key in alert.added]
    out += [f"No longer counted: {_ids(key)} (corrected, retracted or reassessed)."
            for key in alert.removed]
    return out or ["The value or the threshold changed; the evidence is the same."]


def _ids(key: str) -> str:
    subject_id, _, ae_id = key.partition("/")
    return f"subject {subject_id}, {ae_id}"


def counts(summary: Mapping | None) -> list[tuple[str, str]]:
    """The trial's counts as label/value rows; empty when none were given."""
    if not summary:
        return []
    subjects, endpoint = summary.get("subjects", {}), summary.get("primary_endpoint", {})
    planned = summary.get("planned_subjects")
    rows = [("As of", str(summary.get("as_of", "")))] if summary.get("as_of") else []
    rows.append(("Subjects infused",
                 f"{subjects.get('infused', 0)}" + (f" of {planned} planned" if planned else "")
                 + f" (in window {subjects.get('in_window', 0)}, window completed "
                 f"{subjects.get('window_completed', 0)}, withdrawn "
                 f"{subjects.get('withdrawn', 0)}, died {subjects.get('died', 0)})"))
    rows.append(("Primary endpoint",
                 f"{quantity(endpoint.get('ae', 0), 'AE')} in "
                 f"{quantity(endpoint.get('subjects_with_ae', 0), 'subject')}; "
                 f"{quantity(endpoint.get('sae', 0), 'SAE')} in "
                 f"{quantity(endpoint.get('subjects_with_sae', 0), 'subject')}"))
    return rows


def trial_summary(report: Mapping, as_of: dt.datetime) -> dict:
    """The counts an e-mail shows, picked from a trial's report (`trial_report`)."""
    return {"as_of": timestamp(as_of), "subjects": dict(report.get("subjects", {})),
            "primary_endpoint": dict(report.get("primary_endpoint", {})),
            "planned_subjects": report.get("planned_subjects")}


# ----------------------------------------------------------------------- evidence

EVIDENCE_COLUMNS = ("Subject", "AE id", "Term", "Grade", "Serious", "Relatedness",
                    "Onset day")


def evidence_row(item: EvidenceItem, new: bool) -> dict[str, Any]:
    """One evidence item as display cells, in `EVIDENCE_COLUMNS` order."""
    onset = "—" if item.onset_day is None else str(item.onset_day)
    return {"new": new, "cells": (
        item.subject_id, item.ae_id, short_term(item.term),
        "—" if item.grade is None else str(item.grade), yes_no(item.serious),
        _relatedness(item), onset)}


def _relatedness(item: EvidenceItem) -> str:
    if item.grade is None:  # an infusion, not an adverse event
        return "—"
    return (item.relatedness or "not assessed").replace("_", " ")


def short_term(term: str) -> str:
    """The AE term on one line, cut at `TERM_MAX` characters."""
    flat = " ".join(term.split())
    return flat if len(flat) <= TERM_MAX else flat[:TERM_MAX - 1] + "…"


def yes_no(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns two spaces apart, for the plain-text part."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)]


# ----------------------------------------------------------------------- words


def unit_of(alert: AlertTransition) -> str:
    if alert.kind in UNITS:
        return UNITS[alert.kind]
    return "adverse event" if (alert.detail or {}).get("count") == "events" else "subject"


def _evidence_noun(alert: AlertTransition) -> str:
    return "infusion" if alert.kind == "dosing_while_halted" else "adverse event"


def number(value: float | int | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quantity(value: float | int, unit: str) -> str:
    return f"{number(value)} {unit}{'' if value == 1 else 's'}"


def timestamp(moment: dt.datetime) -> str:
    """``2022-10-24 13:00 +07:00``: minutes, with the offset it was recorded in."""
    text = moment.isoformat(timespec="minutes").replace("T", " ")
    return text[:16] + " " + text[16:] if len(text) > 16 else text
