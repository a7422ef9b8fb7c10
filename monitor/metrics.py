"""Prometheus metrics (SPEC section 6): one bundle created against a registry passed in.

Names start with ``safety_``; counters end in ``_total``. Labels carry trial, rule,
severity, grade, event type, placement, state, reason and outcome, each a small closed
set except trial and rule (bounded by the trials and their rules files); never a subject
id, an AE id, an event id or a reason's free text.

Two kinds of metrics, fed two ways so that per-event work stays O(1):

* *What happened* (counters, histograms): the worker calls `Metrics.observe` per
  message (a valid event or a dead letter), `observe_alerts` per step's alert
  transitions, `observe_latency` per message of a written batch and `observe_email`
  per e-mail outcome.
  Each is a dict lookup and an increment per message.
* *What the trials look like now* (gauges: subjects by state, in-window AEs and SAEs,
  rule value, threshold and breached state): computed at scrape time from the engine's
  own reports (`trial_report`, the ``trials`` part of the replay JSON and of
  ``/status``) through a callable given to `Metrics.set_trials`. A scrape costs one
  report per trial (about 0.5 ms for a 20-subject trial); an event costs nothing.
  The gauges therefore always agree with ``/status`` and replay.

Wiring in the worker (`monitor.stream.Pipeline` calls ``observer(outcome, parsed)``)::

    metrics = Metrics(new_registry())         # process, platform and GC collectors too
    metrics.watch(catalog)                    # zero series for every known trial and rule
    metrics.set_trials(lambda: pipeline.status(dt.datetime.now(dt.UTC)))
    build_app(settings, catalog, metrics=metrics)   # Pipeline(observer=metrics)
    ...                                       # per message, in Pipeline.handle:
    metrics(outcome, parsed)                  # = metrics.observe: counts, lag
    metrics.observe_alerts(changes.alerts)    # the transitions the step decided
    ...                                       # per message, once its batch is written:
    metrics.observe_latency(now - message.time_in)  # time_in: fetched (ArrivalMonitor)
    ...                                       # GET /metrics:
    body, content_type = metrics.exposition(request.headers.get("Accept"))
    return web.bytes(body, headers={"Content-Type": content_type})

(aiohttp refuses a ``content_type=`` argument that carries a charset, hence the header;
``content_type=content_type.split(";")[0]`` works too, as plain ``text/plain``.)
``replay --metrics-port`` uses `ReplayExporter`, which records a finished replay's counts
and serves them with `prometheus_client.start_http_server`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .engine.alerts import RAISED, RESOLVED, UPDATED, AlertTransition
from .engine.events import EVENT_TYPES, Event, Rejection, parse_event
from .engine.rules import TrialRules
from .engine.state import ACCEPTED, DUPLICATE, Changes

if TYPE_CHECKING:
    from .replay import ReplayResult

log = logging.getLogger(__name__)

REJECTED = "rejected"
UNKNOWN = "unknown"
# started at zero for every trial; the worker also reports "redelivered" (a message read
# again at the same partition and offset after a crash or rebalance)
EVENT_OUTCOMES = (ACCEPTED, DUPLICATE, REJECTED)
TRANSITIONS = (RAISED, UPDATED, RESOLVED)
EMAIL_OUTCOMES = ("sent", "retried", "failed_permanent", "skipped_duplicate")
SUBJECT_STATES = ("infused", "in_window", "window_completed", "withdrawn", "died")
AE_PLACEMENTS = ("in_window", "pre_treatment", "post_window", "awaiting_infusion", "retracted")
GRADES = ("1", "2", "3", "4", "5")

# seconds: a message is handled in well under a millisecond, a slow one in seconds
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# seconds from recorded_at to processing: a live feed is seconds behind, a site's batch
# upload days; 7 and 15 days are the expedited reporting clocks
_DAY = 86400.0
LAG_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, _DAY, 3 * _DAY,
               7 * _DAY, 15 * _DAY, 30 * _DAY, 90 * _DAY, 365 * _DAY)

ReportFn = Callable[[], Mapping[str, Mapping]]


# --- dead-letter reasons ------------------------------------------------------------

DEAD_LETTER_REASONS = ("not_json", "not_an_object", "unknown_type", "missing_field",
                       "bad_value", "bad_date", "out_of_bounds", "other")

_REASON_PATTERNS = (  # first match wins; see tests/test_metrics.py for each message
    ("not_json", re.compile(r"^(empty message|not JSON|not UTF-8|invalid UTF-8)", re.I)),
    ("not_an_object", re.compile(r"^not a JSON object")),
    ("missing_field", re.compile(r"^type: missing|^[\w.]+: missing \(required")),
    ("unknown_type", re.compile(r"^type: ")),
    ("out_of_bounds", re.compile(r"is after recorded_at|counts from 1")),
    ("bad_date", re.compile(r"ISO 8601 date|calendar date|gap inside the date|UTC offset")),
    ("bad_value", re.compile(r"^[a-z_]+\.[a-z_]+: ")),
)


def dead_letter_reason(reason: str) -> str:
    """The bounded class of a rejection's one-line reason: one of `DEAD_LETTER_REASONS`.

    The reason text names values from the message (a term, a date), so it never becomes
    a label itself; the dead-letter topic keeps the text.
    """
    for label, pattern in _REASON_PATTERNS:
        if pattern.search(reason):
            return label
    return "other"


# --- the bundle ---------------------------------------------------------------------

class Metrics:
    """Every metric of the monitor, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "safety_events", "Messages processed, by trial, event type and outcome "
            "(accepted, duplicate, rejected, redelivered); trial and type are 'unknown' when "
            "a rejected message does not name a known one", ("trial", "type", "outcome"),
            registry=registry)
        self.dead_letters = Counter(
            "safety_dead_letters", "Messages sent to the dead-letter topic (replay: "
            "rejected lines), by class of reason", ("reason",), registry=registry)
        self.alerts = Counter(
            "safety_alerts", "Alert transitions (raised, updated, resolved) by trial, "
            "rule and severity", ("trial", "rule", "severity", "transition"),
            registry=registry)
        self.emails = Counter(
            "safety_emails", "Alert e-mails by outcome (sent, retried, failed_permanent, "
            "skipped_duplicate)", ("outcome",), registry=registry)
        self.latency = Histogram(
            "safety_processing_latency_seconds", "Seconds from receiving a message to "
            "having applied it (or dead-lettered it)", buckets=LATENCY_BUCKETS,
            registry=registry)
        self.lag = Histogram(
            "safety_event_lag_seconds", "Seconds from an event's recorded_at to its "
            "processing, by event type", ("type",), buckets=LAG_BUCKETS, registry=registry)
        self.trial_state = TrialStateCollector()
        registry.register(self.trial_state)
        self._event_children: dict[tuple[str, str, str], Counter] = {}
        self._lag_children = {t: self.lag.labels(t) for t in EVENT_TYPES}
        self._known_trials: set[str] = set()
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        for outcome in EMAIL_OUTCOMES:
            self.emails.labels(outcome)

    # -- what the worker and replay call ---------------------------------------------

    def watch(self, catalog: Mapping[str, TrialRules]) -> None:
        """Start every series of the trials and rules in ``catalog`` at zero, so that a
        first event or alert shows as an increase (and rejected messages naming these
        trials keep their trial label)."""
        for trial_id, rules in catalog.items():
            self._see_trial(trial_id)
            for rule in rules.rules:
                for transition in TRANSITIONS:
                    self.alerts.labels(trial_id, rule.id, rule.severity, transition)

    def observe_event(self, trial: str, event_type: str, outcome: str,
                      latency_s: float | None = None, lag_s: float | None = None) -> None:
        """One message: its trial, event type, outcome (accepted, duplicate, rejected),
        and optionally the seconds it took and the seconds since its recorded_at."""
        child = self._event_children.get((trial, event_type, outcome))
        if child is None:
            child = self._event_child(trial, event_type, outcome)
        child.inc()
        if latency_s is not None:
            self.latency.observe(latency_s)
        if lag_s is not None:
            lag = self._lag_children.get(event_type)
            if lag is not None:
                lag.observe(lag_s if lag_s > 0 else 0.0)

    def observe(self, outcome: str, parsed: Event | Rejection, *,
                latency_s: float | None = None, now: dt.datetime | None = None) -> None:
        """One message as the worker's pipeline saw it: ``outcome`` is 'rejected' with a
        `Rejection`, else the step's outcome with the `Event`. The lag is measured
        against ``now`` (default: the wall clock)."""
        if type(parsed) is Rejection:
            self.observe_rejection(parsed.reason, trial=parsed.trial_id,
                                   event_type=parsed.type, latency_s=latency_s)
            return
        now = now if now is not None else dt.datetime.now(dt.UTC)
        self.observe_event(parsed.trial_id, _TAGS[type(parsed)], outcome, latency_s,
                           (now - parsed.recorded_at).total_seconds())

    __call__ = observe  # the pipeline's ``observer(outcome, parsed)``

    def observe_applied(self, event: Event, changes: Changes, *,
                        latency_s: float | None = None,
                        now: dt.datetime | None = None) -> None:
        """A valid event the engine stepped, and the alert transitions it caused."""
        self.observe(changes.outcome, event, latency_s=latency_s, now=now)
        self.observe_alerts(changes.alerts)

    def observe_rejection(self, reason: str, *, trial: str | None = None,
                          event_type: str | None = None,
                          latency_s: float | None = None) -> None:
        """A message that went to the dead letters, with the `Rejection`'s fields. A
        trial the bundle has not seen accepted is labelled 'unknown': a malformed
        message must not create series."""
        self.dead_letters.labels(dead_letter_reason(reason)).inc()
        trial_label = trial if trial in self._known_trials else UNKNOWN
        type_label = event_type if event_type in EVENT_TYPES else UNKNOWN
        self.observe_event(trial_label, type_label, REJECTED, latency_s)

    def observe_alert(self, alert: AlertTransition) -> None:
        self.alerts.labels(alert.trial_id, alert.rule_id, alert.severity,
                           alert.transition).inc()

    def observe_alerts(self, alerts: Iterable[AlertTransition]) -> None:
        for alert in alerts:
            self.observe_alert(alert)

    def observe_latency(self, seconds: float, count: int = 1) -> None:
        """``count`` messages each took ``seconds`` from arrival to done."""
        for _ in range(count):
            self.latency.observe(seconds)

    def observe_email(self, outcome: str, alert: AlertTransition | None = None) -> None:
        """An e-mail outcome; fits the notifier's ``on_outcome(outcome, alert)`` hook.
        An outcome outside `EMAIL_OUTCOMES` is counted as 'other'."""
        self.emails.labels(outcome if outcome in EMAIL_OUTCOMES else "other").inc()

    def set_trials(self, report_fn: ReportFn | None) -> None:
        """Where the state gauges come from: a callable returning ``{trial_id:
        trial_report(...)}`` for the trials this process holds, called at each scrape
        (in the scraping thread: give it state that is not being changed meanwhile)."""
        self.trial_state.report_fn = report_fn

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, Content-Type) of ``GET /metrics`` for this bundle's registry."""
        return exposition(self.registry, accept)

    def observe_replay(self, result: ReplayResult,
                       catalog: Mapping[str, TrialRules] | None = None) -> None:
        """Record a finished replay: its events, dead letters and alerts, and a snapshot
        of its trials as of the replay's date for the state gauges."""
        self.watch(catalog or {})
        for trial_id, trial in result.trials.trials.items():
            self._see_trial(trial_id)
            for outcome, by_type in ((ACCEPTED, trial.counts.accepted),
                                     (DUPLICATE, trial.counts.duplicates)):
                for event_type, count in by_type.items():
                    if count:
                        self._event_child(trial_id, event_type, outcome).inc(count)
        for item in result.rejected:
            self.observe_rejection(item["reason"], trial=item.get("trial_id"),
                                   event_type=_rejected_type(item.get("raw", "")))
        self.observe_alerts(result.alerts)
        snapshot = result.trials.report(result.effective_as_of)  # replay is over: exact
        self.set_trials(lambda: snapshot)

    # -- internals -------------------------------------------------------------------

    def _see_trial(self, trial: str) -> None:
        if trial not in self._known_trials:
            self._known_trials.add(trial)
            for event_type in EVENT_TYPES:
                for outcome in EVENT_OUTCOMES:
                    self._event_child(trial, event_type, outcome)

    def _event_child(self, trial: str, event_type: str, outcome: str) -> Counter:
        key = (trial, event_type, outcome)
        child = self._event_children.get(key)
        if child is None:
            child = self._event_children[key] = self.events.labels(*key)
            if outcome != REJECTED and trial != UNKNOWN:
                self._see_trial(trial)
        return child


