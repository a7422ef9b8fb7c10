"""Stopping boundaries (monitor.engine.stats) against independent computations.

References used here, none of which shares code with the module under test:

* clinfun's published output: the rendered examples of ``toxbdry`` in clinfun's reference
  page (veseshan/clinfun, reference/toxbdry.md; clinfun 1.1.x), rounded as R prints them.
* A literal port of clinfun's R source (cran/clinfun 1.1.5, R/toxbdry.R: ``getBoundary``
  with priority "null", and ``bdrycross.prob``), including R's ``qbinom`` fuzz and its
  search budget, with binomial terms from ``math.comb``.
* Brute force over all 2^N outcome sequences of N subjects.
* A scan of the nominal level through the family's formula, evaluated as R would.
* For Bayesian boundaries, the Beta tail from the binomial identity (integer priors) and
  from numerical integration of the density (other priors).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from functools import cache
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special

from monitor.engine import stats
from monitor.engine.stats import (
    Boundary,
    bayesian_boundary,
    boundary_at_level,
    operating_characteristics,
    parse_shape,
    posterior_probability_above,
    toxicity_boundary,
)

FAST = settings(max_examples=40, deadline=None)

# --- independent references ---------------------------------------------------------------


def dbinom(x: int, n: int, p: float) -> float:
    return math.comb(n, x) * p**x * (1 - p) ** (n - x) if 0 <= x <= n else 0.0


def pbinom(x: int, n: int, p: float) -> float:
    return math.fsum(dbinom(j, n, p) for j in range(min(x, n) + 1)) if x >= 0 else 0.0


def r_seq(start: int, stop: int) -> range:
    """R's ``start:stop``, which counts down when start > stop."""
    return range(start, stop + 1) if start <= stop else range(start, stop - 1, -1)


@cache
def _cdf(n: int, p: float) -> tuple[float, ...]:
    return tuple(itertools.accumulate(dbinom(x, n, p) for x in range(n + 1)))


def r_qbinom(q: float, n: int, p: float) -> int:
    """R's qbinom: the smallest y with pbinom(y) >= q * (1 - 64 * DBL_EPSILON)."""
    return min(bisect_left(_cdf(n, p), q * (1 - 64 * np.finfo(float).eps)), n)


def family_member(p0: float, level: float, looks: list[int], delta: float) -> tuple[int, ...]:
    """r_k(a) as clinfun writes it: qbinom(1 - pnorm(qnorm(a) / (n / N)^delta), n, p0)."""
    return tuple(
        r_qbinom(1 - special.ndtr(special.ndtri(level) / (n / looks[-1]) ** delta), n, p0)
        for n in looks
    )


def clinfun_bdrycross(n: list[int], r: list[int], p: float) -> tuple[float, float, float]:
    """clinfun's bdrycross.prob for one rate, line by line: (pcross, pstop, ess)."""
    dn = [b - a for a, b in pairwise([0, *n])]
    pcur = [dbinom(j, dn[0], p) for j in range(r[0] + 1)]
    pstop = 1 - pbinom(r[0], dn[0], p)
    ess = n[0] * pstop
    for i in range(1, len(n)):
        ll = r[i - 1] + 1
        pstop0 = 0.0
        for j in r_seq(r[i] - r[i - 1], min(dn[i], r[i])):
            assert ll >= 1, "R would index pcur[0, ] here"
            pstop0 += pcur[ll - 1] * (1 - pbinom(j, dn[i], p))
            ll -= 1
        pstop += pstop0
        ess += n[i] * pstop0
        pnext = [0.0] * (r[i] + 1)
        for j in range(r[i] + 1):
            for k in r_seq(max(0, j - dn[i]), min(j, r[i - 1])):
                pnext[j] += pcur[k] * dbinom(j - k, dn[i], p)
        pcur = pnext
    ess += n[-1] * (1 - pstop)
    return pstop, pstop - pstop0, ess


