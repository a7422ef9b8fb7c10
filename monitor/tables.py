"""Replay's report as tables for a person (rich); the JSON form is the program's."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

_STATE_STYLE = {"breached": "bold red", "ok": "green"}


def print_report(report: dict, console: Console) -> None:
    events = report["events"]
    console.print(f"[bold]As of {report['as_of']}[/]  events read {events['read']}, "
                  f"accepted {events['accepted']}, duplicates {events['duplicates']}, "
                  f"rejected {events['rejected']}, recorded after as-of "
                  f"{events.get('after_as_of', 0)}")
    for trial_id, trial in report["trials"].items():
        _print_trial(trial_id, trial, console)
    if report["alerts"]:
        console.print(_alerts_table(report["alerts"]))
    if report["rejected"]:
        console.print(_rejected_table(report["rejected"]))


def _print_trial(trial_id: str, trial: dict, console: Console) -> None:
    console.rule(f"[bold]{trial_id}[/] {trial.get('title', '')}")
    if "warning" in trial:
        console.print(f"[yellow]warning:[/] {trial['warning']}")
    summary = Table(show_header=True, title="Subjects and primary endpoint")
    for name in ("infused", "in_window", "window_completed", "withdrawn", "died"):
        summary.add_column(name.replace("_", " "), justify="right")
    for name in ("ae", "sae", "subjects_with_ae", "subjects_with_sae"):
        summary.add_column(name.replace("_", " ").upper() if len(name) < 4
                           else name.replace("_", " "), justify="right")
    subjects, endpoint = trial["subjects"], trial["primary_endpoint"]
    summary.add_row(*[str(subjects[k]) for k in ("infused", "in_window", "window_completed",
                                                  "withdrawn", "died")],
                    *[str(endpoint[k]) for k in ("ae", "sae", "subjects_with_ae",
                                                  "subjects_with_sae")])
    console.print(summary)
    aes = trial["adverse_events"]
    grades = ", ".join(f"{g}: {n}" for g, n in aes["by_grade"].items())
    console.print(f"In-window AEs by grade: {grades}.  Pre-treatment {aes['pre_treatment']}, "
                  f"post-window {aes['post_window']}, retracted {aes['retracted']}, "
                  f"imputed onset {aes['imputed_onset']}, awaiting infusion "
                  f"{aes['awaiting_infusion']}, version conflicts {aes['conflicts']}")
    if trial["rules"]:
        console.print(_rules_table(trial["rules"]))


def _rules_table(rules: dict) -> Table:
    table = Table(title="Stopping rules")
    for name in ("rule", "kind", "severity", "state", "value", "threshold", "evidence"):
        table.add_column(name, overflow="fold")
    for rule_id, rule in rules.items():
        evidence = rule["evidence"]
        shown = ", ".join(evidence[:4]) + (f" (+{len(evidence) - 4})" if len(evidence) > 4 else "")
        table.add_row(rule_id, rule["kind"], rule["severity"],
                      f"[{_STATE_STYLE[rule['state']]}]{rule['state']}[/]",
                      str(rule["value"]), str(rule["threshold"]), shown)
    return table


def _alerts_table(alerts: list[dict]) -> Table:
    table = Table(title="Alert transitions")
    for name in ("alert", "transition", "severity", "event", "recorded at", "value"):
        table.add_column(name, overflow="fold")
    for alert in alerts:
        table.add_row(alert["id"], alert["transition"], alert["severity"], alert["event_id"],
                      alert["recorded_at"], f"{alert['value']} / {alert['threshold']}")
    return table


def _rejected_table(rejected: list[dict]) -> Table:
    table = Table(title=f"Rejected lines ({len(rejected)})")
    table.add_column("line", justify="right")
    table.add_column("reason")
    for item in rejected:
        table.add_row(str(item["line"]), item["reason"])
    return table
