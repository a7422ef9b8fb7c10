"""Read every ``*.yaml`` / ``*.yml`` rules file of a folder; parsing is the engine's.

Like alertmanager's ``LoadFile`` around ``Load``: this module only reads files and
collects every problem across them, so ``rules check`` reports them all at once.
"""

from __future__ import annotations

from pathlib import Path

from .engine.rules import RulesError, TrialRules, parse_rules


def rule_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_rules_dir(folder: Path) -> dict[str, TrialRules]:
    """trial_id -> rules for every file in ``folder``; `RulesError` lists all problems."""
    if folder.is_file():
        raise RulesError(str(folder), [f"{folder}: is a file; give the folder that holds the "
                                       "rules files (--rules DIR or MONITOR_RULES_DIR)"])
    if not folder.is_dir():
        raise RulesError(str(folder), [f"{folder}: no such rules folder (set --rules DIR or "
                                       "MONITOR_RULES_DIR)"])
    catalog: dict[str, TrialRules] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for path in rule_files(folder):
        try:
            rules = parse_rules(path.read_text(encoding="utf-8"), source=str(path))
        except RulesError as exc:
            problems.extend(exc.problems)
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
            continue
        if rules.trial_id in catalog:
            problems.append(f"{path}: trial_id: '{rules.trial_id}' is already defined in "
                            f"{sources[rules.trial_id]}; one file per trial")
            continue
        catalog[rules.trial_id], sources[rules.trial_id] = rules, str(path)
    if problems:
        raise RulesError(str(folder), problems)
    return catalog