def clinfun_boundaries(p_lo: float, n: list[int], c_p0: float, delta: float, niter: int = 10):
    """clinfun's getBoundary(priorityNull = TRUE), which only looks at the row for pLo.
    Returns (lo.bdry, hi.bdry, converged)."""
    def member(alpha):
        return list(family_member(p_lo, alpha, n, delta))

    def cross(r):
        return clinfun_bdrycross(n, r, p_lo)[0]

    alpha0, alpha1 = c_p0 / len(n), c_p0
    r0, r1 = member(alpha0), member(alpha1)
    cross0, cross1 = cross(r0), cross(r1)
    while cross1 < c_p0:  # as in R, r0 is not updated here
        alpha0, cross0 = alpha1, cross1
        alpha1 *= 1.4
        r1 = member(alpha1)
        cross1 = cross(r1)
    iteration = 0
    while sum(a - b for a, b in zip(r0, r1, strict=True)) > 1 and iteration <= niter:
        iteration += 1
        if alpha1 - alpha0 > 0.01:
            alpha = (alpha1 + alpha0) / 2
        else:
            alpha = alpha0 + (alpha1 - alpha0) * (c_p0 - cross0) / (cross1 - cross0)
        r = member(alpha)
        if cross(r) < c_p0:
            alpha0, r0, cross0 = alpha, r, cross(r)
        else:
            alpha1, r1, cross1 = alpha, r, cross(r)
    return r1, r0, sum(a - b for a, b in zip(r0, r1, strict=True)) <= 1


def brute_force(looks: tuple[int, ...], stop_at: tuple[int | None, ...], rate: float):
    """(cross, early stop, expected subjects, cross by look) over all 2^N sequences."""
    planned = looks[-1]
    paths = np.array(list(itertools.product((0, 1), repeat=planned)), dtype=np.int64)
    events = paths.sum(axis=1)
    weights = rate**events * (1 - rate) ** (planned - events)
    counts = paths.cumsum(axis=1)
    first_cross = np.full(len(paths), -1)
    for k in reversed(range(len(looks))):
        if stop_at[k] is not None:
            first_cross[counts[:, looks[k] - 1] >= stop_at[k]] = k
    by_look = [math.fsum(weights[first_cross == k]) for k in range(len(looks))]
    subjects = np.where(first_cross >= 0, np.array(looks)[first_cross], planned)
    return sum(by_look), sum(by_look[:-1]), math.fsum(weights * subjects), by_look


def beta_tail_integer(rate: float, a: int, b: int) -> float:
    """P(Beta(a, b) > rate) = P(Binomial(a + b - 1, rate) <= a - 1) for whole a, b."""
    return pbinom(a - 1, a + b - 1, rate)


def expand_printed(printed: str, looks: list[int]) -> tuple[int, ...]:
    """clinfun prints a boundary on looks one subject apart as ``r/n`` at the last n with
    that r; expand it back to one r per look."""
    acceptable: list[int] = []
    for item in printed.split():
        value, last = (int(x) for x in item.split("/"))
        acceptable.extend([value] * (last - looks[0] - len(acceptable) + 1))
    assert len(acceptable) == len(looks)
    return tuple(acceptable)


def from_acceptable(looks: list[int], acceptable: tuple[int, ...]) -> Boundary:
    stop_at = (None if r >= n else r + 1 for n, r in zip(looks, acceptable, strict=True))
    return Boundary(tuple(looks), tuple(stop_at))


def no_later_than(stop_at: tuple[int | None, ...]) -> tuple[float, ...]:
    return tuple(math.inf if s is None else s for s in stop_at)


# --- clinfun's published examples -----------------------------------------------------------

