"""``safety-monitor``: the command line. Thin: parse arguments, build `Settings`, call
the module that does the work, turn a user's mistake into one clear line and an exit
status (0 done, 1 input could not be read, 2 usage or rules error)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
from rich.console import Console

from .engine.rules import RulesError
from .replay import LogUnreadable, open_log, parse_as_of, read_lines, replay
from .rules_loader import load_rules_dir, rule_files
from .settings import Settings

EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in how the command was called; exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return args.run(args)
    except (UsageError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    except RulesError as exc:
        err.print("[red]rules error:[/]\n" + "\n".join(f"  {p}" for p in exc.problems))
        return EXIT_USAGE
    except LogUnreadable as exc:
        err.print(f"[red]error:[/] {exc}")
        return EXIT_UNREADABLE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safety-monitor", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(sub)
    _add_replay(sub)
    _add_rules(sub)
    return parser


# --- demo -------------------------------------------------------------------------

SAMPLE_LOG = Path(__file__).resolve().parent.parent / "examples" / "isc-19-29" / "events.jsonl"


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on embedded defaults, fed the sample "
                       "ISC.19.29 log")
    p.add_argument("--log", default=str(SAMPLE_LOG), help="event log to feed (default: the "
                   "sample ISC.19.29 log)")
    p.add_argument("--rules", metavar="DIR", help="rules folder (default: MONITOR_RULES_DIR, "
                   "else ./rules)")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    args.as_of, args.format = None, "table"
    return run_replay(args)


def _rules_dir(value: str | None) -> Path:
    return Path(value) if value else Settings().rules_dir


# --- replay -----------------------------------------------------------------------

def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="run an event log through the engine and report",
                       description="Run a JSON-lines event log (gzip or plain, - for stdin) "
                       "through the same engine as the stream, as of a date.")
    p.add_argument("log", help="JSON-lines log, .gz or plain, or - for standard input")
    p.add_argument("--rules", metavar="DIR", help="rules folder (default: MONITOR_RULES_DIR, "
                   "else ./rules)")
    p.add_argument("--as-of", metavar="DATE", help="what the sponsor knew then: ISO date "
                   "(00:00 UTC) or date-time with offset; default: the last recorded_at")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    as_of = parse_as_of(args.as_of) if args.as_of else None
    catalog = load_rules_dir(_rules_dir(args.rules))
    stream, raw, size = open_log(args.log)
    with stream:
        lines = read_lines(stream, args.log)
        if size and size > 20_000_000 and sys.stderr.isatty():
            lines = _with_progress(lines, raw, size)
        result = replay(lines, catalog, as_of)
    report = result.to_json()
    if args.format == "json":
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        from .tables import print_report

        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        print_report(report, console)
    return EXIT_OK


def _with_progress(lines, raw, size):  # noqa: ANN001, ANN202
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("replaying", total=size)
        for count, line in enumerate(lines):
            if count & 0xFFFF == 0:
                bar.update(task, completed=raw.tell())
            yield line


# --- rules ------------------------------------------------------------------------

def _add_rules(sub: argparse._SubParsersAction) -> None:
    rules = sub.add_parser("rules", help="check rules files offline")
    rsub = rules.add_subparsers(title="rules commands", metavar="COMMAND")
    check = rsub.add_parser("check", help="validate every rules file of a folder",
                            description="Validate every YAML rules file; errors name the "
                            "file, the rule and the field.")
    check.add_argument("dir", nargs="?", help="rules folder (default: MONITOR_RULES_DIR, "
                       "else ./rules)")
    check.set_defaults(run=run_rules_check)
    rules.set_defaults(run=lambda _args: (rules.print_help(), EXIT_USAGE)[1])


def run_rules_check(args: argparse.Namespace) -> int:
    folder = _rules_dir(args.dir)
    catalog = load_rules_dir(folder)
    out = Console(highlight=False, soft_wrap=True)
    for path in rule_files(folder):
        out.print(f"[green]ok[/] {path}")
    for trial_id, rules in catalog.items():
        kinds = ", ".join(f"{r.id} ({r.kind}, {r.severity})" for r in rules.rules)
        out.print(f"   {trial_id}: {len(rules.rules)} rules: {kinds}")
    if not catalog:
        out.print(f"[yellow]warning:[/] {folder} holds no rules files; no trial is watched")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
