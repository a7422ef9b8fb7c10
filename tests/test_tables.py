"""Replay's table form: a section per trial for a few trials, a row per trial for many;
long tables as plain aligned columns; values printed as text, never as markup."""

from __future__ import annotations

import copy
import io
import re

import pytest
from rich.cells import cell_len
from rich.console import Console

from monitor import tables
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir
from tests.test_replay import RULES, SAMPLE


@pytest.fixture(scope="module")
def sample_report() -> dict:
    result = replay(SAMPLE.read_bytes().splitlines(), load_rules_dir(RULES))
    return result.to_json()


def printed(report: dict, color: bool = False) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=color, color_system="standard"
                      if color else None)
    tables.print_report(report, console)
    return out.getvalue()


def many_trials(report: dict, count: int) -> dict:
    """The sample's trial under ``count`` ids, each with counts and title of its own, and
    every alert of each."""
    report = copy.deepcopy(report)
    (trial,) = report["trials"].values()
    report["trials"] = {}
    for number in range(count):
        mine = report["trials"][f"T{number:04d}"] = copy.deepcopy(trial)
        mine["subjects"]["infused"] = number
        mine["primary_endpoint"]["ae"] = 1000 + number
        mine["adverse_events"]["by_grade"]["1"] = 4000 + number
        mine["adverse_events"]["by_grade"]["3"] = 2000 + number
        mine["adverse_events"]["conflicts"] = 3000 + number
        mine["adverse_events"]["causality_not_assessed"] = 5000 + number
        mine["title"] = f"title {number}"
    report["alerts"] = [{**alert, "id": f"{trial_id}/{alert['id']}"}
                        for trial_id in report["trials"] for alert in report["alerts"]]
    return report


def cells(line: str) -> list[str]:
    """The cells of a table row: rich's (between box lines) or plain aligned columns."""
    if "│" in line:
        return [cell.strip() for cell in line.strip().strip("│").split("│")]
    return re.split(r" {2,}", line.strip())


def rows_by_first_cell(out: str) -> dict[str, list[list[str]]]:
    by_first: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        found = cells(line)
        by_first.setdefault(found[0], []).append(found)
    return by_first


def row(rows: dict[str, list[list[str]]], first: str, marker: str) -> list[str]:
    """The cells of the row that starts with ``first`` and holds the cell ``marker``."""
    found = [cells for cells in rows.get(first, []) if marker in cells]
    assert len(found) == 1, (first, marker, found)
    return found[0]


def test_a_few_trials_print_a_section_each(sample_report) -> None:
    out = printed(many_trials(sample_report, tables.MANY))
    assert out.count("Subjects and primary endpoint") == tables.MANY
    assert out.count("Stopping rules") == tables.MANY
    assert "by trial" not in out
    out = printed(sample_report)
    assert "ISC.19.29" in out and "related-sae" in out and "Rejected lines (2)" in out


def test_a_trials_section_says_which_onsets_were_imputed(sample_report) -> None:
    (trial,) = sample_report["trials"].values()
    aes = trial["adverse_events"]
    assert trial["imputed_onsets"] and aes["causality_not_assessed"]
    out = printed(sample_report)
    assert (f"causality not assessed (counted as related) {aes['causality_not_assessed']}"
            in " ".join(out.split()))
    assert f"Imputed onsets ({len(trial['imputed_onsets'])})" in out
    rows = rows_by_first_cell(out)
    for item in trial["imputed_onsets"]:
        assert row(rows, item["subject_id"], item["ae_id"]) == [
            item["subject_id"], item["ae_id"], item["onset"], item["placed_on"],
            item["placement"]]


@pytest.mark.parametrize("count", [tables.MANY + 1, tables.LONG + 1])  # rich, then plain
def test_many_trials_print_a_row_each_in_shared_tables(sample_report, count) -> None:
    report = many_trials(sample_report, count)
    out = printed(report)
    (trial,) = sample_report["trials"].values()
    assert out.count("Subjects and primary endpoint") == 1
    assert f"Stopping rules, by trial ({count * len(trial['rules'])})" in out
    breached = [rule_id for rule_id, rule in trial["rules"].items()
                if rule["state"] == "breached"]
    assert f"Breached stopping rules ({count * len(breached)})" in out
    assert f"Imputed onsets, by trial ({count * len(trial['imputed_onsets'])})" in out
    onsets = {item["ae_id"]: [item["subject_id"], item["ae_id"], item["onset"],
                              item["placed_on"], item["placement"]]
              for item in trial["imputed_onsets"]}
    rows = rows_by_first_cell(out)
    for number, trial_id in enumerate(report["trials"]):
        subjects = row(rows, trial_id, f"title {number}")
        assert subjects[1] == str(number) and subjects[6] == str(1000 + number)
        aes = row(rows, trial_id, str(3000 + number))
        assert (aes[1], aes[3], aes[-2], aes[-1]) == (
            str(4000 + number), str(2000 + number), str(3000 + number), str(5000 + number))
        imputed = [cells for cells in rows[trial_id] if cells[2] in onsets]
        assert imputed == [[trial_id, *onsets[cells[2]]] for cells in imputed]
        assert len(imputed) == len(onsets)
        for rule_id, rule in trial["rules"].items():
            found = [cells for cells in rows[trial_id] if cells[1] == rule_id]
            assert [c[4] for c in found] == [rule["state"]] * (2 if rule_id in breached else 1)


