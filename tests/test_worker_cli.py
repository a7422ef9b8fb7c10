"""``safety-monitor worker``: a mistake in its settings or its environment is one line
and an exit status before faust starts, not a traceback (SPEC section 8)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from monitor.cli import main

RULES = str(Path(__file__).resolve().parent.parent / "rules")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(capsys: pytest.CaptureFixture, tmp_path: Path, *args: str) -> tuple[int, str]:
    status = main(["worker", "--rules", RULES, "--state-dir", str(tmp_path / "state"),
                   "--web-port", str(free_port()), *args])
    return status, capsys.readouterr().err


@pytest.mark.parametrize(("env", "value", "message"), [
    ("MONITOR_STORE", "bogus://", "MONITOR_STORE: 'bogus://' is not a table store"),
    ("MONITOR_BROKER", "kafka://", "MONITOR_BROKER: 'kafka://' names no broker as host:port"),
    ("MONITOR_BROKER", "kafka://host:port", "names no broker as host:port"),
    ("MONITOR_WEB_PORT", "0", "MONITOR_WEB_PORT: Input should be greater than or equal to 1"),
    ("MONITOR_SMTP_FROM", "Safety <a@b.org>", "MONITOR_SMTP_FROM: 'Safety <a@b.org>' is not an"),
    ("MONITOR_SMTP_FROM", "a@b.org\r\nBcc: x@y.org", "is not an e-mail address"),
    ("MONITOR_SMTP_CA_FILE", "no/such.pem", "'no/such.pem' is not a readable PEM bundle of CA"),
    ("MONITOR_SMTP_CA_FILE", __file__, "is not a readable PEM bundle of CA certificates"),
])
def test_a_bad_setting_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, env, value,
                                              message) -> None:
    monkeypatch.setenv(env, value)
    status = main(["worker", "--rules", RULES, "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_a_state_dir_that_cannot_be_made_is_one_line(capsys, tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    status = main(["worker", "--rules", RULES, "--state-dir", str(tmp_path / "afile" / "s"),
                   "--web-port", str(free_port())])
    err = capsys.readouterr().err
    assert status == 2 and "MONITOR_STATE_DIR" in err and "cannot create the folder" in err


def test_a_web_port_in_use_is_one_line(capsys, tmp_path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status = main(["worker", "--rules", RULES, "--state-dir", str(tmp_path / "state"),
                       "--web-port", str(port), "--broker", "kafka://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert status == 2 and f"MONITOR_WEB_PORT {port}: cannot listen on 127.0.0.1:{port}" in err


def test_a_broker_that_does_not_answer_is_one_line_and_exit_1(capsys, tmp_path) -> None:
    dead = free_port()  # nothing listens there now
    status, err = worker(capsys, tmp_path, "--broker", f"kafka://127.0.0.1:{dead}")
    assert status == 1 and "no MONITOR_SMTP_HOST: alerts go to the alerts topic" in err
    assert f"MONITOR_BROKER: no broker answers (127.0.0.1:{dead}: Connection refused)" in err
    assert "Traceback" not in err
