"""Stopping boundaries for people and programs: what ``rules boundaries`` shows.

Design mode, for a statistician drafting a charter before any rules file exists::

    report = design_from_args(p0=0.1, p1=0.3, alpha=0.1, looks="1-20", shape="pocock")
    print(render([report], "table"))

Each `BoundaryReport` is one rule: its boundary (`monitor.engine.stats.Boundary`), the
operating characteristics under p0 and p1, the design it came from and, optionally, an
observed cumulative count to draw over the boundary. `render` gives a rich table, the
stable JSON (one object per rule, a list when there are several) or a PNG chart::

    {"rule": "design", "kind": "toxicity_boundary",
     "boundary": [{"subjects": 1, "stop_at": null}, {"subjects": 2, "stop_at": 2}, ...],
     "operating_characteristics": {"p0": {"rate": 0.1, "cross_probability": ...,
                                          "early_stop_probability": ..., "expected_subjects": ...},
                                   "p1": {...}},
     "design": {"p0": 0.1, "p1": 0.3, "alpha": 0.1, "shape": 0.0, "looks": [1, ..., 20], ...}}

The numbers all come from the pure engine; this module only arranges them.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from monitor.engine import stats
from monitor.engine.stats import Boundary, OperatingCharacteristics

TOXICITY_BOUNDARY = "toxicity_boundary"
BAYESIAN = "bayesian"
DESIGN_RULE_ID = "design"
FORMATS = ("table", "json", "png")
_LOOKS_HINT = "give a range like 1-20, a list like 5,10,15,20, or both like 1-10,15,20"


@dataclass(frozen=True)
class BoundaryReport:
    """One rule's boundary with its operating characteristics, ready to show.

    ``operating_characteristics`` maps a label ("p0", "p1") to the characteristics at that
    rate; ``observed`` holds (subjects evaluated, subjects with the event so far) pairs.
    """

    rule: str
    kind: str
    boundary: Boundary
    operating_characteristics: Mapping[str, OperatingCharacteristics]
    design: Mapping[str, object] = field(default_factory=dict)
    observed: tuple[tuple[int, int], ...] = ()


def parse_looks(text: str) -> tuple[int, ...]:
    """Looks from ``1-20`` (after every subject), ``5,10,15,20`` (cohorts) or a mix."""
    parts = [part.strip() for part in str(text).split(",")]
    if not text or not text.strip():
        raise ValueError(f"looks is empty; {_LOOKS_HINT}")
    looks: list[int] = []
    for part in parts:
        looks.extend(_looks_in(part, text))
    try:
        return stats.checked_looks(looks)
    except ValueError as error:
        raise ValueError(f"looks {text!r}: {error}") from None


def _looks_in(part: str, text: str) -> range:
    first, dash, last = part.partition("-")
    if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
        raise ValueError(f"looks {text!r}: {part!r} is not a whole number or a range; "
                         f"{_LOOKS_HINT}")
    start, stop = int(first), int(last) if dash else int(first)
    if stop < start:
        raise ValueError(f"looks {text!r}: the range {part!r} runs backwards")
    return range(start, stop + 1)


def design_from_args(
    p0: float, p1: float, alpha: float, looks: str | Sequence[int], shape: str | float = "pocock"
) -> BoundaryReport:
    """The design-mode report: `toxicity_report` for a rule named ``design``."""
    if isinstance(looks, str):
        looks = parse_looks(looks)
    return toxicity_report(DESIGN_RULE_ID, p0, p1, alpha, looks, shape)


def toxicity_report(
    rule: str, p0: float, p1: float, alpha: float, looks: Sequence[int],
    shape: str | float = "pocock", observed: Sequence[tuple[int, int]] = (),
) -> BoundaryReport:
    """Boundary and operating characteristics of a ``toxicity_boundary`` rule."""
    if not p0 < p1 < 1:
        raise ValueError(f"p1 (the unacceptable rate) must be above p0 and below 1, "
                         f"got p0 {p0!r}, p1 {p1!r}")
    delta = stats.parse_shape(shape)
    boundary = stats.toxicity_boundary(p0, alpha, looks, delta)
    design = {"p0": p0, "p1": p1, "alpha": alpha, "shape": delta,
              "shape_name": _shape_name(delta), "looks": list(boundary.looks),
              "nominal_level": boundary.nominal_level}
    return BoundaryReport(rule, TOXICITY_BOUNDARY, boundary, _characteristics(boundary, p0, p1),
                          design, tuple(observed))


def bayesian_report(
    rule: str, rate: float, probability: float, prior_a: float, prior_b: float,
    looks: Sequence[int], p0: float | None = None, p1: float | None = None,
    observed: Sequence[tuple[int, int]] = (),
) -> BoundaryReport:
    """Boundary of a ``bayesian`` rule; characteristics under p0 and p1 when given, else
    under ``rate`` itself."""
    boundary = stats.bayesian_boundary(rate, probability, prior_a, prior_b, looks)
    design = {"rate": rate, "probability": probability, "prior_a": prior_a,
              "prior_b": prior_b, "looks": list(boundary.looks)}
    if p0 is None and p1 is None:
        characteristics = {"rate": stats.operating_characteristics(boundary, rate)}
    else:
        characteristics = _characteristics(boundary, p0, p1)
    return BoundaryReport(rule, BAYESIAN, boundary, characteristics, design, tuple(observed))


def _characteristics(boundary: Boundary, p0: float | None, p1: float | None) -> dict:
    rates = {"p0": p0, "p1": p1}
    return {label: stats.operating_characteristics(boundary, rate)
            for label, rate in rates.items() if rate is not None}


def _shape_name(delta: float) -> str | None:
    names = {stats.POCOCK: "pocock", stats.OBRIEN_FLEMING: "obrien-fleming"}
    return names.get(delta)


def to_json_obj(report: BoundaryReport) -> dict:
    """The stable JSON object of one rule (keys may be added, never renamed)."""
    boundary = report.boundary
    out = {
        "rule": report.rule,
        "kind": report.kind,
        "boundary": [{"subjects": n, "stop_at": stop}
                     for n, stop in zip(boundary.looks, boundary.stop_at, strict=True)],
        "operating_characteristics": {
            label: _characteristics_obj(oc)
            for label, oc in report.operating_characteristics.items()
        },
        "design": dict(report.design),
    }
    if boundary.cross_probability_p0 is not None:
        out["design"]["cross_probability_p0"] = boundary.cross_probability_p0
    if report.observed:
        out["observed"] = [{"subjects": n, "count": count} for n, count in report.observed]
    return out


def _characteristics_obj(oc: OperatingCharacteristics) -> dict:
    return {"rate": oc.rate, "cross_probability": oc.cross_probability,
            "early_stop_probability": oc.early_stop_probability,
            "expected_subjects": oc.expected_subjects}


def to_json(reports: BoundaryReport | Sequence[BoundaryReport]) -> str:
    """One JSON object for one rule, a list of objects for several."""
    reports = _as_list(reports)
    objs = [to_json_obj(report) for report in reports]
    return json.dumps(objs[0] if len(objs) == 1 else objs, indent=2)


def to_table(reports: BoundaryReport | Sequence[BoundaryReport], width: int = 100) -> str:
    """Plain-text tables for people: the boundary by looks, then its characteristics."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    for report in _as_list(reports):
        console.print(f"{report.rule} ({report.kind})", highlight=False)
        console.print(_design_text(report), highlight=False)
        console.print(_boundary_table(report))
        if _level_text(report.boundary):
            console.print(_level_text(report.boundary), highlight=False)
        console.print(_characteristics_table(report))
        console.print()
    return console.file.getvalue()


