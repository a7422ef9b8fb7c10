"""``safety-monitor replay`` as users and their scripts call it (SPEC section 7)."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"
RULES = ROOT / "rules"


def replay_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(["replay", *args, "--rules", str(RULES), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def final_rule_states(report: dict) -> dict:
    return {trial: {rule_id: (r["state"], r["value"], r["threshold"], r["evidence"])
                    for rule_id, r in body["rules"].items()}
            for trial, body in report["trials"].items()}


def per_trial_counts(report: dict) -> dict:
    return {trial: (body["subjects"], body["primary_endpoint"], body["adverse_events"],
                    body["events"]) for trial, body in report["trials"].items()}


def test_sample_log_gives_the_documented_json_keys(capsys) -> None:
    report = replay_json(capsys, str(SAMPLE))
    assert {"as_of", "events", "trials", "alerts", "rejected"} <= set(report)
    assert {"read", "accepted", "duplicates", "rejected"} <= set(report["events"])
    isc = report["trials"]["ISC.19.29"]
    assert set(isc["subjects"]) >= {"infused", "in_window", "window_completed", "withdrawn"}
    assert set(isc["primary_endpoint"]) == {"ae", "sae", "subjects_with_ae",
                                            "subjects_with_sae"}
    assert set(isc["adverse_events"]) >= {"pre_treatment", "post_window", "retracted",
                                          "imputed_onset", "by_grade"}
    assert set(isc["adverse_events"]["by_grade"]) == {"1", "2", "3", "4", "5"}
    for rule in isc["rules"].values():
        assert {"kind", "severity", "state", "value", "threshold", "evidence"} <= set(rule)
    for alert in report["alerts"]:
        assert {"id", "trial_id", "rule_id", "severity", "transition", "event_id",
                "recorded_at", "value", "threshold"} <= set(alert)
        assert alert["transition"] in ("raised", "updated", "resolved")
    assert isc["subjects"]["infused"] == 20
    assert report["events"]["read"] == (report["events"]["accepted"] +
                                        report["events"]["duplicates"] +
                                        report["events"]["rejected"])


def test_sample_log_breaches_and_resolves(capsys) -> None:
    alerts = replay_json(capsys, str(SAMPLE))["alerts"]
    transitions = {(a["rule_id"], a["transition"]) for a in alerts}
    assert {("related-sae", "raised"), ("related-sae", "resolved"),
            ("early-grade3", "raised"), ("early-grade3", "resolved")} <= transitions
    raised = next(a for a in alerts if a["rule_id"] == "related-sae")
    assert raised["id"] == "ISC.19.29/related-sae/1" and raised["severity"] == "halt"


def test_shuffled_log_gives_the_same_counts_and_final_rule_states(capsys, tmp_path) -> None:
    lines = SAMPLE.read_bytes().splitlines(keepends=True)
    expected = replay_json(capsys, str(SAMPLE))
    # seeds 7 and 12 changed dosing-while-halted while it was judged on the halt alerts
    # open when an infusion arrived, rather than on what was recorded before it
    for seed in (1, 7, 12):
        shuffled = list(lines)
        random.Random(seed).shuffle(shuffled)
        path = tmp_path / f"shuffled-{seed}.jsonl"
        path.write_bytes(b"".join(shuffled))
        got = replay_json(capsys, str(path))
        assert per_trial_counts(got) == per_trial_counts(expected)
        assert final_rule_states(got) == final_rule_states(expected)
        assert got["as_of"] == expected["as_of"]


def test_gzip_and_stdin_read_the_same(capsys, tmp_path) -> None:
    plain = replay_json(capsys, str(SAMPLE))
    packed = tmp_path / "events.jsonl.gz"
    packed.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    assert replay_json(capsys, str(packed)) == plain
    run = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", "-", "--rules",
                          str(RULES), "--format", "json"], input=SAMPLE.read_bytes(),
                         capture_output=True, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == plain


def test_broken_lines_are_listed_and_nothing_valid_is_lost(capsys, tmp_path) -> None:
    good = [line for line in SAMPLE.read_bytes().splitlines()
            if line.startswith(b"{") and line.endswith(b"}") and b'"grade":7' not in line]
    broken = [b"garbage", b'{"type": "adverse_event"}', b'{"type":"infusion","trial_id":1}',
              b"\xff\xfe not utf-8", b"[]", b'{"type":"infusion","x":' + b"[" * 5000 + b"}"]
    mixed = []
    for index, line in enumerate(good):
        mixed.append(line)
        if index % 150 == 0 and broken:
            mixed.append(broken.pop())
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"\n".join(mixed) + b"\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join(good) + b"\n")
    got, want = replay_json(capsys, str(path)), replay_json(capsys, str(clean))
    assert got["events"]["rejected"] == 6 and len(got["rejected"]) == 6
    for item in got["rejected"]:
        assert mixed[item["line"] - 1].decode("utf-8", "replace") == item["raw"]
        assert item["reason"] and "\n" not in item["reason"]
    assert per_trial_counts(got) == per_trial_counts(want)
    assert final_rule_states(got) == final_rule_states(want)


def test_as_of_applies_only_what_was_known_then(capsys) -> None:
    full = replay_json(capsys, str(SAMPLE))
    early = replay_json(capsys, str(SAMPLE), "--as-of", "2021-06-01")
    assert early["as_of"] == "2021-06-01T00:00:00+00:00"
    assert early["events"]["after_as_of"] > 0
    assert early["events"]["read"] == full["events"]["read"]
    isc = early["trials"]["ISC.19.29"]
    assert isc["subjects"]["infused"] < 20 and isc["subjects"]["in_window"] > 0
    assert isc["subjects"]["window_completed"] == 0
    assert all(a["recorded_at"] <= "2021-06-01T07:00:00+07:00" for a in early["alerts"])
    assert isc["rules"]["related-sae"]["state"] == "ok"


def test_table_form_shows_the_trial(capsys) -> None:
    assert main(["replay", str(SAMPLE), "--rules", str(RULES)]) == 0
    out = capsys.readouterr().out
    assert "ISC.19.29" in out and "related-sae" in out and "Rejected lines (2)" in out


@pytest.mark.parametrize("args, status, message", [
    (["replay", "no/such/log.jsonl"], 1, "cannot open the log"),
    (["replay", str(SAMPLE), "--as-of", "yesterday"], 2, "--as-of: 'yesterday' is not"),
    (["replay", str(SAMPLE), "--as-of", "2021-06-01T00:00:00"], 2, "has no UTC offset"),
    (["replay", str(SAMPLE), "--as-of", ""], 2, "--as-of is empty; give a date"),
    (["replay", str(SAMPLE), "--as-of", " "], 2, "--as-of is empty; give a date"),
    (["replay", str(SAMPLE), "--rules", "no/such/rules"], 2, "no such rules folder"),
])
def test_exit_status_and_one_line_errors(capsys, args, status, message) -> None:
    assert main(args) == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_invalid_setting_is_one_line_naming_its_variable(capsys, monkeypatch) -> None:
    monkeypatch.setenv("MONITOR_WEB_PORT", "notaport")
    monkeypatch.setenv("MONITOR_SMTP_TLS", "bogus")
    assert main(["replay", str(SAMPLE), "--rules", str(RULES)]) == 2
    err = capsys.readouterr().err
    assert "MONITOR_WEB_PORT: Input should be a valid integer" in err
    assert "(got 'notaport')" in err and "MONITOR_SMTP_TLS" in err
    assert "pydantic" not in err and "Traceback" not in err


def test_a_metrics_port_that_cannot_be_served_is_a_usage_error(capsys) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["replay", str(SAMPLE), "--rules", str(RULES),
                     "--metrics-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--metrics-port {port}: cannot serve metrics at 127.0.0.1:{port}" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as stop:  # argparse: exit status 2
        main(["replay", str(SAMPLE), "--metrics-port", "70000"])
    assert stop.value.code == 2
    assert "'70000' is not a port number (0-65535)" in capsys.readouterr().err


def test_a_file_the_host_refuses_is_one_line_and_exit_1(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MONITOR_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("MONITOR_SMTP_PORT", "1")
    assert main(["replay", str(SAMPLE), "--rules", str(RULES), "--send-email",
                 "--email-log", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"Is a directory: '{tmp_path}'" in err and "Traceback" not in err


def test_a_corrupt_gzip_log_exits_1(capsys, tmp_path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(SAMPLE.read_bytes())[:3000])
    assert main(["replay", str(path), "--rules", str(RULES)]) == 1
    assert "cannot be read to the end" in capsys.readouterr().err


def test_a_bad_rules_folder_exits_2(capsys) -> None:
    assert main(["replay", str(SAMPLE), "--rules", str(ROOT / "tests" / "rules_bad")]) == 2
    assert "rules error" in capsys.readouterr().err


def test_replay_and_its_report_run_without_cyclic_collection_and_restore_it() -> None:
    """Neither makes reference cycles; a collection would scan the whole replay's state
    (about half a large report's time). The caller's setting comes back afterwards."""
    import gc

    from monitor.replay import replay
    from monitor.rules_loader import load_rules_dir

    during = []
    result = replay(SAMPLE.read_bytes().splitlines(), load_rules_dir(RULES),
                    on_alert=lambda alert: during.append(gc.isenabled()))
    assert during and not any(during) and gc.isenabled()
    build = result.trials.report
    result.trials.report = lambda as_of: (during.append(gc.isenabled()), build(as_of))[1]
    report = result.to_json()
    assert during[-1] is False and gc.isenabled()
    assert report["trials"]["ISC.19.29"]["primary_endpoint"]["ae"] > 0
    gc.disable()
    try:
        result.to_json()
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_replaying_once_freezes_the_replay_state_instead_of_scanning_it() -> None:
    """`safety-monitor replay` (and the benchmark) leave the replay's objects to
    reference counting: frozen, no collection walks them afterwards."""
    import gc

    from monitor.replay import replay, replaying_once
    from monitor.rules_loader import load_rules_dir

    catalog, lines = load_rules_dir(RULES), SAMPLE.read_bytes().splitlines()
    try:
        with replaying_once():
            assert not gc.isenabled()
            result = replay(lines, catalog)
        assert gc.isenabled()
        assert gc.get_freeze_count() > 10_000  # the replay's objects, and what came before
        assert result.to_json()["events"]["accepted"] > 0
    finally:
        gc.unfreeze()


def test_a_demo_of_a_log_with_no_valid_event_says_so_at_once(capsys, tmp_path) -> None:
    """Before any broker or worker starts (it used to wait three minutes, then time out)."""
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b"garbage\n{}\n"))
    assert main(["demo", "--rules", str(RULES), "--log", str(tmp_path / "bad.jsonl.gz"),
                 "--exit-when-done"]) == 1
    assert "bad.jsonl.gz: no valid event in 2 lines" in capsys.readouterr().err


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it(capsys, tmp_path) -> None:
    """Some Windows tools start a UTF-8 file with one; the first event is not lost."""
    plain = replay_json(capsys, str(SAMPLE))
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + SAMPLE.read_bytes())
    assert replay_json(capsys, str(marked))["events"] == plain["events"]
    marked.write_bytes(gzip.compress(marked.read_bytes()))
    assert replay_json(capsys, str(marked), "--jobs", "2")["events"] == plain["events"]


def test_options_that_need_another_say_so_and_a_basic_date_is_named(capsys) -> None:
    assert main(["replay", str(SAMPLE), "--rules", str(RULES), "--format", "json",
                 "--email-log", "x.jsonl", "--metrics-hold", "5"]) == 0
    err = capsys.readouterr().err
    assert "warning: --email-log has no effect without --send-email" in err
    assert "warning: --metrics-hold has no effect without --metrics-port" in err
    assert main(["replay", str(SAMPLE), "--rules", str(RULES), "--as-of", "20220830"]) == 2
    assert "'20220830': write the date as YYYY-MM-DD (2022-08-30)" in capsys.readouterr().err


def test_a_log_without_a_valid_event_says_so(capsys, tmp_path) -> None:
    log = tmp_path / "nothing.jsonl"
    log.write_text('{"type": "adverse_event"}\n\n')
    assert main(["replay", str(log), "--rules", str(RULES), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["events"]["rejected"] == 1
    assert (f"warning: {log} holds no valid event (1 read, 1 rejected): nothing to report, "
            "and as_of shows 1970-01-01 for want of a recorded_at") in captured.err
    assert main(["replay", str(log), "--rules", str(RULES), "--as-of", "2022-01-01"]) == 0
    assert "warning" not in capsys.readouterr().err  # the date is the user's own


def test_a_partial_onset_reported_before_the_infusion_is_pre_treatment(capsys,
                                                                      tmp_path) -> None:
    """`2021-03` reported on 03-05 cannot be placed on an infusion day after it: the AE
    is pre-treatment, not a day-0 SAE (it would raise the halt of related-sae)."""
    lines = []
    for subject, infused_on in (("S1", "2021-03-10"), ("S2", "2021-03-12")):
        lines.append({"type": "adverse_event", "trial_id": "ISC.19.29", "subject_id": subject,
                      "event_id": f"a{subject}", "recorded_at": "2021-03-05T09:00:00+00:00",
                      "ae_id": f"AE-{subject}", "version": 1, "term": "Headache",
                      "onset": "2021-03", "grade": 3, "serious": True})
        lines.append({"type": "infusion", "trial_id": "ISC.19.29", "subject_id": subject,
                      "event_id": f"i{subject}", "recorded_at": f"{infused_on}T12:00:00+00:00",
                      "infused_at": infused_on, "dose_number": 1})
    log = tmp_path / "screening.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = replay_json(capsys, str(log))
    trial = report["trials"]["ISC.19.29"]
    assert trial["primary_endpoint"]["sae"] == 0
    assert trial["adverse_events"]["pre_treatment"] == 2
    assert report["alerts"] == []


def test_an_infusion_dated_in_the_year_9999_is_read_like_any_other(capsys, tmp_path) -> None:
    placeholder = {"type": "infusion", "trial_id": "ISC.19.29", "subject_id": "S1",
                   "event_id": "i1", "recorded_at": "2021-03-10T12:00:00+00:00",
                   "infused_at": "9999-06-01", "dose_number": 1}
    log = tmp_path / "placeholder.jsonl"
    log.write_text(json.dumps(placeholder) + "\n")
    report = replay_json(capsys, str(log), "--as-of", "2021-04-01")
    assert report["events"]["accepted"] == 1
    subjects = report["trials"]["ISC.19.29"]["subjects"]
    assert (subjects["infused"], subjects["in_window"]) == (1, 1)  # its window: to 9999-12-31
