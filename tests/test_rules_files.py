"""Rules files: every file under rules/ is valid, and every failure mode has a small bad
file under tests/rules_bad/ with the message it gets (DESIGN habit 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from monitor.cli import main
from monitor.engine.rules import RulesError, parse_rules
from monitor.engine.window import WindowLength
from monitor.rules_loader import load_rules_dir

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "rules_bad"

EXPECTED = {
    "unknown-field.yaml": "rule 'related-sae': match.relted: unknown field",
    "bad-threshold.yaml": "rule 'related-sae': threshold: must be >= 1 (got 0)",
    "unknown-kind.yaml": "rule 'weird': kind: unknown kind 'vibes'",
    "bad-severity.yaml": "rule 'r1': severity: Input should be 'halt', 'pause' or 'review'",
    "duplicate-id.yaml": "rules: rule id 'r1' is used twice",
    "window-both.yaml": "window: give 'months' or 'days', not both",
    "bad-yaml.yaml": "not valid YAML",
    "bad-recipient.yaml": "recipients.halt.0: 'not-an-address' is not valid here",
    "missing-kind.yaml": "rule 'r1': kind: missing 'kind'",
    "cluster-missing.yaml": "rule 'c1': within_days: missing (required)",
    "grade-range.yaml": "rule 'g': match.grade_min: must be <= 5 (got 6)",
    "not-a-mapping.yaml": "expected a mapping with trial_id",
}


def test_every_shipped_rules_file_is_valid() -> None:
    catalog = load_rules_dir(ROOT / "rules")
    assert "ISC.19.29" in catalog
    isc = catalog["ISC.19.29"]
    assert isc.planned_subjects == 20 and isc.window.months == 12
    ids = {rule.id for rule in isc.rules}
    assert {"related-death", "related-sae", "early-grade3", "soc-cluster",
            "dosing-while-halted"} <= ids


@pytest.mark.parametrize("window", ["{anchor: first_infusion}", "{}", "{months: null}"])
def test_a_window_without_a_length_is_12_calendar_months(window: str) -> None:
    rules = parse_rules(f"trial_id: T.1\nwindow: {window}\n")
    assert rules.window.length == WindowLength(months=12)
    assert parse_rules("trial_id: T.1\nwindow: {days: 365}\n").window.length == \
        WindowLength(months=None, days=365)


def test_every_bad_file_has_a_test() -> None:
    assert {p.name for p in BAD.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_message_names_file_rule_and_field(name: str) -> None:
    path = BAD / name
    with pytest.raises(RulesError) as caught:
        parse_rules(path.read_text(), source=str(path))
    problems = caught.value.problems
    assert any(EXPECTED[name] in p for p in problems), problems
    assert all(p.startswith(str(path)) for p in problems), problems


def test_loader_reports_every_problem_of_every_file(tmp_path: Path) -> None:
    for name in ("bad-threshold.yaml", "unknown-kind.yaml"):
        shutil.copy(BAD / name, tmp_path / name)
    with pytest.raises(RulesError) as caught:
        load_rules_dir(tmp_path)
    assert len(caught.value.problems) == 2


def test_loader_rejects_two_files_for_one_trial(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yml"):
        (tmp_path / name).write_text("trial_id: T.1\n")
    with pytest.raises(RulesError, match="already defined in"):
        load_rules_dir(tmp_path)


def test_rules_check_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["rules", "check", str(ROOT / "rules")]) == 0
    out = capsys.readouterr().out
    assert "ISC.19.29" in out and "warning" not in out
    (tmp_path / "t.yaml").write_text(
        "trial_id: T.1\nrecipients: {review: [dsmb@example.org]}\nrules:\n"
        "  - {id: any-death, kind: count, severity: halt, threshold: 1, match: {fatal: true}}\n"
        "  - {id: many, kind: count, severity: review, threshold: 9}\n")
    assert main(["rules", "check", str(tmp_path)]) == 0  # a warning: replay needs none
    out = capsys.readouterr().out
    assert "warning: T.1: no recipients.halt, so the alerts of any-death cannot be e-mailed" \
        in out and "recipients.review" not in out
    (tmp_path / "t.yaml").unlink()
    shutil.copy(BAD / "unknown-field.yaml", tmp_path)
    assert main(["rules", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown-field.yaml: rule 'related-sae': match.relted: unknown field" in err
    assert "Traceback" not in err
    assert main(["rules", "check", str(tmp_path / "missing")]) == 2
    assert "no such rules folder" in capsys.readouterr().err
    assert main(["rules", "check", str(ROOT / "rules" / "isc-19-29.yaml")]) == 2
    assert "isc-19-29.yaml: is a file; give the folder that holds" in capsys.readouterr().err


def test_a_duplicate_id_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    text = (BAD / "bad-severity.yaml").read_text() + (
        "  - {id: r1, kind: count, severity: review, threshold: 1}\n"
        "  - {id: r1, kind: count, severity: review, threshold: 1}\n")
    with pytest.raises(RulesError) as caught:
        parse_rules(text, source="both.yaml")
    problems = caught.value.problems
    assert any("rule 'r1': severity: Input should be" in p for p in problems), problems
    assert "both.yaml: rules: rule id 'r1' is used twice; ids must be unique" in problems
    assert len([p for p in problems if "used twice" in p]) == 1, problems
