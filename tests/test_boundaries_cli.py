"""``safety-monitor rules boundaries``: design mode, a rules file, the observed count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from monitor.boundaries import observed_counts
from monitor.cli import main
from monitor.engine import stats
from monitor.engine.rules import parse_rules
from monitor.engine.trials import Trials
from tests.builders import TRIAL, ae, event, infusion

ROOT = Path(__file__).resolve().parent.parent
ISC_RULES = ROOT / "rules" / "isc-19-29.yaml"
SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"
DESIGN = ["--p0", "0.1", "--p1", "0.3", "--alpha", "0.1", "--looks", "1-20",
          "--shape", "pocock"]
ISC_STOP_AT = [None, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5]
OC_KEYS = {"rate", "cross_probability", "early_stop_probability", "expected_subjects"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def boundaries(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert main(["rules", "boundaries", *args]) == 0
    return capsys.readouterr().out


def as_json(capsys: pytest.CaptureFixture, *args: str) -> dict | list:
    return json.loads(boundaries(capsys, *args, "--format", "json"))


def test_design_json_is_the_stable_interface(capsys) -> None:
    obj = as_json(capsys, *DESIGN)
    assert isinstance(obj, dict)
    assert (obj["rule"], obj["kind"]) == ("design", "toxicity_boundary")
    assert obj["boundary"] == [{"subjects": n, "stop_at": stop}
                               for n, stop in zip(range(1, 21), ISC_STOP_AT, strict=True)]
    characteristics = obj["operating_characteristics"]
    assert set(characteristics) == {"p0", "p1"}
    assert {label: set(oc) for label, oc in characteristics.items()} == {
        "p0": OC_KEYS, "p1": OC_KEYS}
    boundary = stats.toxicity_boundary(0.1, 0.1, range(1, 21), stats.POCOCK)
    for label, rate in (("p0", 0.1), ("p1", 0.3)):
        oc = stats.operating_characteristics(boundary, rate)
        assert characteristics[label] == {
            "rate": rate, "cross_probability": oc.cross_probability,
            "early_stop_probability": oc.early_stop_probability,
            "expected_subjects": oc.expected_subjects}
    assert characteristics["p0"]["cross_probability"] == pytest.approx(0.0906, abs=1e-4)
    assert "observed" not in obj and "trial" not in obj


def test_design_looks_as_a_list_and_shapes_by_name_or_number(capsys) -> None:
    base = ["--p0", "0.1", "--p1", "0.3", "--alpha", "0.1"]
    cohorts = as_json(capsys, *base, "--looks", "5,10,15,20")
    assert [look["subjects"] for look in cohorts["boundary"]] == [5, 10, 15, 20]
    assert [look["stop_at"] for look in cohorts["boundary"]] == list(
        stats.toxicity_boundary(0.1, 0.1, (5, 10, 15, 20)).stop_at)
    default = as_json(capsys, *base, "--looks", "1-20")
    assert [look["stop_at"] for look in default["boundary"]] == ISC_STOP_AT  # pocock
    named = as_json(capsys, *base, "--looks", "1-20", "--shape", "obrien-fleming")
    number = as_json(capsys, *base, "--looks", "1-20", "--shape", "0.5")
    assert named["boundary"] == number["boundary"] != default["boundary"]
    assert named["design"]["shape"] == 0.5
    assert [look["stop_at"] for look in named["boundary"]] == list(
        stats.toxicity_boundary(0.1, 0.1, range(1, 21), stats.OBRIEN_FLEMING).stop_at)
    assert named["boundary"][0]["stop_at"] is None  # null where no count can stop


def test_design_table_reads_like_a_charter(capsys) -> None:
    out = boundaries(capsys, *DESIGN)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in out.splitlines() if line.count("│") == 3}
    assert rows == {"1": "cannot stop", "2-3": "2", "4-8": "3", "9-14": "4", "15-20": "5"}
    assert "design (toxicity_boundary)" in out and "0.091" in out and "0.809" in out


def test_design_png_is_written(capsys, tmp_path, monkeypatch) -> None:
    out = tmp_path / "charter.png"
    assert boundaries(capsys, *DESIGN, "--format", "png", "-o", str(out)) == f"wrote {out}\n"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    monkeypatch.chdir(tmp_path)
    assert boundaries(capsys, *DESIGN, "--format", "png") == "wrote design-boundary.png\n"
    assert (tmp_path / "design-boundary.png").read_bytes()[:8] == PNG_MAGIC


def test_json_can_be_written_to_a_file(capsys, tmp_path) -> None:
    out = tmp_path / "design.json"
    assert boundaries(capsys, *DESIGN, "--format", "json", "-o", str(out)) == f"wrote {out}\n"
    assert json.loads(out.read_text())["rule"] == "design"


def test_isc_rules_file_shows_both_boundary_rules(capsys) -> None:
    objs = as_json(capsys, str(ISC_RULES))
    assert isinstance(objs, list)
    assert [(o["rule"], o["kind"], o["trial"]) for o in objs] == [
        ("related-grade3-boundary", "toxicity_boundary", "ISC.19.29"),
        ("related-grade3-bayesian", "bayesian", "ISC.19.29")]
    tox, bayes = objs
    assert [look["stop_at"] for look in tox["boundary"]] == ISC_STOP_AT
    assert (tox["design"]["p0"], tox["design"]["p1"], tox["design"]["alpha"],
            tox["design"]["shape_name"]) == (0.1, 0.3, 0.1, "pocock")
    rule = parse_rules(ISC_RULES.read_text()).rule("related-grade3-bayesian")
    assert [look["stop_at"] for look in bayes["boundary"]] == list(rule.boundary.stop_at)
    assert set(bayes["operating_characteristics"]) == {"p0", "p1"}
    assert set(bayes["operating_characteristics"]["p1"]) == OC_KEYS


def test_one_rule_of_a_file_is_one_object(capsys) -> None:
    obj = as_json(capsys, str(ISC_RULES), "--rule", "related-grade3-boundary")
    assert isinstance(obj, dict) and obj["rule"] == "related-grade3-boundary"
    table = boundaries(capsys, str(ISC_RULES), "--rule", "related-grade3-bayesian")
    assert "ISC.19.29: related-grade3-bayesian (bayesian)" in table
    assert "related-grade3-boundary" not in table


def test_a_rules_folder_and_the_default_folder(capsys, tmp_path, monkeypatch) -> None:
    shutil.copy(ISC_RULES, tmp_path)
    from_folder = as_json(capsys, str(tmp_path))
    assert [o["rule"] for o in from_folder] == ["related-grade3-boundary",
                                                "related-grade3-bayesian"]
    monkeypatch.setenv("MONITOR_RULES_DIR", str(tmp_path))
    assert as_json(capsys) == from_folder


def test_the_observed_count_of_the_sample_log(capsys) -> None:
    obj = as_json(capsys, str(ISC_RULES), "--rule", "related-grade3-boundary",
                  "--log", str(SAMPLE))
    observed = obj["observed"]
    assert [point["subjects"] for point in observed] == list(range(1, 21))
    counts = [point["count"] for point in observed]
    assert counts == sorted(counts)  # cumulative
    assert main(["replay", str(SAMPLE), "--rules", str(ROOT / "rules"), "--format",
                 "json"]) == 0
    engine = json.loads(capsys.readouterr().out)["trials"]["ISC.19.29"]["rules"]
    assert counts[-1] == engine["related-grade3-boundary"]["value"] == 4
    assert obj["observed_as_of"] == "2023-08-26T12:45:00+07:00"
    then = as_json(capsys, str(ISC_RULES), "--rule", "related-grade3-boundary",
                   "--log", str(SAMPLE), "--as-of", "2022-11-01")
    assert then["observed"][-1] == {"subjects": 20, "count": 5}  # before the correction
    assert then["observed_as_of"] == "2022-11-01T00:00:00+00:00"
    table = boundaries(capsys, str(ISC_RULES), "--rule", "related-grade3-boundary",
                       "--log", str(SAMPLE), "--as-of", "2022-11-01")
    table = " ".join(table.split())
    assert ("5 of 20 subjects with the event (stop at 5 there); CROSSED at 20 subjects (5 "
            "with the event, stop at 5), so the rule is breached") in table
    now = " ".join(boundaries(capsys, str(ISC_RULES), "--rule", "related-grade3-boundary",
                              "--log", str(SAMPLE)).split())
    assert "4 of 20 subjects with the event (stop at 5 there); not crossed at any look" in now


def test_the_observed_count_drawn_on_the_chart(capsys, tmp_path) -> None:
    out = tmp_path / "isc.png"
    boundaries(capsys, str(ISC_RULES), "--log", str(SAMPLE), "--format", "png", "-o", str(out))
    with_log = out.read_bytes()
    boundaries(capsys, str(ISC_RULES), "--format", "png", "-o", str(out))
    assert with_log[:8] == PNG_MAGIC and out.read_bytes()[:8] == PNG_MAGIC
    assert with_log != out.read_bytes()


def test_observed_path_takes_subjects_in_order_of_first_infusion() -> None:
    rules = parse_rules(ISC_RULES.read_text())
    trials = Trials({TRIAL: rules})
    messages = [infusion("S-B", "2021-01-05"), infusion("S-A", "2021-01-10"),
                infusion("S-C", "2021-01-01"), infusion("S-D", "2021-01-05"),
                ae("S-A", "A1", "2021-02-01", grade=3, relatedness="possible"),
                ae("S-D", "D1", "2021-02-01", grade=4),
                ae("S-C", "C1", "2021-02-01", grade=2)]
    for message in messages:
        trials.apply(event(message))
    # first infusions: S-C 01-01, S-B 01-05, S-D 01-05, S-A 01-10: looks after each day
    path = observed_counts(trials.trials[TRIAL], "related-grade3-boundary")
    assert path == ((1, 0), (3, 1), (4, 2))


@pytest.mark.parametrize(("args", "message"), [
    (["--p0", "x", "--p1", "0.3", "--alpha", "0.1", "--looks", "1-20"],
     "--p0: 'x' is not a number"),
    (["--p0", "0.1", "--alpha", "0.1"],
     "design mode needs --p0, --p1, --alpha and --looks; missing --p1, --looks"),
    (["--p0", "0.1", "--p1", "0.3", "--alpha", "0.1", "--looks", "20-1"],
     "looks '20-1': the range '20-1' runs backwards"),
    (["--p0", "0.1", "--p1", "0.3", "--alpha", "0.1", "--looks", "1-20", "--shape", "flat"],
     "shape 'flat' is not pocock, obrien-fleming or a number in [0, 0.5]"),
    (["--p0", "0.3", "--p1", "0.1", "--alpha", "0.1", "--looks", "1-20"],
     "p1 (the unacceptable rate) must be above p0"),
    (["--p0", "0.1", "--p1", "0.3", "--alpha", "1", "--looks", "1-20"],
     "alpha must be a number strictly between 0 and 1"),
    ([str(ISC_RULES), "--p0", "0.1"], "design mode (--p0 --p1 --alpha --looks) takes no rules"),
    ([str(ISC_RULES), "--rule", "related-sae"],
     "rule 'related-sae' is a count rule; boundaries exist for toxicity_boundary and bayesian"),
    ([str(ISC_RULES), "--rule", "nope"],
     "no rule 'nope'; the boundary rules are: related-grade3-boundary, related-grade3-bayesian"),
    (["no/such/rules.yaml"], "no/such/rules.yaml: no such rules file or folder"),
    ([str(ISC_RULES), "--as-of", "2021-01-01"], "--as-of goes with --log"),
    ([str(ISC_RULES), "--log", str(SAMPLE), "--as-of", "June"], "--as-of: 'June' is not"),
    ([str(ISC_RULES), "--log", str(SAMPLE), "--as-of", ""], "--as-of is empty"),
    ([*DESIGN, "--format", "png", "-o", "no/such/folder/x.png"],
     "no/such/folder/x.png: cannot write"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, message) -> None:
    assert main(["rules", "boundaries", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], err


def test_a_file_without_boundary_rules_or_with_errors_exits_2(capsys, tmp_path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("trial_id: T.1\nrules:\n  - {id: r, kind: count, severity: review, "
                     "threshold: 1}\n")
    assert main(["rules", "boundaries", str(plain)]) == 2
    assert "no toxicity_boundary or bayesian rule to show" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("trial_id: T.1\nrules:\n  - {id: r, kind: toxicity_boundary, "
                      "severity: pause, p0: 0.1, p1: 0.3, alpha: 0.1}\n")
    assert main(["rules", "boundaries", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken}: rule 'r': give 'planned_subjects'" in err and "Traceback" not in err


def test_a_log_without_the_trial_draws_no_observed_count(capsys, tmp_path) -> None:
    log = tmp_path / "other.jsonl"
    log.write_text(json.dumps(infusion("S1", "2021-01-01", trial="OTHER.1")) + "\n")
    obj = as_json(capsys, str(ISC_RULES), "--rule", "related-grade3-boundary",
                  "--log", str(log))
    assert "observed" not in obj
    assert main(["rules", "boundaries", str(ISC_RULES), "--log", str(log)]) == 0
    err = capsys.readouterr().err
    assert err == f"warning: {log} holds no event of ISC.19.29: nothing observed\n"


def test_the_observed_text_names_the_first_look_that_crossed(capsys, tmp_path) -> None:
    """2 of the first 2 cross (stop at 2); 2 of 5 now do not: the rule stays breached,
    as replay says, and the text says where it crossed."""
    messages = [infusion(f"S{n}", f"2021-01-0{n}") for n in range(1, 6)]
    messages += [ae(s, "A", "2021-02-01", grade=3, relatedness="possible") for s in ("S1", "S2")]
    log = tmp_path / "crossed.jsonl"
    log.write_text("".join(json.dumps(m) + "\n" for m in messages))
    text = " ".join(boundaries(capsys, str(ISC_RULES), "--rule", "related-grade3-boundary",
                               "--log", str(log)).split())
    assert ("2 of 5 subjects with the event (stop at 3 there); CROSSED at 2 subjects (2 with "
            "the event, stop at 2), so the rule is breached") in text
    assert main(["replay", str(log), "--rules", str(ROOT / "rules"), "--format", "json"]) == 0
    engine = json.loads(capsys.readouterr().out)["trials"][TRIAL]["rules"]
    assert engine["related-grade3-boundary"]["state"] == "breached"
