"""The e-mail parts of the command line: ``replay --send-email`` and ``email test``.

`cli` registers them with one line each; everything else is here. The SMTP server
comes from ``MONITOR_SMTP_*``; when it is unset, both say so in one line (exit 2).
Exit status 3: some alert e-mail could not be delivered to every recipient.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import email.utils
import re
import sys
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path

from rich.console import Console

from .alert_email import MESSAGE_ID_DOMAIN, render, trial_summary
from .engine.alerts import RAISED, AlertTransition
from .engine.kinds import EvidenceItem
from .engine.report import trial_report
from .engine.rules import TrialRules
from .engine.trials import Trials
from .notify import (
    FAILED_PERMANENT,
    SENT,
    JsonLinesLog,
    MemoryLog,
    Notifier,
    SmtpSender,
    describe,
)
from .settings import Settings

EXIT_OK, EXIT_USAGE, EXIT_EMAIL_FAILED = 0, 2, 3
ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")  # as a rules file's recipients


# ----------------------------------------------------------------------- replay --send-email


def add_send_email_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--send-email", action="store_true",
                        help="e-mail each alert transition to the trial's recipients through "
                        "MONITOR_SMTP_HOST (replay sends no e-mail without it)")
    parser.add_argument("--email-log", metavar="FILE",
                        help="with --send-email: a JSON-lines notification log; transitions "
                        "it already holds are not sent again (default: none kept)")


class ReplayOutbox:
    """Collects each alert of a replay with the trial's counts at that moment, then
    sends them in order through a `Notifier`."""

    def __init__(self, settings: Settings, catalog: Mapping[str, TrialRules],
                 email_log: Path | None) -> None:
        self.sender = SmtpSender(settings)  # raises SmtpNotConfigured before any work
        self.catalog = catalog
        self.email_log = email_log
        self.trials = Trials(catalog)
        self.queue: list[tuple[AlertTransition, dict]] = []

    def add(self, alert: AlertTransition) -> None:
        trial = self.trials.trial(alert.trial_id)
        report = trial_report(trial, alert.recorded_at)
        self.queue.append((alert, trial_summary(report, alert.recorded_at)))

    def send(self) -> int:
        """Send what was collected; progress and failures go to standard error."""
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        log = JsonLinesLog(self.email_log) if self.email_log else MemoryLog()
        notifier = Notifier(self.catalog, self.sender, log,
                            on_outcome=lambda outcome, alert: _report(err, outcome, alert))
        outcomes = asyncio.run(notifier.notify_all(self.queue))
        for failure in notifier.failures:
            err.print(f"[red]e-mail failed:[/] {failure.key}: {failure.reason} "
                      + " ".join(f"{a}: {why}" for a, why in failure.rejected.items()))
        err.print(f"{outcomes.count(SENT)} of {len(outcomes)} alert e-mails sent via "
                  f"{self.sender.address}; {outcomes.count(FAILED_PERMANENT)} failed, "
                  f"{len(outcomes) - outcomes.count(SENT) - outcomes.count(FAILED_PERMANENT)} "
                  "already sent")
        return EXIT_EMAIL_FAILED if FAILED_PERMANENT in outcomes else EXIT_OK


def _report(err: Console, outcome: str, alert: AlertTransition) -> None:
    if outcome == "retried":
        return  # the sender logs each retry with its reason and delay
    err.print(f"  {outcome:<17} {alert.key}")


def replay_outbox(args: argparse.Namespace,
                  catalog: Mapping[str, TrialRules]) -> ReplayOutbox | None:
    """An outbox when ``--send-email`` was given, else None."""
    if not getattr(args, "send_email", False):
        if getattr(args, "email_log", None):
            print("warning: --email-log has no effect without --send-email", file=sys.stderr)
        return None
    email_log = getattr(args, "email_log", None)
    return ReplayOutbox(Settings(), catalog, Path(email_log) if email_log else None)


# ----------------------------------------------------------------------- email test


def add_email_command(sub: argparse._SubParsersAction) -> None:
    email_parser = sub.add_parser("email", help="alert e-mail tools")
    esub = email_parser.add_subparsers(title="email commands", metavar="COMMAND")
    test = esub.add_parser("test", help="send a sample alert through the configured server",
                           description="Send one sample alert e-mail through MONITOR_SMTP_HOST "
                           "(one attempt, no retry), to check the SMTP settings. Exit status: "
                           "0 sent to every recipient, 2 no SMTP server set, 3 not sent (or "
                           "refused for some recipient).")
    test.add_argument("--to", required=True, action="append", metavar="ADDRESS",
                      help="recipient (repeat for more)")
    test.set_defaults(run=run_email_test)
    email_parser.set_defaults(run=lambda _args: (email_parser.print_help(), EXIT_USAGE)[1])


def run_email_test(args: argparse.Namespace) -> int:
    for address in args.to:
        if not ADDRESS.match(address):
            raise ValueError(f"--to: {address!r} is not an e-mail address")
    sender = SmtpSender(Settings())
    message = sample_message(args.to, sender.from_address,
                             dt.datetime.now(dt.UTC).replace(microsecond=0))
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        refused = asyncio.run(sender.send_once(message, list(args.to)))
    except Exception as exc:  # noqa: BLE001 - one clear line for any failure
        err.print(f"[red]error:[/] {sender.address}: {describe(exc)}")
        return EXIT_EMAIL_FAILED
    for address, reply in refused.items():
        err.print(f"[red]refused:[/] {address}: {describe(reply)}")
    sent = [a for a in args.to if a not in refused]
    if sent:
        Console(highlight=False).print(f"sent a sample alert via {sender.address} to "
                                       f"{', '.join(sent)}: {message['Subject']}")
    return EXIT_EMAIL_FAILED if refused else EXIT_OK


def sample_message(to: list[str], sender: str, now: dt.datetime) -> EmailMessage:
    """A made-up alert of a made-up trial, marked as a test, with a fresh Message-ID."""
    rules = TrialRules.model_validate({
        "trial_id": "EXAMPLE.TRIAL", "title": "sample alert from `safety-monitor email test`",
        "recipients": {"halt": list(to)},
        "rules": [{"id": "related-sae", "kind": "count", "severity": "halt", "threshold": 2,
                   "match": {"serious": True, "related": True},
                   "description": "Two or more subjects with a related SAE (a test: no rule "
                                  "was breached).",
                   "action": "Nothing: this message only checks the e-mail settings."}]})
    evidence = (
        EvidenceItem("EX-001", "EX-001-AE-001", "example term", 3, True, "possible", 12, None),
        EvidenceItem("EX-002", "EX-002-AE-001", "example term", 3, True, None, 40, None))
    alert = AlertTransition(
        id="EXAMPLE.TRIAL/related-sae/1", trial_id="EXAMPLE.TRIAL", rule_id="related-sae",
        kind="count", severity="halt", episode=1, sequence=1, transition=RAISED,
        event_id="example-event", recorded_at=now, value=2, threshold=2, evidence=evidence,
        added=tuple(item.key for item in evidence), detail={"count": "subjects"})
    message = render(alert, rules, None, None, sender=sender)
    subject = message["Subject"]
    del message["Subject"], message["Message-ID"]
    message["Subject"] = f"[TEST] {subject}"
    message["Message-ID"] = email.utils.make_msgid("email-test", domain=MESSAGE_ID_DOMAIN)
    return message


__all__ = ["ReplayOutbox", "add_email_command", "add_send_email_options",
           "replay_outbox", "run_email_test", "sample_message"]