CONTINUOUS_2_30 = list(range(2, 31))
CONTINUOUS_2_25 = list(range(2, 26))
PUBLISHED = {
    # toxbdry(0.2, 0.35, c(20,40,60,75))
    "cohorts": dict(
        p0=0.2, alpha=0.1, looks=[20, 40, 60, 75], grid=[0.20, 0.23, 0.26, 0.29, 0.32, 0.35],
        lo=(7, 12, 17, 20), hi=(7, 12, 17, 21),
        lo_oc=([0.101, 0.247, 0.456, 0.672, 0.838, 0.935], [0.079, 0.188, 0.354, 0.548, 0.727,
               0.859], [72.0, 68.1, 62.1, 54.7, 47.0, 39.9]),
        hi_oc=([0.088, 0.214, 0.406, 0.619, 0.797, 0.911], [0.079, 0.188, 0.354, 0.548, 0.727,
               0.859], [72.0, 68.1, 62.1, 54.7, 47.0, 39.9])),
    # toxbdry(0.2, 0.3, c(20,40,60,75), cP0=0.15, cP1=0.8)
    "cohorts cP0 0.15": dict(
        p0=0.2, alpha=0.15, looks=[20, 40, 60, 75], grid=[0.20, 0.22, 0.24, 0.26, 0.28, 0.30],
        lo=(6, 12, 16, 20), hi=(7, 12, 16, 20),
        lo_oc=([0.152, 0.253, 0.381, 0.522, 0.659, 0.777], [0.140, 0.229, 0.342, 0.469, 0.598,
               0.715], [69.1, 65.7, 61.4, 56.5, 51.2, 45.9]),
        hi_oc=([0.117, 0.213, 0.341, 0.487, 0.632, 0.758], [0.103, 0.186, 0.297, 0.427, 0.562,
               0.688], [71.6, 69.0, 65.4, 61.0, 56.1, 51.0])),
    # toxbdry(0.1, 0.3, 2:30)
    "continuous": dict(
        p0=0.1, alpha=0.1, looks=CONTINUOUS_2_30, grid=[0.10, 0.14, 0.18, 0.22, 0.26, 0.30],
        lo=expand_printed("1/3 2/8 3/13 4/20 5/26 6/30", CONTINUOUS_2_30),
        hi=expand_printed("1/3 2/8 3/13 4/19 5/26 6/30", CONTINUOUS_2_30),
        lo_oc=([0.100, 0.250, 0.448, 0.644, 0.799, 0.901], [0.099, 0.245, 0.437, 0.631, 0.786,
               0.891], [28.1, 25.7, 22.4, 18.8, 15.5, 12.6]),
        hi_oc=([0.097, 0.245, 0.441, 0.638, 0.795, 0.898], [0.096, 0.239, 0.430, 0.624, 0.781,
               0.888], [28.1, 25.8, 22.5, 19.0, 15.6, 12.7])),
    # toxbdry(0.1, 0.3, 2:25, priority="alt"): only its characteristics are checked here
    "continuous, priority alt": dict(
        p0=None, alpha=None, looks=CONTINUOUS_2_25, grid=[0.10, 0.14, 0.18, 0.22, 0.26, 0.30],
        lo=expand_printed("1/4 2/10 3/16 4/23 5/25", CONTINUOUS_2_25),
        hi=expand_printed("1/4 2/10 3/16 4/22 5/25", CONTINUOUS_2_25),
        lo_oc=([0.146, 0.312, 0.504, 0.679, 0.813, 0.902], [0.145, 0.310, 0.499, 0.673, 0.807,
               0.897], [22.8, 20.5, 17.8, 15.0, 12.5, 10.3]),
        hi_oc=([0.140, 0.300, 0.488, 0.663, 0.800, 0.893], [0.139, 0.296, 0.480, 0.652, 0.790,
               0.885], [22.8, 20.5, 17.8, 15.1, 12.5, 10.3])),
}


@pytest.mark.parametrize("name", [n for n, ex in PUBLISHED.items() if ex["p0"] is not None])
def test_boundary_is_clinfuns_published_high_boundary(name):
    example = PUBLISHED[name]
    boundary = toxicity_boundary(example["p0"], example["alpha"], example["looks"], "pocock")
    assert boundary.acceptable == example["hi"]


