"""Alert e-mails through a real SMTP server (aiosmtpd on loopback, started by each test).

The shared `smtp_server` fixture (a `LocalMailbox`) serves the plain cases and the
outage; `RecordingServer` below adds what it does not do: STARTTLS or implicit TLS with
a self-signed certificate, AUTH, and replies chosen per recipient or per message.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import shutil
import ssl
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import jinja2
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from monitor import notify
from monitor.alert_email import message_id, subject_line
from monitor.cli import main
from monitor.embedded import LocalMailbox, free_port
from monitor.engine.alerts import AlertTransition
from monitor.engine.rules import TrialRules
from monitor.notify import (
    FAILED_PERMANENT,
    PERMANENT,
    RETRIED,
    SENT,
    SKIPPED_DUPLICATE,
    TRANSIENT,
    Backoff,
    CombinedLog,
    JsonLinesLog,
    MappingLog,
    MemoryLog,
    Notifier,
    SmtpSender,
    classify,
)
from monitor.replay import replay
from monitor.rules_loader import load_rules_dir
from monitor.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "isc-19-29" / "events.jsonl"
RULES_DIR = ROOT / "rules"
FAST = Backoff(initial=0.01, maximum=0.05)


# ----------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sample() -> tuple[dict[str, TrialRules], list[AlertTransition]]:
    catalog = load_rules_dir(RULES_DIR)
    alerts = replay(SAMPLE.read_bytes().splitlines(), catalog).alerts
    assert len(alerts) >= 5
    return catalog, alerts


def smtp_settings(host: str, port: int, **extra) -> Settings:
    return Settings(smtp_host=host, smtp_port=port, smtp_from="monitor@example.org",
                    smtp_timeout=5, **extra)


def sender_for(server, **extra) -> SmtpSender:  # noqa: ANN001
    return SmtpSender(smtp_settings(server.host, server.port, **extra), backoff=FAST)


def keys_of(messages) -> list[str]:  # noqa: ANN001
    return [m["X-Safety-Monitor-Alert"] for m in messages]


def with_recipients(rules: TrialRules, **by_severity: list[str]) -> TrialRules:
    recipients = rules.recipients.model_copy(update=by_severity)
    return rules.model_copy(update={"recipients": recipients})


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: email.message.EmailMessage
    login: str | None


@dataclass
class RecordingHandler:
    """Accepts mail and records it; ``rcpt_reply`` / ``data_reply`` may answer otherwise
    (return None to accept)."""

    rcpt_reply: Callable[[str], str | None] = lambda address: None
    data_reply: Callable[[email.message.EmailMessage], str | None] = lambda message: None
    received: list[Received] = field(default_factory=list)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001, ANN201, N802
        reply = self.rcpt_reply(address)
        if reply is None:
            envelope.rcpt_tos.append(address)
            return "250 OK"
        return reply

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201, N802
        message = email.message_from_bytes(envelope.original_content,
                                           policy=email.policy.default)
        reply = self.data_reply(message)
        if reply is not None:
            return reply
        login = session.auth_data.login.decode() if session.authenticated else None
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message,
                                      login))
        return "250 Message accepted"


class RecordingServer:
    """aiosmtpd on loopback with a `RecordingHandler`; TLS and AUTH as asked."""

    def __init__(self, handler: RecordingHandler, **smtp_options) -> None:
        self.handler, self.host, self.port = handler, "127.0.0.1", free_port()
        self.controller = Controller(handler, hostname=self.host, port=self.port,
                                     **smtp_options)

    def __enter__(self) -> RecordingServer:
        self.controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.controller.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key), made by the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    config = folder / "openssl.cnf"
    config.write_text("[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n"
                      "[dn]\nCN = localhost\n"
                      "[ext]\nbasicConstraints = critical, CA:TRUE\n"
                      "keyUsage = critical, digitalSignature, keyCertSign\n"
                      "extendedKeyUsage = serverAuth\n"
                      "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
                      "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-config",
                    str(config), "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))
    return context


def password_check(server, session, envelope, mechanism, auth_data) -> AuthResult:  # noqa: ANN001
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"monitor", b"s3cret-for-tests")
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


# ----------------------------------------------------------------------- replay --send-email


def test_replay_send_email_sends_one_message_per_alert_transition(
        smtp_server: LocalMailbox, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MONITOR_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("MONITOR_SMTP_PORT", str(smtp_server.port))
    assert main(["replay", str(SAMPLE), "--rules", str(RULES_DIR), "--format", "json",
                 "--send-email"]) == 0
    alerts = json.loads(capsys.readouterr().out)["alerts"]
    messages = smtp_server.messages()
    catalog = load_rules_dir(RULES_DIR)

    assert len(messages) == len(alerts) > 0
    for alert, message in zip(alerts, messages, strict=True):  # in order, one to one
        assert message["X-Safety-Monitor-Alert"] == alert["key"]
        assert message["Message-ID"] == message_id(alert["id"], alert["sequence"])
        assert message["Subject"].startswith(f"[{alert['severity'].upper()}] "
                                             f"{alert['trial_id']}: {alert['rule_id']} — ")
        wanted = getattr(catalog[alert["trial_id"]].recipients, alert["severity"])
        assert message["X-RcptTo"].split(", ") == list(wanted)
        text = message.get_body(("plain",)).get_content()
        for item in alert["evidence"]:
            assert item["ae_id"] in text and item["term"] in text
        if alert["sequence"] > 1:
            assert message["In-Reply-To"] == message_id(alert["id"], alert["sequence"] - 1)
    assert len({m["Message-ID"] for m in messages}) == len(messages)


def test_replay_without_send_email_sends_nothing(smtp_server: LocalMailbox,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONITOR_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("MONITOR_SMTP_PORT", str(smtp_server.port))
    assert main(["replay", str(SAMPLE), "--rules", str(RULES_DIR), "--format", "json"]) == 0
    assert smtp_server.messages() == []


def test_send_email_without_an_smtp_server_is_one_clear_line(
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("MONITOR_SMTP_HOST", raising=False)
    assert main(["replay", str(SAMPLE), "--rules", str(RULES_DIR), "--send-email"]) == 2
    assert main(["email", "test", "--to", "me@example.org"]) == 2
    err = capsys.readouterr().err
    assert err.count("MONITOR_SMTP_HOST") == 2 and len(err.strip().splitlines()) == 2


def test_replay_with_the_same_email_log_twice_sends_each_transition_once(
        smtp_server: LocalMailbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys) -> None:
    monkeypatch.setenv("MONITOR_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("MONITOR_SMTP_PORT", str(smtp_server.port))
    ledger = tmp_path / "sent.jsonl"
    args = ["replay", str(SAMPLE), "--rules", str(RULES_DIR), "--format", "json",
            "--send-email", "--email-log", str(ledger)]
    assert main(args) == 0
    first = len(smtp_server.messages())
    assert main(args) == 0
    assert len(smtp_server.messages()) == first
    assert f"0 of {first} alert e-mails sent" in capsys.readouterr().err


def test_email_test_sends_a_sample_alert(smtp_server: LocalMailbox,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONITOR_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("MONITOR_SMTP_PORT", str(smtp_server.port))
    assert main(["email", "test", "--to", "me@example.org"]) == 0
    [message] = smtp_server.messages()
    assert message["Subject"].startswith("[TEST] [HALT] EXAMPLE.TRIAL: related-sae")
    assert message["X-RcptTo"] == "me@example.org"
    assert message.get_body(("plain",)).get_content().count("EX-00") >= 2


# ----------------------------------------------------------------------- TLS and AUTH


async def test_starttls_with_a_self_signed_certificate_and_auth(certificate, sample) -> None:
    catalog, alerts = sample
    handler = RecordingHandler()
    with RecordingServer(handler, tls_context=server_tls(certificate), require_starttls=True,
                         authenticator=password_check, auth_required=True) as server:
        sender = sender_for(server, smtp_tls="starttls", smtp_ca_file=certificate[0],
                            smtp_user="monitor", smtp_password="s3cret-for-tests")
        notifier = Notifier(catalog, sender, MemoryLog())
        assert await notifier.notify(alerts[0]) == SENT
    [received] = handler.received
    assert received.login == "monitor"
    assert received.message["X-Safety-Monitor-Alert"] == alerts[0].key


async def test_implicit_tls_verifies_the_server_certificate(certificate, sample) -> None:
    catalog, alerts = sample
    handler = RecordingHandler()
    with RecordingServer(handler, ssl_context=server_tls(certificate)) as server:
        sender = sender_for(server, smtp_tls="tls", smtp_ca_file=certificate[0])
        assert await Notifier(catalog, sender, MemoryLog()).notify(alerts[0]) == SENT
        untrusted = sender_for(server, smtp_tls="tls")  # the system CAs do not know it
        with pytest.raises(aiosmtplib.SMTPException) as failure:
            await untrusted.send_once(notify.render(alerts[0], catalog["ISC.19.29"]),
                                      ["x@example.org"])
        assert classify(failure.value) == TRANSIENT  # a settings problem: alerts wait
    assert len(handler.received) == 1


async def test_a_wrong_password_is_refused_and_holds_alerts_rather_than_losing_them(
        certificate, sample) -> None:
    catalog, alerts = sample
    with RecordingServer(RecordingHandler(), tls_context=server_tls(certificate),
                         require_starttls=True, authenticator=password_check,
                         auth_required=True) as server:
        sender = sender_for(server, smtp_tls="starttls", smtp_ca_file=certificate[0],
                            smtp_user="monitor", smtp_password="wrong")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await sender.send_once(notify.render(alerts[0], catalog["ISC.19.29"]),
                                   ["x@example.org"])
    assert classify(refused.value) == TRANSIENT


# ----------------------------------------------------------------------- outage


async def test_smtp_server_down_mid_run_every_alert_arrives_exactly_once(
        smtp_server: LocalMailbox, sample) -> None:
    catalog, alerts = sample
    outcomes: Counter[str] = Counter()
    notifier = Notifier(catalog, sender_for(smtp_server), MemoryLog(),
                        on_outcome=lambda outcome, alert: outcomes.update([outcome]))
    half = len(alerts) // 2
    for alert in alerts[:half]:
        assert await notifier.notify(alert) == SENT

    smtp_server.stop()
    rest = asyncio.create_task(notifier.notify_all((a, None) for a in alerts[half:]))
    while outcomes[RETRIED] < 3:  # the next alert waits, retrying
        await asyncio.sleep(0.01)
    assert not rest.done() and outcomes[SENT] == half
    await asyncio.to_thread(smtp_server.start)  # the same port
    assert await asyncio.wait_for(rest, 10) == [SENT] * (len(alerts) - half)

    assert keys_of(smtp_server.messages()) == [a.key for a in alerts]  # once each, in order
    assert outcomes[SENT] == len(alerts) and outcomes[FAILED_PERMANENT] == 0


async def test_back_off_grows_exponentially_with_full_jitter_up_to_a_ceiling(sample) -> None:
    catalog, alerts = sample
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 8:
            raise asyncio.CancelledError  # stands for the worker being stopped

    down = SmtpSender(smtp_settings("127.0.0.1", free_port()),
                      backoff=Backoff(initial=1, maximum=10), sleep=fake_sleep,
                      draw=lambda: 0.5)
    ledger = MemoryLog()
    with pytest.raises(asyncio.CancelledError):
        await Notifier(catalog, down, ledger).notify(alerts[0])
    assert waits == [0.5, 1, 2, 4, 5, 5, 5, 5]
    assert not ledger.was_sent(alerts[0].key)  # cancelled: it will be tried again
    assert Backoff(1, 10).delay(3, 0.0) == 0 and Backoff(1, 10).delay(40, 0.999) < 10


# ----------------------------------------------------------------------- permanent failures


async def test_a_rejected_recipient_does_not_block_the_others(sample) -> None:
    catalog, alerts = sample
    rules = with_recipients(catalog["ISC.19.29"],
                            halt=["chair@example.org", "gone@example.org", "member@example.org"],
                            pause=["chair@example.org"], review=["monitor@example.org"])
    handler = RecordingHandler(rcpt_reply=lambda a: "550 5.1.1 no such user"
                               if a == "gone@example.org" else None)
    outcomes: list[tuple[str, str]] = []
    ledger = MemoryLog()
    with RecordingServer(handler) as server:
        notifier = Notifier({"ISC.19.29": rules}, sender_for(server), ledger,
                            on_outcome=lambda o, a: outcomes.append((o, a.severity)))
        results = await notifier.notify_all((a, None) for a in alerts)

    halts = [a for a in alerts if a.severity == "halt"]
    assert halts and results.count(FAILED_PERMANENT) == len(halts)
    assert results.count(SENT) == len(alerts) - len(halts)
    assert sorted({(o, s) for o, s in outcomes}) == sorted(
        {(FAILED_PERMANENT, "halt"), *((SENT, a.severity) for a in alerts
                                       if a.severity != "halt")})
    got = [r for r in handler.received if r.message["X-Safety-Monitor-Severity"] == "halt"]
    assert [r.rcpt_tos for r in got] == [["chair@example.org", "member@example.org"]] * len(halts)
    assert len(handler.received) == len(alerts)
    entry = ledger.info(halts[0].key)
    assert entry["outcome"] == "failed" and "gone@example.org" in entry["rejected"]
    assert entry["delivered"] == ["chair@example.org", "member@example.org"]
    assert [f.key for f in notifier.failures] == [a.key for a in halts]


async def test_a_busy_recipient_is_retried_alone(sample) -> None:
    catalog, alerts = sample
    rules = with_recipients(catalog["ISC.19.29"], review=["a@example.org", "busy@example.org"])
    tries: Counter[str] = Counter()

    def busy_once(address: str) -> str | None:
        tries[address] += 1
        return "451 4.2.1 mailbox busy" if address == "busy@example.org" and \
            tries[address] == 1 else None

    handler = RecordingHandler(rcpt_reply=busy_once)
    review = next(a for a in alerts if a.severity == "review")
    with RecordingServer(handler) as server:
        notifier = Notifier({"ISC.19.29": rules}, sender_for(server), MemoryLog())
        assert await notifier.notify(review) == SENT
    assert [r.rcpt_tos for r in handler.received] == [["a@example.org"], ["busy@example.org"]]


async def test_a_message_refused_for_good_is_recorded_and_the_queue_goes_on(sample) -> None:
    catalog, alerts = sample
    victim = alerts[0]
    handler = RecordingHandler(data_reply=lambda m: "554 5.6.0 content rejected"
                               if m["X-Safety-Monitor-Alert"] == victim.key else None)
    ledger = MemoryLog()
    with RecordingServer(handler) as server:
        results = await Notifier(catalog, sender_for(server), ledger).notify_all(
            (a, None) for a in alerts)
    assert results == [FAILED_PERMANENT] + [SENT] * (len(alerts) - 1)
    assert ledger.info(victim.key)["reason"].startswith("554")
    assert keys_of(r.message for r in handler.received) == [a.key for a in alerts[1:]]


async def test_a_template_error_fails_that_alert_only(smtp_server: LocalMailbox, sample,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    catalog, alerts = sample
    real_render = notify.render

    def broken_for_the_first(alert, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if alert.key == alerts[0].key:
            raise jinja2.UndefinedError("'evidence_rows' is undefined")
        return real_render(alert, *args, **kwargs)

    monkeypatch.setattr(notify, "render", broken_for_the_first)
    notifier = Notifier(catalog, sender_for(smtp_server), MemoryLog())
    results = await notifier.notify_all((a, None) for a in alerts[:3])
    assert results == [FAILED_PERMANENT, SENT, SENT]
    assert "could not be rendered" in notifier.failures[0].reason
    assert keys_of(smtp_server.messages()) == [a.key for a in alerts[1:3]]


async def test_a_trial_without_recipients_for_the_severity_is_a_permanent_failure(
        smtp_server: LocalMailbox, sample) -> None:
    catalog, alerts = sample
    silent = {"ISC.19.29": with_recipients(catalog["ISC.19.29"], review=[])}
    review = next(a for a in alerts if a.severity == "review")
    notifier = Notifier(silent, sender_for(smtp_server), MemoryLog())
    assert await notifier.notify(review) == FAILED_PERMANENT
    assert "names no recipients for severity review" in notifier.failures[0].reason
    assert smtp_server.messages() == []


# ----------------------------------------------------------------------- restart


async def test_a_restarted_notifier_with_the_same_log_sends_no_duplicates(
        smtp_server: LocalMailbox, sample, tmp_path: Path) -> None:
    catalog, alerts = sample
    path = tmp_path / "state" / "notifications.jsonl"
    first = Notifier(catalog, sender_for(smtp_server), JsonLinesLog(path))
    await first.notify_all((a, None) for a in alerts[:3])
    with path.open("ab") as file:
        file.write(b'{"key": "torn-by-a-kil')  # a process killed mid-write

    outcomes: Counter[str] = Counter()
    again = Notifier(catalog, sender_for(smtp_server), JsonLinesLog(path),
                     on_outcome=lambda outcome, alert: outcomes.update([outcome]))
    await again.notify_all((a, None) for a in alerts)  # the whole topic, re-read
    assert outcomes == Counter({SKIPPED_DUPLICATE: 3, SENT: len(alerts) - 3})
    assert keys_of(smtp_server.messages()) == [a.key for a in alerts]
    # the torn line was cut off, so the lines written after it are whole: a third
    # start knows every alert
    assert all(JsonLinesLog(path).was_sent(a.key) for a in alerts)


def test_a_line_that_is_no_entry_is_skipped_with_its_line_number(tmp_path: Path,
                                                                caplog) -> None:
    """An edited or damaged notification log still opens (the worker starts); each line
    that is no entry is named, and only it is forgotten."""
    path = tmp_path / "notifications.jsonl"
    path.write_bytes(b'{"key": "A#1", "outcome": "sent"}\n[1, 2]\n{"outcome": "sent"}\n'
                     b'\n{"key": 7}\nnot json\n{"key": "B#1", "outcome": "sent"}\n')
    with caplog.at_level("WARNING"):
        opened = JsonLinesLog(path)
    assert opened.was_sent("A#1") and opened.was_sent("B#1")
    assert opened.info("A#1") == {"outcome": "sent"}
    skipped = [r.getMessage() for r in caplog.records if "not an entry" in r.getMessage()]
    assert [m.split(": not")[0] for m in skipped] == [f"{path} line {n}" for n in (2, 3, 5, 6)]


async def test_a_combined_log_skips_what_either_log_holds(smtp_server: LocalMailbox, sample,
                                                         tmp_path: Path) -> None:
    catalog, alerts = sample
    table: dict[str, dict] = {}  # stands for the worker's faust table
    local = tmp_path / "notifications.jsonl"
    first = Notifier(catalog, sender_for(smtp_server), CombinedLog(JsonLinesLog(local),
                                                                   MappingLog(table)))
    await first.notify_all((a, None) for a in alerts[:2])
    assert set(table) == {a.key for a in alerts[:2]}

    moved = Notifier(catalog, sender_for(smtp_server),  # another worker: only the table
                     CombinedLog(JsonLinesLog(tmp_path / "other.jsonl"), MappingLog(table)))
    killed = Notifier(catalog, sender_for(smtp_server),  # same worker, table write lost
                      CombinedLog(JsonLinesLog(local), MappingLog({})))
    assert await moved.notify_all((a, None) for a in alerts[:2]) == [SKIPPED_DUPLICATE] * 2
    assert await killed.notify_all((a, None) for a in alerts[:2]) == [SKIPPED_DUPLICATE] * 2
    assert len(smtp_server.messages()) == 2


async def test_an_update_says_what_changed_using_the_log_of_the_last_message(
        smtp_server: LocalMailbox, sample) -> None:
    catalog, alerts = sample
    updated = next(a for a in alerts if a.transition == "updated")
    before = next(a for a in alerts if a.id == updated.id and a.sequence == updated.sequence - 1)
    notifier = Notifier(catalog, sender_for(smtp_server), MemoryLog())
    await notifier.notify_all([(before, None), (updated, None)])
    last = smtp_server.messages()[-1]
    assert last["Subject"] == subject_line(updated)
    text = last.get_body(("plain",)).get_content()
    assert "WHAT CHANGED SINCE THE LAST MESSAGE" in text
    assert all(f"New evidence: subject {key.replace('/', ', ')}" in text
               for key in updated.added)


@pytest.mark.parametrize(("error", "kind"), [
    (ConnectionRefusedError(111, "refused"), TRANSIENT),
    (TimeoutError(), TRANSIENT),
    (aiosmtplib.SMTPServerDisconnected("gone"), TRANSIENT),
    (aiosmtplib.SMTPReadTimeoutError("slow"), TRANSIENT),
    (aiosmtplib.SMTPDataError(451, "try later"), TRANSIENT),
    (aiosmtplib.SMTPDataError(554, "rejected"), PERMANENT),
    (aiosmtplib.SMTPRecipientRefused(550, "no such user", "x@example.org"), PERMANENT),
    (aiosmtplib.SMTPRecipientRefused(452, "mailbox full", "x@example.org"), TRANSIENT),
    (aiosmtplib.SMTPSenderRefused(553, "sender refused", "m@example.org"), TRANSIENT),
    (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), TRANSIENT),
    (ssl.SSLCertVerificationError("self-signed"), TRANSIENT),
    (ValueError("unexpected"), PERMANENT),
    (421, TRANSIENT), (550, PERMANENT),
])
def test_classify(error: BaseException | int, kind: str) -> None:
    assert classify(error) == kind