def _boundary_table(report: BoundaryReport) -> Table:
    table = Table()
    table.add_column("subjects evaluated", justify="right")
    table.add_column("stop when subjects with the event reach", justify="right")
    for looks, stop in _runs(report.boundary):
        table.add_row(looks, "cannot stop" if stop is None else str(stop))
    return table


def _level_text(boundary: Boundary) -> str | None:
    if boundary.nominal_level is None or boundary.cross_probability_p0 is None:
        return None
    return (f"nominal level {boundary.nominal_level:.4g}; "
            f"exact crossing probability under p0 {boundary.cross_probability_p0:.4f}")


def _characteristics_table(report: BoundaryReport) -> Table:
    table = Table()
    for name in ("", "true rate", "P(cross)", "P(stop early)", "expected subjects"):
        table.add_column(name, justify="right")
    for label, oc in report.operating_characteristics.items():
        table.add_row(label, f"{oc.rate:g}", f"{oc.cross_probability:.3f}",
                      f"{oc.early_stop_probability:.3f}", f"{oc.expected_subjects:.1f}")
    return table


def _design_text(report: BoundaryReport) -> str:
    design = dict(report.design)
    if design.get("shape_name"):
        design["shape"] = design["shape_name"]
    parts = [f"{key} {_number(value)}" for key, value in design.items()
             if key not in {"looks", "shape_name", "nominal_level"} and value is not None]
    return ", ".join([*parts, f"looks {_looks_text(report.boundary.looks)}"])


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _looks_text(looks: Sequence[int]) -> str:
    contiguous = list(looks) == list(range(looks[0], looks[-1] + 1))
    if contiguous and len(looks) > 2:
        return f"{looks[0]}-{looks[-1]}"
    return ",".join(str(n) for n in looks)


