"""The follow-up window: the one place that says which AEs count for the primary endpoint.

A subject's window opens on the calendar date of the FIRST infusion (day 0) and closes
on that date plus the trial's window length (12 calendar months unless the trial file
says ``days: N``), both ends inclusive::

    first infusion 2021-03-10, 12 months
    ...|pre-treatment|[2021-03-10 ...... in window ...... 2022-03-10]|post-window|...
         2021-03-09    day 0                               last day   2022-03-11

An AE whose onset lies in the window counts; onset before day 0 is pre-treatment, after
the last day post-window; both are kept and reported, never counted as in-window.

A partial onset (``2021-03``, ``2021``) is placed at the earliest date the partial date
allows that is not before the first infusion (treatment-emergent imputation, as in
pharmaverse admiral); a known component is never changed, and no date after the day the
AE was first reported (by any version) is allowed (``2021-03`` reported on 2021-03-05 is
03-01 for a subject first infused on 03-10: pre-treatment). So ``2020-11`` for a subject
first infused on 2020-12-06 is 2020-11-01 (pre-treatment) and ``2021`` for a subject
first infused on 2021-03-10 is 2021-03-10 (day 0), once reported after that day. An AE
of a subject with no infusion yet has no place: it waits (``AWAITING_INFUSION``) until
the infusion arrives.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

PRE_TREATMENT = "pre_treatment"
IN_WINDOW = "in_window"
POST_WINDOW = "post_window"
AWAITING_INFUSION = "awaiting_infusion"


@dataclass(frozen=True, slots=True)
class WindowLength:
    """12 calendar months by default; or a number of days."""

    months: int | None = 12
    days: int | None = None

    def last_day(self, first_infusion: dt.date) -> dt.date:
        """The last day inside the window (inclusive) of a subject first infused then; a
        window that would end after 9999-12-31 ends then."""
        try:
            if self.days is not None:
                return first_infusion + dt.timedelta(days=self.days)
            return add_months(first_infusion, self.months or 0)
        except (OverflowError, ValueError):  # past the last date Python has: year 9999
            return dt.date.max


def add_months(day: dt.date, months: int) -> dt.date:
    """Calendar months later; a day that does not exist (Feb 30) becomes the month's last."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


class Placement(NamedTuple):
    """Where an AE's onset falls in its subject's window."""

    onset: dt.date | None  # None while the subject awaits its first infusion
    imputed: bool
    period: str  # PRE_TREATMENT, IN_WINDOW, POST_WINDOW or AWAITING_INFUSION
    day: int | None  # days after the first infusion (day 0 = the infusion day)


def place_onset(earliest: dt.date, latest: dt.date, first_infusion: dt.date | None,
                last_day: dt.date | None) -> Placement:
    """Place an onset known to lie in [earliest, latest] in the window.

    ``earliest == latest`` is a full date and is never moved.
    """
    imputed = earliest != latest
    if first_infusion is None or last_day is None:
        return _placement((None, imputed, AWAITING_INFUSION, None))
    onset = first_infusion if earliest < first_infusion <= latest else earliest
    if onset < first_infusion:
        period = PRE_TREATMENT
    elif onset <= last_day:
        period = IN_WINDOW
    else:
        period = POST_WINDOW
    return _placement((onset, imputed, period, (onset - first_infusion).days))


# Placement(...) without the NamedTuple's Python-level constructor: a third of the cost,
# and every adverse event is placed
_placement = partial(tuple.__new__, Placement)
