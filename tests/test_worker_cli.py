"""``safety-monitor worker``: a mistake in its settings or its environment is one line
and an exit status before faust starts, not a traceback (SPEC section 8)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from monitor.cli import main
from monitor.settings import Settings, broker_servers, settings_problems

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
    ("MONITOR_APP_ID", "", "MONITOR_APP_ID: String should have at least 1 character"),
    ("MONITOR_SMTP_FROM", "Safety <a@b.org>", "MONITOR_SMTP_FROM: 'Safety <a@b.org>' is not an"),
    ("MONITOR_SMTP_FROM", "a@b.org\r\nBcc: x@y.org", "is not an e-mail address"),
    ("MONITOR_SMTP_CA_FILE", "no/such.pem", "'no/such.pem' is not a readable PEM bundle of CA"),
    ("MONITOR_SMTP_CA_FILE", __file__, "is not a readable PEM bundle of CA certificates"),
])
def test_a_bad_setting_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, env, value,
                                              message) -> None:
    monkeypatch.setenv("MONITOR_SMTP_TLS", "starttls")  # the CA file is read only with TLS
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


def test_a_broker_url_is_read_in_any_case_and_without_surrounding_blanks() -> None:
    assert Settings(broker=" KAFKA://h:9092 ").broker == "kafka://h:9092"
    assert Settings(broker="  ").broker is None


def test_a_ca_file_is_checked_only_when_tls_reads_it() -> None:
    assert Settings(smtp_ca_file="no/such.pem").smtp_ca_file == Path("no/such.pem")
    with pytest.raises(ValidationError, match="not a readable PEM bundle"):
        Settings(smtp_ca_file="no/such.pem", smtp_tls="tls")
    with pytest.raises(ValidationError) as both:  # a wrong smtp_tls: both errors at once
        Settings(smtp_ca_file="no/such.pem", smtp_tls="bogus")
    assert {e["loc"][0] for e in both.value.errors()} == {"smtp_tls", "smtp_ca_file"}


@pytest.mark.parametrize("url", [
    "kafka://h:9092", "kafka://h", "kafka://a:1;b:2", "kafka://a:1,kafka://b:2",
    "kafka://kafka:9092/", "kafka://h:9092?x=1", "kafka://[::1]:9092", "kafka://user@h:9092",
    "kafka://Kafka.Example.org:29092",
])
def test_brokers_are_read_as_faust_reads_them(url) -> None:
    from faust.utils.urls import urllist

    Settings(broker=url)  # valid
    assert broker_servers(url) == [(u.host.lower(), u.port or 9092)
                                   for u in urllist(url, default_scheme="kafka")]


def test_a_secret_is_not_shown_in_a_settings_error() -> None:
    with pytest.raises(ValidationError) as invalid:
        Settings(smtp_password=271828, smtp_port="x")  # only code can give a non-string
    lines = settings_problems(invalid.value)
    assert any(line.startswith("MONITOR_SMTP_PASSWORD: ") for line in lines)
    assert any("(got 'x')" in line for line in lines)
    assert not any("271828" in line for line in lines)


def test_an_ipv6_or_empty_web_host_is_checked_as_the_server_binds_it(tmp_path) -> None:
    from monitor.runner import check_environment

    settings = Settings(web_host="::1", web_port=free_port(), state_dir=tmp_path)
    check_environment(settings)  # no broker configured: the embedded one starts next
    check_environment(Settings(web_host="", web_port=free_port(), state_dir=tmp_path))
    with socket.create_server(("::1", settings.web_port), family=socket.AF_INET6), \
            pytest.raises(ValueError, match=r"cannot listen on \[::1\]:\d+ .*in use"):
        check_environment(settings)


def test_a_log_level_faust_does_not_know_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["worker", "--rules", RULES, "--loglevel", "bogus"])
    assert stop.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
