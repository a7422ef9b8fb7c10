"""``safety-monitor``: the command line. Thin: parse arguments, build `Settings`, call
the module that does the work, turn a user's mistake into one clear line and an exit
status (0 done, 1 input or broker could not be reached, 2 usage, settings or rules
error)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
from pydantic import ValidationError
from rich.console import Console

from .cli_email import add_email_command, add_send_email_options, replay_outbox
from .engine.rules import RulesError
from .replay import (
    LogUnreadable,
    Unavailable,
    open_log,
    parse_as_of,
    read_lines,
    replaying_once,
)
from .rules_loader import load_rules_dir, rule_files
from .settings import Settings, settings_problems
from .shards import replay_log

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
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            err.print(f"[red]error:[/] {exc}")
            return EXIT_USAGE
        err.print("[red]settings error:[/]\n" + "\n".join(f"  {line}" for line in
                                                       settings_problems(exc)))
        return EXIT_USAGE
    except (UsageError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    except RulesError as exc:
        err.print("[red]rules error:[/]\n" + "\n".join(f"  {p}" for p in exc.problems))
        return EXIT_USAGE
    except Unavailable as exc:  # a log, a broker, the demo's worker
        err.print(f"[red]error:[/] {exc}")
        return EXIT_UNREADABLE
    except BrokenPipeError:
        raise  # output cut short (| head): Python's own handling
    except OSError as exc:  # a file or folder this host will not give us: it says which
        err.print(f"[red]error:[/] {exc}")
        return EXIT_UNREADABLE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safety-monitor", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(sub)
    _add_worker(sub)
    _add_publish(sub)
    _add_replay(sub)
    _add_rules(sub)
    add_email_command(sub)
    return parser


# --- demo -------------------------------------------------------------------------

SAMPLE_LOG = Path(__file__).resolve().parent.parent / "examples" / "isc-19-29" / "events.jsonl"


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on embedded defaults, fed the sample "
                       "ISC.19.29 log", description="Start a local broker (unless "
                       "MONITOR_BROKER is set), a local mailbox that keeps each e-mail as an "
                       ".eml file (unless MONITOR_SMTP_HOST is set) and the worker; publish "
                       "the log; print where to look. Ctrl-C stops everything.")
    p.add_argument("--log", default=str(SAMPLE_LOG), help="event log to feed (default: the "
                   "sample ISC.19.29 log)")
    p.add_argument("--rules", metavar="DIR", help="rules folder (MONITOR_RULES_DIR)")
    p.add_argument("--web-port", type=int, help="the worker's web port (MONITOR_WEB_PORT)")
    p.add_argument("--exit-when-done", action="store_true", help="stop once the log is "
                   "processed and the e-mails are out, instead of running until Ctrl-C")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    settings = settings_from(args)
    load_rules_dir(settings.rules_dir)  # a bad rules file stops here, with its message
    log = Path(args.log)
    if not log.is_file():
        raise LogUnreadable(f"{log}: no such log")
    return demo(settings, log, args.exit_when_done)


def _rules_dir(value: str | None) -> Path:
    return Path(value) if value else Settings().rules_dir


# --- worker and publish -----------------------------------------------------------

def _settings_help() -> str:
    lines = ["settings (environment variables):"]
    for name, info in Settings.model_fields.items():
        default = "unset" if info.default is None else info.default
        about = f": {info.description}" if info.description else ""
        lines.append(f"  MONITOR_{name.upper():<26} default {default}{about}")
    return "\n".join(lines)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run the stream worker", epilog=_settings_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Consume safety.events, apply the stopping rules, keep the "
                       "state in changelog-backed tables, send alerts; serve /status, "
                       "/metrics, /healthz and /readyz. Without MONITOR_BROKER it starts an "
                       "embedded local broker.")
    p.add_argument("--broker", help="kafka://host:port (MONITOR_BROKER)")
    p.add_argument("--rules", metavar="DIR", help="rules folder (MONITOR_RULES_DIR)")
    p.add_argument("--web-port", type=int, help="web port (MONITOR_WEB_PORT)")
    p.add_argument("--state-dir", help="local table store (MONITOR_STATE_DIR)")
    p.add_argument("--loglevel", default="warning", type=str.lower,
                   help="faust log level (default warning)",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run_worker)


def settings_from(args: argparse.Namespace, **extra: object) -> Settings:
    """Settings from the environment, overridden by the options a person typed."""
    typed = {"broker": getattr(args, "broker", None), "rules_dir": getattr(args, "rules", None),
             "web_port": getattr(args, "web_port", None),
             "state_dir": getattr(args, "state_dir", None), **extra}
    return Settings(**{k: v for k, v in typed.items() if v is not None})


def run_worker(args: argparse.Namespace) -> int:
    from .runner import run_worker_process

    settings = settings_from(args)
    catalog = load_rules_dir(settings.rules_dir)
    return run_worker_process(settings, catalog, args.loglevel)


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="send a JSON-lines log to the events topic",
                       description="Send every line of a log (gzip or plain, - for stdin) "
                       "to the events topic, keyed by trial_id.")
    p.add_argument("log", help="JSON-lines log, .gz or plain, or - for standard input")
    p.add_argument("--broker", help="kafka://host:port (default MONITOR_BROKER)")
    p.set_defaults(run=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    import asyncio

    from aiokafka.errors import KafkaError

    from .publish import publish
    from .runner import check_broker

    settings = settings_from(args)
    if settings.broker is None:
        raise UsageError("no broker: give --broker kafka://host:port or set MONITOR_BROKER")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    too_large: list[tuple[int, int]] = []
    stream, raw, size = open_log(args.log)
    try:
        with stream:
            check_broker(settings.broker)
            lines = read_lines(stream, args.log)
            sent = asyncio.run(publish(settings.broker, settings.events_topic,
                                       _with_progress(lines, raw, size or 0) if size and
                                       sys.stderr.isatty() else lines, settings.partitions,
                                       too_large=too_large))
    except KafkaError as exc:
        raise Unavailable(f"publishing to {settings.broker}: {exc}") from None
    err.print(f"published {sent} events to {settings.events_topic}")
    for number, length in too_large:
        err.print(f"[red]error:[/] line {number} not sent: {length:,} bytes, over the "
                  "broker's message limit (1 MiB); split or shorten it and publish it alone")
    return EXIT_UNREADABLE if too_large else EXIT_OK


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
    p.add_argument("--jobs", type=_jobs, metavar="N", help="processes that share the log's "
                   "trials (default: 2 on two cores or more for a log file of 64 MiB or "
                   "more, else 1); --send-email and --metrics-port replay in one")
    p.add_argument("--metrics-port", type=_port, metavar="PORT", help="serve the replay's "
                   "Prometheus metrics at http://MONITOR_WEB_HOST:PORT/metrics while it runs")
    p.add_argument("--metrics-hold", type=float, default=0, metavar="SECONDS", help="with "
                   "--metrics-port: keep serving this long after the report (Ctrl-C stops)")
    add_send_email_options(p)
    p.set_defaults(run=run_replay)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


MAX_JOBS = 64  # each process reads the whole log: more than cores only slows it down


def _jobs(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_JOBS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (1 to "
                                         f"{MAX_JOBS}; more than this host's cores is slower)")
    return int(text)


def run_replay(args: argparse.Namespace) -> int:
    from .metrics import ReplayExporter

    port, hold = getattr(args, "metrics_port", None), getattr(args, "metrics_hold", 0)
    if hold and port is None:
        print("warning: --metrics-hold has no effect without --metrics-port", file=sys.stderr)
    with ReplayExporter(port, Settings().web_host, hold) as exporter:
        return _replay_and_report(args, exporter)


def _replay_and_report(args: argparse.Namespace, exporter) -> int:  # noqa: ANN001
    as_of = parse_as_of(args.as_of) if args.as_of is not None else None  # "": an error
    catalog = load_rules_dir(_rules_dir(args.rules))
    outbox = replay_outbox(args, catalog)  # None unless --send-email
    # the metrics exporter reads every trial's state: one process holds them all
    jobs = 1 if exporter.port is not None else args.jobs
    with replaying_once():
        result = replay_log(args.log, catalog, as_of, jobs, _progress,
                            on_alert=outbox and outbox.add, trials=outbox and outbox.trials)
    try:
        exporter.record(result, catalog)
        report = result.to_json()
    finally:
        result.close()
    if as_of is None and result.trials.last_recorded_at() is None:
        print(f"warning: {args.log} holds no valid event ({result.read} read, "
              f"{len(result.rejected)} rejected): nothing to report, and as_of shows "
              f"{report['as_of'][:10]} for want of a recorded_at", file=sys.stderr)
    if args.format == "json":
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        from .tables import print_report

        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        print_report(report, console)
    status = outbox.send() if outbox else EXIT_OK
    exporter.linger(Console(stderr=True, highlight=False).print)
    return status


def _progress(lines, raw, size):  # noqa: ANN001, ANN202
    if size and size > 20_000_000 and sys.stderr.isatty():
        return _with_progress(lines, raw, size)
    return lines


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
    from .boundaries import add_parser as add_boundaries_parser

    add_boundaries_parser(rsub)
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
        for severity in ("halt", "pause", "review"):
            unaddressed = [r.id for r in rules.rules if r.severity == severity]
            if unaddressed and not getattr(rules.recipients, severity):
                out.print(f"[yellow]warning:[/] {trial_id}: no recipients.{severity}, so the "
                          f"alerts of {', '.join(unaddressed)} cannot be e-mailed (replay "
                          "and metrics still show them)")
    if not catalog:
        out.print(f"[yellow]warning:[/] {folder} holds no rules files; no trial is watched")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