def _rejected_type(raw: str) -> str | None:
    parsed = parse_event(raw) if raw else None
    return parsed.type if isinstance(parsed, Rejection) else None


_TAGS = {kind: kind.__struct_config__.tag for kind in Event.__args__}


# --- state gauges, computed at scrape time ------------------------------------------

_STATE_GAUGES = {  # name: (help, extra labels)
    "safety_subjects": ("Infused subjects by state as of now (infused = in_window + "
                        "window_completed + withdrawn + died)", ("state",)),
    "safety_in_window_aes": ("Current, non-retracted AEs with onset in the subject's "
                             "window (the primary endpoint)", ()),
    "safety_in_window_saes": ("Serious AEs among safety_in_window_aes", ()),
    "safety_subjects_with_in_window_aes": ("Subjects with at least one in-window AE", ()),
    "safety_subjects_with_in_window_saes": ("Subjects with at least one in-window SAE", ()),
    "safety_in_window_aes_by_grade": ("In-window AEs by CTCAE grade", ("grade",)),
    "safety_aes": ("Every AE's current version by placement (in_window, pre_treatment, "
                   "post_window, awaiting_infusion, or retracted)", ("placement",)),
    "safety_aes_imputed_onset": ("Current AEs whose partial onset date was imputed", ()),
    "safety_aes_causality_not_assessed": ("Current AEs with no causality assessment yet "
                                          "(counted as related)", ()),
    "safety_ae_version_conflicts": ("Messages that repeated an AE version with different "
                                    "content (settled by recorded_at, then event_id)", ()),
    "safety_trial_rules": ("Stopping rules watching the trial (0: no rules file)", ()),
    "safety_rule_value": ("A stopping rule's current value", ("rule", "severity")),
    "safety_rule_threshold": ("The value at which the rule is breached", ("rule", "severity")),
    "safety_rule_breached": ("1 when the rule is breached, else 0", ("rule", "severity")),
    "safety_rule_episodes": ("Alert episodes the rule has had", ("rule", "severity")),
}