@pytest.mark.parametrize("which", ["lo", "hi"])
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_characteristics_match_clinfuns_published_table(name, which):
    example = PUBLISHED[name]
    boundary = from_acceptable(example["looks"], example[which])
    crosses, stops, expected = example[f"{which}_oc"]
    for rate, cross, stop, subjects in zip(example["grid"], crosses, stops, expected, strict=True):
        oc = operating_characteristics(boundary, rate)
        assert oc.cross_probability == pytest.approx(cross, abs=5e-4 + 1e-12)
        assert oc.early_stop_probability == pytest.approx(stop, abs=5e-4 + 1e-12)
        assert oc.expected_subjects == pytest.approx(subjects, abs=0.05 + 1e-9)


# --- the literal port of clinfun's source ---------------------------------------------------

CLINFUN_CONVERGES = [
    (0.1, 0.1, list(range(1, 21)), 0.0),
    (0.1, 0.1, list(range(1, 21)), 0.5),
    (0.2, 0.1, [5, 10, 15, 20, 25, 30, 35, 40], 0.25),
    (0.05, 0.05, [10, 20, 30, 40], 0.1),
    (0.33, 0.2, [3, 6, 9, 12], 0.5),
]


@pytest.mark.parametrize(("p0", "alpha", "looks", "delta"), CLINFUN_CONVERGES)
def test_agrees_with_clinfun_source_where_its_search_converges(p0, alpha, looks, delta):
    _, high, converged = clinfun_boundaries(p0, looks, alpha, delta)
    assert converged
    boundary = toxicity_boundary(p0, alpha, looks, delta)
    assert boundary.acceptable == tuple(high)
    for rate in (p0, p0 + 0.2):
        cross, stop, ess = clinfun_bdrycross(looks, list(boundary.acceptable), rate)
        oc = operating_characteristics(boundary, rate)
        assert oc.cross_probability == pytest.approx(cross, abs=1e-12)
        assert oc.early_stop_probability == pytest.approx(stop, abs=1e-12)
        assert oc.expected_subjects == pytest.approx(ess, abs=1e-9)


def test_where_clinfuns_search_runs_out_the_exact_choice_is_closer_to_alpha():
    low, high, converged = clinfun_boundaries(0.1, [3, 6, 9, 12], 0.05, 0.0)
    assert not converged and sum(h - lo for h, lo in zip(high, low, strict=True)) > 1
    boundary = toxicity_boundary(0.1, 0.05, [3, 6, 9, 12], "pocock")
    clinfun_cross = clinfun_bdrycross([3, 6, 9, 12], high, 0.1)[0]
    assert clinfun_cross < boundary.cross_probability_p0 <= 0.05


# --- brute force over every path -------------------------------------------------------------


@st.composite
def boundaries(draw, most_subjects: int = 10):
    looks = tuple(sorted(draw(st.sets(st.integers(1, most_subjects), min_size=1))))
    stop_at = tuple(draw(st.none() | st.integers(0, n)) for n in looks)
    return Boundary(looks, stop_at)


@FAST
@given(boundaries(), st.floats(0.0, 1.0))
def test_characteristics_equal_brute_force_over_all_paths(boundary, rate):
    cross, early, expected, by_look = brute_force(boundary.looks, boundary.stop_at, rate)
    oc = operating_characteristics(boundary, rate)
    assert oc.cross_probability == pytest.approx(cross, abs=1e-12)
    assert oc.early_stop_probability == pytest.approx(early, abs=1e-12)
    assert oc.expected_subjects == pytest.approx(expected, abs=1e-10)
    assert oc.cross_probability_by_look == pytest.approx(by_look, abs=1e-12)


