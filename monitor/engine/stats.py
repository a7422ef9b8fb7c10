"""Stopping boundaries for continuous toxicity monitoring: pure and exact.

The count of subjects with a matching adverse event is checked at planned looks, after
n_1 < ... < n_K = N subjects (one at a time, or in cohorts). A `Boundary` says, for each
look, the smallest count that stops (``stop_at``), or None where no count can stop.

Repeated significance testing (Ivanova, Qaqish and Schell 2005, Biometrics 61:540-545;
R clinfun ``toxbdry``). For a nominal level ``a`` the largest acceptable count at look k is

    r_k(a) = qbinom(1 - Phi(Phi^-1(a) / (n_k / N)^delta), n_k, p0)

with shape delta in [0, 0.5] (0 Pocock, 0.5 O'Brien-Fleming); a count above r_k stops.
`toxicity_boundary` returns the member of this family whose exact probability of crossing
under p0 is the largest that does not exceed alpha (clinfun's ``hi.bdry``). r_k(a) only
changes where ``a`` passes a level at which some count becomes acceptable, so the family
has finitely many members; they are searched in order of level (crossing only grows with
the level), which makes the choice exact rather than the outcome of an iteration budget.

Bayesian monitoring (Thall, Simon and Estey 1995): `bayesian_boundary` stops at the
smallest count x at which the Beta(a + x, b + m - x) posterior puts more than
``probability`` above ``rate``.

`operating_characteristics` follows the distribution of the count among subjects whose
path has not crossed yet, look by look (a convolution with the binomial of each cohort):
no simulation. Numbers in, numbers out; nothing here reads a clock, a file or a global.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from statistics import NormalDist
from types import MappingProxyType

import numpy as np


def _scipy_stats():  # noqa: ANN202 - the scipy.stats module
    """scipy.stats, imported on first use: it takes about 0.7 s and 75 MB, and only rules
    files with a ``toxicity_boundary`` or ``bayesian`` rule need it."""
    from scipy import stats

    return stats


POCOCK = 0.0
OBRIEN_FLEMING = 0.5
SHAPE_NAMES = MappingProxyType({
    "pocock": POCOCK,
    "obrien-fleming": OBRIEN_FLEMING,
    "o'brien-fleming": OBRIEN_FLEMING,
    "obrien_fleming": OBRIEN_FLEMING,
    "obf": OBRIEN_FLEMING,
})
_STANDARD_NORMAL = NormalDist()
_NEGLIGIBLE_RATE = 1e-300


@dataclass(frozen=True)
class Boundary:
    """Where a stopping rule stops.

    At ``looks[k]`` subjects evaluated, ``stop_at[k]`` or more subjects with the event
    stop; None means no count can stop at that look. ``nominal_level`` is the level ``a``
    of the repeated-significance family that gives this boundary (the level at the last
    look; at every look under Pocock), and ``cross_probability_p0`` its exact probability
    of crossing under p0; both are None for a Bayesian boundary.
    """

    looks: tuple[int, ...]
    stop_at: tuple[int | None, ...]
    nominal_level: float | None = None
    cross_probability_p0: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "looks", checked_looks(self.looks))
        object.__setattr__(self, "stop_at", tuple(self.stop_at))
        if len(self.stop_at) != len(self.looks):
            raise ValueError(f"{len(self.stop_at)} stop_at values for {len(self.looks)} looks")
        for subjects, stop in zip(self.looks, self.stop_at, strict=True):
            if stop is not None and not 0 <= stop <= subjects:
                raise ValueError(f"stop_at {stop} at {subjects} subjects is not in 0..{subjects}")

    @property
    def planned_subjects(self) -> int:
        """N, the subjects at the last look."""
        return self.looks[-1]

    @property
    def acceptable(self) -> tuple[int, ...]:
        """The largest acceptable count at each look (r_k); n_k where nothing stops."""
        return tuple(
            subjects if stop is None else stop - 1
            for subjects, stop in zip(self.looks, self.stop_at, strict=True)
        )

    def stop_count(self, subjects: int) -> int | None:
        """The count that stops with ``subjects`` evaluated: that of the latest look at or
        before ``subjects`` (the last look beyond N); None before the first look or where
        no count can stop."""
        look = bisect_right(self.looks, subjects) - 1
        return None if look < 0 else self.stop_at[look]

    def is_crossed(self, subjects: int, count: int) -> bool:
        """True when ``count`` subjects with the event among ``subjects`` evaluated stop."""
        stop = self.stop_count(subjects)
        return stop is not None and count >= stop


@dataclass(frozen=True)
class OperatingCharacteristics:
    """How a boundary behaves when the true event rate is ``rate``."""

    rate: float
    cross_probability: float
    early_stop_probability: float
    expected_subjects: float
    cross_probability_by_look: tuple[float, ...]


def parse_shape(shape: str | float) -> float:
    """Boundary shape delta: ``pocock`` (0), ``obrien-fleming`` (0.5) or a number in [0, 0.5]."""
    if isinstance(shape, bool):
        raise ValueError(f"shape {shape!r} is not pocock, obrien-fleming or a number in [0, 0.5]")
    if isinstance(shape, str):
        name = shape.strip().lower()
        if name in SHAPE_NAMES:
            return SHAPE_NAMES[name]
        try:
            shape = float(name)
        except ValueError:
            raise ValueError(
                f"shape {shape!r} is not pocock, obrien-fleming or a number in [0, 0.5]"
            ) from None
    value = float(shape)
    if not 0.0 <= value <= 0.5:
        raise ValueError(f"shape {value!r} is outside [0, 0.5] (0 Pocock, 0.5 O'Brien-Fleming)")
    return value


def checked_looks(looks: Sequence[int]) -> tuple[int, ...]:
    """Looks as a tuple of subject counts n_1 < ... < n_K, n_1 >= 1; ValueError otherwise."""
    try:
        counts = tuple(operator.index(n) for n in looks if not isinstance(n, bool))
    except TypeError:
        raise ValueError(f"looks must be whole numbers of subjects, got {looks!r}") from None
    if len(counts) != len(looks) or not counts:
        raise ValueError(f"looks must be one or more whole numbers of subjects, got {looks!r}")
    if counts[0] < 1:
        raise ValueError(f"the first look must be after at least 1 subject, got {counts[0]}")
    for before, after in pairwise(counts):
        if after <= before:
            raise ValueError(f"looks must increase: {after} follows {before}")
    return counts


def acceptance_levels(p0: float, subjects: int, planned_subjects: int, shape: float) -> np.ndarray:
    """For c = 0..subjects, the smallest nominal level at which a count of c is acceptable.

    c is acceptable at level a when P(X > c) <= Phi(Phi^-1(a) / t^delta), X ~ Bin(n, p0),
    t = n / N; that is when a >= Phi(t^delta * Phi^-1(P(X > c))). Decreasing in c; 0 at c = n.
    """
    tails = _scipy_stats().binom.sf(np.arange(subjects + 1), subjects, p0)
    scale = (subjects / planned_subjects) ** shape
    return np.array([_level_for_tail(float(tail), scale) for tail in tails])


def _level_for_tail(tail: float, scale: float) -> float:
    if tail <= 0.0:
        return 0.0
    if tail >= 1.0:
        return 1.0
    return _STANDARD_NORMAL.cdf(scale * _STANDARD_NORMAL.inv_cdf(tail))


def boundary_at_level(
    p0: float, level: float, looks: Sequence[int], shape: str | float = POCOCK
) -> Boundary:
    """The member of the repeated-significance family at nominal level ``level``."""
    _check_open_unit("p0", p0)
    _check_open_unit("level", level)
    looks = checked_looks(looks)
    levels = _levels_by_look(p0, looks, parse_shape(shape))
    boundary = _boundary(looks, _acceptable_at(levels, level), level)
    return _with_crossing(boundary, p0)


def toxicity_boundary(
    p0: float, alpha: float, looks: Sequence[int], shape: str | float = POCOCK
) -> Boundary:
    """The repeated-significance boundary with the largest exact crossing probability under
    p0 that does not exceed ``alpha`` (clinfun ``toxbdry``'s ``hi.bdry``)."""
    _check_open_unit("p0", p0)
    _check_open_unit("alpha", alpha)
    return _toxicity_boundary(p0, alpha, checked_looks(looks), shape)


@lru_cache(maxsize=256)  # each trial of a sponsor's template asks for the same one (~20 ms)
def _toxicity_boundary(p0: float, alpha: float, looks: tuple[int, ...],
                       shape: str | float) -> Boundary:
    levels = _levels_by_look(p0, looks, parse_shape(shape))
    candidates = _candidate_levels(levels)

    def within_alpha(level: float) -> bool:
        acceptable = _acceptable_at(levels, level)
        return math.fsum(_crossing_by_look(looks, acceptable, p0)) <= alpha

    chosen = _last_true(candidates, within_alpha)
    upper = candidates[chosen + 1] if chosen + 1 < len(candidates) else 1.0
    boundary = _boundary(looks, _acceptable_at(levels, candidates[chosen]),
                         (candidates[chosen] + upper) / 2)
    return _with_crossing(boundary, p0)


def _levels_by_look(p0: float, looks: tuple[int, ...], shape: float) -> list[np.ndarray]:
    return [acceptance_levels(p0, subjects, looks[-1], shape) for subjects in looks]


def _candidate_levels(levels: list[np.ndarray]) -> list[float]:
    """One level per member of the family, ascending: 0 and every distinct level in (0, 1)
    at which some count becomes acceptable. Each member holds from its level to the next."""
    inside = {float(v) for per_look in levels for v in per_look if 0.0 < v < 1.0}
    return [0.0, *sorted(inside)]


def _acceptable_at(levels: list[np.ndarray], level: float) -> tuple[int, ...]:
    """r_k(level): the smallest count acceptable at ``level``, look by look."""
    return tuple(int(np.argmax(per_look <= level)) for per_look in levels)


def _last_true(ordered: list[float], holds: Callable[[float], bool]) -> int:
    """Index of the last value for which ``holds`` is true; ``holds`` is true for the first
    value and, once false, stays false."""
    low, high = 0, len(ordered)
    while high - low > 1:
        middle = (low + high) // 2
        if holds(ordered[middle]):
            low = middle
        else:
            high = middle
    return low


def _boundary(looks: tuple[int, ...], acceptable: tuple[int, ...], level: float | None) -> Boundary:
    stop_at = tuple(
        None if largest >= subjects else largest + 1
        for subjects, largest in zip(looks, acceptable, strict=True)
    )
    return Boundary(looks, stop_at, nominal_level=level)


def _with_crossing(boundary: Boundary, p0: float) -> Boundary:
    crossing = math.fsum(_crossing_by_look(boundary.looks, boundary.acceptable, p0))
    return Boundary(boundary.looks, boundary.stop_at, boundary.nominal_level, crossing)


def bayesian_boundary(
    rate: float, probability: float, prior_a: float, prior_b: float, looks: Sequence[int]
) -> Boundary:
    """Stop at the smallest count x at which Beta(prior_a + x, prior_b + m - x) puts more
    than ``probability`` above ``rate``, with m subjects evaluated (Thall, Simon, Estey)."""
    _check_open_unit("rate", rate)
    _check_open_unit("probability", probability)
    for name, value in (("prior_a", prior_a), ("prior_b", prior_b)):
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    return _bayesian_boundary(rate, probability, prior_a, prior_b, checked_looks(looks))


@lru_cache(maxsize=256)  # each trial of a sponsor's template asks for the same one (~4 ms)
def _bayesian_boundary(rate: float, probability: float, prior_a: float, prior_b: float,
                       looks: tuple[int, ...]) -> Boundary:
    stop_at = tuple(_bayesian_stop_at(rate, probability, prior_a, prior_b, m) for m in looks)
    return Boundary(looks, stop_at)


@lru_cache(maxsize=4096)  # a bayesian rule's alerts ask again and again for few values
def posterior_probability_above(
    rate: float, subjects: int, count: int, prior_a: float, prior_b: float
) -> float:
    """P(true rate > ``rate``) under the Beta(prior_a + count, prior_b + subjects - count)
    posterior."""
    return float(_scipy_stats().beta.sf(rate, prior_a + count, prior_b + subjects - count))


def _bayesian_stop_at(
    rate: float, probability: float, prior_a: float, prior_b: float, subjects: int
) -> int | None:
    counts = np.arange(subjects + 1)
    tails = _scipy_stats().beta.sf(rate, prior_a + counts, prior_b + subjects - counts)
    above = tails > probability
    return int(np.argmax(above)) if above.any() else None


def operating_characteristics(boundary: Boundary, rate: float) -> OperatingCharacteristics:
    """Exact probability of crossing at any look, of stopping before the last look, and the
    expected number of subjects, when the true event rate is ``rate``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    crossing = _crossing_by_look(boundary.looks, boundary.acceptable, rate)
    cross = math.fsum(crossing)
    expected = math.fsum(n * c for n, c in zip(boundary.looks, crossing, strict=True))
    expected += boundary.planned_subjects * (1.0 - cross)
    return OperatingCharacteristics(
        rate=rate,
        cross_probability=cross,
        early_stop_probability=math.fsum(crossing[:-1]),
        expected_subjects=expected,
        cross_probability_by_look=tuple(crossing),
    )


def _crossing_by_look(
    looks: tuple[int, ...], acceptable: tuple[int, ...], rate: float
) -> list[float]:
    """P(first crossing at look k), by recursion over P(count = c, not crossed yet)."""
    if rate < _NEGLIGIBLE_RATE:  # scipy's binomial overflows near 1e-307; 0 is as good
        rate = 0.0
    not_crossed = np.ones(1)
    evaluated = 0
    crossing = []
    for subjects, largest in zip(looks, acceptable, strict=True):
        cohort = subjects - evaluated
        cohort_counts = _scipy_stats().binom.pmf(np.arange(cohort + 1), cohort, rate)
        counts = np.convolve(not_crossed, cohort_counts)
        crossing.append(math.fsum(counts[largest + 1:]))
        not_crossed = counts[: largest + 1] if largest >= 0 else np.zeros(1)
        evaluated = subjects
    return crossing


def _check_open_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
