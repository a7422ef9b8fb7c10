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

The numbers all come from the pure engine; this module only arranges them. For a rules
file, `rule_report` shows a ``toxicity_boundary`` or ``bayesian`` rule and
`observed_counts` the path a replayed log took. The command ``safety-monitor rules
boundaries`` (`add_parser`, `run`) puts them together::

    safety-monitor rules boundaries rules/isc-19-29.yaml --log events.jsonl --format png
    safety-monitor rules boundaries --p0 0.1 --p1 0.3 --alpha 0.1 --looks 1-20 --shape pocock
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from monitor.engine import boundary_kinds, stats
from monitor.engine.rules import TrialRules, parse_rules
from monitor.engine.state import TrialState
from monitor.engine.stats import Boundary, OperatingCharacteristics
from monitor.engine.trials import Trials
from monitor.replay import open_log, parse_as_of, read_lines, replay
from monitor.rules_loader import load_rules_dir
from monitor.settings import Settings

if TYPE_CHECKING:  # matplotlib loads when a chart is drawn, not with the command line
    from matplotlib.figure import Figure

TOXICITY_BOUNDARY = "toxicity_boundary"
BAYESIAN = "bayesian"
DESIGN_RULE_ID = "design"
FORMATS = ("table", "json", "png")


@dataclass(frozen=True)
class BoundaryReport:
    """One rule's boundary with its operating characteristics, ready to show.

    ``operating_characteristics`` maps a label ("p0", "p1") to the characteristics at that
    rate; ``observed`` holds (subjects evaluated, subjects with the event so far) pairs,
    known as of ``as_of``; ``trial`` is the trial of a rule from a rules file.
    """

    rule: str
    kind: str
    boundary: Boundary
    operating_characteristics: Mapping[str, OperatingCharacteristics]
    design: Mapping[str, object] = field(default_factory=dict)
    observed: tuple[tuple[int, int], ...] = ()
    trial: str | None = None
    as_of: str | None = None


def parse_looks(text: str) -> tuple[int, ...]:
    """Looks from ``1-20`` (after every subject), ``5,10,15,20`` (cohorts) or a mix; the
    same syntax as a rule's ``looks:`` (`monitor.engine.boundary_kinds.parse_looks`)."""
    try:
        return boundary_kinds.parse_looks(str(text))
    except ValueError as error:
        raise ValueError(f"looks {text!r}: {error}") from None


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
    if report.trial is not None:
        out["trial"] = report.trial
    if report.observed:
        out["observed"] = [{"subjects": n, "count": count} for n, count in report.observed]
        out["observed_as_of"] = report.as_of
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
        trial = f"{report.trial}: " if report.trial else ""
        console.print(f"{trial}{report.rule} ({report.kind})", highlight=False)
        console.print(_design_text(report), highlight=False)
        console.print(_boundary_table(report))
        if _level_text(report.boundary):
            console.print(_level_text(report.boundary), highlight=False)
        console.print(_characteristics_table(report))
        if report.observed:
            console.print(_observed_text(report), highlight=False)
        console.print()
    return console.file.getvalue()


def _observed_text(report: BoundaryReport) -> str:
    """The count now against the boundary now, and the first look of the path (a look
    after each infusion day, subjects in order of first infusion) that crossed it: from
    there the rule is breached, as the engine says."""
    subjects, count = report.observed[-1]
    stop = report.boundary.stop_count(subjects)
    bar = "no count can stop there" if stop is None else f"stop at {stop} there"
    as_of = f" as of {report.as_of}" if report.as_of else ""
    text = f"observed{as_of}: {count} of {subjects} subjects with the event ({bar})"
    crossed = [(n, c) for n, c in report.observed if report.boundary.is_crossed(n, c)]
    if not crossed:
        return f"{text}; not crossed at any look"
    (n, c), looks = crossed[0], _looks_text([n for n, _ in crossed])
    return (f"{text}; CROSSED at {n} subjects ({c} with the event, stop at "
            f"{report.boundary.stop_count(n)}), so the rule is breached; at or past the "
            f"boundary at {looks} subjects (a look after each infusion day, in order of "
            "first infusion)")


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
    from matplotlib.figure import Figure

    reports = _as_list(reports)
    figure = Figure(figsize=(7.5, 3.6 * len(reports)), layout="constrained")
    for axes, report in zip(figure.subplots(len(reports), 1, squeeze=False)[:, 0], reports,
                            strict=True):
        _draw(axes, report)
    return figure