def test_isc_19_29_design():
    """p0 0.10, p1 0.30, alpha 0.10, Pocock, a look after every subject up to 20."""
    boundary = toxicity_boundary(0.1, 0.1, range(1, 21), "pocock")
    assert boundary.stop_at == (None, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5)
    null, alternative = (operating_characteristics(boundary, p) for p in (0.1, 0.3))
    assert boundary.cross_probability_p0 == pytest.approx(null.cross_probability, abs=1e-15)
    assert (null.cross_probability, null.early_stop_probability, null.expected_subjects) == (
        pytest.approx(0.0906, abs=5e-5), pytest.approx(0.0855, abs=5e-5),
        pytest.approx(18.9982, abs=5e-5))
    assert (alternative.cross_probability, alternative.early_stop_probability,
            alternative.expected_subjects) == (
        pytest.approx(0.8088, abs=5e-5), pytest.approx(0.7803, abs=5e-5),
        pytest.approx(10.9347, abs=5e-5))


# --- the choice within the family: a scan of the nominal level -------------------------------

SCAN_LEVELS = sorted(set(np.geomspace(1e-6, 0.6, 4000)) | set(np.linspace(1e-3, 0.6, 2000)))


@pytest.mark.parametrize(("p0", "alpha", "looks", "delta"), [
    (0.1, 0.1, list(range(1, 21)), 0.0),
    (0.1, 0.1, list(range(1, 21)), 0.5),
    (0.25, 0.05, [4, 8, 12, 16, 20, 24], 0.2),
    (0.1, 0.05, [3, 6, 9, 12], 0.0),
])
def test_boundary_is_the_best_member_a_level_scan_finds(p0, alpha, looks, delta):
    members = {family_member(p0, level, looks, delta) for level in SCAN_LEVELS}
    cross = {r: clinfun_bdrycross(looks, list(r), p0)[0] for r in members}
    feasible = [r for r in members if cross[r] <= alpha]
    best = max(feasible, key=cross.get)
    boundary = toxicity_boundary(p0, alpha, looks, delta)
    assert boundary.acceptable == best
    assert all(min(a - b for a, b in zip(r, best, strict=True)) >= 0 for r in feasible)
    assert family_member(p0, boundary.nominal_level, looks, delta) == best


# --- properties --------------------------------------------------------------------------------

designs = st.fixed_dictionaries({
    "p0": st.floats(0.02, 0.5),
    "looks": st.sets(st.integers(1, 10), min_size=1).map(sorted),
    "shape": st.floats(0.0, 0.5),
})


@FAST
@given(designs, st.floats(0.01, 0.3))
def test_boundary_respects_alpha_and_the_next_member_does_not(design, alpha):
    boundary = toxicity_boundary(design["p0"], alpha, design["looks"], design["shape"])
    cross = brute_force(boundary.looks, boundary.stop_at, design["p0"])[0]
    assert cross <= alpha + 1e-12
    assert boundary.cross_probability_p0 == pytest.approx(cross, abs=1e-12)
    same = boundary_at_level(design["p0"], boundary.nominal_level, design["looks"],
                             design["shape"])
    assert same.stop_at == boundary.stop_at
    for level in np.geomspace(boundary.nominal_level, 0.999, 300):
        member = family_member(design["p0"], level, design["looks"], design["shape"])
        if member != boundary.acceptable:
            stricter = from_acceptable(design["looks"], member)
            assert brute_force(stricter.looks, stricter.stop_at, design["p0"])[0] > alpha
            break


@FAST
@given(designs, st.floats(0.01, 0.3), st.floats(0.01, 0.3))
def test_a_larger_alpha_never_raises_the_boundary(design, alpha, other):
    lower, higher = sorted((alpha, other))
    strict = toxicity_boundary(design["p0"], lower, design["looks"], design["shape"])
    loose = toxicity_boundary(design["p0"], higher, design["looks"], design["shape"])
    pairs = zip(no_later_than(strict.stop_at), no_later_than(loose.stop_at), strict=True)
    assert all(a >= b for a, b in pairs)
    assert loose.cross_probability_p0 >= strict.cross_probability_p0


@FAST
@given(st.floats(0.02, 0.5), st.floats(0.01, 0.3), st.sets(st.integers(1, 40), min_size=1))
def test_pocock_boundary_never_decreases_as_subjects_accrue(p0, alpha, looks):
    acceptable = toxicity_boundary(p0, alpha, sorted(looks), "pocock").acceptable
    assert all(a <= b for a, b in pairwise(acceptable))


