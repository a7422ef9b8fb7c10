"""Replay's report as tables for a person (rich); the JSON form is the program's.

A few trials print a section each. More than `MANY` print one row each in shared tables,
so that a log of a thousand trials reads as a handful of tables, not a thousand. A table
longer than `LONG` rows prints as plain aligned columns: rich lays a table out at about a
row per millisecond (17,384 alerts took 13 s; the whole table form of 1,120 trials, 22 s).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

MANY = 20  # trials: more print one row each, not a section each
LONG = 200  # rows: longer tables print as plain aligned columns

_STATE_STYLE = {"breached": "bold red", "ok": "green"}
_SUBJECTS = ("infused", "in_window", "window_completed", "withdrawn", "died")
_ENDPOINT = ("ae", "sae", "subjects_with_ae", "subjects_with_sae")
_OTHER_AES = ("pre_treatment", "post_window", "retracted", "imputed_onset",
              "awaiting_infusion", "conflicts", "causality_not_assessed")
_IMPUTED = ("subject_id", "ae_id", "onset", "placed_on", "placement")
_RULE_COLUMNS = ("rule", "kind", "severity", "state", "value", "threshold", "evidence")


def print_report(report: dict, console: Console) -> None:
    events = report["events"]
    console.print(f"[bold]As of {report['as_of']}[/]  events read {events['read']}, "
                  f"accepted {events['accepted']}, duplicates {events['duplicates']}, "
                  f"rejected {events['rejected']}, recorded after as-of "
                  f"{events.get('after_as_of', 0)}")
    trials = report["trials"]
    if len(trials) > MANY:
        _print_trials(trials, console)
    else:
        for trial_id, trial in trials.items():
            _print_trial(trial_id, trial, console)
    alerts, rejected = report["alerts"], report["rejected"]
    if alerts:
        _table(console, f"Alert transitions ({len(alerts)})",
               ("alert", "transition", "severity", "event", "recorded at", "value"),
               [(a["id"], a["transition"], a["severity"], a["event_id"], a["recorded_at"],
                 f"{a['value']} / {a['threshold']}") for a in alerts])
    if rejected:
        _table(console, f"Rejected lines ({len(rejected)})", ("line", "reason"),
               [(str(item["line"]), item["reason"]) for item in rejected], right=("line",))


def _table(console: Console, title: str, columns: Sequence[str],
           rows: Sequence[Sequence[str]], right: Sequence[str] = ()) -> None:
    """Rows of text under their column names (``right``: the right-aligned ones), as a
    rich table, or as plain aligned columns when longer than `LONG` rows. Values are
    text, never markup."""
    if len(rows) <= LONG:
        table = Table(title=title)
        for name in columns:
            table.add_column(name, overflow="fold", justify="right" if name in right else "left")
        for row in rows:
            table.add_row(*(Text(value, style=_STATE_STYLE.get(value, "") if name == "state"
                                 else "") for name, value in zip(columns, row, strict=True)))
        console.print(table)
        return
    rows = [[value.translate(_VISIBLE) for value in row] for row in rows]
    widths = [max(cell_len(name), *(cell_len(row[index]) for row in rows))
              for index, name in enumerate(columns)]
    flush_right = [name in right for name in columns]

    def padded(values: Sequence[str]) -> list[str]:
        return [" " * (width - cell_len(value)) + value if to_right
                else value + " " * (width - cell_len(value))
                for to_right, value, width in zip(flush_right, values, widths, strict=True)]

    console.print(Text(title, style="italic"))
    # one Text: a breached rule's state stays bold red, at the cost of one span each
    state = columns.index("state") if "state" in columns else None
    text = Text("  ".join(padded(columns)).rstrip() + "\n" +
                "  ".join("-" * width for width in widths) + "\n")
    for values in rows:
        cells = padded(values)
        if state is None or values[state] != "breached":
            text.append("  ".join(cells).rstrip() + "\n")
            continue
        text.append("  ".join(cells[:state] + [""]))
        text.append(cells[state], style=_STATE_STYLE["breached"])
        text.append("  ".join(["", *cells[state + 1:]]).rstrip() + "\n")
    console.print(text, soft_wrap=True, highlight=False, end="")


# a control character in a plain column (a newline in an id) is shown, not obeyed
_VISIBLE = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


def _print_trial(trial_id: str, trial: dict, console: Console) -> None:
    console.rule(Text.assemble((trial_id, "bold"), f" {trial.get('title', '')}"))
    if "warning" in trial:
        console.print(Text.assemble(("warning: ", "yellow"), trial["warning"]))
    subjects, endpoint = trial["subjects"], trial["primary_endpoint"]
    counts = [_heading(name) for name in (*_SUBJECTS, *_ENDPOINT)]
    _table(console, "Subjects and primary endpoint", counts,
           [[str(subjects[k]) for k in _SUBJECTS] + [str(endpoint[k]) for k in _ENDPOINT]],
           right=counts)
    aes = trial["adverse_events"]
    grades = ", ".join(f"{g}: {n}" for g, n in aes["by_grade"].items())
    console.print(f"In-window AEs by grade: {grades}.  Pre-treatment {aes['pre_treatment']}, "
                  f"post-window {aes['post_window']}, retracted {aes['retracted']}, "
                  f"imputed onset {aes['imputed_onset']}, awaiting infusion "
                  f"{aes['awaiting_infusion']}, version conflicts {aes['conflicts']}, "
                  f"causality not assessed (counted as related) "
                  f"{aes['causality_not_assessed']}", highlight=False)
    if imputed := trial.get("imputed_onsets"):
        _table(console, f"Imputed onsets ({len(imputed)})", [_heading(k) for k in _IMPUTED],
               [[item[k] for k in _IMPUTED] for item in imputed])
    if trial["rules"]:
        _table(console, "Stopping rules", _RULE_COLUMNS,
               [_rule_row(rule_id, rule) for rule_id, rule in trial["rules"].items()])


def _print_trials(trials: dict, console: Console) -> None:
    """Many trials: a row each in one table of subjects and endpoint and one of AEs; the
    breached rules; then every rule (a row per trial and rule)."""
    warned: dict[str, list[str]] = {}
    for trial_id, trial in trials.items():
        if "warning" in trial:
            warned.setdefault(trial["warning"], []).append(trial_id)
    for warning, trial_ids in warned.items():
        console.print(Text.assemble(("warning: ", "yellow"), f"{warning} ({len(trial_ids)} "
                                    f"{'trial' if len(trial_ids) == 1 else 'trials'}): ",
                                    ", ".join(trial_ids)))
    counts = [_heading(name) for name in (*_SUBJECTS, *_ENDPOINT)]
    _table(console, f"Subjects and primary endpoint, by trial ({len(trials)})",
           ("trial", *counts, "title"),
           [(trial_id, *(str(trial["subjects"][k]) for k in _SUBJECTS),
             *(str(trial["primary_endpoint"][k]) for k in _ENDPOINT), trial.get("title", ""))
            for trial_id, trial in trials.items()], right=counts)
    others = [_heading(name) for name in _OTHER_AES]
    grades = [f"grade {grade}" for grade in range(1, 6)]
    _table(console, f"In-window AEs by grade, and the others, by trial ({len(trials)})",
           ("trial", *grades, *others),
           [(trial_id, *(str(trial["adverse_events"]["by_grade"][str(grade)])
                         for grade in range(1, 6)),
             *(str(trial["adverse_events"][k]) for k in _OTHER_AES))
            for trial_id, trial in trials.items()], right=[*grades, *others])
    imputed = [(trial_id, *(item[k] for k in _IMPUTED)) for trial_id, trial in trials.items()
               for item in trial.get("imputed_onsets", ())]
    if imputed:
        _table(console, f"Imputed onsets, by trial ({len(imputed)})",
               ("trial", *(_heading(k) for k in _IMPUTED)), imputed)
    every = [(trial_id, rule_id, rule) for trial_id, trial in trials.items()
             for rule_id, rule in trial["rules"].items()]
    breached = [(trial_id, *_rule_row(rule_id, rule)) for trial_id, rule_id, rule in every
                if rule["state"] == "breached"]
    if breached:  # first: what a person looks for among every trial's rules
        _table(console, f"Breached stopping rules ({len(breached)})", ("trial", *_RULE_COLUMNS),
               breached)
    if every:
        _table(console, f"Stopping rules, by trial ({len(every)})", ("trial", *_RULE_COLUMNS),
               [(trial_id, *_rule_row(rule_id, rule)) for trial_id, rule_id, rule in every])


def _rule_row(rule_id: str, rule: dict) -> list[str]:
    evidence = rule["evidence"]
    shown = ", ".join(evidence[:4]) + (f" (+{len(evidence) - 4})" if len(evidence) > 4 else "")
    return [rule_id, rule["kind"], rule["severity"], rule["state"], str(rule["value"]),
            str(rule["threshold"]), shown]


def _heading(name: str) -> str:
    return name.replace("_", " ").upper() if len(name) < 4 else name.replace("_", " ")