class TrialStateCollector(Collector):
    """Gauges of each trial's state, read from the engine's reports at scrape time."""

    def __init__(self, report_fn: ReportFn | None = None) -> None:
        self.report_fn = report_fn
        self.errors = 0

    def describe(self) -> Iterable[Metric]:
        return [*self._families().values(), self._errors()]

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for trial_id, report in self._reports().items():
            _add_trial(families, trial_id, report)
        return [*families.values(), self._errors()]

    def _errors(self) -> CounterMetricFamily:
        return CounterMetricFamily("safety_state_report_errors", "Scrapes whose trial "
                                   "reports failed (their state gauges were left out)",
                                   value=self.errors)

    def _reports(self) -> Mapping[str, Mapping]:
        if self.report_fn is None:
            return {}
        try:
            return self.report_fn()
        except Exception:  # a scrape must not take the other metrics down with it
            self.errors += 1
            log.exception("trial reports for /metrics failed")
            return {}

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {name: GaugeMetricFamily(name, text, labels=("trial", *labels))
                for name, (text, labels) in _STATE_GAUGES.items()}


def _add_trial(families: dict[str, GaugeMetricFamily], trial: str, report: Mapping) -> None:
    def put(name: str, value: float, *labels: str) -> None:
        families[name].add_metric([trial, *labels], value)

    subjects = report.get("subjects", {})
    for state in SUBJECT_STATES:
        put("safety_subjects", subjects.get(state, 0), state)
    endpoint = report.get("primary_endpoint", {})
    put("safety_in_window_aes", endpoint.get("ae", 0))
    put("safety_in_window_saes", endpoint.get("sae", 0))
    put("safety_subjects_with_in_window_aes", endpoint.get("subjects_with_ae", 0))
    put("safety_subjects_with_in_window_saes", endpoint.get("subjects_with_sae", 0))
    aes = report.get("adverse_events", {})
    for grade in GRADES:
        put("safety_in_window_aes_by_grade", aes.get("by_grade", {}).get(grade, 0), grade)
    for placement in AE_PLACEMENTS:
        count = endpoint.get("ae", 0) if placement == "in_window" else aes.get(placement, 0)
        put("safety_aes", count, placement)
    put("safety_aes_imputed_onset", aes.get("imputed_onset", 0))
    put("safety_aes_causality_not_assessed", aes.get("causality_not_assessed", 0))
    put("safety_ae_version_conflicts", aes.get("conflicts", 0))
    rules = report.get("rules", {})
    put("safety_trial_rules", len(rules))
    for rule_id, rule in rules.items():
        labels = (rule_id, rule["severity"])
        put("safety_rule_value", rule["value"], *labels)
        put("safety_rule_threshold", rule["threshold"], *labels)
        put("safety_rule_breached", rule["state"] == "breached", *labels)
        put("safety_rule_episodes", rule.get("episodes", 0), *labels)


