"""Replay's table form: a section per trial for a few trials, a row per trial for many;
long tables as plain aligned columns; values printed as text, never as markup."""

from __future__ import annotations

import copy
import io

import pytest
from rich.console import Console

from monitor import tables
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir
from tests.test_replay import RULES, SAMPLE


@pytest.fixture(scope="module")
def sample_report() -> dict:
    result = replay(SAMPLE.read_bytes().splitlines(), load_rules_dir(RULES))
    return result.to_json()


def printed(report: dict) -> str:
    out = io.StringIO()
    tables.print_report(report, Console(file=out, width=200, force_terminal=False))
    return out.getvalue()


def many_trials(report: dict, count: int) -> dict:
    """The sample's trial under ``count`` ids, with every alert of each."""
    report = copy.deepcopy(report)
    (trial,) = report["trials"].values()
    alerts = report["alerts"]
    ids = [f"T{number:04d}" for number in range(count)]
    report["trials"] = {trial_id: trial for trial_id in ids}
    report["alerts"] = [{**alert, "id": f"{trial_id}/{alert['id']}"}
                        for trial_id in ids for alert in alerts]
    return report


def test_a_few_trials_print_a_section_each(sample_report) -> None:
    out = printed(sample_report)
    assert out.count("Subjects and primary endpoint") == 1
    assert "ISC.19.29" in out and "related-sae" in out and "Rejected lines (2)" in out
    assert "by trial" not in out and " rows)" not in out  # rich tables, not plain columns


def test_many_trials_print_a_row_each_in_shared_tables(sample_report) -> None:
    report = many_trials(sample_report, tables.MANY + 1)
    out = printed(report)
    (trial,) = sample_report["trials"].values()
    assert out.count("Subjects and primary endpoint") == 1
    assert out.count("Stopping rules") == 1
    for trial_id in report["trials"]:  # a row in each of the two trial tables, one per rule
        rows = [line for line in out.splitlines() if f" {trial_id} " in line]
        assert len(rows) == 2 + len(trial["rules"]), trial_id
    breached = [rule_id for rule_id, rule in trial["rules"].items()
                if rule["state"] == "breached"]
    assert out.count("breached") == len(breached) * len(report["trials"])


def test_a_long_table_prints_as_plain_aligned_columns(sample_report) -> None:
    report = many_trials(sample_report, 40)
    alerts = report["alerts"]
    assert len(alerts) > tables.LONG
    out = printed(report).splitlines()
    start = out.index(f"Alert transitions ({len(alerts)} rows)")
    header, rule, *rows = out[start + 1:start + 3 + len(alerts)]
    assert header.split() == ["alert", "transition", "severity", "event", "recorded", "at",
                              "value"]
    assert set(rule) <= {"-", " "}
    columns = [index for index, char in enumerate(rule) if char == "-" and
               (index == 0 or rule[index - 1] == " ")]  # where each column starts
    for alert, line in zip(alerts, rows, strict=True):
        assert line[:columns[1]].strip() == alert["id"]
        assert line[columns[1]:columns[2]].strip() == alert["transition"]
        assert line[columns[4]:columns[5]].strip() == alert["recorded_at"]
        assert line[columns[5]:].strip() == f"{alert['value']} / {alert['threshold']}"


@pytest.mark.parametrize("count", [1, 40])
def test_values_are_printed_as_text_not_markup(sample_report, count) -> None:
    report = many_trials(sample_report, count)
    report["rejected"] = [{"line": 3, "reason": "[bold]grade[/bold]: 7 is not [red]a grade"}]
    report["alerts"][0]["event_id"] = "evt-[i]1[/i]"
    out = printed(report)
    assert "[bold]grade[/bold]: 7 is not [red]a grade" in out
    assert "evt-[i]1[/i]" in out


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
