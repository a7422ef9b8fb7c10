"""The event contract (SPEC section 3): one definition, typed, strict.

`parse_event(raw)` turns the bytes of one Kafka message or one log line into an
`Event` or a `Rejection` whose reason a person can act on, e.g.
``adverse_event.grade: 7 is not a CTCAE grade (1-5)``. Nothing here raises for bad
input: a rejection is a value, so the caller can dead-letter it and carry on.

The models are msgspec Structs (a tagged union on ``type``): decoding and validating
with msgspec runs at about the speed of a bare ``orjson.loads``, three to four times
pydantic v2's, and replay's throughput is mostly decoding. Unknown extra fields are
accepted and ignored; the raw bytes stay in the log or the topic.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Grade = Annotated[int, msgspec.Meta(ge=1, le=5)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Aware = Annotated[dt.datetime, msgspec.Meta(tz=True)]
# A field __post_init__ computes from a real one: whatever JSON an input field of its name
# holds is taken and then overwritten, as SPEC has unknown extra fields ignored. After
# __post_init__ it holds the type its comment gives.
Derived = Any

EVENT_TYPES = ("infusion", "adverse_event", "subject_status", "regulatory_report", "lab_result")
RELATEDNESS = ("not_related", "unlikely", "possible", "probable", "definite")
RELATED = frozenset({"possible", "probable", "definite"})
SERIOUS_CRITERIA = (
    "death", "life_threatening", "hospitalization", "disability", "congenital_anomaly",
    "important_medical_event",
)
OUTCOMES = (
    "recovered", "recovering", "not_recovered", "recovered_with_sequelae", "fatal", "unknown",
)
STATUSES = ("enrolled", "withdrawn", "lost_to_follow_up", "completed", "died")

Relatedness = Literal["not_related", "unlikely", "possible", "probable", "definite"]
SeriousCriterion = Literal[
    "death", "life_threatening", "hospitalization", "disability", "congenital_anomaly",
    "important_medical_event",
]
Outcome = Literal[
    "recovered", "recovering", "not_recovered", "recovered_with_sequelae", "fatal", "unknown",
]
Status = Literal["enrolled", "withdrawn", "lost_to_follow_up", "completed", "died"]

# re.ASCII: \d is 0-9 only (ISO 8601 dates are ASCII; int() would read other digits)
_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(T[\d:.]+(?:Z|[+-]\d{2}:?\d{2})?)?",
                           re.ASCII)
_GAP = re.compile(r"\d{4}-*-{2,}", re.ASCII)
# how builds before 2026-12-03 read an onset: digits of any script, any time unchecked
_LOOSE_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T[\d:.]+(?:Z|[+-]\d{2}:?\d{2})?)?")

# True while `records` reads back stored messages: those an earlier build accepted are
# read as it read them (it checked dates less strictly), not rejected, so that a worker
# loads the state it wrote. Consulted only when a date fails the strict reading.
_STORED = contextvars.ContextVar("stored", default=False)


@contextmanager
def reading_stored() -> Iterator[None]:
    """Decode stored messages (the worker's records) inside this block."""
    token = _STORED.set(True)
    try:
        yield
    finally:
        _STORED.reset(token)


class BadValue(ValueError):
    """A value that decoded but means nothing; the message names the field."""


def parse_day(field: str, text: str) -> dt.date:
    """The calendar date, as written, of YYYY-MM-DD or of a date-time that starts with it."""
    try:
        return _day(text)
    except ValueError:
        if _STORED.get() and len(text) >= 10:  # as builds before 2026-12-03 read it
            try:
                return dt.date.fromisoformat(text[:10])
            except ValueError:
                pass
        raise BadValue(f"{field}: '{text}' is not an ISO 8601 date or date-time (YYYY-MM-DD "
                       "or e.g. 2021-03-01T09:30:00+00:00)") from None


def _day(text: str) -> dt.date:
    """`parse_day` without the field: the whole text must be YYYY-MM-DD, or that, T (or a
    space) and a time with or without offset as `datetime.fromisoformat` reads it; no
    time-zone conversion. Raises ValueError.

    The dashes keep out the other dates fromisoformat reads: 20210310, 2021-W10-3."""
    if len(text) == 10 and text[7] == "-":
        return dt.date.fromisoformat(text)
    if len(text) > 10 and text[10] in "T " and text[7] == "-" and text[4] == "-":
        return dt.datetime.fromisoformat(text).date()
    raise ValueError(text)


def partial_date_range(field: str, text: str, loose: bool = False
                       ) -> tuple[dt.date, dt.date, str]:
    """(earliest, latest, precision) that a possibly partial ISO 8601 date allows.

    ``2021`` -> (2021-01-01, 2021-12-31, "year"); ``2021-03`` -> (2021-03-01,
    2021-03-31, "month"); ``2021-03-05`` -> (that day, that day, "day"). A date with an
    interior gap (``2019---07``, unknown month but known day) is rejected, and so is a
    time after a partial date (``2021-03T10:00``): as in SDTM --DTC, only a full date
    takes one. ``loose``: as builds before 2026-12-03 read it (`_LOOSE_DATE`).
    """
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        try:
            exact = dt.date.fromisoformat(text)
            return exact, exact, "day"
        except ValueError:
            pass  # fall through to the full diagnosis
    if _GAP.match(text):
        raise BadValue(f"{field}: '{text}' has a gap inside the date (a known part after an "
                       "unknown one); give YYYY, YYYY-MM or YYYY-MM-DD")
    m = (_LOOSE_DATE if loose else _PARTIAL_DATE).fullmatch(text)
    if m is None:
        raise BadValue(f"{field}: '{text}' is not an ISO 8601 date (YYYY, YYYY-MM or YYYY-MM-DD)")
    year, month, day, time = (*m.groups(), None) if loose else m.groups()
    if time is not None and day is None:
        raise BadValue(f"{field}: '{text}' has a time after a partial date; only a full date "
                       "takes a time (YYYY-MM-DDThh:mm)")
    try:
        if day is not None:
            exact = dt.date(int(year), int(month), int(day))
        elif month is not None:
            first = dt.date(int(year), int(month), 1)
            return first, _month_end(first), "month"
        else:
            return dt.date(int(year), 1, 1), dt.date(int(year), 12, 31), "year"
    except ValueError:
        raise BadValue(f"{field}: '{text}' is not a calendar date") from None
    if time is not None:
        try:
            dt.datetime.fromisoformat(text)
        except ValueError:
            raise BadValue(f"{field}: '{text}' is not an ISO 8601 date-time (e.g. "
                           "2021-03-01T09:30 or 2021-03-01T09:30:00+07:00)") from None
    return exact, exact, "day"


def _month_end(first: dt.date) -> dt.date:
    nxt = dt.date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return nxt - dt.timedelta(days=1)


class BaseEvent(msgspec.Struct, kw_only=True, tag_field="type", gc=False):
    trial_id: NonEmpty
    subject_id: NonEmpty
    event_id: NonEmpty
    recorded_at: Aware


class Infusion(BaseEvent, tag="infusion"):
    infused_at: str
    dose_number: Positive
    cells_per_kg: Annotated[float, msgspec.Meta(gt=0)] | None = None
    infused_on: Derived = None  # dt.date: the calendar date of infused_at

    def __post_init__(self) -> None:
        self.infused_on = parse_day("infused_at", self.infused_at)


class AdverseEvent(BaseEvent, tag="adverse_event"):
    ae_id: NonEmpty
    version: Positive
    term: NonEmpty
    onset: str
    grade: Grade
    serious: bool
    meddra_pt: str | None = None
    meddra_soc: str | None = None
    resolved: dt.date | None = None
    serious_criteria: tuple[SeriousCriterion, ...] | None = ()  # null: none, as missing
    relatedness: Relatedness | None = None
    expected: bool | None = None
    outcome: Outcome | None = None
    retracted: bool | None = False  # null: not retracted, as missing
    # from onset (partial_date_range); always recomputed, whatever the input says
    onset_earliest: Derived = None  # dt.date
    onset_latest: Derived = None  # dt.date; of the AE's versions, see `AeHistory.cap_onset`
    onset_precision: Derived = "day"  # "day", "month" or "year"
    onset_latest_own: Derived = None  # dt.date: onset_latest as this message alone says

    def __post_init__(self) -> None:
        if self.serious_criteria is None:  # like the other optional fields, null is missing
            self.serious_criteria = ()
        if self.retracted is None:
            self.retracted = False
        try:
            lo, hi, precision = partial_date_range("onset", self.onset)
        except BadValue:
            if not _STORED.get():
                raise
            lo, hi, precision = partial_date_range("onset", self.onset, loose=True)
        reported = self.recorded_at.date()
        if lo > reported:
            raise BadValue(f"onset: '{self.onset}' is after recorded_at "
                           f"({reported.isoformat()}); an AE cannot start after it was reported")
        # nor can the days of a partial onset after it was reported: `2021-03` reported on
        # 2021-03-05 lies in 03-01 .. 03-05, so an infusion on 03-10 cannot place it at 03-10
        self.onset_earliest, self.onset_precision = lo, precision
        self.onset_latest = self.onset_latest_own = min(hi, reported)

    @property
    def related(self) -> bool:
        """Possible, probable or definite; not yet assessed counts as related."""
        return self.relatedness is None or self.relatedness in RELATED

    @property
    def fatal(self) -> bool:
        return self.grade == 5 or self.outcome == "fatal" or "death" in self.serious_criteria


class SubjectStatus(BaseEvent, tag="subject_status"):
    status: Status
    effective_on: dt.date


class RegulatoryReport(BaseEvent, tag="regulatory_report"):
    ae_id: NonEmpty
    submitted_at: Aware


class LabResult(BaseEvent, tag="lab_result"):
    test: NonEmpty
    value: float
    unit: str
    collected_at: str
    uln: float | None = None
    lln: float | None = None
    dialysis: bool | None = None
    collected_on: Derived = None  # dt.date: the calendar date of collected_at

    def __post_init__(self) -> None:
        text = self.collected_at  # _day inline (every lab result passes here), then its errors
        try:
            if len(text) == 10 and text[7] == "-":
                self.collected_on = dt.date.fromisoformat(text)
                return
            if text[10] == "T" and text[7] == "-" and text[4] == "-":
                self.collected_on = dt.datetime.fromisoformat(text).date()
                return
        except (ValueError, IndexError):
            pass
        self.collected_on = parse_day("collected_at", text)


Event = Infusion | AdverseEvent | SubjectStatus | RegulatoryReport | LabResult

_decoder = msgspec.json.Decoder(Event)


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """A message that is not an event, with a one-line reason a person can act on."""

    reason: str
    event_id: str | None = None
    trial_id: str | None = None
    type: str | None = None


# parse_event's first step alone, for a loop over many lines: an Event, or raises
# msgspec.DecodeError (then parse_event says why)
decode_event = _decoder.decode


def parse_event(raw: bytes | str) -> Event | Rejection:
    """Decode and validate one message. Never raises for bad input."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return _explain(raw, exc)
    except RecursionError:  # msgspec's, for arrays or objects nested too deep
        return _TOO_DEEP
    except UnicodeDecodeError:  # msgspec before 0.19; later ones raise DecodeError
        return _NOT_UTF8


_NOT_UTF8 = Rejection(reason="not UTF-8 (a string holds an invalid byte); messages must be "
                             "UTF-8 JSON")
_LONG_INTEGER = Rejection(reason="an integer out of range (thousands of digits); each message "
                                 "must be one event object")
_TOO_DEEP = Rejection(reason="nested too deep (arrays or objects inside each other, about a "
                             "thousand levels or more); each message must be one event object")


# --- the slow path: say what is wrong in a person's words --------------------------

def _is_utf8(raw: bytes | str) -> bool:
    try:
        raw.decode("utf-8") if isinstance(raw, bytes) else raw.encode("utf-8")
    except UnicodeError:
        return False
    return True


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _explain(raw: bytes | str, exc: msgspec.DecodeError) -> Rejection:
    if not raw.strip():
        return Rejection(reason="empty message; each line must be one JSON object")
    if not isinstance(exc, msgspec.ValidationError):
        return _not_json(raw, exc)
    doc = _loose(raw)
    if isinstance(doc, Rejection):
        return doc
    if not isinstance(doc, dict):
        kind = type(doc).__name__ if doc is not None else "null"
        return Rejection(reason=f"not a JSON object (got {_json_kind(kind)}); "
                                "each message must be one event object")
    etype = doc.get("type")
    m = _AT.match(str(exc))
    what, path = m.group("what"), (m.group("path") or "").lstrip(".")
    field = path.split("[")[0].split(".")[0] if path else ""
    reason = _reason(etype, field, doc.get(field), what)
    return Rejection(reason=reason, event_id=_str_or_none(doc.get("event_id")),
                     trial_id=_str_or_none(doc.get("trial_id")),
                     type=etype if etype in EVENT_TYPES else None)


def _not_json(raw: bytes | str, exc: msgspec.DecodeError) -> Rejection:
    if "UTF-8" in str(exc) and not _is_utf8(raw):
        return _NOT_UTF8
    detail = str(exc).removeprefix("JSON is malformed: ")
    if raw.startswith(UTF8_BOM if isinstance(raw, bytes) else "\ufeff"):
        detail = "it starts with a UTF-8 byte-order mark; send the JSON without it"
    return Rejection(reason=f"not JSON ({detail}); each line must be one JSON object")


UTF8_BOM = b"\xef\xbb\xbf"  # some Windows tools start a UTF-8 file with it


class _Number(str):
    """A JSON number as written, out of a float's range (1e999)."""


def _float_or_text(text: str) -> float | _Number:
    value = float(text)
    return value if math.isfinite(value) else _Number(text)


_plain = msgspec.json.Decoder(float_hook=_float_or_text).decode


def _loose(raw: bytes | str) -> object:
    """The message as plain values, read to its end (the typed decoder stops at the first
    error); or a Rejection if that fails."""
    try:
        return _plain(raw)
    except RecursionError:
        return _TOO_DEEP
    except msgspec.ValidationError:  # what a float_hook does not see: a too long integer
        return _long_integer(raw)
    except msgspec.DecodeError as exc:  # malformed after where the typed decoder stopped
        return _not_json(raw, exc)


# a key, then an integer of a thousand digits or more; and the message's type
_LONG_DIGITS = re.compile(r'"((?:[^"\\]|\\.){1,200})"\s*:\s*-?[0-9]{1000}')
_TYPE_FIELD = re.compile(r'"type"\s*:\s*"([a-z_]{1,40})"')


def _long_integer(raw: bytes | str) -> Rejection:
    """An integer too long to read, with the field that holds it when a search finds it
    (the message cannot be read as plain values to look there)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    found = _LONG_DIGITS.search(text)
    if found is None:
        return _LONG_INTEGER
    typed = _TYPE_FIELD.search(text)
    where = found.group(1) if typed is None or typed.group(1) not in EVENT_TYPES \
        else f"{typed.group(1)}.{found.group(1)}"
    return Rejection(reason=f"{where}: an integer of thousands of digits is out of range",
                     type=typed.group(1) if typed and typed.group(1) in EVENT_TYPES else None)


def _shown(value: object) -> str:
    """A number as a reason shows it: one of many digits shortened, so that the reason
    stays a line a person reads."""
    text = str(value)
    return f"{text[:12]}... ({len(text)} characters)" if len(text) > 24 else text


def _json_kind(pytype: str) -> str:
    return {"list": "array", "str": "string", "int": "number", "float": "number",
            "_Number": "number", "bool": "boolean"}.get(pytype, pytype)


def _str_or_none(value: object) -> str | None:
    return value if type(value) is str else None  # not a `_Number`: a number is no id


def _reason(etype: object, field: str, value: object, what: str) -> str:
    if etype not in EVENT_TYPES:
        shown = "missing" if etype is None else f"{etype!r} is not an event type"
        return f"type: {shown}; expected one of {', '.join(EVENT_TYPES)}"
    if not field:
        missing = re.search(r"missing required field `([^`]+)`", what)
        if missing:
            return f"{etype}.{missing.group(1)}: missing (required for {etype})"
        return f"{etype}.{what}"  # our own BadValue messages start with the field
    return f"{etype}.{field}: {_field_message(field, value, what)}"


_ENUMS = {
    "relatedness": RELATEDNESS, "serious_criteria": SERIOUS_CRITERIA, "outcome": OUTCOMES,
    "status": STATUSES,
}


def _field_message(field: str, value: object, what: str) -> str:
    an_int = isinstance(value, int) and not isinstance(value, bool)
    if field == "grade" and an_int:
        return f"{_shown(value)} is not a CTCAE grade (1-5)"
    if field in ("version", "dose_number") and an_int:
        return f"{_shown(value)} is not allowed; {field} counts from 1"
    if "out of range" in what:  # a number as written (1e999) or an int beyond a float
        return f"{_shown(value)} is out of range (beyond a 64-bit float's 1.8e308)"
    if field in _ENUMS and "enum" in what:
        bad = re.search(r"'(.*)'", what)
        shown = bad.group(1) if bad else value
        return f"{shown!r} is not one of {', '.join(_ENUMS[field])}"
    if "with a timezone" in what:
        return (f"{value!r} has no UTC offset; write it as {value}+00:00 or with the "
                "site's offset")
    if "RFC3339 encoded date" in what and "datetime" not in what:
        return f"{value!r} is not an ISO 8601 date (YYYY-MM-DD)"
    if "RFC3339" in what:
        return (f"{value!r} is not an ISO 8601 date-time with offset "
                "(e.g. 2021-03-01T09:30:00+00:00)")
    if "Invalid date" in what or "ISO 8601 date" in what:
        return f"{value!r} is not an ISO 8601 date (YYYY-MM-DD)"
    if "length >= 1" in what:
        return "must not be empty"
    what = what.replace("`", "")
    return what[0].lower() + what[1:] if what else "invalid"