# --- exposition ---------------------------------------------------------------------

def new_registry(process: bool = True) -> CollectorRegistry:
    """A fresh registry, with the process, platform and GC collectors when ``process``."""
    registry = CollectorRegistry()
    if process:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """(body, Content-Type) of ``GET /metrics``: the Prometheus text format, or
    OpenMetrics when the scraper's Accept header asks for it."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can export (``_total``, ``_bucket`` ... included),
    whether or not a sample has been recorded yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                "_created"), "summary": ("", "_sum", "_count", "_created"),
                "info": ("_info",)}
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


class ReplayExporter:
    """``replay --metrics-port``: serves a registry over HTTP while the replay runs, records
    the finished replay into it, and keeps serving for ``hold`` seconds afterwards so a
    person or a Prometheus server can scrape it. Without a port it does nothing."""

    def __init__(self, port: int | None, host: str = "127.0.0.1", hold: float = 0) -> None:
        self.port, self.host, self.hold = port, host, hold
        self.registry = new_registry()
        self.metrics = Metrics(self.registry)
        self._server = None

    def __enter__(self) -> ReplayExporter:
        if self.port is not None:
            try:
                self._server, _thread = start_http_server(self.port, self.host,
                                                          registry=self.registry)
            except (OSError, OverflowError) as exc:  # in use, or no such address here
                raise ValueError(f"--metrics-port {self.port}: cannot serve metrics at "
                                 f"{self.host}:{self.port} (MONITOR_WEB_HOST): "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def record(self, result: ReplayResult, catalog: Mapping[str, TrialRules]) -> None:
        if self._server is not None:
            self.metrics.observe_replay(result, catalog)

    def linger(self, say: Callable[[str], None]) -> None:
        """Keep serving for the hold time; Ctrl-C ends it early."""
        if self._server is None or self.hold <= 0:
            return
        sys.stdout.flush()  # the report first, for whoever reads it meanwhile
        port = self._server.server_address[1]
        say(f"serving metrics at http://{self.host}:{port}/metrics for {self.hold:g} s "
            "(Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            _sleep(self.hold)


def _sleep(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))