def _draw(axes, report: BoundaryReport) -> None:  # noqa: ANN001 - matplotlib Axes
    from matplotlib.ticker import MaxNLocator

    looks = list(report.boundary.looks)
    stops = [math.nan if s is None else s for s in report.boundary.stop_at]
    top = max([s for s in stops if not math.isnan(s)] + [c for _, c in report.observed] + [1]) + 1
    axes.fill_between(looks, stops, top, step="post", color="tab:red", alpha=0.12,
                      label="stop region")
    axes.step(looks, stops, where="post", color="tab:red", marker="o", markersize=3,
              label="boundary (stop at)", gid="boundary")
    if report.observed:
        _draw_observed(axes, report)
    trial = f"{report.trial}: " if report.trial else ""
    axes.set(xlabel="subjects evaluated", ylabel="subjects with the event",
             title=f"{trial}{report.rule} ({report.kind}): {_design_text(report)}",
             ylim=(0, top),
             xlim=(0, max([looks[-1]] + [n for n, _ in report.observed]) + 0.5))
    axes.title.set_fontsize(8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)


def _draw_observed(axes, report: BoundaryReport) -> None:  # noqa: ANN001 - matplotlib Axes
    subjects = [n for n, _ in report.observed]
    counts = [c for _, c in report.observed]
    label = f"observed as of {report.as_of}" if report.as_of else "observed"
    axes.step(subjects, counts, where="post", color="black", marker=".", label=label,
              gid="observed")
    crossed = [(n, c) for n, c in report.observed if report.boundary.is_crossed(n, c)]
    if crossed:
        axes.plot(*zip(*crossed, strict=True), linestyle="none", marker="X", markersize=9,
                  color="tab:red", label="boundary crossed", gid="crossed")


