"""Every boundary of the follow-up window (DESIGN habit 4).

    first infusion 2021-03-10, window 12 months
    2021-03-09 | 2021-03-10 (day 0) ........ 2022-03-10 (last day) | 2022-03-11
    pre-treat. |<------------------- in window -------------------->| post-window
"""

from __future__ import annotations

import datetime as dt

import pytest

from monitor.engine.window import (
    AWAITING_INFUSION,
    IN_WINDOW,
    POST_WINDOW,
    PRE_TREATMENT,
    WindowLength,
    add_months,
    place_onset,
)

D = dt.date
FIRST = D(2021, 3, 10)
TWELVE_MONTHS = WindowLength()


def place(onset_lo: dt.date, onset_hi: dt.date | None = None, first=FIRST,
          length: WindowLength = TWELVE_MONTHS):
    last = length.last_day(first) if first else None
    return place_onset(onset_lo, onset_hi or onset_lo, first, last)


@pytest.mark.parametrize("onset, period, day", [
    (D(2021, 3, 9), PRE_TREATMENT, -1),     # the day before the first infusion
    (D(2021, 3, 10), IN_WINDOW, 0),         # day 0
    (D(2021, 3, 11), IN_WINDOW, 1),
    (D(2022, 3, 10), IN_WINDOW, 365),       # the last day, inclusive
    (D(2022, 3, 11), POST_WINDOW, 366),     # the day after
])
def test_full_dates_at_every_boundary(onset, period, day) -> None:
    placement = place(onset)
    assert (placement.period, placement.day, placement.imputed) == (period, day, False)


@pytest.mark.parametrize("first, last", [
    (D(2021, 3, 10), D(2022, 3, 10)),
    (D(2020, 2, 29), D(2021, 2, 28)),  # leap day: the month's last day a year on
    (D(2021, 1, 31), D(2022, 1, 31)),
])
def test_twelve_calendar_months(first, last) -> None:
    assert TWELVE_MONTHS.last_day(first) == last


@pytest.mark.parametrize("day, months, expected", [
    (D(2021, 1, 31), 1, D(2021, 2, 28)),
    (D(2020, 1, 31), 1, D(2020, 2, 29)),
    (D(2021, 11, 30), 3, D(2022, 2, 28)),
    (D(2021, 12, 15), 1, D(2022, 1, 15)),
    (D(2021, 5, 15), 0, D(2021, 5, 15)),
])
def test_add_months_clamps_to_the_months_last_day(day, months, expected) -> None:
    assert add_months(day, months) == expected


def test_a_window_past_the_year_9999_ends_on_its_last_day() -> None:
    assert WindowLength().last_day(D(9999, 6, 1)) == D.max
    assert WindowLength(months=None, days=365).last_day(D(9999, 6, 1)) == D.max
    assert WindowLength().last_day(D(9998, 12, 31)) == D(9999, 12, 31)


def test_a_window_in_days() -> None:
    days = WindowLength(months=None, days=365)
    assert days.last_day(D(2020, 3, 1)) == D(2021, 3, 1)
    assert place(D(2021, 3, 1), first=D(2020, 3, 1), length=days).period == IN_WINDOW
    assert place(D(2021, 3, 2), first=D(2020, 3, 1), length=days).period == POST_WINDOW


# The SPEC's two examples of partial onsets, and the rest of the imputation rule.
@pytest.mark.parametrize("lo, hi, first, onset, period, imputed", [
    # 2020-11 for a subject first infused 2020-12-06: 2020-11-01, pre-treatment
    (D(2020, 11, 1), D(2020, 11, 30), D(2020, 12, 6), D(2020, 11, 1), PRE_TREATMENT, True),
    # 2021 for a subject first infused 2021-03-10: 2021-03-10, day 0
    (D(2021, 1, 1), D(2021, 12, 31), D(2021, 3, 10), D(2021, 3, 10), IN_WINDOW, True),
    # the month of the first infusion: the infusion day
    (D(2021, 3, 1), D(2021, 3, 31), D(2021, 3, 10), D(2021, 3, 10), IN_WINDOW, True),
    # a month after the infusion month: its first day
    (D(2021, 4, 1), D(2021, 4, 30), D(2021, 3, 10), D(2021, 4, 1), IN_WINDOW, True),
    # infusion on the first day of the month: no change needed
    (D(2021, 3, 1), D(2021, 3, 31), D(2021, 3, 1), D(2021, 3, 1), IN_WINDOW, True),
    # infusion on the last day of the month
    (D(2021, 3, 1), D(2021, 3, 31), D(2021, 3, 31), D(2021, 3, 31), IN_WINDOW, True),
    # a partial date after the window
    (D(2022, 4, 1), D(2022, 4, 30), D(2021, 3, 10), D(2022, 4, 1), POST_WINDOW, True),
])
def test_partial_onsets_are_placed_at_the_earliest_date_not_before_infusion(
        lo, hi, first, onset, period, imputed) -> None:
    placement = place(lo, hi, first=first)
    assert (placement.onset, placement.period, placement.imputed) == (onset, period, imputed)


def test_no_infusion_yet_means_awaiting() -> None:
    placement = place(D(2021, 3, 1), first=None)
    assert (placement.onset, placement.period, placement.day) == (None, AWAITING_INFUSION, None)
