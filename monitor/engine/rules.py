"""The rules file of one trial (SPEC section 4): schema and a pure parser.

``parse_rules(text, source)`` checks YAML text and returns a `TrialRules`, or raises
`RulesError` listing every problem, each naming the file, the rule and the field::

    rules/isc-19-29.yaml: rule 'related-sae': threshold: must be >= 1 (got 0)

Reading files is `monitor.rules_loader`'s job; this module does no I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .boundary_kinds import BayesianRule, ToxicityBoundaryRule
from .kinds import ClusterRule, CountRule, DosingWhileHalted, Rule
from .window import WindowLength

Address = Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
RULE_KINDS = (CountRule, ClusterRule, DosingWhileHalted, ToxicityBoundaryRule, BayesianRule)
AnyRule = Annotated[Union[RULE_KINDS], Field(discriminator="kind")]  # noqa: UP007


class RulesError(Exception):
    """A rules file that cannot be used; ``problems`` are one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.source = source
        self.problems = problems


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    anchor: Literal["first_infusion"] = "first_infusion"
    months: int | None = Field(None, ge=1, le=120)
    days: int | None = Field(None, ge=1, le=3650)

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, data: object) -> object:
        """No length given: 12 calendar months (SPEC 3)."""
        if isinstance(data, dict) and data.get("months") is None and data.get("days") is None:
            return {**data, "months": 12}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> Window:
        if self.months is not None and self.days is not None:
            raise ValueError("give 'months' or 'days', not both")
        return self

    @property
    def length(self) -> WindowLength:
        return WindowLength(months=self.months, days=self.days)


class Recipients(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    halt: tuple[Address, ...] = ()
    pause: tuple[Address, ...] = ()
    review: tuple[Address, ...] = ()


class TrialRules(BaseModel):
    """Everything one trial's rules file says."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trial_id: Annotated[str, StringConstraints(min_length=1)]
    title: str = ""
    planned_subjects: int | None = Field(None, ge=1)
    window: Window = Window()
    recipients: Recipients = Recipients()
    rules: tuple[AnyRule, ...] = ()

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        if twice := _used_twice([rule.id for rule in rules]):
            raise ValueError(_twice_message(twice[0]))
        return rules

    def rule(self, rule_id: str) -> Rule:
        return next(r for r in self.rules if r.id == rule_id)


# libyaml's safe loader when PyYAML was built with it: ten times the pure-Python one
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_rules(text: str, source: str = "<rules>") -> TrialRules:
    """Check one rules file's text; raise `RulesError` naming file, rule and field."""
    try:
        doc = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RulesError(source, [f"{source}: {where}not valid YAML: {problem}"]) from None
    if not isinstance(doc, dict):
        raise RulesError(source, [f"{source}: expected a mapping with trial_id, window, "
                                  f"recipients and rules, got {type(doc).__name__}"])
    try:
        return TrialRules.model_validate(doc)
    except ValidationError as exc:
        problems = [_problem(source, doc, e) for e in exc.errors()]
        # pydantic checks the ids only when every rule is valid: say it now, with the rest
        rules = doc.get("rules") if isinstance(doc.get("rules"), list) else []
        ids = [r["id"] for r in rules if isinstance(r, dict) and isinstance(r.get("id"), str)]
        problems += [problem for rule_id in _used_twice(ids)
                     if (problem := f"{source}: rules: {_twice_message(rule_id)}")
                     not in problems]
        raise RulesError(source, problems) from None


def _used_twice(ids: list[str]) -> list[str]:
    """The ids given more than once, each once, in order."""
    seen: set[str] = set()
    twice: dict[str, None] = {}
    for rule_id in ids:
        if rule_id in seen:
            twice[rule_id] = None
        seen.add(rule_id)
    return list(twice)


def _twice_message(rule_id: str) -> str:
    return f"rule id '{rule_id}' is used twice; ids must be unique"


def _problem(source: str, doc: dict, error: dict) -> str:
    loc = list(error["loc"])
    message = _message(error)
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rule_id = _rule_id(doc, loc[1])
        field = [str(p) for p in loc[2:] if str(p) not in _KIND_TAGS]
        where = ".".join(field) or "kind" if "tag" in error["type"] else ".".join(field)
        return f"{source}: rule {rule_id}: {where + ': ' if where else ''}{message}"
    field = ".".join(str(p) for p in loc)
    return f"{source}: {field + ': ' if field else ''}{message}"


_KIND_TAGS = {k.model_fields["kind"].annotation.__args__[0] for k in RULE_KINDS}


def _rule_id(doc: dict, index: int) -> str:
    rules = doc.get("rules")
    raw = rules[index] if isinstance(rules, list) and index < len(rules) else None
    if isinstance(raw, dict) and raw.get("id"):
        return f"'{raw['id']}'"
    return f"#{index + 1}"


def _message(error: dict) -> str:
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        return "unknown field; check its spelling against the rule kind's fields"
    if kind == "missing":
        return "missing (required)"
    if kind == "union_tag_invalid":
        return f"unknown kind {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"missing 'kind'; expected one of {', '.join(sorted(_KIND_TAGS))}"
    bound = {"greater_than_equal": "must be >= {ge}", "less_than_equal": "must be <= {le}",
             "greater_than": "must be > {gt}", "less_than": "must be < {lt}"}.get(kind)
    if bound:
        return f"{bound.format(**ctx)} (got {given!r})"
    if kind == "string_pattern_mismatch":
        return f"{given!r} is not valid here (expected pattern {ctx.get('pattern')})"
    text = error["msg"].removeprefix("Value error, ")
    return f"{text} (got {given!r})" if kind == "literal_error" else text