@FAST
@given(boundaries(most_subjects=25), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_a_higher_rate_crosses_more_often_and_sooner(boundary, rate, other):
    low, high = sorted((rate, other))
    safer, worse = (operating_characteristics(boundary, p) for p in (low, high))
    assert safer.cross_probability <= worse.cross_probability + 1e-12
    assert safer.expected_subjects >= worse.expected_subjects - 1e-9


def test_obrien_fleming_is_slower_to_stop_early_than_pocock():
    pocock = toxicity_boundary(0.1, 0.1, range(1, 21), "pocock")
    obf = toxicity_boundary(0.1, 0.1, range(1, 21), "obrien-fleming")
    assert no_later_than(obf.stop_at)[:5] > no_later_than(pocock.stop_at)[:5]
    assert (operating_characteristics(obf, 0.1).expected_subjects
            > operating_characteristics(pocock, 0.1).expected_subjects)


# --- Bayesian boundary --------------------------------------------------------------------------


def test_bayesian_boundary_by_hand():
    """Uniform prior, stop when P(rate > 0.3) > 0.9. One event in one subject: Beta(2, 1),
    tail 1 - 0.3^2 = 0.91. One in two: Beta(2, 2), tail 0.784; two in two: 0.973."""
    boundary = bayesian_boundary(0.3, 0.9, 1, 1, [1, 2])
    assert boundary.stop_at == (1, 2)
    assert posterior_probability_above(0.3, 2, 1, 1, 1) == pytest.approx(0.784, abs=1e-12)


@pytest.mark.parametrize(("rate", "probability", "a", "b"), [
    (0.3, 0.9, 1, 1), (0.2, 0.8, 1, 4), (0.1, 0.95, 2, 18), (0.33, 0.7, 3, 7)])
def test_bayesian_boundary_is_the_smallest_count_past_the_probability(rate, probability, a, b):
    boundary = bayesian_boundary(rate, probability, a, b, range(1, 31))
    for m, stop in zip(boundary.looks, boundary.stop_at, strict=True):
        tails = [beta_tail_integer(rate, a + x, b + m - x) for x in range(m + 1)]
        expected = next((x for x, tail in enumerate(tails) if tail > probability), None)
        assert stop == expected


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.5), (0.6, 1.4)])
def test_bayesian_boundary_with_a_fractional_prior(a, b):
    def tail(m, x):
        density = lambda t: t ** (a + x - 1) * (1 - t) ** (b + m - x - 1)  # noqa: E731
        return integrate.quad(density, 0.25, 1)[0] / special.beta(a + x, b + m - x)

    boundary = bayesian_boundary(0.25, 0.85, a, b, range(1, 16))
    for m, stop in zip(boundary.looks, boundary.stop_at, strict=True):
        expected = next((x for x in range(m + 1) if tail(m, x) > 0.85), None)
        assert stop == expected


@FAST
@given(st.floats(0.05, 0.6), st.floats(0.5, 0.99), st.floats(0.2, 5), st.floats(0.2, 5))
def test_bayesian_boundary_never_decreases_and_a_surer_rule_stops_later(rate, prob, a, b):
    acceptable = bayesian_boundary(rate, prob, a, b, range(1, 26)).acceptable
    assert all(x <= y for x, y in pairwise(acceptable))
    surer = bayesian_boundary(rate, min(prob + 0.05, 0.999), a, b, range(1, 26))
    assert all(x >= y for x, y in zip(surer.acceptable, acceptable, strict=True))


