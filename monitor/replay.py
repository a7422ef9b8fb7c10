"""``replay``: any event log through the same engine as the stream (SPEC section 7).

Reads JSON lines (gzip or plain, ``-`` for stdin), applies every valid event recorded
at or before the as-of instant in log order, and reports what the sponsor knew then.
Never imports faust; sends no e-mail unless the caller passes an alert handler.
"""

from __future__ import annotations

import datetime as dt
import gc
import gzip
import io
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import msgspec

from .engine.alerts import AlertTransition
from .engine.events import UTF8_BOM, Rejection, decode_event, parse_event
from .engine.rules import TrialRules
from .engine.state import DUPLICATE, step
from .engine.trials import Trials

GZIP_MAGIC = b"\x1f\x8b"


class Unavailable(Exception):
    """Something outside the call is not there (a log, a broker, a worker that would
    not start): one line and exit status 1."""


class LogUnreadable(Unavailable):
    """The log cannot be read (missing, unreadable, corrupt gzip): exit status 1."""


@dataclass
class ReplayResult:
    trials: Trials  # or, after a replay over several processes, `shards.ShardedTrials`
    as_of: dt.datetime | None
    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    after_as_of: int = 0
    alerts: list[AlertTransition] = field(default_factory=list)
    alert_lines: list[int] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    first_lines: dict[str, int] = field(default_factory=dict)  # trial: its first event's line

    def close(self) -> None:
        """Let go of the processes that hold the trials of a replay over several
        (`monitor.shards`); nothing to do for one."""
        close = getattr(self.trials, "close", None)
        if close is not None:
            close()

    @property
    def effective_as_of(self) -> dt.datetime:
        return self.as_of or self.trials.last_recorded_at() or dt.datetime(1970, 1, 1,
                                                                          tzinfo=dt.UTC)

    def to_json(self) -> dict:
        as_of = self.effective_as_of
        with collection_paused():
            return {
                "as_of": as_of.isoformat(),
                "events": {"read": self.read, "accepted": self.accepted,
                           "duplicates": self.duplicates, "rejected": len(self.rejected),
                           "after_as_of": self.after_as_of},
                "trials": self.trials.report(as_of),
                "alerts": [alert_json(a, line)
                           for a, line in zip(self.alerts, self.alert_lines, strict=True)],
                "rejected": self.rejected,
            }


def alert_json(alert: AlertTransition, line: int | None = None) -> dict:
    out = alert.to_json()
    out["recorded_at"] = alert.recorded_at.isoformat()
    if line is not None:
        out["line"] = line
    return out


def replay(lines: Iterable[bytes], catalog: dict[str, TrialRules],
           as_of: dt.datetime | None = None,
           on_alert: Callable[[AlertTransition], None] | None = None,
           trials: Trials | None = None) -> ReplayResult:
    """Run a log through the engine. ``lines`` are raw lines, numbered from 1. Pass
    ``trials`` to see the trials' state from ``on_alert`` (e-mail shows their counts)."""
    return replay_numbered(enumerate(lines, 1), catalog, as_of, on_alert, trials)


def replay_numbered(lines: Iterable[tuple[int, bytes]], catalog: dict[str, TrialRules],
                    as_of: dt.datetime | None = None,
                    on_alert: Callable[[AlertTransition], None] | None = None,
                    trials: Trials | None = None) -> ReplayResult:
    """`replay` of ``(line number, raw line)`` pairs: some of a log's lines, numbered as
    in the whole log (`monitor.shards` gives each process its trials' lines)."""
    result = ReplayResult(trials if trials is not None else Trials(catalog), as_of)
    with collection_paused():
        _replay_into(result, lines, as_of, on_alert)
    return result


@contextmanager
def replaying_once() -> Iterator[None]:
    """For a process that replays one log, reports and exits (`safety-monitor replay`):
    `collection_paused` for the replay, after which its state is frozen (``gc.freeze``)
    rather than scanned. The first collection after a pause would otherwise walk every
    object the replay made (about 0.3 s for 500,000 events) and free nothing: the
    engine makes no cycles, and reference counting still frees what it drops."""
    with collection_paused():
        try:
            yield
        finally:
            gc.freeze()  # before collection resumes


@contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: the engine and its reports make no reference
    cycles, and each collection would scan the whole of a large replay's state, freeing
    nothing, at a cost of a good part of the replay's time (and half its report's)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _replay_into(result: ReplayResult, lines: Iterable[tuple[int, bytes]],
                 as_of: dt.datetime | None,
                 on_alert: Callable[[AlertTransition], None] | None) -> None:
    trials, trial_of = result.trials.trials, result.trials.trial
    found, found_lines = result.alerts, result.alert_lines
    read = accepted = duplicates = after_as_of = 0  # locals: this loop runs for every line
    for number, raw in lines:
        try:
            event = decode_event(raw)  # parse_event's own first step, without its call
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # see parse_event
            if not raw or raw.isspace():
                continue  # a blank line holds no message (and is no JSON)
            read += 1
            result.rejected.append(rejection_json(number, raw, parse_event(raw)))
            continue  # parse_event decodes again, fails again, and says what is wrong
        read += 1
        if as_of is not None and event.recorded_at > as_of:
            after_as_of += 1
        else:
            trial = trials.get(event.trial_id)  # Trials.apply, inline
            if trial is None:
                trial = trial_of(event.trial_id)
                result.first_lines[event.trial_id] = number
            outcome, _record, alerts = step(trial, event)[1]
            if outcome is DUPLICATE:
                duplicates += 1
                continue
            accepted += 1
            for alert in alerts:
                found.append(alert)
                found_lines.append(number)
                if on_alert is not None:
                    on_alert(alert)
    result.read += read
    result.accepted += accepted
    result.duplicates += duplicates
    result.after_as_of += after_as_of


def rejection_json(number: int, raw: bytes, rejection: Rejection) -> dict:
    out = {"line": number, "reason": rejection.reason}
    if rejection.event_id is not None:
        out["event_id"] = rejection.event_id
    if rejection.trial_id is not None:
        out["trial_id"] = rejection.trial_id
    out["raw"] = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return out


def open_log(path: str) -> tuple[BinaryIO, BinaryIO, int | None]:
    """(lines stream, underlying file for progress, its size) for a path or ``-``."""
    try:
        raw: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise LogUnreadable(f"{path}: cannot open the log: {exc.strerror or exc}") from None
    size = None if path == "-" else Path(path).stat().st_size
    peek = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    stream = gzip.GzipFile(fileobj=raw) if peek == GZIP_MAGIC else raw
    return stream, raw, size


def read_lines(stream: BinaryIO, source: str) -> Iterator[bytes]:
    """The log's lines; a read error (corrupt gzip, I/O) becomes `LogUnreadable`. A
    UTF-8 byte-order mark before the first line (some Windows tools write one) is
    not part of it."""
    try:
        first = stream.readline()
        if first:
            yield first.removeprefix(UTF8_BOM)
        yield from stream
    except _READ_ERRORS as exc:
        raise LogUnreadable(f"{source}: the log cannot be read to the end: {exc}") from None


def read_chunks(stream: BinaryIO, source: str, size: int = 1 << 20) -> Iterator[list[bytes]]:
    """`read_lines` a list at a time (about ``size`` bytes of lines), for a caller that
    looks at every line but keeps few."""
    try:
        chunk = stream.readlines(size)
        if chunk:
            chunk[0] = chunk[0].removeprefix(UTF8_BOM)
        while chunk:
            yield chunk
            chunk = stream.readlines(size)
    except _READ_ERRORS as exc:
        raise LogUnreadable(f"{source}: the log cannot be read to the end: {exc}") from None


_READ_ERRORS = (OSError, EOFError, gzip.BadGzipFile, io.UnsupportedOperation)


def parse_as_of(text: str) -> dt.datetime:
    """An ISO 8601 date (its start, 00:00 UTC) or date-time with offset."""
    if not text.strip():  # `--as-of "$DATE"` with DATE unset: not "the last recorded_at"
        raise ValueError("--as-of is empty; give a date (YYYY-MM-DD) or a date-time with "
                         "offset, or leave the option out for the last recorded_at")
    if len(text) == 8 and text.isdigit():  # fromisoformat reads it as a naive date-time
        raise ValueError(f"--as-of: {text!r}: write the date as YYYY-MM-DD "
                         f"({text[:4]}-{text[4:6]}-{text[6:]})")
    try:
        if len(text) == 10:
            return dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), tzinfo=dt.UTC)
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--as-of: {text!r} is not an ISO 8601 date or date-time") from None
    if value.tzinfo is None:
        raise ValueError(f"--as-of: {text!r} has no UTC offset; add +00:00 or the site's offset")
    return value
