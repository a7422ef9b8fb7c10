"""Alert e-mails to the DSMB: clear, never lost, never sent twice (SPEC section 5).

The pipeline follows alertmanager's notify stages::

    AlertTransition ─> dedup: NotificationLog.was_sent(alert.key)?  ── yes ─> skipped_duplicate
                    ─> render (monitor.alert_email, pure)             ── error ─> failed_permanent
                    ─> SmtpSender.deliver: classify every failure;
                       transient (refused, timeout, 4xx): back off with full jitter, retry
                       permanent (5xx for an address, 5xx for the message): give up on it
                    ─> NotificationLog.mark_sent(alert.key, info)     ─> sent | failed_permanent

`Notifier.notify` runs those for one alert and returns its outcome; the caller awaits
alerts one at a time, so while the SMTP server is down delivery holds, in order, and
no alert is lost; a permanent failure is logged, counted, kept in `Notifier.failures`
and recorded in the log (so a restart does not mail the recipients who had it), and
the next alert goes on.

Failures that are the server's or the settings' (refused AUTH, a refused sender, a TLS
handshake) are not any alert's fault and would fail every alert alike: they are
classed transient, so alerts wait (logged as errors) until an operator fixes the
settings, instead of being marked failed one after another.

Exceptions::

    NotifyError (Exception)
    ├── SmtpNotConfigured (also ValueError)  e-mail asked for, MONITOR_SMTP_HOST unset
    └── DeliveryFailed                        permanent: .reason, .delivered, .rejected
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

import aiosmtplib
import orjson

from .alert_email import message_id, recipients_for, render, trial_summary
from .engine.alerts import AlertTransition
from .engine.kinds import EvidenceItem
from .engine.rules import TrialRules
from .settings import Settings

__all__ = [
    "Backoff", "CombinedLog", "Delivery", "DeliveryFailed", "JsonLinesLog", "MappingLog",
    "MemoryLog", "NotificationLog", "Notifier", "NotifyError", "SmtpNotConfigured",
    "SmtpSender", "alert_from_payload", "alert_payload", "classify", "render",
    "trial_summary",
]

log = logging.getLogger(__name__)

TRANSIENT, PERMANENT = "transient", "permanent"
SENT, RETRIED = "sent", "retried"
FAILED_PERMANENT, SKIPPED_DUPLICATE = "failed_permanent", "skipped_duplicate"
OUTCOMES = (SENT, RETRIED, FAILED_PERMANENT, SKIPPED_DUPLICATE)


class NotifyError(Exception):
    """Alert e-mail could not be provided."""


class SmtpNotConfigured(NotifyError, ValueError):
    """E-mail was asked for but no SMTP server is set."""


class DeliveryFailed(NotifyError):
    """A permanent failure: retrying would not help. Recipients in ``delivered`` got the
    message before it; ``rejected`` maps each address that did not to the reason."""

    def __init__(self, reason: str, delivered: Iterable[str] = (),
                 rejected: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delivered = tuple(delivered)
        self.rejected = dict(rejected or {})


# ----------------------------------------------------------------------- notification log


class NotificationLog(Protocol):
    """What was sent, by transition key (``trial/rule/episode#sequence``)."""

    def was_sent(self, key: str) -> bool: ...

    def mark_sent(self, key: str, info: dict) -> None: ...

    def info(self, key: str) -> Mapping | None: ...


class MappingLog:
    """A notification log over any mutable mapping: a dict, or in the worker a faust
    ``Table`` (a MutableMapping whose writes go to its changelog topic)."""

    def __init__(self, mapping: MutableMapping[str, Any]) -> None:
        self.mapping = mapping

    def was_sent(self, key: str) -> bool:
        return key in self.mapping

    def mark_sent(self, key: str, info: dict) -> None:
        self.mapping[key] = info

    def info(self, key: str) -> Mapping | None:
        return self.mapping.get(key)


class MemoryLog(MappingLog):
    """In memory: dedups within one process (replay without ``--email-log``, tests)."""

    def __init__(self) -> None:
        super().__init__({})


class JsonLinesLog(MappingLog):
    """A JSON-lines file, one ``{"key": ..., **info}`` per line, appended and fsynced
    before `mark_sent` returns, so a process killed afterwards does not send again. A
    torn last line (killed mid-write) is cut off when the file is opened: the next line
    appended would otherwise continue it, and be unreadable too."""

    def __init__(self, path: Path) -> None:
        drop_torn_tail(Path(path))
        super().__init__(dict(read_log_lines(Path(path))))
        self.path = Path(path)

    def mark_sent(self, key: str, info: dict) -> None:
        line = orjson.dumps({"key": key, **info}) + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        super().mark_sent(key, info)


class CombinedLog:
    """Several logs as one: sent if any has it; marked in all. In the worker, a local
    `JsonLinesLog` (fsynced: survives SIGKILL at once) with a `MappingLog` over the faust
    table (its changelog follows the partition to another worker on a rebalance)."""

    def __init__(self, *logs: NotificationLog) -> None:
        self.logs = logs

    def was_sent(self, key: str) -> bool:
        return any(log.was_sent(key) for log in self.logs)

    def mark_sent(self, key: str, info: dict) -> None:
        for log in self.logs:
            log.mark_sent(key, info)

    def info(self, key: str) -> Mapping | None:
        return next((i for log in self.logs if (i := log.info(key)) is not None), None)


def drop_torn_tail(path: Path) -> None:
    """Cut off a last line with no newline (a write cut short) from the log file."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        log.warning("%s: cutting off a torn last line of the notification log", path)
        with path.open("r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)
            os.fsync(file.fileno())


def read_log_lines(path: Path) -> Iterable[tuple[str, dict]]:
    if not path.exists():
        return
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            # a torn or edited line: skipping it may send its alert's e-mail again, which
            # beats a worker that cannot start
            log.warning("%s line %d: not an entry of the notification log (a JSON object "
                        "with a \"key\"); skipped: its alert may be e-mailed again",
                        path, number)
            continue
        yield entry.pop("key"), entry


# ----------------------------------------------------------------------- sending


def classify(error: BaseException | int) -> str:
    """TRANSIENT (retry later) or PERMANENT (give up) for an exception or a reply code.

    4xx replies, refused or dropped connections, timeouts and TLS errors are transient;
    a 5xx reply to RCPT (that address) or to DATA (that message) is permanent; any other
    SMTP error is the server's or the settings' and is transient (see the module doc).
    Anything unexpected is permanent, so that it cannot hold the queue forever."""
    if isinstance(error, int):
        return TRANSIENT if error < 500 else PERMANENT
    if isinstance(error, aiosmtplib.SMTPResponse):
        return classify(error.code)
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        codes = [refusal.code for refusal in error.recipients]
        return TRANSIENT if any(code < 500 for code in codes) else PERMANENT
    if isinstance(error, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError):
        return classify(error.code)
    if isinstance(error, aiosmtplib.SMTPException | OSError | TimeoutError):
        return TRANSIENT
    return PERMANENT


def describe(error: BaseException | aiosmtplib.SMTPResponse) -> str:
    """One line for a log or a person: ``550 no such user``, ``connection refused``."""
    if isinstance(error, aiosmtplib.SMTPResponse | aiosmtplib.SMTPResponseException):
        return f"{error.code} {' '.join(str(error.message).split())}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, aiosmtplib.SMTPConnectError) and error.__cause__ is not None:
        return f"cannot connect: {describe(error.__cause__)}"
    if isinstance(error, aiosmtplib.SMTPTimeoutError):
        return f"timed out: {error}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with full jitter: before retry ``n`` wait a uniform draw from
    [0, min(maximum, initial * factor ** (n - 1))] seconds."""

    initial: float = 1.0
    maximum: float = 300.0
    factor: float = 2.0

    def delay(self, attempt: int, draw: float) -> float:
        return draw * min(self.maximum, self.initial * self.factor ** min(attempt - 1, 64))


@dataclass(frozen=True)
class Delivery:
    """Who got the message, who refused it for good, and how many retries it took."""

    delivered: tuple[str, ...]
    rejected: dict[str, str] = field(default_factory=dict)
    retries: int = 0


OnRetry = Callable[[str, int, float], None]  # (what failed, retry number, delay in s)


class SmtpSender:
    """Sends one message at a time through the configured server, one connection each
    (alerts are rare), and retries what `classify` calls transient until delivered.

    ``sleep`` and ``draw`` (a uniform [0, 1) source) are there for tests."""

    def __init__(self, settings: Settings, *, backoff: Backoff | None = None,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 draw: Callable[[], float] = random.random) -> None:
        if not settings.smtp_host:
            raise SmtpNotConfigured(
                "no SMTP server: set MONITOR_SMTP_HOST (and MONITOR_SMTP_PORT, "
                "MONITOR_SMTP_TLS, MONITOR_SMTP_USER, MONITOR_SMTP_PASSWORD, "
                "MONITOR_SMTP_FROM as needed)")
        self.settings = settings
        self.backoff = backoff or Backoff(settings.smtp_retry_initial, settings.smtp_retry_max)
        self._sleep, self._draw = sleep, draw

    @property
    def address(self) -> str:
        return f"{self.settings.smtp_host}:{self.settings.smtp_port}"

    @property
    def from_address(self) -> str:
        return self.settings.smtp_from

    def connection_options(self) -> dict[str, Any]:
        """aiosmtplib's keywords for host, port, TLS mode, credentials and timeout."""
        s = self.settings
        options: dict[str, Any] = {
            "hostname": s.smtp_host, "port": s.smtp_port, "timeout": s.smtp_timeout,
            "use_tls": s.smtp_tls == "tls", "start_tls": s.smtp_tls == "starttls",
            "username": s.smtp_user,
            "password": s.smtp_password.get_secret_value() if s.smtp_password else None,
        }
        if s.smtp_ca_file is not None and s.smtp_tls != "none":
            options["tls_context"] = ssl.create_default_context(cafile=str(s.smtp_ca_file))
        return options

    async def send_once(self, message: EmailMessage,
                        recipients: list[str]) -> dict[str, aiosmtplib.SMTPResponse]:
        """One attempt. Returns the recipients the server refused, with its replies
        (empty when all got it); raises for anything else that went wrong."""
        try:
            refused, _reply = await aiosmtplib.send(
                message, sender=self.from_address, recipients=recipients,
                **self.connection_options())
        except aiosmtplib.SMTPRecipientsRefused as exc:  # every recipient refused
            return {r.recipient: aiosmtplib.SMTPResponse(r.code, r.message)
                    for r in exc.recipients}
        return refused

    async def deliver(self, message: EmailMessage, recipients: Iterable[str] | None = None,
                      on_retry: OnRetry | None = None) -> Delivery:
        """Send until every recipient has the message or refused it for good.

        Retries only transient failures, and only to the recipients that still need the
        message; attempts are unbounded (cancel the task to stop). Raises
        `DeliveryFailed` for a permanent failure of the message as a whole."""
        pending = list(recipients if recipients is not None else addresses(message))
        delivered: list[str] = []
        rejected: dict[str, str] = {}
        retries = 0
        while pending:
            failure = await self._attempt(message, pending, delivered, rejected)
            if failure is None:
                break
            retries += 1
            delay = self.backoff.delay(retries, self._draw())
            log.warning("SMTP %s: %s; retry %d in %.1f s", self.address, failure, retries,
                        delay)
            if on_retry is not None:
                on_retry(failure, retries, delay)
            await self._sleep(delay)
        return Delivery(tuple(delivered), rejected, retries)

    async def _attempt(self, message: EmailMessage, pending: list[str], delivered: list[str],
                       rejected: dict[str, str]) -> str | None:
        """One attempt; updates the three lists; returns what failed transiently."""
        try:
            refused = await self.send_once(message, pending)
        except Exception as exc:  # noqa: BLE001 - every failure is classified
            if classify(exc) == PERMANENT:
                raise DeliveryFailed(describe(exc), delivered,
                                     {**rejected, **dict.fromkeys(pending, describe(exc))}
                                     ) from exc
            return describe(exc)
        delivered += [address for address in pending if address not in refused]
        for address, reply in refused.items():
            if classify(reply.code) == PERMANENT:
                rejected[address] = describe(reply)
        pending[:] = [a for a in pending if a in refused and a not in rejected]
        return "; ".join(f"{a}: {describe(refused[a])}" for a in pending) or None


def addresses(message: EmailMessage) -> list[str]:
    return [addr for _name, addr in email.utils.getaddresses(message.get_all("To", []))
            if addr]


# ----------------------------------------------------------------------- notifier


@dataclass(frozen=True)
class Failure:
    """A permanent failure, kept for people to see (the worker's /status, logs)."""

    key: str
    reason: str
    rejected: dict[str, str]


OnOutcome = Callable[[str, AlertTransition], None]


class Notifier:
    """One alert transition in, at most one e-mail per recipient out.

    ``catalog``: trial id -> its rules (recipients, rule description and action).
    ``on_outcome(outcome, alert)`` is called with ``sent``, ``failed_permanent`` or
    ``skipped_duplicate`` once per alert, and with ``retried`` before each retry; the
    metrics module counts them. An alert that some recipient will not get (refused for
    good) is ``failed_permanent`` even if the others got it."""

    def __init__(self, catalog: Mapping[str, TrialRules], sender: SmtpSender,
                 log: NotificationLog, *, on_outcome: OnOutcome | None = None,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 failures_kept: int = 100) -> None:
        self.catalog, self.sender, self.log = catalog, sender, log
        self.on_outcome = on_outcome or (lambda outcome, alert: None)
        self.now = now
        self.failures: deque[Failure] = deque(maxlen=failures_kept)
        self._in_flight: set[str] = set()

    async def notify(self, alert: AlertTransition, trial_summary: Mapping | None = None) -> str:
        """Send the alert's e-mail unless the log has it; returns the outcome."""
        if alert.key in self._in_flight or self.log.was_sent(alert.key):
            return self._outcome(SKIPPED_DUPLICATE, alert)
        self._in_flight.add(alert.key)
        try:
            return await self._notify(alert, trial_summary)
        finally:
            self._in_flight.discard(alert.key)

    async def notify_all(self, alerts: Iterable[tuple[AlertTransition, Mapping | None]]
                         ) -> list[str]:
        """Each (alert, trial summary) in order, one after the other."""
        return [await self.notify(alert, summary) for alert, summary in alerts]

    async def _notify(self, alert: AlertTransition, summary: Mapping | None) -> str:
        try:
            message, recipients = self.compose(alert, summary)
            delivery = await self.sender.deliver(
                message, recipients, on_retry=lambda *_: self.on_outcome(RETRIED, alert))
        except DeliveryFailed as exc:
            delivery = Delivery(exc.delivered, exc.rejected)
            return self._finish(alert, delivery, exc.reason)
        reason = "refused by the server" if delivery.rejected else None
        return self._finish(alert, delivery, reason)

    def compose(self, alert: AlertTransition, summary: Mapping | None
                ) -> tuple[EmailMessage, tuple[str, ...]]:
        """The message and its recipients; `DeliveryFailed` when there can be none."""
        rules = self.catalog.get(alert.trial_id)
        if rules is None:
            raise DeliveryFailed(f"no rules file for trial {alert.trial_id}: no recipients")
        recipients = recipients_for(rules, alert.severity)
        if not recipients:
            raise DeliveryFailed(f"the rules file of {alert.trial_id} names no recipients "
                                 f"for severity {alert.severity}")
        previous = self.log.info(f"{alert.id}#{alert.sequence - 1}")
        try:
            message = render(alert, rules, summary, previous,
                             sender=self.sender.from_address)
        except Exception as exc:  # noqa: BLE001 - a template error must not stop the queue
            raise DeliveryFailed(f"the e-mail could not be rendered: {describe(exc)}") from exc
        return message, recipients

    def _finish(self, alert: AlertTransition, delivery: Delivery, reason: str | None) -> str:
        outcome = FAILED_PERMANENT if reason else SENT
        self.log.mark_sent(alert.key, self._record(alert, delivery, outcome, reason))
        if reason:
            self.failures.append(Failure(alert.key, reason, delivery.rejected))
            log.error("alert %s: e-mail failed for good (%s); delivered to %s; refused: %s",
                      alert.key, reason, ", ".join(delivery.delivered) or "nobody",
                      delivery.rejected)
        return self._outcome(outcome, alert)

    def _record(self, alert: AlertTransition, delivery: Delivery, outcome: str,
                reason: str | None) -> dict:
        """What the log keeps: enough for the next message's "what changed" and for an
        auditor; no evidence beyond ids."""
        return {"outcome": "sent" if outcome == SENT else "failed", "reason": reason,
                "message_id": message_id(alert.id, alert.sequence),
                "transition": alert.transition, "value": alert.value,
                "threshold": alert.threshold, "recorded_at": alert.recorded_at.isoformat(),
                "delivered": list(delivery.delivered), "rejected": delivery.rejected,
                "retries": delivery.retries, "at": self.now().isoformat()}

    def _outcome(self, outcome: str, alert: AlertTransition) -> str:
        self.on_outcome(outcome, alert)
        return outcome


# ----------------------------------------------------------------------- alert topic


def alert_payload(alert: AlertTransition, trial_summary: Mapping | None = None) -> dict:
    """The JSON value for the alerts topic: the alert and, when given, the trial's
    counts at the moment it was decided (the e-mail shows them)."""
    out = alert.to_json()
    if trial_summary is not None:
        out["trial_summary"] = dict(trial_summary)
    return out


def alert_from_payload(payload: Mapping) -> tuple[AlertTransition, dict | None]:
    """Back from `alert_payload` (or replay's alert JSON): the alert and the summary."""
    fields = {name: payload[name] for name in AlertTransition.__struct_fields__
              if name in payload}
    fields["recorded_at"] = dt.datetime.fromisoformat(payload["recorded_at"])
    fields["evidence"] = tuple(_evidence(item) for item in payload.get("evidence", ()))
    fields["added"] = tuple(payload.get("added", ()))
    fields["removed"] = tuple(payload.get("removed", ()))
    return AlertTransition(**fields), payload.get("trial_summary")


def _evidence(item: Mapping) -> EvidenceItem:
    onset = item.get("onset")
    return EvidenceItem(
        item["subject_id"], item["ae_id"], item.get("term", ""), item.get("grade"),
        item.get("serious"), item.get("relatedness"), item.get("onset_day"),
        dt.date.fromisoformat(onset) if onset else None, item.get("group"))