def write_png(reports: BoundaryReport | Sequence[BoundaryReport], out_path: str | Path) -> Path:
    """Write `boundary_figure` as a PNG; returns the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

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


# --- rules from a file, the observed count from a log ----------------------------------

def rule_report(rule: boundary_kinds.BoundaryRule, trial: str | None = None,
                observed: Sequence[tuple[int, int]] = (), as_of: str | None = None,
                ) -> BoundaryReport:
    """The report of a ``toxicity_boundary`` or ``bayesian`` rule of a rules file."""
    looks = rule.boundary.looks
    if isinstance(rule, boundary_kinds.ToxicityBoundaryRule):
        report = toxicity_report(rule.id, rule.p0, rule.p1, rule.alpha, looks, rule.shape,
                                 observed)
    else:
        report = bayesian_report(rule.id, rule.rate, rule.probability, rule.prior.a,
                                 rule.prior.b, looks, rule.p0, rule.p1, observed)
    return replace(report, trial=trial, as_of=as_of if observed else None)


def boundary_rules(catalog: Mapping[str, TrialRules], rule_id: str | None = None,
                   ) -> list[tuple[str, boundary_kinds.BoundaryRule]]:
    """(trial, rule) for every boundary rule of the catalog, or for the one named."""
    every = [(trial, rule) for trial in sorted(catalog) for rule in catalog[trial].rules]
    found = [(trial, rule) for trial, rule in every
             if isinstance(rule, boundary_kinds.BoundaryRule)]
    names = ", ".join(rule.id for _, rule in found) or "none"
    if rule_id is None:
        if not found:
            raise ValueError(f"no {TOXICITY_BOUNDARY} or {BAYESIAN} rule to show")
        return found
    named = [(trial, rule) for trial, rule in every if rule.id == rule_id]
    if not named:
        raise ValueError(f"no rule '{rule_id}'; the boundary rules are: {names}")
    if not isinstance(named[0][1], boundary_kinds.BoundaryRule):
        raise ValueError(f"rule '{rule_id}' is a {named[0][1].kind} rule; boundaries exist for "
                         f"{TOXICITY_BOUNDARY} and {BAYESIAN} rules: {names}")
    return named


def observed_counts(trial: TrialState, rule_id: str) -> tuple[tuple[int, int], ...]:
    """The path to draw over a boundary, look by look as the engine takes them: subjects
    in order of first infusion, a look after each infusion day, and how many of the
    subjects so far have a matching AE as the trial knows it now. Its last point is the
    engine's: subjects infused so far, the rule's count."""
    return tuple(boundary_kinds.looks(trial.infusion_order, trial.trackers[rule_id].items))


def replay_observed(log: str, as_of: dt.datetime | None, catalog: Mapping[str, TrialRules],
                    ) -> tuple[Trials, str]:
    """Replay ``log`` through the engine with these rules; the trials and the as-of."""
    stream, _raw, _size = open_log(log)
    with stream:
        result = replay(read_lines(stream, log), dict(catalog), as_of)
    return result.trials, result.effective_as_of.isoformat()


# --- the command: safety-monitor rules boundaries -----------------------------------------

DESIGN_OPTIONS = ("p0", "p1", "alpha", "looks", "shape")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``rules boundaries``, under ``safety-monitor rules``."""
    p = subparsers.add_parser(
        "boundaries", help="stopping boundaries and operating characteristics, as a "
        "table, JSON or a chart", description="The boundary table (subjects evaluated -> "
        "stop at >= k) and its operating characteristics for the toxicity_boundary and "
        "bayesian rules of a rules file, or for a design given with --p0 --p1 --alpha "
        "--looks [--shape].")
    p.add_argument("file", nargs="?", metavar="FILE", help="rules file or folder (default: "
                   "MONITOR_RULES_DIR, else ./rules)")
    p.add_argument("--rule", metavar="ID", help="only this rule")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("-o", "--output", metavar="PATH", help="write here instead of standard "
                   "output (png default: TRIAL-boundaries.png or design-boundary.png)")
    p.add_argument("--log", metavar="LOG", help="event log (as for replay) whose observed "
                   "count is drawn and summarised over the boundary")
    p.add_argument("--as-of", metavar="DATE", help="with --log: what was known then")
    design = p.add_argument_group("design mode (no rules file)")
    design.add_argument("--p0", metavar="RATE", help="acceptable event rate")
    design.add_argument("--p1", metavar="RATE", help="unacceptable event rate")
    design.add_argument("--alpha", metavar="PROB", help="crossing probability at p0")
    design.add_argument("--looks", metavar="LOOKS", help="1-20 (after every subject) or "
                        "5,10,15,20 (cohorts)")
    design.add_argument("--shape", metavar="SHAPE", help="pocock (default), obrien-fleming "
                        "or a number in [0, 0.5]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if any(getattr(args, name) is not None for name in DESIGN_OPTIONS):
        reports, default_png = [_design(args)], f"{DESIGN_RULE_ID}-boundary.png"
    else:
        reports = _from_rules(args)
        trials = sorted({report.trial for report in reports})
        default_png = f"{trials[0] if len(trials) == 1 else 'rules'}-boundaries.png"
    _emit(reports, args.format, args.output, default_png)
    return 0


def _design(args: argparse.Namespace) -> BoundaryReport:
    for given, name in ((args.file, "rules FILE"), (args.rule, "--rule"),
                        (args.log, "--log"), (args.as_of, "--as-of")):
        if given is not None:
            raise ValueError(f"design mode (--p0 --p1 --alpha --looks) takes no {name}")
    missing = [f"--{name}" for name in DESIGN_OPTIONS[:4] if getattr(args, name) is None]
    if missing:
        raise ValueError(f"design mode needs --p0, --p1, --alpha and --looks; missing "
                         f"{', '.join(missing)}")
    return design_from_args(_option_number("--p0", args.p0), _option_number("--p1", args.p1),
                            _option_number("--alpha", args.alpha), args.looks,
                            args.shape if args.shape is not None else "pocock")


def _option_number(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{option}: {text!r} is not a finite number")
    return value


def _from_rules(args: argparse.Namespace) -> list[BoundaryReport]:
    if args.as_of is not None and args.log is None:
        raise ValueError("--as-of goes with --log: the date at which to replay the log")
    catalog = load_catalog(args.file)
    chosen = boundary_rules(catalog, args.rule)
    if args.log is None:
        return [rule_report(rule, trial) for trial, rule in chosen]
    as_of = parse_as_of(args.as_of) if args.as_of is not None else None
    trials, as_of_text = replay_observed(args.log, as_of, catalog)
    for trial_id in sorted({trial_id for trial_id, _ in chosen} - set(trials.trials)):
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[yellow]warning:[/] {args.log} holds no event of {trial_id}: nothing observed")
    return [rule_report(rule, trial_id, observed_counts(trials.trials[trial_id], rule.id)
                        if trial_id in trials.trials else (), as_of_text)
            for trial_id, rule in chosen]


def load_catalog(path: str | None) -> dict[str, TrialRules]:
    """The rules of one file, or of every file of a folder (default: the rules folder)."""
    if path is None:
        return load_rules_dir(Settings().rules_dir)
    source = Path(path)
    if source.is_dir():
        return load_rules_dir(source)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such rules file or folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the rules file: {exc}") from None
    rules = parse_rules(text, source=path)
    return {rules.trial_id: rules}


def _emit(reports: list[BoundaryReport], fmt: str, output: str | None,
          default_png: str) -> None:
    try:
        if fmt == "png":
            print(f"wrote {render(reports, fmt, output or default_png)}")
            return
        text = render(reports, fmt)
        text = text if text.endswith("\n") else text + "\n"
        if output is None:
            sys.stdout.write(text)
        else:
            Path(output).write_text(text, encoding="utf-8")
            print(f"wrote {output}")
    except OSError as exc:
        raise ValueError(f"{output or default_png}: cannot write: "
                         f"{exc.strerror or exc}") from None