def test_bayesian_characteristics_equal_brute_force_even_when_the_prior_alone_stops():
    for boundary in (bayesian_boundary(0.3, 0.9, 1, 1, range(1, 11)),
                     bayesian_boundary(0.2, 0.6, 4, 1, [2, 5, 8])):
        cross, early, expected, _ = brute_force(boundary.looks, boundary.stop_at, 0.15)
        oc = operating_characteristics(boundary, 0.15)
        assert (oc.cross_probability, oc.early_stop_probability, oc.expected_subjects) == (
            pytest.approx(cross, abs=1e-12), pytest.approx(early, abs=1e-12),
            pytest.approx(expected, abs=1e-10))
    assert bayesian_boundary(0.2, 0.6, 4, 1, [2, 5, 8]).stop_at[0] == 0


# --- shapes, inputs, lookups -----------------------------------------------------------------


@pytest.mark.parametrize(("given_shape", "delta"), [
    ("pocock", 0.0), ("Pocock", 0.0), ("obrien-fleming", 0.5), ("O'Brien-Fleming", 0.5),
    ("obf", 0.5), ("0.2", 0.2), (0.25, 0.25), (0, 0.0), ("0.5", 0.5)])
def test_parse_shape(given_shape, delta):
    assert parse_shape(given_shape) == delta


@pytest.mark.parametrize("bad", ["haybittle", "0.6", -0.1, "nan", True, ""])
def test_parse_shape_rejects(bad):
    with pytest.raises(ValueError, match="shape"):
        parse_shape(bad)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: toxicity_boundary(0.0, 0.1, [5, 10]), "p0"),
    (lambda: toxicity_boundary(0.1, 1.0, [5, 10]), "alpha"),
    (lambda: toxicity_boundary(0.1, 0.1, [10, 5]), "increase"),
    (lambda: toxicity_boundary(0.1, 0.1, [0, 5]), "at least 1"),
    (lambda: toxicity_boundary(0.1, 0.1, []), "one or more"),
    (lambda: toxicity_boundary(0.1, 0.1, [2.5, 5]), "whole numbers"),
    (lambda: bayesian_boundary(0.3, 0.9, 0, 1, [5]), "prior_a"),
    (lambda: operating_characteristics(Boundary((5,), (3,)), 1.5), "rate"),
    (lambda: Boundary((5, 10), (6, None)), "stop_at 6"),
    (lambda: Boundary((5, 10), (3,)), "1 stop_at values for 2 looks"),
])
def test_inputs_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(("subjects", "count", "stop", "crossed"), [
    (0, 5, None, False), (4, 4, None, False), (5, 2, 3, False), (5, 3, 3, True),
    (9, 3, 3, True), (10, 3, None, False), (15, 5, 5, True), (40, 4, 5, False)])
def test_stop_count_uses_the_latest_look(subjects, count, stop, crossed):
    boundary = Boundary((5, 10, 15), (3, None, 5))
    assert boundary.stop_count(subjects) == stop
    assert boundary.is_crossed(subjects, count) is crossed


def test_a_toxicity_boundary_is_computed_once_per_design() -> None:
    """Every trial of a sponsor's template asks for the same boundary: the second ask
    is the first answer (a frozen value), whatever sequence type gives the looks."""
    first = stats.toxicity_boundary(0.15, 0.1, [5, 10, 15, 20])
    assert stats.toxicity_boundary(0.15, 0.1, (5, 10, 15, 20)) is first
    computed = stats._toxicity_boundary.__wrapped__(0.15, 0.1, (5, 10, 15, 20), stats.POCOCK)
    assert computed == first and computed is not first
    with pytest.raises(ValueError):
        stats.toxicity_boundary(1.5, 0.1, [5, 10])


def test_a_bayesian_boundary_is_computed_once_per_design() -> None:
    first = stats.bayesian_boundary(0.3, 0.9, 1, 1, [5, 10, 15, 20])
    assert stats.bayesian_boundary(0.3, 0.9, 1, 1, (5, 10, 15, 20)) is first
    computed = stats._bayesian_boundary.__wrapped__(0.3, 0.9, 1, 1, (5, 10, 15, 20))
    assert computed == first and computed is not first
    with pytest.raises(ValueError, match="prior_a"):
        stats.bayesian_boundary(0.3, 0.9, 0, 1, [5, 10])
