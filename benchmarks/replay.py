#!/usr/bin/env python3
"""Replay throughput and peak memory against a bare ``orjson.loads`` loop.

    python benchmarks/replay.py                 # >= 1,000,000 events (about 1,120 trials)
    python benchmarks/replay.py --trials 100    # a quick look

Generates a log with examples/generate.py (every trial gets the ISC.19.29 rules, so
every event goes through the rules), then runs, each in a fresh process so that peak
memory is its own: a bare loop of ``orjson.loads`` over the file's lines, and
``replay`` of the same file as ``safety-monitor replay`` runs it (its own number of
processes, or ``--jobs``), interleaved ``--repeat`` times; the best of each counts
(a busy machine slows a run, never speeds it up). Prints events per second, the
ratio, and peak RSS (over several processes, their peaks added up).
Targets (issue #2): replay >= 25% of the bare rate (50% is where we want to be), peak
memory under 1 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bare(path: str) -> dict:
    import orjson

    count, start = 0, time.perf_counter()
    with open(path, "rb") as log:
        for line in log:
            try:  # noqa: SIM105 - contextlib.suppress would slow the baseline down
                orjson.loads(line)
            except orjson.JSONDecodeError:
                pass
            count += 1
    return {"events": count, "seconds": time.perf_counter() - start}


def replayed(path: str, rules: str, jobs: int | None) -> dict:
    from rich.console import Console

    from monitor.replay import replaying_once
    from monitor.rules_loader import load_rules_dir
    from monitor.shards import default_jobs, replay_log
    from monitor.tables import print_report

    catalog = load_rules_dir(Path(rules))
    jobs = default_jobs(path) if jobs is None else jobs
    start = time.perf_counter()
    with replaying_once():  # what `safety-monitor replay` runs
        result = replay_log(path, catalog, jobs=jobs)
    seconds = time.perf_counter() - start
    report_start = time.perf_counter()
    report = result.to_json()
    report_seconds = time.perf_counter() - report_start
    result.close()
    table_start = time.perf_counter()  # the table form, as `replay` prints it to a file
    print_report(report, Console(file=io.StringIO(), width=160))
    table_seconds = time.perf_counter() - table_start
    return {"events": result.read, "seconds": seconds, "alerts": len(result.alerts),
            "report_seconds": report_seconds, "table_seconds": table_seconds, "jobs": jobs}


def measure(kind: str, path: str, rules: str, jobs: int | None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, path, rules, str(jobs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def child(kind: str, path: str, rules: str, jobs: str) -> None:
    figures = bare(path) if kind == "bare" else replayed(path, rules, _jobs(jobs))
    figures["peak_rss_mb"] = peak_rss_mb(figures.get("jobs", 1))
    print(json.dumps(figures))


def peak_rss_mb(processes: int) -> float:
    """This process's peak RSS, plus the largest child's for each other process: an upper
    bound of the processes' peak total (pages they share are counted once per process)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children * (processes - 1)) / 1024


def _jobs(text: str) -> int | None:
    return None if text == "None" else int(text)


def prepare(folder: Path, trials: int) -> tuple[str, str]:
    log = folder / "events.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), "--trials",
                    str(trials), "--out", str(log)], check=True)
    rules = folder / "rules"
    rules.mkdir()
    template = (ROOT / "rules" / "isc-19-29.yaml").read_text()
    for index in range(trials):
        trial_id = "ISC.19.29" if index == 0 else f"SIM.{index:04d}"
        (rules / f"{trial_id}.yaml").write_text(
            template.replace("trial_id: ISC.19.29", f"trial_id: {trial_id}"))
    return str(log), str(rules)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1120, help="20 subjects, ~900 events each")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement")
    parser.add_argument("--jobs", type=int, help="replay's processes (default: replay's own "
                        "choice: 2 on two cores or more, for a log this size)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(f"generating {args.trials} trials ...", flush=True)
        log, rules = prepare(Path(folder), args.trials)
        runs = [(measure("bare", log, rules, None), measure("replay", log, rules, args.jobs))
                for _ in range(args.repeat)]  # interleaved: both see the same machine
    base = max((b for b, _ in runs), key=lambda f: f["events"] / f["seconds"])
    ours = max((r for _, r in runs), key=lambda f: f["events"] / f["seconds"])
    print(f"runs:                {args.repeat} of each, interleaved; the best of each shown")
    base_rate = base["events"] / base["seconds"]
    our_rate = ours["events"] / ours["seconds"]
    print(f"events:              {ours['events']:,} ({ours['alerts']:,} alert transitions)")
    print(f"bare orjson.loads:   {base_rate:,.0f} events/s, peak RSS {base['peak_rss_mb']:,.0f} MB")
    print(f"replay:              {our_rate:,.0f} events/s, peak RSS {ours['peak_rss_mb']:,.0f} MB"
          f" summed over {ours['jobs']} process(es)"
          f" (report built in {ours['report_seconds']:.1f} s,"
          f" its table form printed in {ours['table_seconds']:.1f} s)")
    print(f"ratio:               {our_rate / base_rate:.1%} of the bare parse rate "
          "(target >= 25%, aim 50%)")
    if len(runs) > 1:  # how much the machine moved the figures: each pair ran back to back
        pairs = sorted((r["events"] / r["seconds"]) / (b["events"] / b["seconds"])
                       for b, r in runs)
        print(f"ratio of each pair:  {', '.join(f'{p:.1%}' for p in pairs)} "
              f"(median {statistics.median(pairs):.1%})")


if __name__ == "__main__":
    main()