def test_a_long_table_prints_as_plain_aligned_columns(sample_report) -> None:
    alerts = sample_report["alerts"]
    per_trial = len(alerts)
    report = many_trials(sample_report, tables.LONG // per_trial + 1)
    alerts = report["alerts"]
    assert len(alerts) > tables.LONG
    out = printed(report).splitlines()
    start = out.index(f"Alert transitions ({len(alerts)})")
    header, rule, *rows = out[start + 1:start + 3 + len(alerts)]
    assert cells(header) == ["alert", "transition", "severity", "event", "recorded at", "value"]
    assert set(rule) <= {"-", " "}
    columns = [index for index, char in enumerate(rule) if char == "-" and
               (index == 0 or rule[index - 1] == " ")]  # where each column starts
    for alert, line in zip(alerts, rows, strict=True):
        assert line[:columns[1]].strip() == alert["id"]
        assert line[columns[1]:columns[2]].strip() == alert["transition"]
        assert line[columns[4]:columns[5]].strip() == alert["recorded_at"]
        assert line[columns[5]:].strip() == f"{alert['value']} / {alert['threshold']}"


def test_a_table_of_exactly_the_limit_is_still_a_rich_table(sample_report) -> None:
    report = copy.deepcopy(sample_report)
    bad = "not JSON; each line must be one JSON object"
    report["rejected"] = [{"line": n, "reason": bad} for n in range(1, tables.LONG + 1)]
    assert "│ " in printed(report).split(f"Rejected lines ({tables.LONG})")[1]
    report["rejected"].append({"line": 10_000, "reason": bad})
    plain = printed(report).split(f"Rejected lines ({tables.LONG + 1})")[1].splitlines()
    assert "│" not in "".join(plain)
    assert plain[3] == f"    1  {bad}" and plain[-1] == f"10000  {bad}"  # numbers flush right


def test_plain_columns_line_up_by_display_width_and_show_control_characters(
        sample_report) -> None:
    report = many_trials(sample_report, tables.LONG + 1)
    report["trials"] = {("臨床試験-01" if n == 0 else "EVIL\nT999" if n == 1 else trial_id): trial
                        for n, (trial_id, trial) in enumerate(report["trials"].items())}
    out = printed(report).splitlines()
    start = out.index(next(line for line in out if line.startswith("Subjects and primary")))
    header, *rows = out[start + 1:start + 3 + len(report["trials"])]
    assert rows[1].startswith("臨床試験-01  ") and rows[2].startswith("EVIL\\x0aT999  ")
    title_at = [cell_len(line[:line.index("title ")]) for line in rows[1:]]
    assert len(set(title_at)) == 1  # every row's last column starts at the same cell
    assert cell_len(header[:header.index("title")]) == title_at[0]


@pytest.mark.parametrize("count", [1, tables.MANY + 1, tables.LONG + 1])
def test_values_are_printed_as_text_not_markup(sample_report, count) -> None:
    report = many_trials(sample_report, count)
    trials = report["trials"]
    first = next(iter(trials))
    trials["[bold]T[/bold]"] = {**trials.pop(first), "title": "[red]title[/red]",
                                "warning": "[i]no[/i] rules"}
    report["rejected"] = [{"line": 3, "reason": "[bold]grade[/bold]: 7 is not [red]a grade"}]
    report["alerts"][0]["event_id"] = "evt-[i]1[/i]"
    out = printed(report)
    for text in ("[bold]grade[/bold]: 7 is not [red]a grade", "evt-[i]1[/i]", "[bold]T[/bold]",
                 "[red]title[/red]", "[i]no[/i] rules"):
        assert text in out, text


def test_breached_rules_stay_in_colour_in_a_long_report(sample_report) -> None:
    (trial,) = sample_report["trials"].values()
    breached = sum(rule["state"] == "breached" for rule in trial["rules"].values())
    count = tables.LONG + 1
    out = printed(many_trials(sample_report, count), color=True)
    first = out.split("Breached stopping rules")[1].split("Stopping rules, by trial")[0]
    every = out.split("Stopping rules, by trial")[1].split("Alert transitions")[0]
    for table in (first, every):  # both long: plain columns, the breached state in bold red
        assert "│" not in table
        assert table.count("\x1b[1;31mbreached") == breached * count
    assert every.count("\n") == 3 + len(trial["rules"]) * count  # title, header, rule, rows
    assert "ok" in every and "\x1b[32m" not in every  # the rest stays plain


def test_many_trials_without_rules_share_one_warning(sample_report) -> None:
    report = many_trials(sample_report, tables.MANY + 1)
    (trial,) = sample_report["trials"].values()
    unwatched = {**copy.deepcopy(trial), "rules": {}, "warning": "no rules file watches it"}
    report["trials"] = {**{f"U{n}": unwatched for n in range(3)}, **report["trials"]}
    out = printed(report)
    assert out.count("warning:") == 1
    assert "no rules file watches it (3 trials): U0, U1, U2" in out
    assert " U0 " in out.split("Stopping rules")[0]  # its counts are still shown
    assert " U0 " not in out.split("Stopping rules")[1]  # no rule of its own
