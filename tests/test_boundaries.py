"""`rules boundaries` presentation: looks parsing, the stable JSON, the table, the chart."""

from __future__ import annotations

import json

import pytest

from monitor.boundaries import (
    BoundaryReport,
    bayesian_report,
    boundary_figure,
    design_from_args,
    parse_looks,
    render,
    to_json_obj,
    to_table,
    toxicity_report,
    write_png,
)
from monitor.engine.stats import (
    bayesian_boundary,
    operating_characteristics,
    toxicity_boundary,
)

ISC_STOP_AT = [None, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5]


@pytest.fixture(scope="module")
def isc_design() -> BoundaryReport:
    return design_from_args(p0=0.1, p1=0.3, alpha=0.1, looks="1-20", shape="pocock")


@pytest.mark.parametrize(("text", "looks"), [
    ("1-20", tuple(range(1, 21))),
    ("5,10,15,20", (5, 10, 15, 20)),
    (" 5, 10 ,15 ", (5, 10, 15)),
    ("1-10,15,20", (*range(1, 11), 15, 20)),
    ("20", (20,)),
    ("7-7", (7,)),
])
def test_parse_looks(text, looks):
    assert parse_looks(text) == looks


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("  ", "empty"),
    ("20-1", "runs backwards"),
    ("0-5", "at least 1 subject"),
    ("a,b", "'a' is not a whole number or a range"),
    ("1-", "'1-' is not a whole number or a range"),
    ("-3", "'-3' is not a whole number"),
    ("5,5", "must increase: 5 follows 5"),
    ("10,5", "must increase: 5 follows 10"),
    ("1-10,8", "must increase: 8 follows 10"),
    ("2.5,5", "'2.5' is not a whole number"),
])
def test_parse_looks_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_looks(text)


def test_design_json_has_the_stable_shape(isc_design):
    obj = json.loads(render(isc_design, "json"))
    assert set(obj) >= {"rule", "kind", "boundary", "operating_characteristics", "design"}
    assert (obj["rule"], obj["kind"]) == ("design", "toxicity_boundary")
    assert obj["boundary"] == [{"subjects": n, "stop_at": s}
                               for n, s in zip(range(1, 21), ISC_STOP_AT, strict=True)]
    assert set(obj["operating_characteristics"]) == {"p0", "p1"}
    for label, rate in (("p0", 0.1), ("p1", 0.3)):
        oc = obj["operating_characteristics"][label]
        assert set(oc) == {"rate", "cross_probability", "early_stop_probability",
                           "expected_subjects"}
        assert oc["rate"] == rate
    assert obj["design"]["looks"] == list(range(1, 21))
    assert (obj["design"]["shape"], obj["design"]["shape_name"]) == (0.0, "pocock")


def test_design_json_numbers_are_the_engines(isc_design):
    obj = to_json_obj(isc_design)
    boundary = toxicity_boundary(0.1, 0.1, range(1, 21), 0.0)
    for label, rate in (("p0", 0.1), ("p1", 0.3)):
        oc = operating_characteristics(boundary, rate)
        assert obj["operating_characteristics"][label] == {
            "rate": rate, "cross_probability": oc.cross_probability,
            "early_stop_probability": oc.early_stop_probability,
            "expected_subjects": oc.expected_subjects}
    assert obj["design"]["cross_probability_p0"] == boundary.cross_probability_p0 <= 0.1
    assert obj["operating_characteristics"]["p0"]["cross_probability"] == pytest.approx(0.0906,
                                                                                        abs=1e-4)


def test_one_rule_is_an_object_several_are_a_list(isc_design):
    bayes = bayesian_report("tox-bayes", 0.3, 0.9, 1, 1, range(1, 21), p0=0.1, p1=0.3)
    assert isinstance(json.loads(render([isc_design], "json")), dict)
    both = json.loads(render([isc_design, bayes], "json"))
    assert [o["rule"] for o in both] == ["design", "tox-bayes"]
    assert both[1]["kind"] == "bayesian"
    assert [b["stop_at"] for b in both[1]["boundary"]] == list(
        bayesian_boundary(0.3, 0.9, 1, 1, range(1, 21)).stop_at)


def test_bayesian_report_without_p0_p1_shows_its_own_rate():
    report = bayesian_report("b", 0.3, 0.9, 1, 1, [5, 10])
    assert list(to_json_obj(report)["operating_characteristics"]) == ["rate"]
    assert report.operating_characteristics["rate"].rate == 0.3


def test_design_shapes_and_cohorts():
    report = design_from_args(0.1, 0.3, 0.1, "5,10,15,20", "obrien-fleming")
    assert report.boundary == toxicity_boundary(0.1, 0.1, [5, 10, 15, 20], 0.5)
    assert to_json_obj(report)["design"]["shape_name"] == "obrien-fleming"
    numeric = design_from_args(0.1, 0.3, 0.1, [5, 10, 15, 20], 0.2)
    assert to_json_obj(numeric)["design"]["shape_name"] is None


@pytest.mark.parametrize(("p0", "p1"), [(0.3, 0.1), (0.2, 0.2), (0.1, 1.0)])
def test_p1_must_be_above_p0(p0, p1):
    with pytest.raises(ValueError, match="p1"):
        design_from_args(p0, p1, 0.1, "1-20")


def test_table_reads_like_a_charter(isc_design):
    text = to_table(isc_design)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in text.splitlines() if line.count("│") == 3}
    assert rows == {"1": "cannot stop", "2-3": "2", "4-8": "3", "9-14": "4", "15-20": "5"}
    assert "p0 0.1, p1 0.3, alpha 0.1, shape pocock, looks 1-20" in text
    assert "0.091" in text and "0.809" in text and "10.9" in text


def test_figure_draws_the_boundary_and_the_observed_count(isc_design):
    observed = ((1, 0), (2, 1), (3, 1), (4, 2), (5, 3), (6, 3))
    report = toxicity_report("related-grade3", 0.1, 0.3, 0.1, range(1, 21), "pocock",
                             observed=observed)
    axes = boundary_figure([isc_design, report]).axes
    assert len(axes) == 2
    lines = {line.get_gid(): line for line in axes[1].get_lines()}
    boundary_y = [None if y != y else int(y) for y in lines["boundary"].get_ydata()]
    assert boundary_y == ISC_STOP_AT
    assert list(lines["observed"].get_ydata()) == [c for _, c in observed]
    crossed = lines["crossed"]
    assert list(zip(crossed.get_xdata(), crossed.get_ydata(), strict=True)) == [(5, 3), (6, 3)]
    assert "observed" not in {line.get_gid() for line in axes[0].get_lines()}


def test_png_is_written(tmp_path, isc_design):
    path = render([isc_design], "png", tmp_path / "boundary.png")
    data = (tmp_path / "boundary.png").read_bytes()
    assert path == str(tmp_path / "boundary.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert write_png(isc_design, tmp_path / "again.png").stat().st_size > 10_000


@pytest.mark.parametrize(("fmt", "out", "message"), [
    ("png", None, "output file"), ("csv", None, "unknown format 'csv'")])
def test_render_refuses(fmt, out, message, isc_design):
    with pytest.raises(ValueError, match=message):
        render(isc_design, fmt, out)


def test_nothing_to_render():
    with pytest.raises(ValueError, match="no boundaries"):
        render([], "table")