def _runs(boundary: Boundary) -> list[tuple[str, int | None]]:
    """Consecutive looks one subject apart with the same stop_at, as ``first-last`` rows."""
    runs: list[list] = []
    for n, stop in zip(boundary.looks, boundary.stop_at, strict=True):
        if runs and runs[-1][2] == stop and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n, stop])
    return [(str(a) if a == b else f"{a}-{b}", stop) for a, b, stop in runs]


def boundary_figure(reports: BoundaryReport | Sequence[BoundaryReport]) -> Figure:
    """The chart a DSMB expects: count that stops against subjects evaluated, one panel per
    rule, with the observed cumulative count drawn over it when there is one."""
    reports = _as_list(reports)
    figure = Figure(figsize=(7.5, 3.6 * len(reports)), layout="constrained")
    for axes, report in zip(figure.subplots(len(reports), 1, squeeze=False)[:, 0], reports,
                            strict=True):
        _draw(axes, report)
    return figure


def _draw(axes, report: BoundaryReport) -> None:  # noqa: ANN001 - matplotlib Axes
    looks = list(report.boundary.looks)
    stops = [math.nan if s is None else s for s in report.boundary.stop_at]
    top = max([s for s in stops if not math.isnan(s)] + [c for _, c in report.observed] + [1]) + 1
    axes.fill_between(looks, stops, top, step="post", color="tab:red", alpha=0.12,
                      label="stop region")
    axes.step(looks, stops, where="post", color="tab:red", marker="o", markersize=3,
              label="boundary (stop at)", gid="boundary")
    if report.observed:
        _draw_observed(axes, report)
    axes.set(xlabel="subjects evaluated", ylabel="subjects with the event",
             title=f"{report.rule} ({report.kind}): {_design_text(report)}", ylim=(0, top),
             xlim=(0, max([looks[-1]] + [n for n, _ in report.observed]) + 0.5))
    axes.title.set_fontsize(8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)


def _draw_observed(axes, report: BoundaryReport) -> None:  # noqa: ANN001 - matplotlib Axes
    subjects = [n for n, _ in report.observed]
    counts = [c for _, c in report.observed]
    axes.step(subjects, counts, where="post", color="black", marker=".", label="observed",
              gid="observed")
    crossed = [(n, c) for n, c in report.observed if report.boundary.is_crossed(n, c)]
    if crossed:
        axes.plot(*zip(*crossed, strict=True), linestyle="none", marker="X", markersize=9,
                  color="tab:red", label="boundary crossed", gid="crossed")


def write_png(reports: BoundaryReport | Sequence[BoundaryReport], out_path: str | Path) -> Path:
    """Write `boundary_figure` as a PNG; returns the path written."""
    path = Path(out_path)
    FigureCanvasAgg(boundary_figure(reports)).print_png(str(path))
    return path


def render(
    reports: BoundaryReport | Sequence[BoundaryReport], fmt: str,
    out_path: str | Path | None = None,
) -> str:
    """``table`` or ``json`` text, or for ``png`` the path of the chart written to ``out_path``."""
    if fmt == "table":
        return to_table(reports)
    if fmt == "json":
        return to_json(reports)
    if fmt == "png":
        if out_path is None:
            raise ValueError("--format png needs an output file")
        return str(write_png(reports, out_path))
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _as_list(reports: BoundaryReport | Sequence[BoundaryReport]) -> list[BoundaryReport]:
    listed = [reports] if isinstance(reports, BoundaryReport) else list(reports)
    if not listed:
        raise ValueError("no boundaries to show")
    return listed
